"""What to run next: the command each actionable finding suggests.

Commands are derived from the study as it was run: the command line in its
row of the tracking table (`<parent of the study>/studies.csv`, the sweep or
playbook command), else one rebuilt from study.json (config,
config_overrides, seed, number of trials, trainer module). A command that
changes what the trials are writes a new study directory, `<study>_<what>`.

  found = next_steps.attach(study, found, findings.Thresholds())
  found[0].command  # "python -m tuning_playbook.playbook next_round ..."
"""

from __future__ import annotations

import csv
import dataclasses
import math
import os
import shlex
from typing import Any, Callable, Mapping, Sequence

from tuning_playbook.analysis import findings as findings_lib
from tuning_playbook.analysis.findings import Finding
from tuning_playbook.analysis import study_data
from tuning_playbook.studies import commands
from tuning_playbook.studies import study as study_lib
from tuning_playbook.studies import tracking

PLAYBOOK = "tuning_playbook.playbook"


def _tracking_command(study_dir: str) -> list[str] | None:
  """The command of the study's (or its first sub-study's) tracking row."""
  parent = os.path.dirname(os.path.normpath(study_dir)) or "."
  path = os.path.join(parent, tracking.TRACKING_TABLE_FILE)
  if not os.path.exists(path):
    return None
  key = os.path.abspath(study_dir)
  try:
    with open(path, newline="") as f:
      rows = list(csv.DictReader(f))
  except (OSError, csv.Error):
    return None
  for row in rows:
    where = os.path.abspath(row.get("study_dir") or "")
    if (where == key or where.startswith(key + os.sep)) and row.get("command"):
      return shlex.split(row["command"])
  return None


def _rebuilt_command(record: Mapping[str, Any] | None) -> list[str] | None:
  """The sweep command of an ordinary study, from its study.json."""
  if not record or record.get("procedure") or not record.get("config"):
    return None
  return commands.module_argv(
      "tuning_playbook.sweep",
      [f"--config={record['config']}", "--study_dir=<study_dir>",
       f"--num_trials={len(record.get('trials') or [])}",
       f"--seed={record.get('seed', 0)}"],
      overrides=record.get("config_overrides") or {},
      trainer_module=record.get("trainer_module") or commands.DEFAULT_TRAINER,
      run=True)


@dataclasses.dataclass(frozen=True)
class StudyCommands:
  """Builds the commands that follow up on one study."""
  study: study_data.Study
  record: Mapping[str, Any] | None  # study.json, None for a combined study.
  argv: list[str] | None  # The command that ran the study, if known.

  @classmethod
  def of(cls, study: study_data.Study) -> "StudyCommands":
    record = study_lib.read_study_json(study.study_dir)
    argv = _tracking_command(study.study_dir) or _rebuilt_command(record)
    if argv:
      argv = [a.replace("<study_dir>", study.study_dir) for a in argv]
    return cls(study, record, argv)

  def new_dir(self, suffix: str) -> str:
    return f"{os.path.normpath(self.study.study_dir)}_{suffix}"

  def searched(self, key: str) -> bool:
    return any(d.param == key for d in self.study.dimensions.values())

  def rerun(self, *, study_dir: str | None = None,
            num_trials: int | None = None,
            overrides: Mapping[str, Any] | None = None) -> str | None:
    """The study's own command with a new directory, budget or overrides."""
    if not self.argv:
      return None
    argv = list(self.argv)
    def put(flag: str, value: str, required: bool) -> bool:
      for i, arg in enumerate(argv):
        if arg.startswith(flag + "="):
          argv[i] = f"{flag}={value}"
          return True
      if required:
        return False
      argv.insert(len(argv) - (argv[-1] == "--run"), f"{flag}={value}")
      return True
    if study_dir is not None:
      put("--study_dir", study_dir, required=True)
    if num_trials is not None and not put("--num_trials", str(num_trials),
                                          required=True):
      return None
    for key, value in (overrides or {}).items():
      put(f"--config.{key}", commands.format_override(value), required=False)
    return commands.command_line(argv)

  def playbook(self, procedure: str, suffix: str, *flags: str) -> str | None:
    """A playbook procedure starting from the best trial of this study."""
    if not self.study.config_path or self.record is None:
      return None
    return commands.command_line(commands.module_argv(
        PLAYBOOK, [procedure, f"--config={self.study.config_path}",
                   f"--study_dir={self.new_dir(suffix)}",
                   f"--from_study={self.study.study_dir}", *flags],
        trainer_module=(self.record.get("trainer_module")
                        or commands.DEFAULT_TRAINER), run=True))


def _round_up(value: float) -> int:
  """Up to two significant digits: 1234 -> 1300."""
  if value <= 0:
    return 1
  scale = 10 ** max(0, math.floor(math.log10(value)) - 1)
  return int(math.ceil(value / scale) * scale)


def trials_needed(good: int, num_trials: int, miss_probability: float) -> int:
  """Trials for which a study of the same space misses the good region (a
  share good / num_trials of it) with at most `miss_probability`."""
  share = good / num_trials
  if share >= 1:
    return num_trials
  return max(num_trials + 1,
             math.ceil(math.log(miss_probability) / math.log(1 - share)))


Rule = Callable[[StudyCommands, Finding, Mapping[str, Finding],
                 findings_lib.Thresholds], tuple[str | None, dict[str, Any]]]


def _near_boundary(c, f, _, __):
  if f.details.get("suggested_bound") is None:
    return None, {}  # At a natural limit: nothing to widen.
  if f.details.get("infeasible_beyond"):
    return _instability(c, f, _, __)
  return c.playbook("next_round", "widened", "--widen"), {}


def _train_longer(c, f, _, thresholds):
  factor = thresholds.round2_steps_factor
  return c.playbook("next_round", f"x{factor:g}", f"--steps_factor={factor:g}"), {
      "steps_factor": factor}


def _train_shorter(c, f, _, thresholds):
  latest = max(int(t.best_step) for t in c.study.feasible_trials()
               if t.best_step is not None)
  current = max(f.details.get("total_train_steps") or [latest])
  steps = min(current, _round_up(thresholds.early_stop_margin * latest))
  if c.searched("max_train_steps"):
    return None, {}
  return c.rerun(study_dir=c.new_dir(f"steps{steps}"),
                 overrides={"max_train_steps": steps}), {
                     "suggested_max_train_steps": steps}


def _instability(c, f, _, __):
  return c.playbook("instability_check", "instability"), {}


def _more_trials(c, f, _, thresholds):
  n = trials_needed(f.details["good_trials"], f.details["num_trials"],
                    thresholds.miss_probability)
  return c.rerun(num_trials=n), {"suggested_num_trials": n}


def _clip(c, f, found, _):
  suggestion = found.get("clipping_threshold")
  if suggestion is None or c.searched("grad_clip_norm"):
    return None, {}
  value = float(f"{suggestion.details['suggested_threshold']:.3g}")
  return c.rerun(study_dir=c.new_dir("clip"),
                 overrides={"grad_clip_norm": value}), {
                     "suggested_grad_clip_norm": value}


RULES: dict[str, Rule] = {
    "near_boundary": _near_boundary,
    "best_step_late": _train_longer,
    "still_improving": _train_longer,
    "best_step_early": _train_shorter,
    "gradient_outliers": _instability,
    "loss_spikes": _instability,
    "instability_edge": _instability,
    "not_enough_trials": _more_trials,
    "aggressive_clipping": _clip,
}


def _actionable(f: Finding) -> bool:
  if f.kind == "infeasible":
    return f.severity == findings_lib.WARNING and bool(f.details.get("regions"))
  return f.kind in RULES


def attach(study: study_data.Study, found: Sequence[Finding],
           thresholds: findings_lib.Thresholds) -> list[Finding]:
  """`found` with the command (and what it changes, in details) of every
  actionable finding that has none yet."""
  commands = StudyCommands.of(study)
  by_kind = {f.kind: f for f in found}
  out = []
  for f in found:
    if f.command is None and _actionable(f):
      rule = RULES.get(f.kind, _instability)
      command, extra = rule(commands, f, by_kind, thresholds)
      if command is not None:
        f = dataclasses.replace(f, command=command,
                                details={**f.details, **extra})
    out.append(f)
  return out



def with_flags(command: str, flags: Mapping[str, str]) -> str:
  """`command` with each `--flag=value` replaced, or added before `--run`."""
  argv = shlex.split(command)
  for flag, value in flags.items():
    for i, arg in enumerate(argv):
      if arg.startswith(flag + "="):
        argv[i] = f"{flag}={value}"
        break
    else:
      argv.insert(len(argv) - (argv[-1] == "--run"), f"{flag}={value}")
  return shlex.join(argv)
