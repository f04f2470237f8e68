"""Run evidence: metrics.jsonl with fixed names, TensorBoard events, optional Weights & Biases, a progress line.

Metric names (the analysis code reads only these):
  train/loss, train/grad_norm, train/update_norm, train/lr, train/tokens (loss tokens in the step),
  train/tokens_per_s (all processed token slots: prompt and padding included), train/loss_tokens_per_s,
  train/step_time_s, train/peak_memory_bytes, eval/nll, eval/perplexity, eval/accuracy (generation-based eval, when on),
  params/trainable, params/total, lora/rel_update_mean, lora/norm_a_mean, lora/norm_b_mean.
"""

from __future__ import annotations

import json
import math
import sys
import time
from typing import Any

import jax
import numpy as np
from etils import epath

METRICS_FILE = "metrics.jsonl"  # A run's metrics, one JSON record per logged step.
DIAGNOSTICS_FILE = "lora_diagnostics.jsonl"  # Per-module LoRA diagnostics at each evaluation, next to metrics.jsonl.
FAILED_FILE = "stack_failed.json"  # In a stacked run's directory once it has failed: a resumed stack leaves it failed.

def lora_diagnostics(params, adapters) -> dict[str, dict[str, jax.Array]]:
  """Per adapted module: ‖s·A·B‖_F/‖W‖_F and the spectral norms of A and B (the study saw B outgrow A).

  Pure jnp, so it can be jitted over sharded arrays; the results are scalars.
  """
  import jax.numpy as jnp
  from flax import traverse_util

  from lora_jax import lora, quant

  flat = traverse_util.flatten_dict(params)
  out = {}
  for path, ad in lora.adapter_items(adapters):
    w = flat[lora.kernel_path(path, ad)]
    w = (quant.dequantize(w) if quant.is_quantized(w) else w).astype(jnp.float32)
    a = ad.a.astype(jnp.float32).reshape(-1, ad.rank)
    b = jnp.moveaxis(ad.b.astype(jnp.float32), ad.n_stack + sum(r == "shared" for r in ad.layout.roles), -1)
    out["/".join(path)] = {
        "rel_update": jnp.linalg.norm(lora.delta(ad)) / jnp.maximum(jnp.linalg.norm(w), 1e-30),
        "norm_a": jnp.linalg.norm(a, 2),
        "norm_b": jnp.linalg.norm(b.reshape(-1, ad.rank), 2),
    }
  return out


def _summary_writer():
  """tensorboardX's ``SummaryWriter`` class, imported without torch: its writer module tries ``import torch`` only to
  accept torch tensors, which this writer never passes, and that import costs ~1.3-2.5 s in every run process of a
  machine that has torch installed (tests/test_metrics.py checks that it stays out)."""
  if "torch" in sys.modules:
    from tensorboardX import SummaryWriter

    return SummaryWriter
  sys.modules["torch"] = None  # `import torch` raises ImportError while this is set
  try:
    from tensorboardX import SummaryWriter
  finally:
    del sys.modules["torch"]
  return SummaryWriter


class MetricWriter:
  """Appends metrics to ``workdir/metrics.jsonl`` and TensorBoard; only process 0 writes."""

  def __init__(self, workdir: str | epath.PathLike, *, tensorboard: bool = True, wandb: dict | None = None,
               active: bool | None = None):
    self.workdir = epath.Path(workdir)  # a local path or gs://
    self.active = jax.process_index() == 0 if active is None else active
    self._tb = None
    self._wandb = None
    if not self.active:
      return
    self.workdir.mkdir(parents=True, exist_ok=True)
    self.path = self.workdir / METRICS_FILE
    if tensorboard:
      self._tb = _summary_writer()(str(self.workdir / "tensorboard"))
    if wandb:
      try:
        import wandb as wandb_lib
      except ImportError as e:
        raise ImportError("config.wandb.project is set but wandb is not installed: pip install wandb") from e
      self._wandb = wandb_lib.init(dir=str(self.workdir), resume="allow", **wandb)

  def truncate_after(self, step: int) -> None:
    """Drops records past ``step`` (used when resuming from a checkpoint at ``step``)."""
    if self.active:
      truncate_jsonl(self.path, step)

  def write(self, step: int, metrics: dict[str, Any]) -> None:
    """Records ``metrics`` at ``step`` everywhere that is configured."""
    if not self.active:
      return
    clean = {k: _scalar(v) for k, v in metrics.items()}
    append_line(self.path, json.dumps({"step": int(step), **clean}))
    if self._tb is not None:
      for k, v in clean.items():
        if isinstance(v, (int, float)) and math.isfinite(v):
          self._tb.add_scalar(k, v, step)
      self._tb.flush()
    if self._wandb is not None:
      self._wandb.log(clean, step=int(step))

  def close(self) -> None:
    """Flushes and closes the writers."""
    if self._tb is not None:
      self._tb.close()
    if self._wandb is not None:
      self._wandb.finish()


def _scalar(v):
  v = np.asarray(v)
  return v.item() if v.size == 1 else v.tolist()


def append_line(path: epath.Path, line: str) -> None:
  """Appends a line to a text file; object stores (gs://) cannot append, so there the file is rewritten."""
  if "://" in str(path):
    path.write_text((path.read_text() if path.exists() else "") + line + "\n")
  else:
    with path.open("a") as f:
      f.write(line + "\n")


def truncate_jsonl(path: epath.Path, step: int) -> None:
  """Drops the records of a JSON-lines log whose ``"step"`` is past ``step``; a missing file is left missing."""
  path = epath.Path(path)
  if not path.exists():
    return
  kept = []
  for line in path.read_text().splitlines():
    try:
      record = json.loads(line)
    except json.JSONDecodeError:
      continue  # a blank line, or one cut short by a killed writer: nothing to keep
    if record["step"] <= step:
      kept.append(line)
  path.write_text("".join(l + "\n" for l in kept))


def read_metrics(workdir: str | epath.PathLike) -> list[dict]:
  """All records of a run's metrics.jsonl."""
  path = epath.Path(workdir) / METRICS_FILE
  return [json.loads(l) for l in path.read_text().splitlines() if l.strip()]


class Progress:
  """A one-line console progress bar with step, loss and ETA (written to stderr, process 0 only)."""

  def __init__(self, total: int, start: int = 0, active: bool | None = None, stream=sys.stderr):
    self.total, self.start, self.t0 = total, start, time.time()
    self.active = jax.process_index() == 0 if active is None else active
    self.stream = stream

  def update(self, step: int, **values: float) -> None:
    """Redraws the line for ``step`` (on a terminal; elsewhere, e.g. a log file, one line per 10% of the run)."""
    if not self.active:
      return
    tty = self.stream.isatty()
    if not tty and step != self.total and step % max(1, self.total // 10):
      return
    done = step - self.start
    elapsed = time.time() - self.t0
    eta = elapsed / done * (self.total - step) if done > 0 else float("nan")
    width = 24
    filled = int(width * step / max(1, self.total))
    shown = " ".join(f"{k} {v:.4g}" for k, v in values.items())
    eta_s = time.strftime("%H:%M:%S", time.gmtime(eta)) if math.isfinite(eta) else "--:--:--"
    line = f"[{'#' * filled}{'.' * (width - filled)}] {step}/{self.total} {shown} eta {eta_s}"
    self.stream.write(f"\r{line}   " if tty else f"{line}\n")
    self.stream.flush()

  def close(self) -> None:
    """Ends the progress line."""
    if self.active and self.stream.isatty():
      self.stream.write("\n")
      self.stream.flush()
