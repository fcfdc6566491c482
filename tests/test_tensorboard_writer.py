"""The TensorFlow-free event file writer against CLU's TensorFlow writer."""

import glob
import os

import numpy as np
from clu.metric_writers.tf import summary_writer
from tensorboard.backend.event_processing import event_accumulator
from tensorboard.util import tensor_util

from tuning_playbook.training import tensorboard_writer

ROWS = [(5, {"train/loss": 2.302585092994, "perf/examples_per_second": 1.5e4,
             "eval/test/accuracy": np.float32(0.875)}),
        (10, {"train/loss": 1.25, "perf/examples_per_second": 1.6e4,
              "eval/test/accuracy": np.float64(0.9), "train/grad_norm": float("nan")})]


def _board(logdir):
  board = event_accumulator.EventAccumulator(logdir, size_guidance={"tensors": 0})
  board.Reload()
  return board


def _scalars(board):
  """{tag: [(step, value, dtype)]}, NaN as the string "nan" (exact compare)."""
  def value(event):
    number = tensor_util.make_ndarray(event.tensor_proto).item()
    return "nan" if np.isnan(number) else number
  return {tag: [(e.step, value(e), e.tensor_proto.dtype) for e in board.Tensors(tag)]
          for tag in board.Tags()["tensors"]}


def _write(writer):
  for step, row in ROWS:
    writer.write_scalars(step, row)
  writer.close()


def test_scalars_read_back_as_tensorflow_writes_them(tmp_path):
  ours, theirs = str(tmp_path / "ours"), str(tmp_path / "tf")
  _write(tensorboard_writer.EventFileWriter(ours))
  _write(summary_writer.SummaryWriter(theirs))
  ours_board, theirs_board = _board(ours), _board(theirs)
  assert _scalars(ours_board) == _scalars(theirs_board)
  assert set(_scalars(ours_board)) == {
      "train/loss", "perf/examples_per_second", "eval/test/accuracy", "train/grad_norm"}
  assert _scalars(ours_board)["train/loss"][1][:2] == (10, 1.25)
  assert _scalars(ours_board)["train/grad_norm"][0][:2] == (10, "nan")
  for tag in _scalars(ours_board):
    assert (ours_board.SummaryMetadata(tag).SerializeToString()
            == theirs_board.SummaryMetadata(tag).SerializeToString())
    assert ours_board.SummaryMetadata(tag).plugin_data.plugin_name == "scalars"


def test_texts_hparams_and_images(tmp_path):
  writer = tensorboard_writer.EventFileWriter(str(tmp_path))
  writer.write_texts(3, {"notes": "lr too high"})
  writer.write_hparams({"optimizer": {"learning_rate": 0.1, "name": "adam"}})
  writer.write_images(4, {"sample": np.zeros((4, 4, 3), np.float32)})
  writer.close()
  board = _board(str(tmp_path))
  assert [(e.step, tensor_util.make_ndarray(e.tensor_proto).item())
          for e in board.Tensors("notes")] == [(3, b"lr too high")]
  # Images go through CLU's TensorFlow writer: a second file, same directory.
  assert "sample" in board.Tags()["tensors"]
  assert len(glob.glob(os.path.join(tmp_path, "events.out.tfevents.*"))) == 2
  hparams = [t for t in board.Tags()["tensors"] if t.startswith("_hparams_")]
  assert hparams
  content = board.SummaryMetadata(hparams[0]).plugin_data.content
  assert b"optimizer.learning_rate" in content and b"adam" in content


def test_default_writer_logs_only_when_asked(tmp_path):
  writer = tensorboard_writer.create_default_writer(str(tmp_path), just_logging=True)
  writer.write_scalars(1, {"a": 1.0})
  writer.close()
  assert not glob.glob(os.path.join(tmp_path, "events.out.tfevents.*"))


def test_a_fresh_run_writes_its_config_for_the_hparams_dashboard(tmp_path):
  from tests import helpers  # pylint: disable=g-import-not-at-top
  from tuning_playbook.training import train  # pylint: disable=g-import-not-at-top
  workdir = str(tmp_path / "run")
  config = helpers.load_config(**{"max_train_steps": 10, "eval_every_steps": 5,
                                  "optimizer.warmup_steps": 0,
                                  "optimizer.learning_rate": 0.0375})
  train.train_and_evaluate(config, workdir)
  board = _board(workdir)
  (tag,) = [t for t in board.Tags()["tensors"] if t.startswith("_hparams_")]
  assert tag == "_hparams_/session_start_info"
  content = board.SummaryMetadata(tag).plugin_data.content
  assert b"optimizer.learning_rate" in content and b"tests.tiny_workload" in content
  assert len(board.Tensors(tag)) == 1
