r"""Suggestions of Open-Source Vizier's Gaussian-process designers.

Runs in a process of its own, on the CPU (`suggest_in_subprocess`), so that
the launcher never opens the accelerators its trials train on:

  python -m tuning_playbook.procedures.bayes_designer < request.json

The request: the parameters, each in the unit coordinate of its dimension
("unit", a float in [0, 1] on the dimension's own scale) or an index of its
values ("categorical"), the goal, the designer, a seed, how many to suggest,
and the completed trials (`point` and `value`; a value of null is an
infeasible trial, reported to the designer as infeasible). The reply on
stdout: {"suggestions": [point, ...]}. The same request gives the same reply.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any, Mapping, Sequence

DESIGNERS = ("gp_ucb_pe", "gp_bandit")
# The playbook: "Open-Source Vizier ... supports infeasible trials".
INFEASIBLE_REASON = "diverged, or no finite objective"
INSTALL_HINT = ("Open-Source Vizier is not installed: pip install -e '.[bayes]' "
                "(or pip install 'tuning_playbook[bayes]')")


class DesignerError(RuntimeError):
  """The designer could not run; the message says why."""


def _problem(parameters: Sequence[Mapping[str, Any]], goal: str):
  from vizier import pyvizier as vz  # pylint: disable=g-import-not-at-top
  problem = vz.ProblemStatement()
  root = problem.search_space.root
  for p in parameters:
    if p["kind"] == "categorical":
      root.add_categorical_param(p["name"], [str(i) for i in range(p["size"])])
    else:
      root.add_float_param(p["name"], 0.0, 1.0)
  problem.metric_information.append(vz.MetricInformation(
      name="objective", goal=(vz.ObjectiveMetricGoal.MINIMIZE if goal == "min"
                              else vz.ObjectiveMetricGoal.MAXIMIZE)))
  return problem


def _trial(parameters, point: Mapping[str, Any], value: float | None):
  from vizier import pyvizier as vz  # pylint: disable=g-import-not-at-top
  values = {p["name"]: (str(int(point[p["name"]])) if p["kind"] == "categorical"
                        else min(max(float(point[p["name"]]), 0.0), 1.0))
            for p in parameters}
  trial = vz.Trial(parameters=values)
  if value is None:
    trial.complete(vz.Measurement(), infeasibility_reason=INFEASIBLE_REASON)
  else:
    trial.complete(vz.Measurement(metrics={"objective": float(value)}))
  return trial


def suggest(request: Mapping[str, Any]) -> list[dict[str, Any]]:
  """The designer's next `count` points after the completed trials."""
  import jax  # pylint: disable=g-import-not-at-top
  from vizier import algorithms as vza  # pylint: disable=g-import-not-at-top
  from vizier._src.algorithms.designers import gp_bandit  # pylint: disable=g-import-not-at-top
  from vizier._src.algorithms.designers import gp_ucb_pe  # pylint: disable=g-import-not-at-top
  parameters = request["parameters"]
  problem = _problem(parameters, request["goal"])
  kind = (gp_ucb_pe.VizierGPUCBPEBandit if request["designer"] == "gp_ucb_pe"
          else gp_bandit.VizierGPBandit)
  designer = kind(problem, rng=jax.random.PRNGKey(int(request["seed"])))
  completed = [_trial(parameters, t["point"], t["value"])
               for t in request["completed"]]
  for i, trial in enumerate(completed):
    trial.id = i + 1
  designer.update(vza.CompletedTrials(completed), vza.ActiveTrials())
  out = []
  for suggestion in designer.suggest(int(request["count"])):
    point = {}
    for p in parameters:
      value = suggestion.parameters[p["name"]].value
      point[p["name"]] = (int(value) if p["kind"] == "categorical"
                          else float(value))
    out.append(point)
  return out


def suggest_in_subprocess(request: Mapping[str, Any], timeout_s: float = 1800,
                          environment: Mapping[str, str] | None = None
                          ) -> list[dict[str, Any]]:
  """`suggest` in a CPU-only child process, with `environment` added (a
  compilation cache, say); DesignerError naming the cause."""
  env = {**os.environ, **(environment or {}), "JAX_PLATFORMS": "cpu"}
  try:
    done = subprocess.run(
        [sys.executable, "-m", __name__], input=json.dumps(request), env=env,
        capture_output=True, text=True, timeout=timeout_s, check=False)
  except subprocess.TimeoutExpired:
    raise DesignerError(f"the {request['designer']} designer gave no "
                        f"suggestion in {timeout_s:g} s") from None
  if done.returncode != 0:
    tail = done.stderr.strip().splitlines()[-5:]
    raise DesignerError(f"the {request['designer']} designer failed (exit "
                        f"{done.returncode}): " + "\n".join(tail))
  return json.loads(done.stdout)["suggestions"]


def available() -> str | None:
  """None when Vizier's designers import; otherwise what to install."""
  try:
    import vizier  # pylint: disable=g-import-not-at-top,unused-import
    import equinox  # pylint: disable=g-import-not-at-top,unused-import
  except ImportError:
    return INSTALL_HINT
  return None


def main() -> None:
  request = json.loads(sys.stdin.read())
  suggestions = suggest(request)
  sys.stdout.write(json.dumps({"suggestions": suggestions}))


if __name__ == "__main__":
  main()
