"""Shared command-line handling: bad flags and config files exit 2 with a message.

  app.run(main, flags_parser=cli.parse_flags)
  config = cli.loaded_config(_CONFIG)
"""

from __future__ import annotations

import ast
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
    # ml_collections raises a KeyError for a key the config lacks, at times
    # wrapped in an AttributeError.
    key_error = e if isinstance(e, KeyError) else (
        e.args[0] if e.args and isinstance(e.args[0], KeyError) else None)
    message = _unknown_key(key_error, argv) if key_error else e
    fail(f"bad --config file or --config.* override: {message}")
  raise AssertionError("unreachable")


def _unknown_key(error: KeyError, argv: list[str]) -> str:
  """The --config.* flag naming a key the config lacks, and what is allowed."""
  text = error.args[0] if error.args else ""
  # ml_collections quotes the key, at times twice: "'key'", or "'key'\nDid
  # you mean ...".
  while (isinstance(text, str) and len(text) >= 2 and text[0] == text[-1]
         and text[0] in "'\""):
    try:
      text = ast.literal_eval(text)
    except (ValueError, SyntaxError):
      break
  first, _, hint = str(text).partition("\n")
  key = first.strip("'\"")
  named = [a.split("=", 1)[0] for a in argv[1:] if a.startswith("--config.")
           and key in a.split("=", 1)[0].split(".")[1:]]
  return (f"{named[0] if named else '--config.*'}: the config has no key "
          f"{key!r}" + (f" ({hint.strip()})" if hint.strip() else "") +
          "; a --config.* flag can only set a key that the config file's "
          "get_config() defines")


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
