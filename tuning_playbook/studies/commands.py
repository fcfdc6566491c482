"""Every command line the framework prints or launches, built one way.

  argv = commands.module_argv("tuning_playbook.sweep", [f"--config={path}"],
                              overrides={"optimizer.learning_rate": 0.1})
  print(commands.command_line(argv))   # shlex-quoted, ready to paste

Config overrides become `--config.<key>=<value>` flags spelled as
`ml_collections.config_flags` parses them back (`format_override`).
"""

from __future__ import annotations

import shlex
from typing import Any, Mapping, Sequence

DEFAULT_TRAINER = "tuning_playbook.main"


def format_override(value: Any) -> str:
  """A value as `--config.key=<text>` must spell it for config_flags."""
  if isinstance(value, bool):
    return str(value).lower()
  if isinstance(value, str):
    return value
  if isinstance(value, float):
    return repr(value)
  if isinstance(value, (list, tuple)):
    return repr(tuple(value))
  return str(value)


def override_flags(overrides: Mapping[str, Any]) -> list[str]:
  """`--config.<key>=<value>` for each override, in order."""
  return [f"--config.{k}={format_override(v)}" for k, v in overrides.items()]


def module_argv(module: str, flags: Sequence[str] = (), *,
                overrides: Mapping[str, Any] | None = None,
                trainer_module: str = DEFAULT_TRAINER,
                python: str = "python", run: bool = False) -> list[str]:
  """`python -m module` with `flags`, the config overrides, a trainer other
  than the default, and `--run` last when asked."""
  argv = [python, "-m", module, *flags, *override_flags(overrides or {})]
  if trainer_module != DEFAULT_TRAINER:
    argv.append(f"--trainer_module={trainer_module}")
  return argv + (["--run"] if run else [])


def command_line(argv: Sequence[str]) -> str:
  """The argv as one line a shell runs unchanged."""
  return shlex.join(argv)


def environment_prefix(env: Mapping[str, str]) -> str:
  """`NAME=value ...` (quoted) as written before a command."""
  return " ".join(f"{k}={shlex.quote(str(v))}" for k, v in env.items())
