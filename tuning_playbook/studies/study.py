"""A study on disk: `study.json`, one config per trial, one command per trial.

  studies = study.plan_studies(config_path="configs/mnist1d_cnn.py",
                               config=config,
                               spec=get_search_space(config, 64),
                               study_dir="runs/lr", num_trials=64, seed=0)
  study.write_studies(studies, config)
  studies[0].command(studies[0].trials[0])
  # ['python', '-m', 'tuning_playbook.main', '--config=configs/mnist1d_cnn.py',
  #  '--workdir=runs/lr/trials/0000', '--config.optimizer.learning_rate=...']

A study directory only grows: planning into an existing one must use the same
seed, search space, config and overrides (the error names what differs); a
larger `num_trials` appends trials and leaves the earlier ones untouched.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
from typing import Any, Mapping, Protocol, Sequence

import ml_collections

from tuning_playbook.common import atomic_files
from tuning_playbook.common import config_validation
from tuning_playbook.common import json_records
from tuning_playbook.common import records
from tuning_playbook import config_paths
from tuning_playbook import config_schema
from tuning_playbook.studies import commands
from tuning_playbook.studies import search_space as search_space_lib

STUDY_FILE = "study.json"
TRIALS_DIR = "trials"
# The fields of study.json that decide what every trial is; a study directory
# refuses to be planned again with any of them changed.
IDENTITY_FIELDS = ("config", "config_overrides", "seed", "sampler",
                   "scientific", "fixed", "search_space", "base_config",
                   "procedure")


class StudyError(ValueError):
  """A study that cannot be planned or written; the message says why."""


def trial_id(index: int) -> str:
  """Trial 7 is "0007": ids sort in trial order and never change."""
  return f"{index:04d}"


@dataclasses.dataclass(frozen=True)
class Trial:
  trial_id: str
  params: Mapping[str, Any]


@dataclasses.dataclass(frozen=True)
class Study:
  """Everything needed to run, record and reproduce one study."""
  study_dir: str
  name: str
  description: str
  config_path: str
  config_overrides: Mapping[str, Any]
  seed: int
  sampler: Mapping[str, Any]
  scientific: Mapping[str, Any]
  fixed: Mapping[str, Any]
  search_space: Mapping[str, Any]
  base_config: Mapping[str, Any]
  trials: tuple[Trial, ...]
  trainer_module: str = commands.DEFAULT_TRAINER
  # The playbook procedure that planned the study (name and parameters, see
  # tuning_playbook/procedures); None for an ordinary sweep.
  procedure: Mapping[str, Any] | None = None

  def trial_dir(self, trial: Trial) -> str:
    return os.path.join(self.study_dir, TRIALS_DIR, trial.trial_id)

  def overrides(self, trial: Trial) -> dict[str, Any]:
    """Config overrides of a trial: the sweep's, fixed, then searched."""
    return {**self.config_overrides, **self.fixed, **trial.params}

  def command(self, trial: Trial, python: str = "python") -> list[str]:
    """The trainer command line of `trial` (run from the sweep's directory)."""
    return commands.module_argv(
        self.trainer_module, [f"--config={self.config_path}",
                              f"--workdir={self.trial_dir(trial)}"],
        overrides=self.overrides(trial), python=python)

  def command_line(self, trial: Trial) -> str:
    return commands.command_line(self.command(trial))

  def to_json(self) -> dict[str, Any]:
    procedure = ({"procedure": dict(self.procedure)}
                 if self.procedure is not None else {})
    return {
        "name": self.name,
        "description": self.description,
        "config": self.config_path,
        "config_overrides": dict(self.config_overrides),
        "seed": self.seed,
        "sampler": dict(self.sampler),
        "scientific": dict(self.scientific),
        "fixed": dict(self.fixed),
        "search_space": dict(self.search_space),
        "base_config": dict(self.base_config),
        "trainer_module": self.trainer_module,
        "num_trials": len(self.trials),
        "trials": [{"trial_id": t.trial_id, "params": dict(t.params)}
                   for t in self.trials],
        **procedure,
    }


class Sampler(Protocol):
  """Proposes the params of a study's next trials (see plan_studies)."""
  record: Mapping[str, Any]

  def propose(self, space: search_space_lib.SearchSpace, study_dir: str,
              indices: Sequence[int], seed: int) -> list[dict[str, Any]]:
    ...


def _plain(obj: Any) -> Any:
  """The JSON form of obj, so that values compare as they are stored."""
  return json.loads(json.dumps(obj, default=str))


def check_config_keys(keys: Sequence[str],
                      config: ml_collections.ConfigDict) -> None:
  """Raises StudyError naming the first key that is not a config field."""
  for key in keys:
    node = config
    for i, part in enumerate(key.split(".")):
      if (not isinstance(node, (ml_collections.ConfigDict, dict))
          or part not in node):
        raise StudyError(
            f"search space key {key!r}: the config has no field "
            f"config.{key} (no {'.'.join(key.split('.')[:i + 1])!r})")
      node = node[part]
    if isinstance(node, (ml_collections.ConfigDict, dict)):
      raise StudyError(f"search space key {key!r} is a config section, "
                       "not a field")


def resolve_trial_config(config: ml_collections.ConfigDict,
                         overrides: Mapping[str, Any],
                         what: str = "trial") -> ml_collections.ConfigDict:
  """The config with `overrides` applied and checked by config_schema."""
  resolved = copy.deepcopy(config)
  for key, value in overrides.items():
    *parents, leaf = key.split(".")
    node = resolved
    for part in parents:
      node = node[part]
    try:
      node[leaf] = value
    except (TypeError, ValueError, KeyError) as e:
      raise StudyError(f"{what}: cannot set config.{key}={value!r}: {e}") from e
  try:
    config_validation.validate(resolved)
  except config_schema.ConfigError as e:
    raise StudyError(f"{what}: {e}") from e
  return resolved


def read_study_json(study_dir: str) -> dict[str, Any] | None:
  """study.json's object, or None when there is none; StudyError (the
  message of json_records' policy) when it cannot be read."""
  try:
    return json_records.read_optional(
        os.path.join(study_dir, STUDY_FILE),
        written_by="tuning_playbook.sweep (or .playbook)")
  except json_records.RecordFileError as e:
    raise StudyError(str(e)) from None


def _differences(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
  """Human-readable list of the identity fields that differ (a base-config
  key that `old` predates, at its default, does not)."""
  diffs = []
  for field in IDENTITY_FIELDS:
    a, b = _plain(old.get(field)), _plain(new.get(field))
    if field == "base_config" and isinstance(a, dict) and isinstance(b, dict):
      # Compared as a run's config.json is (records.config_differences).
      diffs.extend(f"{field}.{line}" for line in records.config_differences(a, b))
    elif isinstance(a, dict) and isinstance(b, dict):
      keys = [k for k in dict.fromkeys(list(a) + list(b)) if a.get(k) != b.get(k)]
      if keys:
        diffs.extend(f"{field}.{k}: {a.get(k, '<absent>')!r} -> "
                     f"{b.get(k, '<absent>')!r}" for k in keys)
      elif field == "search_space" and list(a) != list(b):
        diffs.append(f"search_space order: {list(a)} -> {list(b)}")
    elif a != b:
      diffs.append(f"{field}: {a!r} -> {b!r}")
  return diffs


def plan_studies(*, config_path: str, config: ml_collections.ConfigDict,
                 spec: Mapping[str, Any], study_dir: str,
                 num_trials: int | None, seed: int,
                 config_overrides: Mapping[str, Any] | None = None,
                 trainer_module: str = commands.DEFAULT_TRAINER,
                 procedure: Mapping[str, Any] | None = None,
                 sampler: Sampler | None = None) -> list[Study]:
  """Expands a search space into its studies (one per scientific value when
  the space says so); nothing is written.

  `config` is the config with `config_overrides` (the sweep's own
  `--config.*` flags) already applied; they are passed on to every trial.
  `spec` must be computed from that same config (and `num_trials`), so that
  study.json, the trial configs and the relaunch check all see one config.
  `procedure` ({"name": ..., "parameters": {...}}) marks a study planned by a
  playbook procedure; it is part of the study's identity.
  """
  space = search_space_lib.parse(spec)
  overrides = dict(config_overrides or {})
  check_config_keys(space.config_keys(), config)
  for key in space.config_keys():
    if key in overrides:
      raise StudyError(f"--config.{key} is set by the search space; drop the "
                       "override or the search space entry")
  if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
    raise StudyError(f"seed={seed!r}: must be an integer >= 0")
  stem = os.path.splitext(os.path.basename(config_path.split(":")[0]))[0]
  base = _plain(config_paths.flatten(config))
  studies = []
  for slug, sub in search_space_lib.split_scientific(space):
    directory = os.path.join(study_dir, slug) if slug else study_dir
    wanted = num_trials
    if wanted is None:
      if sub.algorithm != "grid":
        raise StudyError("num_trials is required (only a grid has a natural "
                         "number of trials)")
      wanted = sub.grid_size()
    if wanted < 1:
      raise StudyError(f"num_trials={wanted}: must be >= 1")
    record = {
        "config": config_path, "config_overrides": overrides, "seed": seed,
        "sampler": (dict(sampler.record) if sampler is not None else
                    {"algorithm": sub.algorithm, "skip": search_space_lib.SKIP,
                     "version": search_space_lib.SAMPLER_VERSION}),
        "scientific": dict(sub.scientific), "fixed": dict(sub.fixed),
        "search_space": sub.to_json(), "base_config": base,
        "procedure": _plain(procedure) if procedure is not None else None}
    existing = read_study_json(directory)
    kept = []
    if existing is not None:
      diffs = _differences(existing, record)
      if diffs:
        budget = ""
        if (any(d.startswith("search_space") for d in diffs)
            and existing.get("num_trials") != num_trials):
          budget = (f" (the config's get_search_space(config, num_trials) "
                    f"may depend on the budget: {existing.get('num_trials')} "
                    f"trials recorded, num_trials={num_trials} asked)")
        raise StudyError(
            f"{directory} already holds a study with a different definition; "
            "choose a new --study_dir to keep the earlier results. "
            "Differences: " + "; ".join(diffs) + budget)
      kept = [Trial(t["trial_id"], t["params"]) for t in existing["trials"]]
    new_indices = range(len(kept), max(wanted, len(kept)))
    proposed = (sampler.propose(sub, directory, new_indices, seed)
                if sampler is not None and len(new_indices) else
                sub.sample(new_indices, seed))
    new = [Trial(trial_id(i), p) for i, p in zip(new_indices, proposed)]
    name = sub.name or (f"{stem}/{slug}" if slug else stem)
    studies.append(Study(
        study_dir=directory, name=name, description=sub.description,
        config_path=config_path, config_overrides=overrides, seed=seed,
        sampler=record["sampler"], scientific=record["scientific"],
        fixed=record["fixed"], search_space=record["search_space"],
        base_config=base, trials=tuple(kept + new),
        trainer_module=trainer_module, procedure=record["procedure"]))
  return studies


def write_studies(studies: Sequence[Study],
                  config: ml_collections.ConfigDict) -> None:
  """Checks every trial's config, then writes study.json and trial configs.

  Nothing is written unless every trial of every study resolves to a valid
  config. Existing trial configs are left as they are.
  """
  resolved = {}
  for s in studies:
    for t in s.trials:
      cfg = resolve_trial_config(config, {**s.fixed, **t.params},
                                 what=f"trial {s.trial_dir(t)}")
      resolved[s.trial_dir(t)] = cfg
  for s in studies:
    os.makedirs(os.path.join(s.study_dir, TRIALS_DIR), exist_ok=True)
    atomic_files.write_json(os.path.join(s.study_dir, STUDY_FILE), s.to_json(),
                            default=str)
    for t in s.trials:
      directory = s.trial_dir(t)
      if not os.path.exists(os.path.join(directory, records.CONFIG_FILE)):
        records.write_config(directory, resolved[directory])


def load_study(study_dir: str, trainer_module: str = commands.DEFAULT_TRAINER) -> Study:
  """The Study recorded in `study_dir/study.json`."""
  if not os.path.isdir(study_dir):
    raise StudyError(f"{study_dir} is not a directory: name a study directory "
                     f"(one holding {STUDY_FILE}, as tuning_playbook.sweep "
                     "writes)")
  record = read_study_json(study_dir)
  if record is None:
    raise StudyError(f"no {STUDY_FILE} in {study_dir}: is it a study directory "
                     "(as tuning_playbook.sweep writes)?")
  try:
    return Study(
        study_dir=study_dir, name=record["name"],
        description=record["description"], config_path=record["config"],
        config_overrides=record["config_overrides"], seed=record["seed"],
        sampler=record["sampler"], scientific=record["scientific"],
        fixed=record["fixed"], search_space=record["search_space"],
        base_config=record["base_config"],
        trials=tuple(Trial(t["trial_id"], t["params"]) for t in record["trials"]),
        trainer_module=trainer_module, procedure=record.get("procedure"))
  except (KeyError, TypeError) as e:
    missing = f"key {e}" if isinstance(e, KeyError) else f"value ({e})"
    raise StudyError(
        f"{os.path.join(study_dir, STUDY_FILE)}: a bad or missing {missing}; "
        "it must hold the JSON object that tuning_playbook.sweep writes (name, "
        "config, config_overrides, seed, sampler, search_space, base_config, "
        "trials of trial_id and params, ...)") from None
