"""One trainer for LoRA and full fine-tuning: state, train/eval steps, and a run as the one loop runs it (``loop``).

Full fine-tuning is ``LoraSpec.full()``: no adapters and every base parameter trainable, so both methods share the
optimizer, the step, the evaluation, the logging and the checkpoints. The frozen base lives in the state but is
never differentiated, never in the optimizer and never checkpointed (adapter-only checkpoints for LoRA).

Batches are dicts of arrays ``inputs, targets, loss_mask [B, T]`` plus optional ``segment_ids, positions``; the loss
is the mean NLL over tokens with ``loss_mask`` 1 (summed over micro-batches, so accumulation equals one big batch).
"""

from __future__ import annotations

import dataclasses
import functools
import math
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

from lora_jax import lora
from lora_jax import loop as loop_lib
from lora_jax import metrics as metrics_lib
from lora_jax import optim
from lora_jax import quant as quant_lib
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


def accumulate(fn: Callable, batch: dict, parts: int, combine: Callable | None = None,
               init: Callable | None = None):
  """``fn(micro_batch, i)`` folded by ``combine(carry, new)`` (default: the sum, leaf by leaf) over the ``parts``
  micro-batches that ``batch``'s leading axis splits into, in one ``lax.scan`` (``fn`` is in the program once): never
  more than one micro-batch's activations and gradients at a time. The fold starts from zeros shaped like ``fn``'s
  result, or ``init(zeros)`` (the identity of another ``combine``). Gradient accumulation for every step that has it
  (supervised and RL)."""
  micro = jax.tree.map(lambda x: x.reshape((parts, x.shape[0] // parts) + x.shape[1:]), batch)
  shapes = jax.eval_shape(fn, jax.tree.map(lambda x: x[0], micro), 0)
  zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)

  def body(carry, xs):
    mb, i = xs
    new = fn(mb, i)
    return (combine(carry, new) if combine else jax.tree.map(jnp.add, carry, new)), None

  return jax.lax.scan(body, zeros if init is None else init(zeros), (micro, jnp.arange(parts)))[0]


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
    total, count, grads = accumulate(
        lambda mb, i: loss_and_grads(state.trainable, state.frozen, mb, jax.random.fold_in(rng, i), scales), batch,
        grad_accum) if grad_accum > 1 else loss_and_grads(state.trainable, state.frozen, batch, rng, scales)
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


# The loop's configuration and the errors it raises, under the names the trainer's users know them by.
LoopConfig, Preempted, NonFiniteLoss, Collapsed = (loop_lib.LoopConfig, loop_lib.Preempted, loop_lib.NonFiniteLoss,
                                                   loop_lib.Collapsed)


class BatchIterator(Protocol):
  """Training batches with a position that can be saved in a checkpoint and restored exactly."""

  def __next__(self) -> dict: ...

  def state(self) -> dict: ...

  def restore(self, state: dict) -> None: ...


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


def jit_eval_step(model: nn.Module, shardings: TrainState | None = None, batch_sharding=None) -> Callable:
  """``make_eval_step`` jitted (with explicit in-shardings under a mesh)."""
  in_shardings = {} if shardings is None else {"in_shardings": (shardings, batch_sharding)}
  return jax.jit(under_mesh(make_eval_step(model), batch_sharding), **in_shardings)


def make_steps(model: nn.Module, optim_config: optim.OptimConfig, grad_accum: int = 1,
               shardings: TrainState | None = None, batch_sharding=None) -> tuple[Callable, Callable, Callable]:
  """The jitted ``(train_step, train_steps, eval_step)`` of a model: one step (``jit_train_step``), the steps of one
  call of the loop (``jit_train_steps``) and the evaluation; explicit shardings under a mesh."""
  step = make_train_step(model, optim.make_optimizer(optim_config), grad_accum)
  return (jit_train_step(step, shardings, batch_sharding), jit_train_steps(step, shardings, batch_sharding),
          jit_eval_step(model, shardings, batch_sharding))


def state_shardings(state: TrainState, param_shardings, mesh) -> TrainState:
  """Where each part of the state lives: base params by ``param_shardings``, adapters like their kernels, the
  optimizer moments like what they track, counters and RNG replicated."""
  flat = traverse_util.flatten_dict(param_shardings)

  rep = sharding_lib.replicated(mesh)

  def like_params(tree):  # a quantized kernel (QLoRA's base) is replicated: its codes are not sharded yet
    return traverse_util.unflatten_dict({p: jax.tree.map(lambda _: rep, v) if quant_lib.is_quantized(v) else flat[p]
                                         for p, v in traverse_util.flatten_dict(tree).items()}) if tree else {}

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
  return TrainState(step=rep, trainable=trainable, frozen=like_params(state.frozen), opt_state=opt_state, rng=rep)


def program(model: nn.Module, state: TrainState, optim_config: optim.OptimConfig, loop: loop_lib.LoopConfig,
            train_batches: BatchIterator, eval_batches: Callable[[], Iterable[dict]], *, mesh=None,
            param_shardings=None, setup: Setup | None = None) -> tuple[loop_lib.Program, TrainState]:
  """One run as the loop runs it (``loop.Program``, K = 1), and ``state`` placed where it trains.

  Each call runs ``loop.chunk_steps`` steps (``jit_train_steps``). With a ``mesh``, the state is placed by
  ``param_shardings`` (see ``state_shardings``), each host's batches become one global batch split over the data
  axes, and the steps are compiled with explicit shardings. With a ``setup`` (``train.setup``), its mesh, placements
  and compiled steps are the ones used: nothing is derived or compiled again.
  """
  if setup is not None:
    if mesh is not None or param_shardings is not None:
      raise ValueError("fit takes a setup, or a mesh and param_shardings: the setup has its own")
    if setup.grad_accum != loop.grad_accum:
      raise ValueError(f"the setup's steps accumulate {setup.grad_accum} micro-batches, the loop asks for "
                       f"{loop.grad_accum}")
    mesh, param_shardings = setup.mesh, setup.param_shardings
  if (mesh is None) != (param_shardings is None):
    raise ValueError("fit needs both mesh and param_shardings, or neither")
  shardings = batch_sharding = replicated = None
  to_device = stacked_to_device = mask_to_device = lambda x: x  # noqa: E731
  if mesh is not None:
    shardings = setup.state_shardings if setup is not None else state_shardings(state, param_shardings, mesh)
    state = jax.device_put(state, shardings)
    batch_sharding, replicated = sharding_lib.batch_sharding(mesh), sharding_lib.replicated(mesh)
    to_device = functools.partial(sharding_lib.global_batch, mesh=mesh)
    # Global arrays, the (replicated) mask too: a multi-process jit takes no host arrays.
    stacked_sh = stacked_batch_sharding(batch_sharding)
    stacked_to_device = lambda batches: {k: jax.make_array_from_process_local_data(stacked_sh, v)  # noqa: E731
                                         for k, v in batches.items()}
    mask_to_device = functools.partial(jax.make_array_from_process_local_data, replicated)
  chunk = loop.chunk_steps
  if setup is not None:
    train_steps, eval_step = setup.train_steps, setup.eval_step
  else:
    _, train_steps, eval_step = make_steps(model, optim_config, loop.grad_accum, shardings, batch_sharding)
  diagnostics = jax.jit(lambda s: metrics_lib.lora_diagnostics(*lora.combine(s.trainable, s.frozen)),
                        out_shardings=replicated)
  trainable_finite = jax.jit(loop_lib.all_finite, out_shardings=replicated)
  n_trainable = sum(x.size for x in jax.tree.leaves(state.trainable))

  def draw(_, step, stopped):
    last, batches, active = loop_lib.draw_call(lambda: next(train_batches), step, chunk, loop.steps, stopped)
    batches = stacked_to_device(batches)
    # Every token slot processed counts: prompt and padding included (all hosts' rows).
    return loop_lib.Call(last, batches, mask_to_device(active), batches["inputs"].size // chunk)

  def train(s, batches, active):
    rest, m = train_steps(s.frozen, s.replace(frozen=None), batches, active)
    return rest.replace(frozen=s.frozen), m

  prog = loop_lib.Program(
      size=1, draw=draw, train=train,
      evaluate=lambda s: [evaluate(eval_step, s, map(to_device, eval_batches()))],
      split=lambda s: [s], join=lambda s, states: states[0],
      finite=lambda s: np.array([bool(trainable_finite(s.trainable))]),
      data_state=lambda s, k: train_batches.state(), restore_data=lambda data: train_batches.restore(data[0]),
      lr_at=[optim.schedule(optim_config)], n_trainable=[n_trainable],
      n_total=[n_trainable + sum(math.prod(x.shape) for x in jax.tree.leaves(  # a quantized kernel: its values
          state.frozen, is_leaf=quant_lib.is_quantized))], diagnostics=diagnostics)
  return prog, state


def fit(model: nn.Module, state: TrainState, optim_config: optim.OptimConfig, loop: loop_lib.LoopConfig,
        train_batches: BatchIterator, eval_batches: Callable[[], Iterable[dict]], workdir: str | epath.PathLike,
        *, record: dict | None = None, eval_hook: Callable[[TrainState], dict] | None = None,
        writer: metrics_lib.MetricWriter | None = None, progress: bool = True, mesh=None,
        param_shardings=None, setup: Setup | None = None) -> tuple[TrainState, dict]:
  """Trains ``state`` for ``loop.steps`` steps in ``lora_jax.loop`` (``program``), resuming from the newest
  checkpoint in ``workdir`` if there is one; returns the final state and metrics. ``setup``: a ``train.setup``
  whose placements and compiled steps to use (``fit(s.model, s.state, ..., setup=s)``).

  ``record`` (JSON) is stored with every checkpoint (e.g. which base model the adapters belong to).
  ``eval_hook(state)`` may add metrics (e.g. generation accuracy) at each evaluation. SIGTERM saves a checkpoint
  and raises ``Preempted``; a NaN/Inf loss or non-finite parameters raise ``NonFiniteLoss`` without saving, and an
  all-zero gradient for ``loop.collapse_steps`` steps raises ``Collapsed``; both name the newest checkpoint from
  before the failure. On resume, the logs (metrics.jsonl, lora_diagnostics.jsonl) are cut back to the restored
  step, so no step is logged twice.
  """
  prog, state = program(model, state, optim_config, loop, train_batches, eval_batches, mesh=mesh,
                        param_shardings=param_shardings, setup=setup)
  runs = loop_lib.open_runs([workdir], loop, records=[record], writers=[writer])
  state, (result,) = loop_lib.fit(prog, state, loop, runs, eval_hook=eval_hook, fail_fast=True, progress=progress)
  return state, result.metrics


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
  grad_accum: int  # micro-batches per step, in both compiled steps
  train_step: Callable  # step(frozen, state_without_frozen, batch) -> (state_without_frozen, metrics), jitted
  # What the loop runs (``fit(..., setup=s)``), and what benchmarks/fit.py plans the memory of: the steps of one call,
  # steps(frozen, state_without_frozen, batches [k, B, T], active [k]) -> (state_without_frozen, metrics [k]).
  train_steps: Callable
  eval_step: Callable  # eval_step(state, batch) -> (sum NLL, token count), jitted


def setup(model_config, spec: lora.LoraSpec, optim_config: optim.OptimConfig, params, *, mesh=None,
          rules=None, seed: int = 0, grad_accum: int = 1, quant: quant_lib.QuantSpec | None = None) -> Setup:
  """The one set-up path: mesh -> parameter shardings -> params -> layouts -> adapters -> state -> jitted steps.

  ``model_config`` is a ``models.transformer.ModelConfig``. ``params`` is a base parameter tree, a function of the
  parameter shardings that loads or initialises one (e.g. ``hf.load_params(dir, cfg, shardings=...)``, reading only
  each host's slices), or a tree of ``jax.ShapeDtypeStruct`` (e.g. ``transformer.abstract_params``): then nothing is
  allocated and the state is abstract, with shardings, for lowering the step ahead of time (``benchmarks/fit.py``)
  or checking a config. ``mesh`` is a ``Mesh``, a shape for ``sharding.make_mesh`` or None (one device); ``rules``
  map logical axes to mesh axes (default ``sharding.DEFAULT_RULES``). ``seed`` draws the adapters' init and is the
  state's RNG seed (adapter dropout). ``fit(s.model, s.state, ..., setup=s)`` trains the result with the steps
  compiled here. ``quant`` stores the frozen base's kernels it targets quantized (QLoRA, ``lora_jax.quant``) before
  the adapters are made; on a mesh the quantized kernels are replicated (each device holds the whole 4-bit base).
  """
  from lora_jax import model_lora  # the trainer itself works on any Flax model; set-up knows this one
  from lora_jax.models import transformer

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
  layouts = model_lora.layouts(model_config)

  def make_state(p):
    if quant is not None:
      p = lora.quantize_base(p, quant, layouts)
    base, adapters = lora.create(p, spec, jax.random.key(seed), layouts=layouts)
    return init_state(base, adapters, spec, optim_config, seed)

  shapes = jax.eval_shape(make_state, params)  # checks spec against the model before anything is allocated
  if mesh is not None:
    state_sh = state_shardings(shapes, param_sh, mesh)
  if all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(params)):
    state = shapes if mesh is None else jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, state_sh)
  else:
    state = make_state(params)
    if mesh is not None:
      state = jax.device_put(state, state_sh)
  train_step, train_steps, eval_step = make_steps(model, optim_config, grad_accum, state_sh, batch_sh)
  return Setup(model=model, spec=spec, state=state, mesh=mesh, param_shardings=param_sh, state_shardings=state_sh,
               batch_sharding=batch_sh, grad_accum=grad_accum, train_step=train_step, train_steps=train_steps,
               eval_step=eval_step)


def lower_steps(s: Setup, batch: int, seq: int, steps: int = 1):
  """``s.train_steps`` (the loop's call) lowered for ``steps`` batches of ``[batch, seq]`` tokens from shapes alone:
  nothing is allocated. ``.compile().memory_analysis()`` is what a run of that shape needs per device."""
  rows = stacked_batch_sharding(s.batch_sharding) if s.batch_sharding is not None else None
  token = jax.ShapeDtypeStruct((steps, batch, seq), jnp.int32, sharding=rows)
  batches = {"inputs": token, "targets": token,
             "loss_mask": jax.ShapeDtypeStruct((steps, batch, seq), jnp.float32, sharding=rows)}
  active = jax.ShapeDtypeStruct((steps,), jnp.bool_, sharding=(sharding_lib.replicated(s.mesh) if s.mesh is not None
                                                                else None))
  return s.train_steps.lower(s.state.frozen, s.state.replace(frozen=None), batches, active)
