"""Shared command-line handling: bad flags and config files exit 2 with a message.

  app.run(main, flags_parser=cli.parse_flags)
  config = cli.loaded_config(_CONFIG)
"""

from __future__ import annotations

import logging as std_logging
import sys
from typing import Any

from absl import flags
from absl import logging

BAD_INPUT_EXIT_CODE = 2


def fail(message: str) -> None:
  """Reports bad input on stderr and exits with status 2."""
  sys.stderr.write(f"Error: {message}\n")
  sys.exit(BAD_INPUT_EXIT_CODE)


def parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing where a bad --config file or override is no traceback."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    fail(f"{e}\nRun with --helpfull for the flags.")
  except (KeyError, OSError, AttributeError, TypeError, ValueError) as e:
    message = e.args[0] if isinstance(e, KeyError) and e.args else e
    fail(f"bad --config file or --config.* override: {message}")
  raise AssertionError("unreachable")


def loaded_config(config_flag: flags.FlagHolder) -> Any:
  """The value of a config_flags flag; a file that failed to load exits 2."""
  try:
    config = config_flag.value
    config.keys()  # A config file that failed to load raises here.
    return config
  except (OSError, KeyError, AttributeError, TypeError, ValueError) as e:
    fail(f"--config could not be loaded: {e}")


class QuietLibraries(std_logging.Filter):
  """Keeps Orbax's per-save INFO lines out of the progress log."""

  def filter(self, record: std_logging.LogRecord) -> bool:
    return record.levelno >= std_logging.WARNING or "/orbax/" not in record.pathname


def quiet_library_logs() -> None:
  """Filters library chatter out of absl's log handler."""
  logging.get_absl_handler().addFilter(QuietLibraries())
