"""One reader of optional JSON records (json_records) and its one policy:
absent is None; damaged is bad input, named by file and line, exit 2."""

import json
import os

import pytest

from tests import helpers
from tuning_playbook.common import json_records
from tuning_playbook.common import records
from tuning_playbook.common import step_logs
from tuning_playbook.studies import trial_claims


def _write(path, data: bytes):
  with open(path, "wb") as f:
    f.write(data)
  return str(path)


def test_an_absent_record_is_none_and_an_object_is_read(tmp_path):
  assert json_records.read_optional(str(tmp_path / "nope.json")) is None
  path = _write(tmp_path / "r.json", json.dumps({"a": [1, 2]}).encode())
  assert json_records.read_optional(path) == {"a": [1, 2]}


@pytest.mark.parametrize("data,line,problem", [
    (b'{"a": 1,\n "b": }', 2, "not readable as JSON (Expecting value, column 7)"),
    (b"", 1, "not readable as JSON (Expecting value, column 1)"),
    (b'{"a": "\n\n\xff"}', 3, "not UTF-8 text (invalid start byte)"),
    (b"[1, 2]", None, "holds a list, not a JSON object"),
    (b"3.5", None, "holds a float, not a JSON object"),
])
def test_a_damaged_record_names_file_line_and_problem(tmp_path, data, line, problem):
  path = _write(tmp_path / "r.json", data)
  with pytest.raises(json_records.RecordFileError) as error:
    json_records.read_optional(path, written_by="the test")
  where = path if line is None else f"{path}, line {line}"
  assert str(error.value) == (
      f"{where}: {problem}; it must hold the JSON object that the test writes")
  assert error.value.path == path and error.value.line == line
  assert open(path, "rb").read() == data  # Left as it is.


def test_a_directory_in_place_of_a_record_is_named(tmp_path):
  os.mkdir(tmp_path / "r.json")
  with pytest.raises(json_records.RecordFileError, match=r"r\.json: cannot be read"):
    json_records.read_optional(str(tmp_path / "r.json"))


def test_a_log_line_error_is_a_record_error(tmp_path):
  # One family: whatever catches damaged records catches a log's bad line.
  path = _write(tmp_path / "metrics.jsonl", b'{"step": 1}\nnot json\n{"step": 2}\n')
  with pytest.raises(json_records.RecordFileError) as error:
    step_logs.read_jsonl(path)
  assert isinstance(error.value, step_logs.RecordsError)
  assert error.value.line == 2 and str(error.value).startswith(f"{path}, line 2: ")


def test_every_status_reader_shares_the_policy(tmp_path):
  # results.csv, the report and the tracking table read a trial's status
  # here: a damaged runner.json stops them all alike.
  trial = tmp_path / "trial"
  os.makedirs(trial)
  records.write_runner(str(trial), records.EXITED, returncode=1)
  assert records.trial_status(str(trial))["status"] == records.FAILED
  _write(trial / records.RUNNER_FILE, b'{"status": "exited", ')
  with pytest.raises(json_records.RecordFileError, match="runner.json, line 1"):
    records.trial_status(str(trial))


def test_a_claim_being_written_is_no_owner_yet(tmp_path):
  # A claim is created empty, then filled: read in between, it names no
  # owner (its age judges it), which is not an error.
  _write(tmp_path / trial_claims.CLAIM_FILE, b"")
  assert trial_claims.read_claim(str(tmp_path)) is None
  assert not trial_claims.is_stale(str(tmp_path))


def test_main_refuses_a_damaged_config_json_before_compiling(tmp_path):
  workdir = tmp_path / "run"
  os.makedirs(workdir)
  config_json = _write(workdir / records.CONFIG_FILE, b'{"seed": 0,\n\n "batch_size" 16}')
  result = helpers.run_main(str(workdir), f"--config.data.data_dir={tmp_path / 'data'}")
  assert result.returncode == 2, result.stderr[-3000:]
  assert (f"Error: {config_json}, line 3: not readable as JSON "
          "(Expecting ':' delimiter, column 15)") in result.stderr
  assert "Traceback" not in result.stderr
  # Before the mesh, the data set and any compilation; nothing written.
  assert "Mesh" not in result.stderr and not os.path.exists(tmp_path / "data")
  assert sorted(os.listdir(workdir)) == [records.CONFIG_FILE]
