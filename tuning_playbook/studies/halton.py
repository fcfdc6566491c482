"""Seeded, scrambled Halton points: the quasi-random sequence of a study.

Point i of the sequence in d dimensions takes dimension j from the radical
inverse of i in the j-th prime base, with every digit position of every
dimension passed through its own random permutation of the digits (the
random-permutation scramble of Owen, "A randomized Halton algorithm in R",
arXiv:1706.03200). Unlike a fixed shift per prime, this breaks the
correlations between dimensions of large bases, so the first 16-200 points are
already much better spread than independent uniform draws.

Everything random comes from a counter-based SplitMix64 hash owned by this
module, so a point depends only on (seed, index, dimension): the sequence is
identical across processes, machines and library versions, and a study can be
split across workers or extended later without changing earlier points.

  points = halton.scrambled_halton(range(64), num_dims=4, seed=0)
  points.shape  # (64, 4), every value in [0, 1)
"""

from __future__ import annotations

from typing import Iterable

import numpy as np

from tuning_playbook.common.stable_hash import hash64

_MASK64 = (1 << 64) - 1
# Stream tags keep the random numbers of different uses independent.
_STREAM_DIGIT_PERMUTATION = 1
_STREAM_PSEUDO_RANDOM = 2
# Radical inverses are computed on integers of at most 53 bits, so every
# point is an exact integer divided by a power of the base: one correctly
# rounded division, bit-identical everywhere and always < 1.
_MANTISSA_BITS = 53


def _check_seed(seed: int) -> int:
  if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
    raise ValueError(f"seed must be an integer, got {seed!r}")
  if not 0 <= int(seed) <= _MASK64:
    raise ValueError(f"seed must be in [0, 2**64), got {seed}")
  return int(seed)


def _check_indices(indices: Iterable[int]) -> np.ndarray:
  idx = np.asarray(list(indices) if not isinstance(indices, np.ndarray)
                   else indices, dtype=np.int64).reshape(-1)
  if idx.size and idx.min() < 0:
    raise ValueError("point indices must be >= 0")
  return idx


def primes(n: int) -> list[int]:
  """The first n primes."""
  found = []
  candidate = 2
  while len(found) < n:
    if all(candidate % p for p in found if p * p <= candidate):
      found.append(candidate)
    candidate += 1
  return found


def digit_count(base: int) -> int:
  """Digits kept per coordinate: the largest c with base**c <= 2**53."""
  count = 0
  while base ** (count + 1) <= 2 ** _MANTISSA_BITS:
    count += 1
  return count


def digit_permutations(base: int, dim: int, seed: int) -> np.ndarray:
  """One random permutation of range(base) per digit position of `dim`.

  Returns int64[digit_count(base), base]; row k permutes the k-th digit after
  the radix point. Fisher-Yates driven by `hash64`, so the permutations depend
  only on (seed, dim, base).
  """
  seed = _check_seed(seed)
  count = digit_count(base)
  k = np.arange(count, dtype=np.uint64)[:, None]
  t = np.arange(1, base, dtype=np.uint64)[None, :]
  words = hash64(seed, _STREAM_DIGIT_PERMUTATION, dim, base, k, t)
  perms = np.tile(np.arange(base, dtype=np.int64), (count, 1))
  for row in range(count):
    perm = perms[row]
    for t_i in range(base - 1, 0, -1):
      # Uniform integer in [0, t_i] from the top 53 bits, exact in Python ints.
      r = ((int(words[row, t_i - 1]) >> 11) * (t_i + 1)) >> 53
      perm[t_i], perm[r] = perm[r], perm[t_i]
  return perms


def radical_inverse(indices: Iterable[int], base: int,
                    permutations: np.ndarray | None = None) -> np.ndarray:
  """Radical inverse of each index in `base`, digits optionally permuted.

  Without permutations this is the van der Corput sequence: base 2 gives
  0, 1/2, 1/4, 3/4, ... With them, the trailing zero digits are permuted too,
  so every digit position is randomized.
  """
  idx = _check_indices(indices)
  count = digit_count(base)
  numerator = np.zeros_like(idx)
  rest = idx.copy()
  for k in range(count):
    digit = rest % base
    rest //= base
    if permutations is not None:
      digit = permutations[k][digit]
    numerator = numerator * base + digit
  return numerator / float(base ** count)


def scrambled_halton(indices: Iterable[int], num_dims: int, seed: int,
                     scramble: bool = True) -> np.ndarray:
  """Points `indices` of the seeded scrambled Halton sequence.

  Returns float64[len(indices), num_dims] in [0, 1). Point i depends only on
  (seed, i, num_dims' first primes), never on how many points are asked for.
  """
  seed = _check_seed(seed)
  idx = _check_indices(indices)
  out = np.empty((idx.size, num_dims), dtype=np.float64)
  for dim, base in enumerate(primes(num_dims)):
    perms = digit_permutations(base, dim, seed) if scramble else None
    out[:, dim] = radical_inverse(idx, base, perms)
  return out


def pseudo_random(indices: Iterable[int], num_dims: int,
                  seed: int) -> np.ndarray:
  """Independent uniform points from the owned hash; same contract as above."""
  seed = _check_seed(seed)
  idx = _check_indices(indices).astype(np.uint64)
  dims = np.arange(num_dims, dtype=np.uint64)
  words = hash64(seed, _STREAM_PSEUDO_RANDOM, idx[:, None], dims[None, :])
  return (words >> np.uint64(11)).astype(np.float64) * 2.0 ** -53
