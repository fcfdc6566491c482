"""A hash of integers that is the same on every machine, NumPy and Python version.

Randomness that must be reproducible for years (quasi-random trials, the data
order of a run) is derived from it instead of a library RNG whose streams may
change between releases.
"""

from __future__ import annotations

import numpy as np

_GOLDEN_GAMMA = 0x9E3779B97F4A7C15
_HASH_START = 0x243F6A8885A308D3


def splitmix64(x: np.ndarray) -> np.ndarray:
  """The SplitMix64 output function (Steele, Lea & Flood 2014) on uint64."""
  with np.errstate(over="ignore"):
    z = x + np.uint64(_GOLDEN_GAMMA)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def hash64(*words) -> np.ndarray:
  """Hashes non-negative integers (or arrays of them, broadcast) to uint64."""
  h = np.uint64(_HASH_START)
  for word in words:
    h = splitmix64(h ^ np.asarray(word, dtype=np.uint64))
  return h
