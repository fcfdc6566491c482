"""Run records on disk: JSON-lines logs that never lose a readable row, and
atomic whole-file writes."""

import csv
import json
import os
import threading

import ml_collections
import pytest

from tests import helpers
from tuning_playbook.analysis import trial_data
from tuning_playbook.common import atomic_files
from tuning_playbook.common import records
from tuning_playbook.common import step_logs
from tuning_playbook import config_paths

ROWS = [{"step": 10, "train/loss": 2.5}, {"step": 20, "train/loss": 1.75},
        {"step": 30, "train/loss": 1.125}, {"step": 40, "train/loss": 0.875}]


def _jsonl(rows):
  return "".join(json.dumps(r) + "\n" for r in rows)


def _write(path, text):
  with open(path, "w") as f:
    f.write(text)


def _read_bytes(path):
  with open(path, "rb") as f:
    return f.read()


def _temp_files(directory):
  return [n for n in os.listdir(directory) if n.endswith(".tmp")]


def test_torn_last_line_is_dropped_and_earlier_rows_kept(tmp_path):
  path = str(tmp_path / "metrics.jsonl")
  _write(path, _jsonl(ROWS[:3]) + '{"step": 40, "train/lo')
  assert step_logs.read_jsonl(path) == ROWS[:3]


def test_unreadable_last_line_with_newline_and_blank_lines_is_torn(tmp_path):
  path = str(tmp_path / "metrics.jsonl")
  _write(path, _jsonl(ROWS[:2]) + '{"step": 30, "train/lo\n\n')
  assert step_logs.read_jsonl(path) == ROWS[:2]
  assert step_logs.scan_jsonl(path) == step_logs.JsonlContents(ROWS[:2], [], 3)


def test_whole_last_line_without_newline_is_kept(tmp_path):
  path = str(tmp_path / "metrics.jsonl")
  _write(path, _jsonl(ROWS).rstrip("\n"))
  assert step_logs.read_jsonl(path) == ROWS


def test_absent_file_reads_as_no_rows(tmp_path):
  assert step_logs.read_jsonl(str(tmp_path / "metrics.jsonl")) == []


@pytest.mark.parametrize("bad_line", [
    '{"step": 20, "train/lo',  # A torn write that later rows followed.
    "[20, 1.75]",  # JSON, but not a row.
    "\udcff\udcfe",  # Not UTF-8 (written below as raw bytes).
])
def test_bad_middle_line_raises_naming_file_and_line(tmp_path, bad_line):
  path = str(tmp_path / "metrics.jsonl")
  with open(path, "wb") as f:
    f.write((_jsonl(ROWS[:1]) + "\n" + bad_line + "\n" + _jsonl(ROWS[2:]))
            .encode("utf-8", "surrogateescape"))
  with pytest.raises(step_logs.RecordsError) as e:
    step_logs.read_jsonl(path)
  assert e.value.path == path
  assert e.value.line_number == 3  # Blank line 2 is skipped, not an error.
  assert path in str(e.value) and "line 3" in str(e.value)
  if bad_line.isascii():
    assert bad_line in str(e.value)


def test_scan_reports_every_bad_line_and_keeps_every_readable_row(tmp_path):
  path = str(tmp_path / "metrics.jsonl")
  _write(path, _jsonl(ROWS[:1]) + "garbage\n" + _jsonl(ROWS[1:3]) + "x" * 200
         + "\n" + _jsonl(ROWS[3:]) + '{"step": 5')
  contents = step_logs.scan_jsonl(path)
  assert contents.rows == ROWS
  assert contents.bad_lines == [(2, "garbage"), (5, "x" * 80 + "...")]
  assert contents.torn_line == 7


def test_truncate_after_keeps_every_row_up_to_the_step(tmp_path):
  path = str(tmp_path / "metrics.jsonl")
  _write(path, _jsonl(ROWS))
  step_logs.StepLog(path, enabled=True).truncate_after(20)
  assert step_logs.read_jsonl(path) == ROWS[:2]
  assert _temp_files(tmp_path) == []


def test_truncate_after_drops_only_a_torn_last_line(tmp_path):
  path = str(tmp_path / "metrics.jsonl")
  _write(path, _jsonl(ROWS) + '{"step": 50, "train/lo')
  step_logs.StepLog(path, enabled=True).truncate_after(40)
  assert _read_bytes(path) == _jsonl(ROWS).encode()


def test_truncate_after_keeps_rows_byte_for_byte(tmp_path):
  path = str(tmp_path / "metrics.jsonl")
  text = ('{"step": 1, "note": null, "sizes": [1, 2]}\n'
          '{"step": 2,   "train/loss": NaN}\n'
          '{"note": "a row without a step is never dropped"}\n')
  _write(path, text + '{"step": 3, "train/loss": 0.5}\n')
  step_logs.StepLog(path, enabled=True).truncate_after(2)
  assert _read_bytes(path) == text.encode()


def test_truncate_after_refuses_a_bad_middle_line_and_changes_nothing(tmp_path):
  path = str(tmp_path / "metrics.jsonl")
  _write(path, _jsonl(ROWS[:2]) + '{"step": 25, "trai\n' + _jsonl(ROWS[2:]))
  before = _read_bytes(path)
  with pytest.raises(step_logs.RecordsError, match="line 3"):
    step_logs.StepLog(path, enabled=True).truncate_after(30)
  assert _read_bytes(path) == before
  assert _temp_files(tmp_path) == []


def test_truncate_after_leaves_an_intact_log_untouched(tmp_path):
  path = str(tmp_path / "metrics.jsonl")
  _write(path, _jsonl(ROWS))
  mtime = os.stat(path).st_mtime_ns
  step_logs.StepLog(path, enabled=True).truncate_after(40)
  assert os.stat(path).st_mtime_ns == mtime


def test_append_after_torn_line_gives_a_readable_file(tmp_path):
  path = str(tmp_path / "metrics.jsonl")
  _write(path, _jsonl(ROWS[:2]) + '{"step": 30, "train/lo')
  log = step_logs.StepLog(path, enabled=True)
  log.append(ROWS[2:3])
  log.append(ROWS[3:])
  assert step_logs.read_jsonl(path) == ROWS
  assert _read_bytes(path).endswith(b"\n")


def test_append_after_whole_line_without_newline_does_not_glue(tmp_path):
  path = str(tmp_path / "metrics.jsonl")
  _write(path, _jsonl(ROWS[:2]).rstrip("\n"))
  step_logs.StepLog(path, enabled=True).append(ROWS[2:])
  assert step_logs.read_jsonl(path) == ROWS


def test_disabled_log_writes_nothing(tmp_path):
  path = str(tmp_path / "metrics.jsonl")
  log = step_logs.StepLog(path, enabled=False)
  log.append(ROWS)
  log.truncate_after(0)
  assert not os.path.exists(path)


def test_failed_json_write_leaves_old_file_and_no_temp_file(tmp_path):
  path = str(tmp_path / "summary.json")
  atomic_files.write_json(path, {"status": "completed", "best_value": 0.25})
  before = _read_bytes(path)
  with pytest.raises(TypeError):
    # The first field is written before the second fails to serialize.
    atomic_files.write_json(path, {"status": "diverged", "reason": object()})
  assert _read_bytes(path) == before
  assert json.loads(before) == {"status": "completed", "best_value": 0.25}
  assert _temp_files(tmp_path) == []


def test_failed_block_leaves_old_file_and_no_temp_file(tmp_path):
  path = str(tmp_path / "plot.png")
  atomic_files.write_bytes(path, b"old image")
  with pytest.raises(RuntimeError):
    with atomic_files.replacing(path, "wb") as f:
      f.write(b"half a new im")
      raise RuntimeError("rendering failed")
  assert _read_bytes(path) == b"old image"
  assert os.listdir(tmp_path) == ["plot.png"]


def test_written_file_has_the_permissions_of_a_plain_open(tmp_path):
  plain, atomic = str(tmp_path / "plain.txt"), str(tmp_path / "atomic.txt")
  _write(plain, "x")
  atomic_files.write_text(atomic, "x")
  assert os.stat(atomic).st_mode == os.stat(plain).st_mode


def test_csv_round_trip(tmp_path):
  path = str(tmp_path / "results.csv")
  atomic_files.write_csv(path, ["trial_id", "status", "reason"],
                         [{"trial_id": "0000", "status": "completed"},
                          {"trial_id": "0001", "status": "failed",
                           "reason": 'a "quoted", multi\nline reason'}])
  with open(path, newline="") as f:
    rows = list(csv.DictReader(f))
  assert rows == [
      {"trial_id": "0000", "status": "completed", "reason": ""},
      {"trial_id": "0001", "status": "failed",
       "reason": 'a "quoted", multi\nline reason'}]


def test_concurrent_writers_never_produce_a_mixed_file(tmp_path):
  path = str(tmp_path / "study.json")
  payloads = [{"writer": w, "trials": [f"{w}-{i}" for i in range(2000)]}
              for w in range(4)]
  atomic_files.write_json(path, payloads[0])
  stop = threading.Event()
  seen, errors = [], []

  def write(payload):
    try:
      for _ in range(25):
        atomic_files.write_json(path, payload)
    except Exception as e:  # pylint: disable=broad-except
      errors.append(e)

  def read():
    while not stop.is_set():
      with open(path) as f:
        seen.append(json.load(f))

  reader = threading.Thread(target=read)
  reader.start()
  writers = [threading.Thread(target=write, args=(p,)) for p in payloads]
  for t in writers:
    t.start()
  for t in writers:
    t.join()
  stop.set()
  reader.join()
  assert errors == []
  with open(path) as f:
    assert json.load(f) in payloads
  assert seen and all(s in payloads for s in seen)
  assert os.listdir(tmp_path) == ["study.json"]


def test_analysis_reads_around_a_bad_middle_line_and_names_it(tmp_path):
  run_dir = tmp_path / "0000"
  run_dir.mkdir()
  _write(str(run_dir / records.METRICS_FILE),
         _jsonl(ROWS[:2]) + "not json\n" + _jsonl(ROWS[2:]) + '{"step": 5')
  trial = trial_data.load_trial(str(run_dir), "0000", {})
  steps, losses = trial.series("train/loss")
  assert steps.tolist() == [10, 20, 30, 40]
  assert losses.tolist() == [2.5, 1.75, 1.125, 0.875]
  assert ("metrics.jsonl: unreadable line 3 skipped (line 3: 'not json'); "
          "unreadable line 6 dropped (a torn last line: a write cut short)"
          in trial.problems)


def test_flatten_nested_dicts_and_config_dicts():
  config = ml_collections.ConfigDict(
      {"seed": 0, "optimizer": {"name": "adam", "betas": (0.9, 0.99)},
       "model": {"widths": [8, 16]}})
  expected = {"seed": 0, "optimizer.name": "adam",
              "optimizer.betas": (0.9, 0.99), "model.widths": [8, 16]}
  assert config_paths.flatten(config) == expected
  assert config_paths.flatten(
      {"optimizer": ml_collections.ConfigDict({"name": "adam"}),
       "model.widths": [8, 16]}) == {"optimizer.name": "adam",
                                     "model.widths": [8, 16]}


def test_config_differences_name_the_dotted_field():
  old = {"optimizer": {"learning_rate": 0.1, "name": "sgd"}, "seed": 0}
  new = {"optimizer": {"learning_rate": 0.2, "name": "sgd"}, "seed": 0,
         "batch_size": 32}
  assert records.config_differences(old, new) == [
      "batch_size: '<absent>' -> 32",
      "optimizer.learning_rate: 0.1 -> 0.2"]


def test_config_differences_let_a_key_added_since_take_its_default():
  # A run recorded before `data.on_device_max_mb` existed (default 512).
  old = {"data": {"cache": True}, "seed": 0}
  assert records.config_differences(
      old, {"data": {"cache": True, "on_device_max_mb": 512}, "seed": 0}) == []
  assert records.config_differences(
      old, {"data": {"cache": True, "on_device_max_mb": 0}, "seed": 0}) == [
          "data.on_device_max_mb: '<absent>' -> 0"]
  # A key the base config does not have is a difference at any value.
  assert records.config_differences(old, {"data": {"cache": True}, "seed": 0,
                                          "model": {"width": 512}}) == [
      "model.width: '<absent>' -> 512"]


@pytest.mark.slow
def test_resume_refuses_a_log_with_a_bad_middle_line_and_keeps_it(tmp_path):
  workdir = str(tmp_path / "run")
  flags = ("--config.max_train_steps=20",)
  assert helpers.run_main(workdir, *flags).returncode == 0
  os.remove(os.path.join(workdir, records.SUMMARY_FILE))  # As if killed at the end.
  path = os.path.join(workdir, records.METRICS_FILE)
  with open(path) as f:
    lines = f.readlines()
  lines[1] = lines[1][:25] + "\n"
  with open(path, "w") as f:
    f.writelines(lines)
  before = open(path, "rb").read()
  result = helpers.run_main(workdir, *flags)
  assert result.returncode == 2, result.stderr[-3000:]
  assert f"{path}" in result.stderr and "line 2" in result.stderr
  assert open(path, "rb").read() == before
  assert not os.path.exists(os.path.join(workdir, records.SUMMARY_FILE))
