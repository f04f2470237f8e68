"""One trainer for LoRA and full fine-tuning: state, train/eval steps, the loop with resume (optimizer: ``optim``).

Full fine-tuning is ``LoraSpec.full()``: no adapters and every base parameter trainable, so both methods share the
optimizer, the step, the evaluation, the logging and the checkpoints. The frozen base lives in the state but is
never differentiated, never in the optimizer and never checkpointed (adapter-only checkpoints for LoRA).

Batches are dicts of arrays ``inputs, targets, loss_mask [B, T]`` plus optional ``segment_ids, positions``; the loss
is the mean NLL over tokens with ``loss_mask`` 1 (summed over micro-batches, so accumulation equals one big batch).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import resource
import signal
import time
from collections.abc import Callable, Iterable
from typing import Any, Protocol

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from etils import epath
from flax import traverse_util

from lora_jax import checkpoint as ckpt_lib
from lora_jax import lora
from lora_jax import metrics as metrics_lib
from lora_jax import optim
from lora_jax import sharding as sharding_lib

@flax.struct.dataclass
class TrainState:
  """Everything a step reads and writes; only ``trainable`` and ``opt_state`` change besides ``step``."""

  step: jax.Array
  trainable: Any  # {"lora": adapters, "params": fully trained base params}
  frozen: Any  # the rest of the base parameters
  opt_state: Any
  rng: jax.Array  # raw uint32 key data; per-step keys are fold_in(rng, step)

  def checkpoint_tree(self) -> dict:
    """What a checkpoint holds: never the frozen base."""
    return {"step": self.step, "trainable": self.trainable, "opt_state": self.opt_state, "rng": self.rng}


def init_state(params, adapters, spec: lora.LoraSpec, optim_config: optim.OptimConfig, seed: int) -> TrainState:
  """A step-0 state from base params and adapters (from ``lora.create``)."""
  trainable, frozen = lora.split(params, adapters, spec)
  # Mixed precision: whatever the base's dtype, trained values and Adam moments are at least float32 (a bf16 base
  # may stay frozen in bf16; the model casts to its compute dtype; a float64 base, as in exactness tests, stays
  # float64). Adapters keep the dtype their spec asks for.
  trainable = {"lora": trainable["lora"],
               "params": jax.tree.map(lambda x: x.astype(jnp.promote_types(x.dtype, jnp.float32))
                                      if jnp.issubdtype(x.dtype, jnp.floating) else x, trainable["params"])}
  opt_state = optim.make_optimizer(optim_config).init(trainable)
  return TrainState(step=jnp.zeros((), jnp.int32), trainable=trainable, frozen=frozen, opt_state=opt_state,
                    rng=jax.random.key_data(jax.random.key(seed)))


def _model_kwargs(batch) -> dict:
  return {k: batch[k] for k in ("segment_ids", "positions") if k in batch}


def nll_sum(model: nn.Module, trainable, frozen, batch, rng, train: bool, scales=None):
  """(sum of masked token NLL, number of loss tokens) for one batch (``scales``: see ``lora.apply``).

  A model with an ``nll_sum`` method (``CausalLM``) computes the loss itself: in sequence chunks, never holding the
  full [B, T, V] logits, when its config's ``loss_chunk_size`` > 0 (``lora_jax.losses``); other models return logits.
  """
  from lora_jax import losses  # Imported here: this function is the trainer's only use of it.

  params, adapters = lora.combine(trainable, frozen)
  kwargs = dict(train=train, rngs={"dropout": rng}, scales=scales, **_model_kwargs(batch))
  if hasattr(model, "nll_sum"):
    return lora.apply(model, params, adapters, batch["inputs"], batch["targets"], batch["loss_mask"],
                      method="nll_sum", **kwargs)
  logits = lora.apply(model, params, adapters, batch["inputs"], **kwargs)
  return losses.masked_nll_sum(logits, batch["targets"], batch["loss_mask"])


def make_train_step(model: nn.Module, tx: optax.GradientTransformation | Callable[[dict], optax.GradientTransformation],
                    grad_accum: int = 1) -> Callable:
  """``train_step(state, batch, hyper=None) -> (state, metrics)``; the batch's leading axis is split into
  ``grad_accum`` parts.

  ``tx`` is an optimizer, or a function of ``hyper`` (e.g. ``functools.partial(optim.make_optimizer, cfg)``) when
  the step is vmapped over stacked runs with per-run hyperparameters: ``hyper`` then holds those (``lr``, ...) and
  ``scales``, each adapter's scale (``lora.apply``).
  """

  def loss_and_grads(trainable, frozen, batch, rng, scales):
    def f(tr):
      total, count = nll_sum(model, tr, frozen, batch, rng, train=True, scales=scales)
      return total, count

    (total, count), grads = jax.value_and_grad(f, has_aux=True)(trainable)
    return total, count, grads

  def train_step(state: TrainState, batch, hyper: dict | None = None):
    hyper = dict(hyper or {})
    scales = hyper.pop("scales", None)
    opt = tx(hyper) if callable(tx) and not isinstance(tx, optax.GradientTransformation) else tx
    rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    if grad_accum == 1:
      total, count, grads = loss_and_grads(state.trainable, state.frozen, batch, rng, scales)
    else:
      micro = jax.tree.map(lambda x: x.reshape((grad_accum, x.shape[0] // grad_accum) + x.shape[1:]), batch)

      def body(carry, xs):
        mb, i = xs
        t, c, g = loss_and_grads(state.trainable, state.frozen, mb, jax.random.fold_in(rng, i), scales)
        return jax.tree.map(jnp.add, carry, (t, c, g)), None

      zero = (jnp.zeros(()), jnp.zeros(()), jax.tree.map(jnp.zeros_like, state.trainable))
      (total, count, grads), _ = jax.lax.scan(body, zero, (micro, jnp.arange(grad_accum)))
    count = jnp.maximum(count, 1.0)
    grads = jax.tree.map(lambda g: g / count, grads)
    updates, opt_state = opt.update(grads, state.opt_state, state.trainable)
    trainable = optax.apply_updates(state.trainable, updates)
    metrics = {"train/loss": total / count, "train/grad_norm": optax.tree.norm(grads),
               "train/update_norm": optax.tree.norm(updates), "train/tokens": count}
    return state.replace(step=state.step + 1, trainable=trainable, opt_state=opt_state), metrics

  return train_step


def make_eval_step(model: nn.Module) -> Callable:
  """``eval_step(state, batch, scales=None) -> (sum NLL, token count)``, deterministic (no dropout)."""

  def eval_step(state: TrainState, batch, scales=None):
    return nll_sum(model, state.trainable, state.frozen, batch, jax.random.key(0), train=False, scales=scales)

  return eval_step


def evaluate(eval_step: Callable, state: TrainState, batches: Iterable[dict]) -> dict[str, float]:
  """Held-out NLL per loss token and perplexity exp(NLL) over all ``batches``."""
  total, count = 0.0, 0.0
  for batch in batches:
    t, c = eval_step(state, batch)
    total += float(t)
    count += float(c)
  if count == 0:
    raise ValueError("the eval set has no loss tokens")
  nll = total / count
  return {"eval/nll": nll, "eval/perplexity": math.exp(min(nll, 700.0))}


class BatchIterator(Protocol):
  """Training batches with a position that can be saved in a checkpoint and restored exactly."""

  def __next__(self) -> dict: ...

  def state(self) -> dict: ...

  def restore(self, state: dict) -> None: ...


@dataclasses.dataclass(frozen=True)
class LoopConfig:
  """How long to train and how often to evaluate, log and checkpoint."""

  steps: int  # Optimizer steps in the whole run.
  grad_accum: int = 1  # Micro-batches per step (the batch's leading axis is split into this many).
  log_every: int = 10  # Steps between train metric records.
  eval_every: int = 100  # Steps between evaluations (and at the end).
  checkpoint_every: int = 100  # Steps between checkpoints (and at the end).
  keep_checkpoints: int = 2  # Newest checkpoints kept on disk.
  collapse_steps: int = 20  # Stop when the gradient is exactly 0 this many steps in a row (0 = never).
  seed: int = 0  # Seed of the per-step RNG (adapter dropout).
  # Steps per jitted call (a lax.scan over that many batches): at small shapes the host's per-step work (dispatch,
  # transfers, metric fetches) costs as much as the step; see ``chunk_steps``. SIGTERM waits for the call in flight.
  steps_per_call: int = 1

  def __post_init__(self):
    if self.steps_per_call < 1:
      raise ValueError(f"LoopConfig.steps_per_call must be >= 1, got {self.steps_per_call}")

  @property
  def chunk_steps(self) -> int:
    """Steps per jitted call: the largest divisor of both ``eval_every`` and ``checkpoint_every`` that is at most
    ``steps_per_call``, so that evaluations and checkpoints fall at the end of a call."""
    every = math.gcd(self.eval_every, self.checkpoint_every)
    return max(d for d in range(1, min(self.steps_per_call, every) + 1) if every % d == 0)


def under_mesh(fn: Callable, batch_sharding=None) -> Callable:
  """``fn`` traced under the abstract mesh of ``batch_sharding`` (as is without one).

  Kernels that run per device in ``shard_map`` (splash attention, and ``model.attention='auto'`` choosing it on a
  TPU mesh) find the mesh and its platform there; XLA ops are unaffected.
  """
  if batch_sharding is None:
    return fn

  @functools.wraps(fn)
  def traced(*args):
    with jax.sharding.use_abstract_mesh(batch_sharding.mesh.abstract_mesh):
      return fn(*args)

  return traced


def jit_train_step(train_step: Callable, shardings: TrainState | None = None, batch_sharding=None) -> Callable:
  """``train_step`` jitted as ``step(frozen, state_without_frozen, batch)``, donating all but the frozen base.

  With ``shardings`` (a TrainState of NamedShardings) it is compiled with explicit in/out shardings; lowering it
  with abstract arguments is how ``benchmarks/fit.py`` plans memory without allocating anything.
  """
  if shardings is None:
    jit = functools.partial(jax.jit, donate_argnums=(1,))
  else:
    rest = shardings.replace(frozen=None)
    jit = functools.partial(jax.jit, donate_argnums=(1,), in_shardings=(shardings.frozen, rest, batch_sharding),
                            out_shardings=(rest, sharding_lib.replicated(batch_sharding.mesh)))

  @jit
  @functools.partial(under_mesh, batch_sharding=batch_sharding)
  def step(frozen, state, batch):
    state, metrics = train_step(state.replace(frozen=frozen), batch)
    return state.replace(frozen=None), metrics

  return step


def stacked_batch_sharding(batch_sharding):
  """The sharding of ``k`` stacked batches ``[k, B, T]``: the batch's, behind an unsharded leading axis."""
  return jax.sharding.NamedSharding(batch_sharding.mesh, jax.sharding.PartitionSpec(None, *batch_sharding.spec))


def jit_train_steps(train_step: Callable, shardings: TrainState | None = None, batch_sharding=None) -> Callable:
  """``train_step`` scanned over stacked batches in one jitted call, donating all but the frozen base:
  ``steps(frozen, state_without_frozen, batches, active) -> (state_without_frozen, metrics)``.

  ``batches`` and the returned metrics have a leading axis of ``k`` steps; a step whose ``active`` entry is False
  leaves the state untouched, so a short call (at the end of a run, or when SIGTERM cuts it) pads ``batches`` and
  runs the same compiled program: how a run is cut into calls never changes its bits, so resume stays exact.
  ``batch_sharding`` is that of one ``[B, T]`` batch.
  """
  if shardings is None:
    jit = functools.partial(jax.jit, donate_argnums=(1,))
  else:
    rest, rep = shardings.replace(frozen=None), sharding_lib.replicated(batch_sharding.mesh)
    jit = functools.partial(jax.jit, donate_argnums=(1,),
                            in_shardings=(shardings.frozen, rest, stacked_batch_sharding(batch_sharding), rep),
                            out_shardings=(rest, rep))

  @jit
  @functools.partial(under_mesh, batch_sharding=batch_sharding)
  def steps(frozen, state, batches, active):
    def one(state, batch):
      new, metrics = train_step(state.replace(frozen=frozen), batch)
      return new.replace(frozen=None), metrics

    return scan_steps(one, state, batches, active)

  return steps


def draw_call(draw: Callable[[], dict], step: int, chunk: int, steps: int,
              stopped: Callable[[], bool]) -> tuple[int, dict, np.ndarray]:
  """The host batches of the jitted call after step ``step``: ``(its last step, batches stacked [chunk, ...],
  active mask [chunk])``. Calls end at multiples of ``chunk`` (hence at every evaluation and checkpoint) and at
  ``steps``, so a resumed run is cut into the same calls; when ``stopped()`` turns true while a batch is drawn
  (SIGTERM), the call ends at that step, the rest of it zero padding that ``active`` masks."""
  rows = []
  for _ in range(min(steps, (step // chunk + 1) * chunk) - step):
    rows.append({k: np.asarray(v) for k, v in draw().items()})
    if stopped():
      break
  pad = [{k: np.zeros_like(v) for k, v in rows[0].items()}] * (chunk - len(rows))
  return step + len(rows), {k: np.stack([r[k] for r in rows + pad]) for k in rows[0]}, np.arange(chunk) < len(rows)


def scan_steps(step: Callable, state, batches, active):
  """``step(state, batch) -> (state, metrics)`` over the leading axis of ``batches`` in one ``lax.scan``; where
  ``active`` is False the state stays as it was (a padded step), so a short call runs the same program as a full one.
  Returns the final state and the metrics stacked over steps."""

  def body(state, xs):
    batch, on = xs
    new, metrics = step(state, batch)
    # A select, not a cond: it fuses into the optimizer's elementwise update (no copy of the state).
    return jax.tree.map(lambda n, o: jnp.where(on, n, o), new, state), metrics

  return jax.lax.scan(body, state, (batches, active))


def make_steps(model: nn.Module, optim_config: optim.OptimConfig, grad_accum: int = 1,
               shardings: TrainState | None = None, batch_sharding=None) -> tuple[Callable, Callable]:
  """The jitted ``(train_step, eval_step)`` of a model (``jit_train_step``; explicit shardings under a mesh)."""
  train_step = jit_train_step(make_train_step(model, optim.make_optimizer(optim_config), grad_accum), shardings,
                              batch_sharding)
  in_shardings = {} if shardings is None else {"in_shardings": (shardings, batch_sharding)}
  return train_step, jax.jit(under_mesh(make_eval_step(model), batch_sharding), **in_shardings)


def state_shardings(state: TrainState, optim_config: optim.OptimConfig, param_shardings, mesh) -> TrainState:
  """Where each part of the state lives: base params by ``param_shardings``, adapters like their kernels, the
  optimizer moments like what they track, counters and RNG replicated."""
  flat = traverse_util.flatten_dict(param_shardings)

  def like_params(tree):
    return traverse_util.unflatten_dict({p: flat[p] for p in traverse_util.flatten_dict(tree)}) if tree else {}

  rep = sharding_lib.replicated(mesh)
  trainable = {"lora": sharding_lib.adapter_shardings(state.trainable["lora"], param_shardings, mesh),
               "params": like_params(state.trainable["params"])}
  # An optimizer-state leaf that tracks a trainable leaf (Adam's mu and nu) sits at a path ending with that leaf's
  # path; it is placed like it. Everything else (step counts) is replicated.
  by_path = {tuple(p): s for p, s in jax.tree_util.tree_flatten_with_path(trainable)[0]}
  shapes = {tuple(p): x.shape for p, x in jax.tree_util.tree_flatten_with_path(state.trainable)[0]}

  def place(path, leaf):
    for i in range(len(path)):
      suffix = tuple(path[i:])
      if suffix in by_path and shapes[suffix] == leaf.shape:
        return by_path[suffix]
    return rep

  opt_state = jax.tree_util.tree_map_with_path(place, state.opt_state)
  del optim_config
  return TrainState(step=rep, trainable=trainable, frozen=like_params(state.frozen), opt_state=opt_state, rng=rep)


def eval_extras(state: TrainState, step: int, eval_hook: Callable | None, diagnostics: Callable,
                writer: metrics_lib.MetricWriter, workdir: epath.Path) -> dict:
  """An evaluation's metrics beyond the NLL: the eval hook's and the means of the per-module LoRA diagnostics, which
  go whole to ``workdir/lora_diagnostics.jsonl``."""
  m = dict(eval_hook(state)) if eval_hook is not None else {}
  diag = {k: {n: float(v) for n, v in d.items()} for k, d in jax.device_get(diagnostics(state)).items()}
  if diag:
    for key in ("rel_update", "norm_a", "norm_b"):
      m[f"lora/{key}_mean"] = float(np.mean([d[key] for d in diag.values()]))
    if writer.active:
      metrics_lib.append_line(workdir / DIAGNOSTICS_FILE, json.dumps({"step": step, "modules": diag}))
  return m


class NonFiniteLoss(FloatingPointError):
  """Raised when the loss or the trained parameters become NaN or Inf; nothing non-finite is ever saved."""


class Collapsed(ArithmeticError):
  """Raised when the gradient has been exactly zero for ``LoopConfig.collapse_steps`` steps (a dead run)."""


class Preempted(Exception):
  """Raised after SIGTERM once a checkpoint is saved, so the whole process stops instead of starting the next run."""


DIAGNOSTICS_FILE = "lora_diagnostics.jsonl"  # Per-module LoRA diagnostics at each evaluation, next to metrics.jsonl.


def peak_memory_bytes() -> int:
  """Peak device memory if the backend reports it, else the process's peak resident memory."""
  stats = jax.local_devices()[0].memory_stats() or {}
  if "peak_bytes_in_use" in stats:
    return int(stats["peak_bytes_in_use"])
  return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def all_finite(tree) -> jax.Array:
  """Whether every entry of every leaf of ``tree`` is finite, as one scalar (jit it: one fused reduction)."""
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)] or [jnp.array(True)]))


def fit(model: nn.Module, state: TrainState, optim_config: optim.OptimConfig, loop: LoopConfig,
        train_batches: BatchIterator, eval_batches: Callable[[], Iterable[dict]], workdir: str | epath.PathLike,
        *, record: dict | None = None, eval_hook: Callable[[TrainState], dict] | None = None,
        writer: metrics_lib.MetricWriter | None = None, progress: bool = True, mesh=None,
        param_shardings=None) -> tuple[TrainState, dict]:
  """Trains ``state`` for ``loop.steps`` steps, resuming from the newest checkpoint in ``workdir`` if there is one.

  ``record`` (JSON) is stored with every checkpoint (e.g. which base model the adapters belong to).
  ``eval_hook(state)`` may add metrics (e.g. generation accuracy) at each evaluation. SIGTERM saves a checkpoint
  and raises ``Preempted``; a NaN/Inf loss or non-finite parameters raise ``NonFiniteLoss`` without saving, and an
  all-zero gradient for ``loop.collapse_steps`` steps raises ``Collapsed``; both name the newest checkpoint from
  before the failure. On resume, the logs (metrics.jsonl, lora_diagnostics.jsonl) are cut back to the restored
  step, so no step is logged twice. Returns the final state and metrics. With a ``mesh``, the state is placed by
  ``param_shardings`` (see ``state_shardings``), each host's batches become one global batch split over the data
  axes, and the steps are compiled with explicit shardings.

  Each jitted call runs ``loop.chunk_steps`` steps (``jit_train_steps``); the host stacks the next call's batches
  and fetches the previous call's metrics (all its steps at once) while the device works, so nothing waits on the
  device once per step. Every step's metrics are still checked (NaN, collapse) before any checkpoint is saved.
  """
  if (mesh is None) != (param_shardings is None):
    raise ValueError("fit needs both mesh and param_shardings, or neither")
  workdir = epath.Path(workdir)
  checkpointer = ckpt_lib.Checkpointer(workdir / "checkpoints", keep=loop.keep_checkpoints)
  writer = writer or metrics_lib.MetricWriter(workdir)
  shardings = batch_sharding = None
  to_device = lambda batch: batch  # noqa: E731
  if mesh is not None:
    shardings = state_shardings(state, optim_config, param_shardings, mesh)
    state = jax.device_put(state, shardings)
    batch_sharding = sharding_lib.batch_sharding(mesh)
    to_device = functools.partial(sharding_lib.global_batch, mesh=mesh)
  chunk = loop.chunk_steps
  train_steps = jit_train_steps(make_train_step(model, optim.make_optimizer(optim_config), loop.grad_accum),
                                shardings, batch_sharding)
  _, eval_step = make_steps(model, optim_config, loop.grad_accum, shardings, batch_sharding)
  stacked_to_device = mask_to_device = lambda x: x  # noqa: E731
  if mesh is not None:  # global arrays, the (replicated) mask too: a multi-process jit takes no host arrays
    stacked_sh, rep = stacked_batch_sharding(batch_sharding), sharding_lib.replicated(mesh)
    stacked_to_device = lambda batches: {k: jax.make_array_from_process_local_data(stacked_sh, v)  # noqa: E731
                                         for k, v in batches.items()}
    mask_to_device = functools.partial(jax.make_array_from_process_local_data, rep)
  found = checkpointer.restore_latest(state.checkpoint_tree())  # an unreadable newest one falls back, saying so
  if found is not None:
    _, restored, saved = found
    state = state.replace(**restored)
    train_batches.restore(saved["data"])
  start = int(state.step)
  # Records past ``start`` were written by an attempt that died before its next checkpoint; they are redone now.
  # A fresh start redoes step 0's evaluation too, so then nothing is kept.
  keep_until = start if start else -1
  writer.truncate_after(keep_until)
  if writer.active:
    metrics_lib.truncate_jsonl(workdir / DIAGNOSTICS_FILE, keep_until)
  replicated = None if mesh is None else sharding_lib.replicated(mesh)
  diagnostics = jax.jit(lambda s: metrics_lib.lora_diagnostics(*lora.combine(s.trainable, s.frozen)),
                        out_shardings=replicated)
  trainable_finite = jax.jit(all_finite, out_shardings=replicated)
  n_trainable = sum(x.size for x in jax.tree.leaves(state.trainable))
  n_total = n_trainable + sum(x.size for x in jax.tree.leaves(state.frozen))
  lr_at = optim.schedule(optim_config)

  stop = {"signal": None}
  previous = signal.signal(signal.SIGTERM, lambda signum, frame: stop.update(signal=signum))
  bar = metrics_lib.Progress(loop.steps, start, active=None if progress else False)
  last = {}
  # (first step, last step, stacked metrics, t0, tokens per step): a call's metrics are fetched after the next call
  # is dispatched.
  pending = None
  done_at = 0.0  # when the previous call's metrics arrived (a call's device time starts after it, or at dispatch)
  zero_grad_since = None  # first step of the current streak of exactly-zero gradients

  def save(step, data_state):
    # Only finite states are saved, so every checkpoint on disk can be resumed from.
    if not bool(trainable_finite(state.trainable)):
      raise NonFiniteLoss(f"the trained parameters are not finite after step {step} (train/loss at step {step} was "
                          f"{last.get('train/loss')}); stopping without saving. {last_good(checkpointer, step - 1)}")
    checkpointer.save(step, state.checkpoint_tree(), {"data": data_state, **(record or {})})

  def finish_pending():
    nonlocal pending, last, zero_grad_since, done_at
    if pending is None:
      return
    first, final, stacked, t0, tokens = pending
    pending = None
    stacked = jax.device_get(stacked)
    now = time.time()
    dt = (now - max(t0, done_at)) / (final - first + 1)  # seconds per step of this call
    done_at = now
    for i, step in enumerate(range(first, final + 1)):
      m = {k: float(v[i]) for k, v in stacked.items()}
      error, zero_grad_since = check_step(m, step, zero_grad_since, loop.collapse_steps, checkpointer)
      if error is not None:
        raise error
      m.update({"train/step_time_s": dt, "train/loss_tokens_per_s": m["train/tokens"] / max(dt, 1e-9),
                "train/tokens_per_s": tokens / max(dt, 1e-9)})
      logged = step % loop.log_every == 0 or step == loop.steps
      if logged or step == final:  # the schedule is evaluated on the host only where it is recorded
        m["train/lr"] = float(lr_at(step - 1))
      last = m
      bar.update(step, loss=m["train/loss"])
      if logged:
        writer.write(step, {**m, "train/peak_memory_bytes": peak_memory_bytes(), "params/trainable": n_trainable,
                            "params/total": n_total})

  def run_eval(step):
    m = evaluate(eval_step, state, map(to_device, eval_batches()))
    m.update(eval_extras(state, step, eval_hook, diagnostics, writer, workdir))
    writer.write(step, m)
    return m

  try:
    if start == 0:  # the curve starts at the base model (B = 0 for LoRA)
      last.update(run_eval(0))
    step = start
    while step < loop.steps:
      first = step + 1
      step, batches, active = draw_call(lambda: next(train_batches), step, chunk, loop.steps,
                                        lambda: stop["signal"] is not None)
      batches, active = stacked_to_device(batches), mask_to_device(active)
      t0 = time.time()
      rest, m = train_steps(state.frozen, state.replace(frozen=None), batches, active)
      state = rest.replace(frozen=state.frozen)
      finish_pending()
      # Every token slot processed counts: prompt and padding included (all hosts' rows).
      pending = (first, step, m, t0, batches["inputs"].size // chunk)
      if step % loop.eval_every == 0 or step == loop.steps:
        finish_pending()
        last.update(run_eval(step))
      if step % loop.checkpoint_every == 0 or step == loop.steps or stop["signal"] is not None:
        finish_pending()
        save(step, train_batches.state())
      if stop["signal"] is not None:
        # Raised, not returned: a caller looping over runs must not start the next one on a machine going away.
        raise Preempted(f"preempted by signal {stop['signal']} at step {step}; checkpoint saved in "
                        f"{checkpointer.directory}")
    finish_pending()
  finally:
    bar.close()
    signal.signal(signal.SIGTERM, previous)
    checkpointer.close()
  return state, last


def last_good(checkpointer: ckpt_lib.Checkpointer, upto: int) -> str:
  """A sentence naming the newest checkpoint on disk at or before step ``upto``."""
  steps = [s for s in checkpointer.all_steps() if s <= upto]
  if not steps:
    return f"No good checkpoint in {checkpointer.directory}."
  return f"Last good checkpoint: step {steps[-1]} in {checkpointer.directory}."


def check_step(m: dict, step: int, zero_grad_since: int | None, collapse_steps: int,
               checkpointer: ckpt_lib.Checkpointer) -> tuple[Exception | None, int | None]:
  """``(error, zero_grad_since)`` after step ``step``'s metrics ``m``: a ``NonFiniteLoss`` for a NaN/Inf loss or
  gradient norm, a ``Collapsed`` after ``collapse_steps`` steps of exactly zero gradient (0: never), else None; the
  message names the newest checkpoint that can be trusted. ``zero_grad_since`` is the first step of the current
  streak of zero gradients (None: no streak)."""
  # Step s's loss and gradient are those of the state saved as step s - 1, so when they are bad, the newest
  # checkpoint that can be trusted is at step s - 2 or before.
  if not math.isfinite(m["train/loss"]) or not math.isfinite(m["train/grad_norm"]):
    return NonFiniteLoss(f"train/loss is {m['train/loss']} (grad norm {m['train/grad_norm']}) at step {step}; "
                         f"stopping. {last_good(checkpointer, step - 2)}"), zero_grad_since
  zero_grad_since = (zero_grad_since or step) if m["train/grad_norm"] == 0.0 else None
  if collapse_steps and zero_grad_since is not None and step - zero_grad_since + 1 >= collapse_steps:
    return Collapsed(f"train/grad_norm has been exactly 0 for {collapse_steps} steps (steps {zero_grad_since}-{step}, "
                     f"train/loss {m['train/loss']:.6g}): the run has collapsed (learning rate too high?); stopping "
                     f"at step {step}. {last_good(checkpointer, zero_grad_since - 2)}"), zero_grad_since
  return None, zero_grad_since


@dataclasses.dataclass(frozen=True)
class Setup:
  """What ``setup`` builds for one run: the model, its step-0 state placed on the mesh, and how it is placed."""

  model: nn.Module
  spec: lora.LoraSpec
  state: TrainState  # arrays, or ShapeDtypeStructs (with shardings) when set up from abstract params
  mesh: Any  # jax.sharding.Mesh, or None for one device without explicit shardings
  param_shardings: Any  # NamedShardings of the base params (None without a mesh)
  state_shardings: TrainState | None  # NamedShardings of every part of the state (None without a mesh)
  batch_sharding: Any  # NamedSharding of a [B, T] batch (None without a mesh)
  train_step: Callable  # step(frozen, state_without_frozen, batch) -> (state_without_frozen, metrics), jitted
  eval_step: Callable  # eval_step(state, batch) -> (sum NLL, token count), jitted


def setup(model_config, spec: lora.LoraSpec, optim_config: optim.OptimConfig, params, *, mesh=None,
          rules=None, seed: int = 0, grad_accum: int = 1) -> Setup:
  """The one set-up path: mesh -> parameter shardings -> params -> layouts -> adapters -> state -> jitted steps.

  ``model_config`` is a ``models.transformer.ModelConfig``. ``params`` is a base parameter tree, a function of the
  parameter shardings that loads or initialises one (e.g. ``hf.load_params(dir, cfg, shardings=...)``, reading only
  each host's slices), or a tree of ``jax.ShapeDtypeStruct`` (e.g. ``transformer.abstract_params``): then nothing is
  allocated and the state is abstract, with shardings, for lowering the step ahead of time (``benchmarks/fit.py``)
  or checking a config. ``mesh`` is a ``Mesh``, a shape for ``sharding.make_mesh`` or None (one device); ``rules``
  map logical axes to mesh axes (default ``sharding.DEFAULT_RULES``). ``seed`` draws the adapters' init and is the
  state's RNG seed (adapter dropout). ``fit(s.model, s.state, ..., mesh=s.mesh, param_shardings=s.param_shardings)``
  trains the result.
  """
  from lora_jax.models import transformer  # the trainer itself works on any Flax model; set-up knows this one

  model = transformer.CausalLM(model_config)
  param_sh = state_sh = batch_sh = None
  if mesh is not None:
    if not isinstance(mesh, jax.sharding.Mesh):
      mesh = sharding_lib.make_mesh(mesh)
    param_sh = sharding_lib.param_shardings(transformer.abstract_params(model_config),
                                            transformer.logical_axes(model_config), mesh,
                                            sharding_lib.DEFAULT_RULES if rules is None else rules)
    batch_sh = sharding_lib.batch_sharding(mesh)
  if callable(params):
    params = params(param_sh)
  layouts = lora.trace_layouts(model, jnp.zeros((1, 8), jnp.int32))

  def make_state(p):
    base, adapters = lora.create(p, spec, jax.random.key(seed), layouts=layouts)
    return init_state(base, adapters, spec, optim_config, seed)

  shapes = jax.eval_shape(make_state, params)  # checks spec against the model before anything is allocated
  if mesh is not None:
    state_sh = state_shardings(shapes, optim_config, param_sh, mesh)
  if all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(params)):
    state = shapes if mesh is None else jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, state_sh)
  else:
    state = make_state(params)
    if mesh is not None:
      state = jax.device_put(state, state_sh)
  train_step, eval_step = make_steps(model, optim_config, grad_accum, state_sh, batch_sh)
  return Setup(model=model, spec=spec, state=state, mesh=mesh, param_shardings=param_sh, state_shardings=state_sh,
               batch_sharding=batch_sh, train_step=train_step, eval_step=eval_step)
