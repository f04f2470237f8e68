"""One trainer for LoRA and full fine-tuning: state, optimizer, train/eval steps, the loop with resume.

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
from lora_jax import sharding as sharding_lib

SCHEDULES = ("constant", "warmup_constant", "linear", "cosine")


@dataclasses.dataclass(frozen=True)
class OptimConfig:
  """Adam(W) and its schedule; the study's setting is Adam, constant LR, no warmup, no clipping."""

  lr: float  # Peak learning rate (of A and of full fine-tuning's weights).
  schedule: str = "constant"  # constant | warmup_constant | linear (decay to 0) | cosine (decay to 0).
  warmup_steps: int = 0  # Linear warm-up steps (warmup_constant, linear, cosine).
  total_steps: int = 0  # Steps the decaying schedules decay over.
  b1: float = 0.9  # Adam beta1.
  b2: float = 0.999  # Adam beta2.
  eps: float = 1e-8  # Adam epsilon.
  weight_decay: float = 0.0  # Decoupled weight decay (AdamW); 0 is plain Adam.
  grad_clip_norm: float | None = None  # Clip the global gradient norm to this value; None = no clipping.
  lr_b_ratio: float = 1.0  # LoRA+: learning rate of B = lr_b_ratio * lr (1 = one LR for A and B, the study's).

  def __post_init__(self):
    if self.schedule not in SCHEDULES:
      raise ValueError(f"unknown optim.schedule {self.schedule!r}; valid: {list(SCHEDULES)}")
    if self.schedule in ("linear", "cosine") and self.total_steps <= self.warmup_steps:
      raise ValueError(f"optim.schedule {self.schedule!r} needs total_steps > warmup_steps, got "
                       f"{self.total_steps} <= {self.warmup_steps}")
    if self.lr <= 0:
      raise ValueError(f"optim.lr must be > 0, got {self.lr}")


def schedule(cfg: OptimConfig, scale: float = 1.0) -> optax.Schedule:
  """The learning-rate schedule of ``cfg`` (times ``scale``)."""
  peak = cfg.lr * scale
  if cfg.schedule == "constant":
    return optax.constant_schedule(peak)
  warmup = optax.linear_schedule(0.0, peak, max(cfg.warmup_steps, 1)) if cfg.warmup_steps else None
  if cfg.schedule == "warmup_constant":
    main = optax.constant_schedule(peak)
  elif cfg.schedule == "linear":
    main = optax.linear_schedule(peak, 0.0, cfg.total_steps - cfg.warmup_steps)
  else:
    main = optax.cosine_decay_schedule(peak, cfg.total_steps - cfg.warmup_steps)
  return optax.join_schedules([warmup, main], [cfg.warmup_steps]) if warmup else main


def make_optimizer(cfg: OptimConfig) -> optax.GradientTransformation:
  """Global-norm clipping (optional) then Adam(W) over the trainable tree, B with its own LR under LoRA+."""

  def adam(scale):
    return optax.adamw(schedule(cfg, scale), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay)

  tx = lora.optimizer(adam(1.0), tx_b=adam(cfg.lr_b_ratio) if cfg.lr_b_ratio != 1.0 else None)
  if cfg.grad_clip_norm is not None:
    tx = optax.chain(optax.clip_by_global_norm(cfg.grad_clip_norm), tx)
  return tx


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


def init_state(params, adapters, spec: lora.LoraSpec, optim: OptimConfig, seed: int) -> TrainState:
  """A step-0 state from base params and adapters (from ``lora.create``)."""
  trainable, frozen = lora.split(params, adapters, spec)
  # Mixed precision: whatever the base's dtype, trained values and Adam moments are float32 (a bf16 base may stay
  # frozen in bf16; the model casts to its compute dtype). Adapters keep the dtype their spec asks for.
  trainable = {"lora": trainable["lora"],
               "params": jax.tree.map(lambda x: x.astype(jnp.float32) if jnp.issubdtype(x.dtype, jnp.floating)
                                      else x, trainable["params"])}
  opt_state = make_optimizer(optim).init(trainable)
  return TrainState(step=jnp.zeros((), jnp.int32), trainable=trainable, frozen=frozen, opt_state=opt_state,
                    rng=jax.random.key_data(jax.random.key(seed)))


def _model_kwargs(batch) -> dict:
  return {k: batch[k] for k in ("segment_ids", "positions") if k in batch}


def nll_sum(model: nn.Module, trainable, frozen, batch, rng, train: bool):
  """(sum of masked token NLL, number of loss tokens) for one batch."""
  params, adapters = lora.combine(trainable, frozen)
  logits = lora.apply(model, params, adapters, batch["inputs"], train=train, rngs={"dropout": rng},
                      **_model_kwargs(batch))
  logp = jax.nn.log_softmax(logits.astype(jnp.float32))
  nll = -jnp.take_along_axis(logp, batch["targets"][..., None].astype(jnp.int32), axis=-1)[..., 0]
  mask = batch["loss_mask"].astype(jnp.float32)
  return jnp.sum(nll * mask), jnp.sum(mask)


def make_train_step(model: nn.Module, tx: optax.GradientTransformation, grad_accum: int = 1) -> Callable:
  """``train_step(state, batch) -> (state, metrics)``; the batch's leading axis is split into ``grad_accum`` parts."""

  def loss_and_grads(trainable, frozen, batch, rng):
    def f(tr):
      total, count = nll_sum(model, tr, frozen, batch, rng, train=True)
      return total, count

    (total, count), grads = jax.value_and_grad(f, has_aux=True)(trainable)
    return total, count, grads

  def train_step(state: TrainState, batch):
    rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    if grad_accum == 1:
      total, count, grads = loss_and_grads(state.trainable, state.frozen, batch, rng)
    else:
      micro = jax.tree.map(lambda x: x.reshape((grad_accum, x.shape[0] // grad_accum) + x.shape[1:]), batch)

      def body(carry, xs):
        mb, i = xs
        t, c, g = loss_and_grads(state.trainable, state.frozen, mb, jax.random.fold_in(rng, i))
        return jax.tree.map(jnp.add, carry, (t, c, g)), None

      zero = (jnp.zeros(()), jnp.zeros(()), jax.tree.map(jnp.zeros_like, state.trainable))
      (total, count, grads), _ = jax.lax.scan(body, zero, (micro, jnp.arange(grad_accum)))
    count = jnp.maximum(count, 1.0)
    grads = jax.tree.map(lambda g: g / count, grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.trainable)
    trainable = optax.apply_updates(state.trainable, updates)
    metrics = {"train/loss": total / count, "train/grad_norm": optax.tree.norm(grads),
               "train/update_norm": optax.tree.norm(updates), "train/tokens": count}
    return state.replace(step=state.step + 1, trainable=trainable, opt_state=opt_state), metrics

  return train_step


def make_eval_step(model: nn.Module) -> Callable:
  """``eval_step(state, batch) -> (sum NLL, token count)``, deterministic (no dropout)."""

  def eval_step(state: TrainState, batch):
    return nll_sum(model, state.trainable, state.frozen, batch, jax.random.key(0), train=False)

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
  seed: int = 0  # Seed of the per-step RNG (adapter dropout).


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
  def step(frozen, state, batch):
    state, metrics = train_step(state.replace(frozen=frozen), batch)
    return state.replace(frozen=None), metrics

  return step


def _donating(train_step: Callable, shardings: TrainState | None = None, batch_sharding=None) -> Callable:
  """``train_step(state, batch)`` run through ``jit_train_step``: the caller keeps the frozen base."""
  step = jit_train_step(train_step, shardings, batch_sharding)

  def run(state: TrainState, batch):
    new, metrics = step(state.frozen, state.replace(frozen=None), batch)
    return new.replace(frozen=state.frozen), metrics

  return run


def state_shardings(state: TrainState, optim: OptimConfig, param_shardings, mesh) -> TrainState:
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
  del optim
  return TrainState(step=rep, trainable=trainable, frozen=like_params(state.frozen), opt_state=opt_state, rng=rep)


class NonFiniteLoss(FloatingPointError):
  """Raised when the loss becomes NaN or Inf; the last good checkpoint is left untouched."""


def peak_memory_bytes() -> int:
  """Peak device memory if the backend reports it, else the process's peak resident memory."""
  stats = jax.local_devices()[0].memory_stats() or {}
  if "peak_bytes_in_use" in stats:
    return int(stats["peak_bytes_in_use"])
  return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def fit(model: nn.Module, state: TrainState, optim: OptimConfig, loop: LoopConfig,
        train_batches: BatchIterator, eval_batches: Callable[[], Iterable[dict]], workdir: str | epath.PathLike,
        *, record: dict | None = None, eval_hook: Callable[[TrainState], dict] | None = None,
        writer: metrics_lib.MetricWriter | None = None, progress: bool = True, mesh=None,
        param_shardings=None) -> tuple[TrainState, dict]:
  """Trains ``state`` for ``loop.steps`` steps, resuming from the newest checkpoint in ``workdir`` if there is one.

  ``record`` (JSON) is stored with every checkpoint (e.g. which base model the adapters belong to).
  ``eval_hook(state)`` may add metrics (e.g. generation accuracy) at each evaluation. SIGTERM saves a checkpoint
  and stops cleanly; a NaN/Inf loss raises ``NonFiniteLoss`` without saving. Returns the final state and metrics.
  With a ``mesh``, the state is placed by ``param_shardings`` (see ``state_shardings``), each host's batches become
  one global batch split over the data axes, and the steps are compiled with explicit shardings.
  """
  if (mesh is None) != (param_shardings is None):
    raise ValueError("fit needs both mesh and param_shardings, or neither")
  workdir = epath.Path(workdir)
  checkpointer = ckpt_lib.Checkpointer(workdir / "checkpoints", keep=loop.keep_checkpoints)
  writer = writer or metrics_lib.MetricWriter(workdir)
  if mesh is None:
    train_step = _donating(make_train_step(model, make_optimizer(optim), loop.grad_accum))
    eval_step = jax.jit(make_eval_step(model))
    to_device = lambda batch: batch  # noqa: E731
  else:
    shardings = state_shardings(state, optim, param_shardings, mesh)
    state = jax.device_put(state, shardings)
    batch_sharding = sharding_lib.batch_sharding(mesh)
    train_step = _donating(make_train_step(model, make_optimizer(optim), loop.grad_accum), shardings, batch_sharding)
    eval_step = jax.jit(make_eval_step(model), in_shardings=(shardings, batch_sharding))
    to_device = functools.partial(sharding_lib.global_batch, mesh=mesh)
  start = checkpointer.latest_step()
  if start is not None:
    restored, saved = checkpointer.restore(start, state.checkpoint_tree())
    state = state.replace(**restored)
    train_batches.restore(saved["data"])
    writer.truncate_after(start)
  start = int(state.step)
  diagnostics = jax.jit(lambda s: metrics_lib.lora_diagnostics(*lora.combine(s.trainable, s.frozen)),
                        out_shardings=None if mesh is None else sharding_lib.replicated(mesh))
  n_trainable = sum(x.size for x in jax.tree.leaves(state.trainable))
  n_total = n_trainable + sum(x.size for x in jax.tree.leaves(state.frozen))
  lr_at = schedule(optim)

  stop = {"signal": None}
  previous = signal.signal(signal.SIGTERM, lambda signum, frame: stop.update(signal=signum))
  bar = metrics_lib.Progress(loop.steps, start, active=None if progress else False)
  last = {}
  pending = None  # (step, metrics, t0): metrics of the step before are fetched after the next is dispatched

  def save(step, data_state):
    checkpointer.save(step, state.checkpoint_tree(), {"data": data_state, **(record or {})})

  def finish_pending():
    nonlocal pending, last
    if pending is None:
      return
    step, m, t0 = pending
    pending = None
    m = {k: float(v) for k, v in jax.device_get(m).items()}
    if not math.isfinite(m["train/loss"]) or not math.isfinite(m["train/grad_norm"]):
      good = checkpointer.latest_step()
      raise NonFiniteLoss(f"train/loss is {m['train/loss']} (grad norm {m['train/grad_norm']}) at step {step}; "
                          f"stopping. Last good checkpoint: step {good} in {checkpointer.directory}")
    dt = time.time() - t0
    m.update({"train/lr": float(lr_at(step - 1)), "train/step_time_s": dt,
              "train/tokens_per_s": m["train/tokens"] / max(dt, 1e-9)})
    last = m
    bar.update(step, loss=m["train/loss"])
    if step % loop.log_every == 0 or step == loop.steps:
      writer.write(step, {**m, "train/peak_memory_bytes": peak_memory_bytes(), "params/trainable": n_trainable,
                          "params/total": n_total})

  def run_eval(step):
    m = evaluate(eval_step, state, map(to_device, eval_batches()))
    if eval_hook is not None:
      m.update(eval_hook(state))
    diag = {k: {n: float(v) for n, v in d.items()} for k, d in jax.device_get(diagnostics(state)).items()}
    if diag:
      for key in ("rel_update", "norm_a", "norm_b"):
        m[f"lora/{key}_mean"] = float(np.mean([d[key] for d in diag.values()]))
      if writer.active:
        metrics_lib.append_line(workdir / "lora_diagnostics.jsonl", json.dumps({"step": step, "modules": diag}))
    writer.write(step, m)
    return m

  try:
    if start == 0:  # the curve starts at the base model (B = 0 for LoRA)
      last.update(run_eval(0))
    for step in range(start + 1, loop.steps + 1):
      batch = to_device(next(train_batches))
      t0 = time.time()
      state, m = train_step(state, batch)
      finish_pending()
      pending = (step, m, t0)
      if step % loop.eval_every == 0 or step == loop.steps:
        finish_pending()
        last.update(run_eval(step))
      if step % loop.checkpoint_every == 0 or step == loop.steps or stop["signal"] is not None:
        finish_pending()
        save(step, train_batches.state())
      if stop["signal"] is not None:
        bar.close()
        print(f"stopped by signal {stop['signal']} at step {step}; checkpoint saved in {checkpointer.directory}")
        break
    finish_pending()
  finally:
    bar.close()
    signal.signal(signal.SIGTERM, previous)
    checkpointer.close()
  return state, last


def restore_trained(run_dir: str | epath.PathLike, params, layouts=None) -> tuple[Any, Any]:
  """``(params, adapters)`` of a run dir's newest checkpoint, on top of the base ``params`` it was trained from."""
  run_dir = epath.Path(run_dir)
  spec_file = run_dir / "lora_spec.json"
  if not spec_file.exists():
    raise FileNotFoundError(f"{spec_file} not found: expected a run directory written by experiments.main")
  spec = lora.LoraSpec.from_json(spec_file.read_text())
  base, adapters = lora.create(params, spec, jax.random.key(0), layouts=layouts)
  checkpointer = ckpt_lib.Checkpointer(run_dir / "checkpoints")
  step = checkpointer.latest_step()
  if step is None:
    raise FileNotFoundError(f"no finished checkpoint in {checkpointer.directory}")
  # The checkpoint holds the optimizer state too; its template costs one Adam init of the trainable tree.
  state = init_state(base, adapters, spec, OptimConfig(lr=1.0), 0)
  restored, _ = checkpointer.restore(step, state.checkpoint_tree())
  return lora.combine(restored["trainable"], state.frozen)
