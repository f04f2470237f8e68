"""Tests for lora_jax.metrics: the metrics log and its truncation on resume, the progress line, LoRA diagnostics."""

import io
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from etils import epath

from lora_jax import lora, metrics


def test_metric_writer_writes_and_read_metrics_reads_back(tmp_path):
  writer = metrics.MetricWriter(tmp_path / "run", tensorboard=False, active=True)
  writer.write(0, {"eval/nll": np.float32(2.5), "train/tokens": jnp.array(24)})
  writer.write(1, {"train/loss": 1.25, "train/grad_norm": float("nan")})
  writer.close()
  records = metrics.read_metrics(tmp_path / "run")
  assert records[0] == {"step": 0, "eval/nll": 2.5, "train/tokens": 24}
  assert records[1]["step"] == 1 and records[1]["train/loss"] == 1.25 and math.isnan(records[1]["train/grad_norm"])
  assert isinstance(records[0]["train/tokens"], int)  # numpy/jax scalars become plain JSON numbers


def test_tensorboard_events_are_written_without_importing_torch(tmp_path):
  """The TensorBoard writer logs scalars (read back with tensorboard's own event reader where installed, else found
  on disk) and does not pull torch into a run process (it is installed here, for the PEFT tests)."""
  import subprocess
  import sys

  code = ("import sys\nfrom lora_jax import metrics\n"
          f"w = metrics.MetricWriter({str(tmp_path / 'run')!r}, active=True)\n"
          "w.write(3, {'train/loss': 1.5})\nw.close()\nassert 'torch' not in sys.modules\nimport torch\n")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  (events,) = (tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*")
  assert b"train/loss" in events.read_bytes()


def test_an_inactive_writer_writes_nothing(tmp_path):
  writer = metrics.MetricWriter(tmp_path / "run", tensorboard=False, active=False)
  writer.write(0, {"train/loss": 1.0})
  writer.truncate_after(0)
  assert not (tmp_path / "run").exists()  # processes other than 0 leave no files


def test_truncate_after_drops_records_past_the_restored_step(tmp_path):
  writer = metrics.MetricWriter(tmp_path, tensorboard=False, active=True)
  for step in (0, 2, 4, 4, 6):
    writer.write(step, {"train/loss": float(step)})
  writer.truncate_after(4)
  assert [r["step"] for r in metrics.read_metrics(tmp_path)] == [0, 2, 4, 4]
  writer.truncate_after(-1)  # a fresh start redoes step 0 too
  assert metrics.read_metrics(tmp_path) == []


def test_truncate_jsonl_skips_a_line_cut_short_and_leaves_a_missing_file_missing(tmp_path):
  path = epath.Path(tmp_path) / "lora_diagnostics.jsonl"
  metrics.truncate_jsonl(path, 3)
  assert not path.exists()
  path.write_text('{"step": 1, "modules": {}}\n\n{"step": 3, "modules": {}}\n{"step": 5, "modules": {}}\n'
                  '{"step": 6, "mo')  # a killed writer's last line
  metrics.truncate_jsonl(path, 5)
  assert path.read_text() == '{"step": 1, "modules": {}}\n{"step": 3, "modules": {}}\n{"step": 5, "modules": {}}\n'
  metrics.truncate_jsonl(path, 2)
  assert [json.loads(l)["step"] for l in path.read_text().splitlines()] == [1]


def test_append_line_appends(tmp_path):
  path = epath.Path(tmp_path) / "log.jsonl"
  metrics.append_line(path, "a")
  metrics.append_line(path, "b")
  assert path.read_text() == "a\nb\n"


def test_progress_off_a_terminal_prints_one_line_per_tenth_of_the_run():
  stream = io.StringIO()  # not a tty, like a log file
  bar = metrics.Progress(total=20, stream=stream, active=True)
  for step in range(1, 21):
    bar.update(step, loss=1.0 / step)
  bar.close()
  lines = stream.getvalue().splitlines()
  assert len(lines) == 10 and "\r" not in stream.getvalue()
  assert lines[0].startswith("[" + "#" * 2 + "." * 22 + "] 2/20 loss 0.5 eta ")
  assert lines[-1].startswith("[" + "#" * 24 + "] 20/20 loss 0.05 eta 00:00:00")
  quiet = io.StringIO()
  metrics.Progress(total=20, stream=quiet, active=False).update(20, loss=1.0)
  assert quiet.getvalue() == ""


def test_lora_diagnostics_equal_their_closed_form():
  w = np.full((3, 4), 0.5)  # ‖W‖_F = 0.5·sqrt(12)
  a = np.array([[3.0, 0.0], [0.0, 1.0], [0.0, 0.0]])  # singular values 3, 1
  b = np.array([[0.0, 0.0, 2.0, 0.0], [0.0, 1.0, 0.0, 0.0]])  # singular values 2, 1
  params = {"dense": {"kernel": jnp.asarray(w, jnp.float32)}}
  adapters = {"dense": lora.Adapter(a=jnp.asarray(a, jnp.float32), b=jnp.asarray(b, jnp.float32), scale=0.5)}
  # s·A·B = 0.5·[[0, 0, 6, 0], [0, 1, 0, 0], [0, 0, 0, 0]]: Frobenius norm 0.5·sqrt(37).
  for fn in (metrics.lora_diagnostics, jax.jit(metrics.lora_diagnostics)):
    d = fn(params, adapters)
    assert set(d) == {"dense"}
    assert float(d["dense"]["rel_update"]) == pytest.approx(math.sqrt(37) / math.sqrt(12), rel=1e-6)
    assert float(d["dense"]["norm_a"]) == pytest.approx(3.0, rel=1e-6)
    assert float(d["dense"]["norm_b"]) == pytest.approx(2.0, rel=1e-6)
