"""Centered discrepancy of the study sampler against iid uniform and SciPy's Halton.

  python benchmarks/halton_discrepancy.py [--dims=4] [--seeds=20]

Needs SciPy (the test extra). For each trial count n it prints the mean over
seeds of SciPy's centered discrepancy (`qmc.discrepancy(method="CD")`, the
squared form) of our scrambled Halton points, of iid uniform points and of
`scipy.stats.qmc.Halton(scramble=True)`. The last line is
`ratio=<iid / ours at n=64>`: how many times lower ours is than random search.
"""

from absl import app
from absl import flags
import numpy as np
from scipy.stats import qmc

from tuning_playbook.studies import halton

_DIMS = flags.DEFINE_integer("dims", 4, "Search-space dimensions.")
_SEEDS = flags.DEFINE_integer("seeds", 20, "Seeds averaged over.")


def main(argv):
  del argv
  d, seeds = _DIMS.value, range(_SEEDS.value)

  def mean_cd(points):
    return float(np.mean([qmc.discrepancy(points(s), method="CD") for s in seeds]))

  print(f"d={d}, mean over {len(seeds)} seeds of the squared centered discrepancy")
  ratio_64 = None
  for n in (16, 32, 64, 128, 256):
    ours = mean_cd(lambda s: halton.scrambled_halton(range(n), d, s))
    iid = mean_cd(lambda s: np.random.default_rng(s).random((n, d)))
    scipy = mean_cd(lambda s: qmc.Halton(d, scramble=True, seed=s).random(n))
    print(f"n={n:3d} ours={ours:.2e} iid={iid:.2e} scipy_halton={scipy:.2e} "
          f"iid/ours={iid / ours:5.1f} ours/scipy={ours / scipy:.2f}")
    if n == 64:
      ratio_64 = iid / ours
  print(f"ratio={ratio_64:.1f}")


if __name__ == "__main__":
  app.run(main)
