r"""Runs one procedure of the tuning playbook as a study.

  python -m tuning_playbook.playbook PROCEDURE --config=configs/mnist1d_cnn.py \
      --study_dir=runs/cnn_PROCEDURE [--from_study=S] [--run --parallel=K]

PROCEDURE is a module of tuning_playbook/procedures (batch_size, lr_sweep,
seed_variance, ...), which plans the trials and analyses them; its own flags
(`--learning_rates`, `--num_seeds`, ...) are listed by
`python -m tuning_playbook.playbook PROCEDURE --helpfull`. The result is an
ordinary study: `study.json` (with the procedure's name and parameters),
`trials/`, `results.csv` and a row of the tracking table, so relaunching the
same command resumes (a changed one is refused with the differences listed),
and `python -m tuning_playbook.analyze --study_dir=D` adds the procedure's
section and findings to the report.

  --from_study=S     start from the best trial of the finished study S: its
                     overrides apply under the `--config.*` flags given here.
  --config.<key>=v   overrides applied to every trial (keys the procedure
                     sets itself win; a conflicting value is refused).

Bad input (an unknown procedure, a missing or unusable --from_study, a bad
procedure flag) exits with status 2 before any trial runs.
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping, Sequence

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from tuning_playbook.common import cli
from tuning_playbook.common import json_records
from tuning_playbook import procedures
from tuning_playbook.procedures import from_study
from tuning_playbook.studies import commands
from tuning_playbook.studies import search_space as search_space_lib
from tuning_playbook.studies import study as study_lib
from tuning_playbook.studies import study_flags
from tuning_playbook.studies import study_launch

flags.adopt_module_key_flags(study_flags)

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file the procedure starts from.", lock_config=True)
_STUDY_DIR = flags.DEFINE_string("study_dir", None, "Directory of the study.")
_FROM_STUDY = flags.DEFINE_string(
    "from_study", None, "A finished study whose best trial the procedure "
    "starts from.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the study's sampler.",
                             lower_bound=0)

_DEFINE = {"int": flags.DEFINE_integer, "float": flags.DEFINE_float,
           "floats": flags.DEFINE_list, "string": flags.DEFINE_string,
           "bool": flags.DEFINE_bool}


def _procedure_name(argv: Sequence[str]) -> str | None:
  """The first argument that is not a flag."""
  return next((a for a in argv[1:] if not a.startswith("-")), None)


def _define_arguments(arguments: Sequence[procedures.Argument]) -> None:
  for argument in arguments:
    default = argument.default
    if argument.kind == "floats" and default is not None:
      default = [repr(float(v)) for v in default]
    _DEFINE[argument.kind](argument.name, default, argument.help)


def parse_flags(argv: list[str]) -> list[str]:
  """Defines the named procedure's flags, then parses all of them."""
  name = _procedure_name(argv)
  if name is None:
    cli.fail("name a procedure: python -m tuning_playbook.playbook PROCEDURE "
             f"--config=... --study_dir=...; allowed: "
             f"{', '.join(procedures.available())}")
  try:
    module = procedures.load(name)
  except procedures.ProcedureError as e:
    cli.fail(str(e))
  _define_arguments(module.ARGUMENTS)
  return cli.parse_flags(argv)


def _argument_values(arguments: Sequence[procedures.Argument]
                     ) -> dict[str, Any]:
  values = {}
  for argument in arguments:
    value = flags.FLAGS[argument.name].value
    if argument.kind == "floats" and value is not None:
      try:
        value = [float(v) for v in value]
      except ValueError:
        cli.fail(f"--{argument.name}={','.join(value)}: expected a comma-"
                 "separated list of numbers")
    values[argument.name] = value
  return values


def _argument_flags(arguments: Sequence[procedures.Argument],
                    values: Mapping[str, Any]) -> list[str]:
  """The procedure flags that reproduce `values` (unset ones left out)."""
  out = []
  for argument in arguments:
    value = values[argument.name]
    if value is None:
      continue
    if argument.kind == "bool":
      out.append(f"--{'' if value else 'no'}{argument.name}")
    elif argument.kind == "floats":
      out.append(f"--{argument.name}={','.join(repr(v) for v in value)}")
    else:
      out.append(f"--{argument.name}={value}")
  return out


def playbook_command(name: str, config_path: str, study_dir: str,
                     source_dir: str | None, seed: int,
                     argument_flags: Sequence[str],
                     overrides: Mapping[str, Any], trainer_module: str) -> str:
  """The command line that reproduces (and runs) the procedure's study."""
  flags = [name, f"--config={config_path}", f"--study_dir={study_dir}"]
  if source_dir:
    flags.append(f"--from_study={source_dir}")
  flags += [f"--seed={seed}", *argument_flags]
  return commands.command_line(commands.module_argv(
      "tuning_playbook.playbook", flags, overrides=overrides,
      trainer_module=trainer_module, run=True))


def _same(a: Any, b: Any) -> bool:
  return json.dumps(a, default=str) == json.dumps(b, default=str)


def overrides_passed_on(name: str, space: search_space_lib.SearchSpace,
                        base: Mapping[str, Any], user: Mapping[str, Any]
                        ) -> dict[str, Any]:
  """The overrides every trial gets besides the procedure's own.

  `base` (the --from_study trial's) lie under `user` (the --config.* flags).
  Keys the procedure sets are left to it; a --config.* flag that contradicts
  a value the procedure fixes is refused.
  """
  for key, value in user.items():
    if key in space.fixed and not _same(space.fixed[key], value):
      raise procedures.ProcedureError(
          f"--config.{key}={commands.format_override(value)} conflicts with "
          f"{name}, which sets {key}={space.fixed[key]!r}; drop the flag")
  procedure_keys = set(space.config_keys())
  merged = {**base, **user}
  return {k: v for k, v in merged.items() if k not in procedure_keys}


def _warn_of_another_batch_size(source: from_study.Source,
                                user: Mapping[str, Any]) -> None:
  """Warns when --config.batch_size leaves the size the source was tuned at."""
  key = search_space_lib.BATCH_SIZE_KEY
  tuned = (source.study.best_trial().config or {}).get(key)
  if key in user and tuned is not None and user[key] != tuned:
    logging.warning(
        "--config.%s=%s: the hyperparameters of --from_study=%s were tuned at "
        "%s=%s, and %s.", key, user[key], source.study_dir, key, tuned,
        search_space_lib.BATCH_SIZE_REASON)


def _batch_size(args: Mapping[str, Any],
                options: study_launch.LaunchOptions) -> int:
  """Trials an adaptive plan proposes at a time: --batch, or enough to fill
  every study worker's population."""
  if args.get("batch"):
    return int(args["batch"])
  workers = options.parallel or 1
  if options.run and options.isolation != "process":
    workers = max(1, len(study_launch.worker_environments(options)))
  return workers * max(1, options.vectorize or 1)


def _resolve(name: str, module, config, args: Mapping[str, Any],
             user: Mapping[str, Any]):
  """(config under --from_study's best trial, the plan, the overrides every
  trial gets, study.json's procedure record)."""
  source, base = None, {}
  if getattr(module, "NEEDS_FROM_STUDY", False) and not _FROM_STUDY.value:
    raise procedures.ProcedureError(
        f"--from_study is required by {name}: name a finished study (its "
        "directory holds study.json)")
  if _FROM_STUDY.value:
    source = from_study.Source.load(_FROM_STUDY.value)
    best = source.top(1)[0]
    base = {k: v for k, v in best.overrides.items() if k not in user}
    config = study_lib.resolve_trial_config(
        config, base, what=f"--from_study={_FROM_STUDY.value} trial "
        f"{best.trial_id}")
    _warn_of_another_batch_size(source, user)
  plan = module.plan(config, args, source)
  parameters = dict(plan.parameters)
  if source is not None:
    parameters["from_study"] = {**source.to_json(), **source.top(1)[0].to_json()}
  return config, plan, base, {"name": name, "parameters": parameters}


def main(argv):
  name = _procedure_name(argv)
  extra = [a for a in argv[1:] if a != name]
  if extra:
    raise app.UsageError(f"unexpected arguments: {extra}")
  module = procedures.load(name)
  config_path = config_flags.get_config_filename(flags.FLAGS["config"])
  user = dict(config_flags.get_override_values(flags.FLAGS["config"]))
  study_dir = _STUDY_DIR.value
  args = _argument_values(module.ARGUMENTS)
  command = playbook_command(
      name, config_path, study_dir, _FROM_STUDY.value, _SEED.value,
      _argument_flags(module.ARGUMENTS, args), user, study_flags.TRAINER_MODULE.value)
  options = study_flags.launch_options(
      study_dir, command, stop_rule=getattr(module, "stop_rule", None))
  try:
    config, plan, base, procedure = _resolve(
        name, module, cli.loaded_config(_CONFIG), args, user)
    spec = dict(plan.search_space)
    stem = os.path.splitext(os.path.basename(config_path.split(":")[0]))[0]
    spec.setdefault("name", f"{stem}/{name}")
    spec.setdefault("algorithm", "grid")
    overrides = overrides_passed_on(name, search_space_lib.parse(spec), base, user)

    def write(num_trials: int | None) -> list[study_lib.Study]:
      studies = study_lib.plan_studies(
          config_path=config_path, config=config, spec=spec,
          study_dir=study_dir, num_trials=num_trials, seed=_SEED.value,
          config_overrides=overrides,
          trainer_module=study_flags.TRAINER_MODULE.value,
          procedure=procedure, sampler=plan.sampler)
      study_lib.write_studies(studies, config)
      return studies

    if plan.sampler is None:
      study_launch.launch(write(plan.num_trials), options)
      return
    batch = _batch_size(args, options)
    recorded = study_lib.read_study_json(study_dir) or {}
    target = max(len(recorded.get("trials", [])), min(plan.num_trials, batch))
    while True:  # A batch at a time, each proposed knowing the earlier ones.
      study_launch.launch(write(target), options)
      if not options.run or target >= plan.num_trials:
        break
      target = min(plan.num_trials, target + batch)
  except (procedures.ProcedureError, study_lib.StudyError,
          search_space_lib.SearchSpaceError, ValueError,
          study_launch.LaunchError, json_records.RecordFileError) as e:
    cli.fail(str(e))


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "study_dir"])
  app.run(main, flags_parser=parse_flags)
