"""Stacked runs: K runs over one frozen base trained in one jitted step, mapped over a leading run axis.

    plans = [stack.RunPlan(spec_r, optim_lr, seed) for ...]        # K runs that differ in rank, alpha, LR, seed, ...
    s = stack.init(params, plans, layouts)                          # the stacked state and per-run hyperparameters
    s, results = stack.fit(model, s, loop, batches, eval_batches, workdirs)   # each run writes its own run directory

What a run of a stack may set for itself (``STACKABLE_SPEC``, ``optim.HYPERPARAMETERS``, the seed and its data
order); everything else (targets, layers, dropout, schedule, Adam's betas, clipping) is the stack's. Adapters,
fully-trained parameters, Adam states, step RNGs, the per-run learning rate, LoRA+ ratio, weight decay and each
adapter's scale alpha/r carry the run axis; the frozen base is shared, and so is the batch unless the runs draw
different data orders (then each run gets its own, ``[K, B, T]``). The step maps one run's step over the run axis
(``map_runs``): ``jax.vmap`` over groups of ``vectorize`` runs, the groups looped by ``lax.map`` — all K in one vmap
on GPU/TPU, one run at a time on a CPU (``default_vectorize``); the arithmetic of each run is the same either way.

Different ranks share one stack by zero-padding: A's extra columns and B's extra rows start at zero, and since
∂L/∂A[:, j] = xᵀ(g·B[j, :]ᵀ) and ∂L/∂B[j, :] = (x·A[:, j])ᵀg, both stay exactly zero (zero gradient, zero Adam
moments, zero update, zero weight decay), so each run is its unpadded self with the scale of its true rank.

``fit`` writes every run's directory exactly as ``train.fit`` would for that run alone (metrics.jsonl,
lora_diagnostics.jsonl, adapter-only checkpoints at its true rank, TensorBoard), so reports, export and generation
need not know it was stacked. A run whose loss turns non-finite or collapses stops being logged and saved (its
result says why, and so does ``metrics.FAILED_FILE`` in its directory); the others go on. Resume restores every live
run from the newest step all of them have checkpointed; a run that failed in an earlier attempt stays failed. The
loop itself is ``lora_jax.loop``'s, shared with a run alone and RL (``program`` says what a stack's call computes).

``make_eval_runs`` evaluates finished runs' adapters (``lora.stack_adapters``) in one batch with per-row adapters
(``experiments.evaluate`` does it for a whole sweep).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from jax.sharding import NamedSharding, PartitionSpec

from lora_jax import lora
from lora_jax import loop as loop_lib
from lora_jax import metrics as metrics_lib
from lora_jax import optim
from lora_jax import sharding as sharding_lib
from lora_jax import train

RUN_AXIS = "runs"  # logical name of the run axis; sharding rules map it (e.g. {"runs": "data"}) to spread runs
STACKABLE_SPEC = ("rank", "alpha", "scaling", "init_a", "rank_pattern", "alpha_pattern", "rank_policy")


@dataclasses.dataclass(frozen=True)
class RunPlan:
  """One run of a stack: its LoRA spec (``LoraSpec.full()`` for full FT), optimizer and seed (init and dropout)."""

  spec: lora.LoraSpec
  optim: optim.OptimConfig
  seed: int = 0


def check_stackable(plans: Sequence[RunPlan]) -> None:
  """Raises ValueError naming the fields in which a run differs from run 0 beyond what a stack allows."""
  if not plans:
    raise ValueError("a stack needs at least one run")
  ref = plans[0]
  for i, p in enumerate(plans):
    if p.spec.init_a == "pissa":
      raise ValueError(f"run {i}: init_a='pissa' changes the base weights per run, so they cannot share one frozen "
                       "base; stack runs with uniform or gaussian init")
    spec_diff = [f"spec.{f.name}" for f in dataclasses.fields(lora.LoraSpec)
                 if f.name not in STACKABLE_SPEC and getattr(p.spec, f.name) != getattr(ref.spec, f.name)]
    optim_diff = [f"optim.{f.name}" for f in dataclasses.fields(optim.OptimConfig)
                  if f.name not in optim.HYPERPARAMETERS and getattr(p.optim, f.name) != getattr(ref.optim, f.name)]
    if spec_diff or optim_diff:
      raise ValueError(f"run {i} cannot be stacked with run 0: they differ in {spec_diff + optim_diff}; runs of a "
                       f"stack may differ only in spec {list(STACKABLE_SPEC)}, optim {list(optim.HYPERPARAMETERS)} "
                       "and seed")


def _unit_scales(tree):
  """``tree`` with every Adapter's static scale replaced by its 0/1 layer mask, so runs of any rank share a treedef."""

  def one(x):
    if isinstance(x, lora.Adapter):
      return x.replace(scale=lora._nested((x.scale_array() != 0).astype(np.float32)))  # noqa: SLF001
    return x

  return jax.tree.map(one, tree, is_leaf=lambda x: isinstance(x, lora.Adapter))


def stack_trees(trees: Sequence[Any]) -> Any:
  """Stacks K trees of one structure on a new leading axis, zero-padding each leaf to the largest shape among them."""
  normal = [_unit_scales(t) for t in trees]
  treedef = jax.tree.structure(normal[0])
  for i, t in enumerate(normal[1:], 1):
    if jax.tree.structure(t) != treedef:
      raise ValueError(f"run {i}'s state has another structure than run 0's (different targets, layers or "
                       "trainable parameters): they cannot be stacked")
  columns = zip(*(jax.tree.leaves(t) for t in normal))

  def pad_stack(leaves):
    if not np.ndim(leaves[0]):
      return jnp.stack(leaves)
    shape = tuple(int(n) for n in np.max([np.shape(x) for x in leaves], axis=0))
    return jnp.stack([jnp.pad(x, [(0, n - m) for n, m in zip(shape, np.shape(x))]) for x in leaves])

  return jax.tree.unflatten(treedef, [pad_stack(c) for c in columns])


def unstack_tree(stacked: Any, k: int, like: Any) -> Any:
  """Run ``k`` of a stacked tree, cut back to the shapes (true ranks) and structure (true scales) of ``like``."""
  leaves, treedef = jax.tree.flatten(like)
  return jax.tree.unflatten(treedef, [x[k][tuple(slice(0, n) for n in np.shape(y))]
                                      for x, y in zip(jax.tree.leaves(stacked), leaves)])


@dataclasses.dataclass
class Stack:
  """K runs as one: the stacked state (every leaf but ``frozen`` has the run axis) and per-run hyperparameters."""

  state: train.TrainState
  hyper: dict  # {"lr", "lr_b_ratio", "weight_decay": [K], "scales": {adapter key: [K, *stack axes]}}
  plans: list[RunPlan]
  like: list[train.TrainState]  # each run's own state as shapes (true ranks and scales), for unstacking

  @property
  def size(self) -> int:
    """Number of runs K."""
    return len(self.plans)

  def run_state(self, k: int) -> train.TrainState:
    """Run ``k`` alone, as ``train.fit`` would hold it (true rank and scale, the shared frozen base)."""
    rest = unstack_tree(self.state.replace(frozen=None), k, self.like[k].replace(frozen=None))
    return rest.replace(frozen=self.state.frozen)


def _hyper(plan: RunPlan, adapters) -> dict:
  return {"lr": plan.optim.lr, "lr_b_ratio": plan.optim.lr_b_ratio, "weight_decay": plan.optim.weight_decay,
          "scales": {key: ad.scale_array() for key, ad in lora.adapter_items(adapters)}}


def init(params, plans: Sequence[RunPlan], layouts=None) -> Stack:
  """Creates each run's adapters and state (``lora.create``, ``train.init_state`` with its seed) and stacks them."""
  plans = list(plans)
  check_stackable(plans)
  states, hypers = [], []
  for p in plans:
    base, adapters = lora.create(params, p.spec, jax.random.key(p.seed), layouts=layouts)
    states.append(train.init_state(base, adapters, p.spec, p.optim, p.seed))
    hypers.append(_hyper(p, adapters))
  frozen = states[0].frozen
  rest = stack_trees([s.replace(frozen=None) for s in states])
  # Python floats become float32 (float64 under x64), as a separate run's constants do; scales stay float32.
  hyper = jax.tree.map(lambda *xs: jnp.asarray(np.stack(xs)), *hypers)
  like = [jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), s.replace(frozen=None)) for s in states]
  return Stack(state=rest.replace(frozen=frozen), hyper=hyper, plans=plans, like=like)


def with_states(s: Stack, states: Sequence[train.TrainState]) -> Stack:
  """``s`` holding these per-run states (e.g. restored from each run's checkpoint) instead of its own."""
  rest = stack_trees([st.replace(frozen=None) for st in states])
  return dataclasses.replace(s, state=rest.replace(frozen=s.state.frozen))


def default_vectorize(k: int, sharded: bool = False) -> int:
  """Runs per vmapped group when none is asked for: all ``k`` on GPU/TPU or when the runs are spread over a mesh
  (bigger matmuls fill the chip); one at a time on a CPU, where the vmapped program spends more time in its matmul
  and elementwise fusions and copies than the loop (``benchmarks/many_runs.py``, K=8 tiny step: vmapped 0.77x of K
  separate steps, looped 1.06x)."""
  return k if sharded or jax.default_backend() != "cpu" else 1


def map_runs(fn: Callable, xs, vectorize: int):
  """``fn`` over the leading run axis of ``xs``: ``vectorize`` runs at a time in one ``jax.vmap``, the groups one
  after another in a ``lax.map`` loop (all at once when ``vectorize`` covers them)."""
  k = jax.tree.leaves(xs)[0].shape[0]
  if k == 1:  # one run: its own step's program (a vmap of one adds layout changes around the run axis)
    return jax.tree.map(lambda y: y[None], fn(jax.tree.map(lambda x: x[0], xs)))
  if vectorize >= k:
    return jax.vmap(fn)(xs)
  return jax.lax.map(fn, xs, batch_size=vectorize if vectorize > 1 else None)


def _step_fns(model: nn.Module, plans: Sequence[RunPlan], grad_accum: int, per_run_batches: bool,
              shardings: dict | None, vectorize: int | None) -> tuple[Callable, Callable]:
  """The stacked ``(train_step, eval_step)`` before jit (``make_steps``), traced under the mesh of ``shardings``."""
  ref = plans[0].optim
  step_fn = train.make_train_step(model, lambda h: optim.make_optimizer(ref, h), grad_accum)
  eval_fn = train.make_eval_step(model)
  if vectorize is None:
    vectorize = default_vectorize(len(plans), shardings is not None and shardings["runs"].spec != PartitionSpec(None))
  if vectorize < 1:
    raise ValueError(f"vectorize must be >= 1 runs per vmapped group, got {vectorize}")

  def train_step(frozen, state, batch, hyper):
    def one(xs):
      st, b, h = xs
      new, m = step_fn(st.replace(frozen=frozen), batch if b is None else b, h)
      return new.replace(frozen=None), m

    return map_runs(one, (state, batch if per_run_batches else None, hyper), vectorize)

  def eval_step(frozen, state, batch, hyper):
    return map_runs(lambda xs: eval_fn(xs[0].replace(frozen=frozen), batch, xs[1]["scales"]), (state, hyper),
                    vectorize)

  if shardings is None:
    return train_step, eval_step
  # Traced under the mesh, so that mesh-aware kernels (splash attention on TPU) find it, as in train.make_steps.
  return train.under_mesh(train_step, shardings["batch"]), train.under_mesh(eval_step, shardings["batch"])


def make_steps(model: nn.Module, plans: Sequence[RunPlan], grad_accum: int = 1, per_run_batches: bool = False,
               shardings: dict | None = None, vectorize: int | None = None) -> tuple[Callable, Callable]:
  """The jitted stacked ``(train_step, eval_step)``.

  ``train_step(frozen, state_without_frozen, batch, hyper) -> (state_without_frozen, metrics [K])`` donates the
  state; ``eval_step(frozen, state_without_frozen, batch, hyper) -> (sum NLL [K], token count [K])`` on one shared
  batch. ``shardings`` (from ``stack_shardings``) compiles them with explicit placements. ``vectorize`` runs go
  through one vmapped step at a time (``map_runs``; default ``default_vectorize``): each run's arithmetic is the
  same either way, only the program's shape changes. ``make_train_steps`` scans the step over several batches.
  """
  train_step, eval_step = _step_fns(model, plans, grad_accum, per_run_batches, shardings, vectorize)
  if shardings is None:
    return jax.jit(train_step, donate_argnums=(1,)), jax.jit(eval_step)
  sh = shardings
  batch_sh = sh["run_batch"] if per_run_batches else sh["batch"]
  return (jax.jit(train_step, donate_argnums=(1,), in_shardings=(sh["frozen"], sh["state"], batch_sh, sh["hyper"]),
                  out_shardings=(sh["state"], sh["runs"])),
          jax.jit(eval_step, in_shardings=(sh["frozen"], sh["state"], sh["batch"], sh["hyper"]),
                  out_shardings=sh["runs"]))


def make_train_steps(model: nn.Module, plans: Sequence[RunPlan], grad_accum: int = 1, per_run_batches: bool = False,
                     shardings: dict | None = None, vectorize: int | None = None) -> Callable:
  """``make_steps``'s train step scanned over several batches in one jitted call (``train.scan_steps``), as
  ``train.fit`` runs ``loop.chunk_steps`` steps a call: ``steps(frozen, state_without_frozen, batches, active,
  hyper) -> (state_without_frozen, metrics [n, K])``, ``batches`` ``[n, B, T]`` (``[n, K, B, T]`` per run); a step
  whose ``active`` entry is False leaves every run as it was. Donates the state."""
  train_step, _ = _step_fns(model, plans, grad_accum, per_run_batches, shardings, vectorize)

  def steps(frozen, state, batches, active, hyper):
    return train.scan_steps(lambda st, b: train_step(frozen, st, b, hyper), state, batches, active)

  if shardings is None:
    return jax.jit(steps, donate_argnums=(1,))
  sh = shardings
  mesh = sh["batch"].mesh
  return jax.jit(steps, donate_argnums=(1,),
                 in_shardings=(sh["frozen"], sh["state"],
                               train.stacked_batch_sharding(sh["run_batch"] if per_run_batches else sh["batch"]),
                               sharding_lib.replicated(mesh), sh["hyper"]),
                 out_shardings=(sh["state"], NamedSharding(mesh, PartitionSpec(None, *sh["runs"].spec))))


def make_eval_runs(model: nn.Module, k: int) -> Callable:
  """The jitted ``eval_runs(params, adapters, batch) -> (sum NLL [k], loss tokens [k])`` of ``k`` runs' adapters
  stacked by ``lora.stack_adapters``, all in one program: the batch repeated ``k`` times, copy r answered by run r
  (``lora.apply(rows=)``: A and B gathered per row, never a per-row W + BA); the loss head then takes one run's
  rows at a time, so no more than one run's logits (or loss chunk) are held. ``model`` is a ``CausalLM``."""

  def eval_runs(params, adapters, batch):
    b = batch["inputs"].shape[0]
    tiled = jax.tree.map(lambda x: jnp.concatenate([x] * k, axis=0), batch)
    rows = jnp.repeat(jnp.arange(k, dtype=jnp.int32), b)
    h, _ = lora.apply(model, params, adapters, tiled["inputs"], rows=rows, method="hidden_states",
                      check_unused=False, **train._model_kwargs(tiled))  # noqa: SLF001

    def one(xs):
      r, h_r, targets, mask = xs
      return lora.apply(model, params, adapters, h_r, targets, mask, rows=jnp.full((b,), r, jnp.int32),
                        method="hidden_nll_sum", check_unused=False)

    per_run = lambda x: x.reshape(k, b, *x.shape[1:])  # noqa: E731
    return jax.lax.map(one, (jnp.arange(k), per_run(h), per_run(tiled["targets"]), per_run(tiled["loss_mask"])))

  return jax.jit(eval_runs)


def stack_shardings(s: Stack, param_shardings, mesh, rules: dict | None = None) -> dict:
  """Placements of a stack on ``mesh``: each run's parts as ``train.state_shardings`` places one run's, with the run
  axis (logical ``RUN_AXIS``, mapped by ``rules``) in front; the frozen base by ``param_shardings``; the shared batch
  over the batch axes the run axis does not use."""
  rules = dict(sharding_lib.DEFAULT_RULES if rules is None else rules)
  run_axis = rules.get(RUN_AXIS)
  one = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype), s.state.replace(frozen=None))
  per_run = train.state_shardings(one.replace(frozen=s.state.frozen), param_shardings, mesh)
  used = {a for a in ([run_axis] if isinstance(run_axis, str) else run_axis or [])}

  def with_run_axis(sh):
    taken = {a for part in sh.spec for a in ([part] if isinstance(part, str) else part or [])}
    if used & taken:
      raise ValueError(f"sharding rule {RUN_AXIS!r} -> {run_axis!r} puts the run axis on mesh axes that also split a "
                       f"parameter ({sh.spec}); map {RUN_AXIS!r} to a mesh axis the parameters do not use")
    return NamedSharding(mesh, PartitionSpec(run_axis, *sh.spec))

  state = jax.tree.map(with_run_axis, per_run.replace(frozen=None))
  runs = NamedSharding(mesh, PartitionSpec(run_axis))
  batch_axes = tuple(a for a in sharding_lib.BATCH_AXES if a not in used)
  return {"frozen": per_run.frozen, "state": state, "runs": runs,
          "hyper": jax.tree.map(lambda x: NamedSharding(mesh, PartitionSpec(run_axis)), s.hyper),
          "batch": NamedSharding(mesh, PartitionSpec(batch_axes or None)),
          "run_batch": NamedSharding(mesh, PartitionSpec(run_axis, batch_axes or None))}


def _next_batch(batches):
  """The next shared batch, or each run's next batch stacked ``[K, B, T]`` (an iterator that several runs share,
  the same object in ``batches``, is drawn from once)."""
  if not isinstance(batches, (list, tuple)):
    return next(batches)
  drawn = {}
  for it in batches:
    if id(it) not in drawn:
      drawn[id(it)] = next(it)
  parts = [drawn[id(it)] for it in batches]
  return {k: np.stack([b[k] for b in parts]) for k in parts[0]}


def _data_states(batches, k: int) -> dict:
  return (batches[k] if isinstance(batches, (list, tuple)) else batches).state()


def program(model: nn.Module, s: Stack, loop: train.LoopConfig, batches, eval_batches: Callable[[], Iterable[dict]],
            *, mesh=None, param_shardings=None, rules: dict | None = None,
            vectorize: int | None = None) -> tuple[loop_lib.Program, train.TrainState]:
  """The K runs of ``s`` as the loop runs them (``loop.Program``), and the stacked state placed where it trains.

  Each call runs ``loop.chunk_steps`` steps of every run (``make_train_steps``), cut at the same steps as a run alone
  is cut, so a resumed stack runs the same calls. With a ``mesh``, the runs are spread over the mesh axis that
  ``rules`` maps ``RUN_AXIS`` to (``stack_shardings``). ``vectorize``: runs per vmapped group (``make_steps``).
  """
  k_runs = s.size
  per_run_batches = isinstance(batches, (list, tuple))
  if per_run_batches and len(batches) != k_runs:
    raise ValueError(f"{k_runs} runs but {len(batches)} batch iterators")
  shardings, hyper = None, s.hyper
  to_device = calls_to_device = lambda b: b  # noqa: E731  (eval batches; a call's stacked batches)
  state = s.state
  if mesh is not None:
    shardings = stack_shardings(s, param_shardings, mesh, rules)
    state = jax.device_put(state, dataclasses.replace(shardings["state"], frozen=shardings["frozen"]))
    hyper = jax.device_put(hyper, shardings["hyper"])
    call_sh = train.stacked_batch_sharding(shardings["run_batch"] if per_run_batches else shardings["batch"])
    to_device = lambda b: jax.device_put(b, shardings["batch"])  # noqa: E731
    calls_to_device = lambda b: jax.device_put(b, call_sh)  # noqa: E731
  _, eval_step = make_steps(model, s.plans, loop.grad_accum, per_run_batches, shardings, vectorize)
  train_steps = make_train_steps(model, s.plans, loop.grad_accum, per_run_batches, shardings, vectorize)
  runs_finite = jax.jit(jax.vmap(loop_lib.all_finite))  # [K]: one program for every run (padding is finite)
  # Every run's own state in one jitted call (slicing each leaf eagerly per run costs a dispatch per leaf and run).
  split = jax.jit(lambda rest: [unstack_tree(rest, k, like.replace(frozen=None)) for k, like in enumerate(s.like)])
  n_trainable = [sum(math.prod(x.shape) for x in jax.tree.leaves(like.trainable)) for like in s.like]
  n_frozen = sum(x.size for x in jax.tree.leaves(s.state.frozen))

  def draw(_, step, stopped):
    last, host, active = loop_lib.draw_call(lambda: _next_batch(batches), step, loop.chunk_steps, loop.steps,
                                            stopped)
    tokens = host["inputs"][0].size // (k_runs if per_run_batches else 1)  # token slots of one run's batch
    return loop_lib.Call(last, calls_to_device(host), active, tokens)

  def train_call(st, call_batches, active):
    rest, m = train_steps(st.frozen, st.replace(frozen=None), call_batches, active, hyper)
    return rest.replace(frozen=st.frozen), m

  def evaluate(st):
    totals, counts = 0.0, 0.0
    for batch in eval_batches():
      t, c = eval_step(st.frozen, st.replace(frozen=None), to_device(batch), hyper)
      totals, counts = totals + np.asarray(t, np.float64), counts + np.asarray(c, np.float64)
    if np.any(np.asarray(counts) == 0):
      raise ValueError("the eval set has no loss tokens")
    nll = np.asarray(totals / counts)
    return [{"eval/nll": float(x), "eval/perplexity": math.exp(min(float(x), 700.0))} for x in nll]

  def join(st, states):
    joined = with_states(dataclasses.replace(s, state=st), states).state
    if mesh is None:
      return joined
    return jax.device_put(joined, dataclasses.replace(shardings["state"], frozen=shardings["frozen"]))

  def restore_data(data):
    for k in data if per_run_batches else list(data)[:1]:
      (batches[k] if per_run_batches else batches).restore(data[k])

  prog = loop_lib.Program(
      size=k_runs, draw=draw, train=train_call, evaluate=evaluate,
      split=lambda st: [rest.replace(frozen=st.frozen) for rest in split(st.replace(frozen=None))], join=join,
      finite=lambda st: np.asarray(runs_finite(st.trainable)), data_state=lambda st, k: _data_states(batches, k),
      restore_data=restore_data, lr_at=[optim.schedule(p.optim) for p in s.plans], n_trainable=n_trainable,
      n_total=[n + n_frozen for n in n_trainable],
      diagnostics=jax.jit(lambda st: metrics_lib.lora_diagnostics(*lora.combine(st.trainable, st.frozen))))
  return prog, state


def fit(model: nn.Module, s: Stack, loop: train.LoopConfig, batches, eval_batches: Callable[[], Iterable[dict]],
        workdirs: Sequence[str | epath.PathLike], *, records: Sequence[dict] | None = None,
        eval_hook: Callable[[train.TrainState], dict] | None = None,
        writers: Sequence[metrics_lib.MetricWriter] | None = None, progress: bool = True, mesh=None,
        param_shardings=None, rules: dict | None = None,
        vectorize: int | None = None) -> tuple[Stack, list[loop_lib.RunResult]]:
  """Trains the K runs of ``s`` for ``loop.steps`` steps in ``lora_jax.loop`` (``program``), each into its own
  ``workdirs[k]`` as ``train.fit`` would.

  ``batches`` is one ``train.BatchIterator`` shared by every run, or a list of K (each run's own data order; runs
  that share an order may share one iterator object, drawn once a step). Resumes every run from the newest step
  that all of them have checkpointed. SIGTERM saves every live run and raises ``train.Preempted``. A run that fails
  stops (its result and ``metrics.FAILED_FILE`` say why) and the others go on. Returns the final stack and each
  run's ``loop.RunResult``.
  """
  if len(workdirs) != s.size:
    raise ValueError(f"{s.size} runs but {len(workdirs)} workdirs")
  prog, state = program(model, s, loop, batches, eval_batches, mesh=mesh, param_shardings=param_shardings,
                        rules=rules, vectorize=vectorize)
  runs = loop_lib.open_runs(workdirs, loop, records=records or (), writers=writers or (), remember_failures=True)
  state, results = loop_lib.fit(prog, state, loop, runs, eval_hook=eval_hook, progress=progress)
  return dataclasses.replace(s, state=state), results
