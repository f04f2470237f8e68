"""The one training loop: K runs (K = 1 is a run alone) trained call by call, each into its own run directory.

    program = train.program(...) | stack.program(...) | rl.program(...)   # what one call computes, per client
    state, results = loop.fit(program, state, loop_config, loop.open_runs(workdirs, loop_config))

The loop owns everything around the arithmetic, once for every client: one writer per run directory (``lock.hold``),
resuming every live run from the newest step all of them have checkpointed (moving an unreadable newer one aside),
cutting the logs back to it, SIGTERM (finish the call, save, raise ``Preempted``), the progress line, fetching a
call's metrics while the next call runs, the per-step checks (a NaN/Inf loss or gradient: ``NonFiniteLoss``; an all-zero gradient for
``LoopConfig.collapse_steps`` steps: ``Collapsed``), evaluation (the program's metrics, an eval hook's and the
per-module LoRA diagnostics), logging and checkpoints (only finite states are saved). A ``Program`` says what a call
is: how its batches are drawn (a data iterator, or an RL sampler reading the current state), the jitted steps,
the evaluation, and how the K runs' states are split and joined.

With ``fail_fast`` (a run alone) a failed run raises at once; otherwise (a stack) it stops being logged and saved,
is marked failed on disk (``metrics.FAILED_FILE``, so a resumed stack leaves it failed) and the others go on.
"""

from __future__ import annotations

import dataclasses
import json
import math
import resource
import signal
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from lora_jax import checkpoint as ckpt_lib
from lora_jax import lock
from lora_jax import metrics as metrics_lib


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


class Preempted(Exception):
  """Raised after SIGTERM once a checkpoint is saved, so the whole process stops instead of starting the next run."""


class NonFiniteLoss(FloatingPointError):
  """Raised when the loss or the trained parameters become NaN or Inf; nothing non-finite is ever saved."""


class Collapsed(ArithmeticError):
  """Raised when the gradient has been exactly zero for ``LoopConfig.collapse_steps`` steps (a dead run)."""


class Call(NamedTuple):
  """One jitted call's input, as a program's ``draw`` returns it."""

  last_step: int  # the step the call ends at
  batches: Any  # what ``Program.train`` takes (device-ready), with a leading axis of ``chunk`` steps
  active: Any  # [chunk] bools: False marks padding after a SIGTERM (those steps leave the state as it was)
  tokens: float  # token slots one run processes per step (for tokens_per_s)
  host_metrics: Sequence[dict] = ()  # per step of the call, merged into its metrics (e.g. an RL round's rewards)
  draw_seconds: float = 0.0  # host time spent drawing it that the device did not overlap (an RL round's sampling)


@dataclasses.dataclass(frozen=True)
class Program:
  """What the loop runs for one client: K runs' state transitions; every file on disk is the loop's."""

  size: int  # K runs
  # draw(state, step, stopped) -> Call after ``step``; ``stopped()`` turns true on SIGTERM.
  draw: Callable[[Any, int, Callable[[], bool]], Call]
  train: Callable[[Any, Any, Any], tuple[Any, dict]]  # (state, batches, active) -> (state, metrics {name: [chunk, K]})
  evaluate: Callable[[Any], list[dict]]  # state -> each run's eval metrics
  split: Callable[[Any], list[Any]]  # state -> each run's own ``train.TrainState``
  join: Callable[[Any, list[Any]], Any]  # (state, each run's restored TrainState) -> state
  finite: Callable[[Any], np.ndarray]  # state -> [K] whether each run's trained parameters are finite
  data_state: Callable[[Any, int], dict]  # (state, k) -> run k's data position, saved with its checkpoint
  restore_data: Callable[[dict[int, dict]], None]  # {run: saved data position} of the live runs on resume
  lr_at: Sequence[Callable[[int], float]]  # each run's schedule (step -> LR), logged where metrics are written
  n_trainable: Sequence[int]  # each run's trainable parameters
  n_total: Sequence[int]  # each run's parameters, frozen base included
  diagnostics: Callable[[Any], dict] | None = None  # one run's state -> per-module LoRA diagnostics (None: none)
  progress_key: str = "train/loss"  # the metric the progress line shows
  # True when ``draw`` reads the state (an RL round samples from it): the previous call's metrics are then fetched
  # before the next draw, so a call's time is its own (its draw_seconds plus its device time).
  draw_reads_state: bool = False


@dataclasses.dataclass
class Run:
  """One run's files and bookkeeping: its checkpoints, metric writer, record and whether it has failed."""

  workdir: epath.Path
  checkpointer: ckpt_lib.Checkpointer
  writer: metrics_lib.MetricWriter
  record: dict = dataclasses.field(default_factory=dict)  # stored with every checkpoint (e.g. the base model)
  remember_failure: bool = False  # a failure is written to FAILED_FILE (a stack's runs), so a rerun keeps it
  error: str | None = None
  last: dict = dataclasses.field(default_factory=dict)  # the last train and eval metrics
  zero_grad_since: int | None = None  # first step of the current streak of exactly-zero gradients

  def fail(self, error: str) -> None:
    """Marks the run failed (on disk too when ``remember_failure``)."""
    self.error = error
    if self.remember_failure and self.writer.active:
      (self.workdir / metrics_lib.FAILED_FILE).write_text(json.dumps({"error": error}) + "\n")


def open_runs(workdirs: Sequence[str | epath.PathLike], loop: LoopConfig, *, records: Sequence[dict | None] = (),
              writers: Sequence[metrics_lib.MetricWriter | None] = (), remember_failures: bool = False) -> list[Run]:
  """A ``Run`` per workdir; with ``remember_failures`` a run that failed in an earlier attempt stays failed."""
  runs = []
  for k, w in enumerate(workdirs):
    w = epath.Path(w)
    failed = w / metrics_lib.FAILED_FILE
    runs.append(Run(w, ckpt_lib.Checkpointer(w / "checkpoints", keep=loop.keep_checkpoints),
                    (writers[k] if k < len(writers) else None) or metrics_lib.MetricWriter(w),
                    dict((records[k] if k < len(records) else None) or {}), remember_failures,
                    json.loads(failed.read_text())["error"] if remember_failures and failed.exists() else None))
  return runs


@dataclasses.dataclass(frozen=True)
class RunResult:
  """How one run ended: "done" or "failed" (with the error that stopped it) and its last metrics."""

  state: str
  error: str | None = None
  metrics: dict = dataclasses.field(default_factory=dict)


def peak_memory_bytes() -> int:
  """Peak device memory if the backend reports it, else the process's peak resident memory."""
  stats = jax.local_devices()[0].memory_stats() or {}
  if "peak_bytes_in_use" in stats:
    return int(stats["peak_bytes_in_use"])
  return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def all_finite(tree) -> jax.Array:
  """Whether every entry of every leaf of ``tree`` is finite, as one scalar (jit it: one fused reduction)."""
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)] or [jnp.array(True)]))


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
  streak of zero gradients (None: no streak). A step whose batch had no learning signal (an RL step whose groups all
  had equal rewards: ``train/groups_with_signal`` 0) has a zero gradient by design: it ends a streak, never counts."""
  # Step s's loss and gradient are those of the state saved as step s - 1, so when they are bad, the newest
  # checkpoint that can be trusted is at step s - 2 or before.
  if not math.isfinite(m["train/loss"]) or not math.isfinite(m["train/grad_norm"]):
    return NonFiniteLoss(f"train/loss is {m['train/loss']} (grad norm {m['train/grad_norm']}) at step {step}; "
                         f"stopping. {last_good(checkpointer, step - 2)}"), zero_grad_since
  if m.get("train/groups_with_signal", 1.0) == 0.0:
    return None, None  # a collapse is consecutive zero gradients of steps that had something to learn
  zero_grad_since = (zero_grad_since or step) if m["train/grad_norm"] == 0.0 else None
  if collapse_steps and zero_grad_since is not None and step - zero_grad_since + 1 >= collapse_steps:
    return Collapsed(f"train/grad_norm has been exactly 0 for {collapse_steps} steps (steps {zero_grad_since}-{step}, "
                     f"train/loss {m['train/loss']:.6g}): the run has collapsed (learning rate too high?); stopping "
                     f"at step {step}. {last_good(checkpointer, zero_grad_since - 2)}"), zero_grad_since
  return None, zero_grad_since


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


def _resume(program: Program, state, runs: list[Run]) -> tuple[Any, int]:
  """The state restored from the newest step every live run has a readable checkpoint of, and that step (0: a fresh
  start). Newer checkpoints that can't be read (truncated files, a missing ``_METADATA``) are moved aside to
  ``<step>.corrupt`` and the others past the step deleted (the resumed runs write them again), each said; when none
  can be read (also what a changed model or optimizer looks like) the error is raised and nothing is touched."""
  live = [k for k, r in enumerate(runs) if r.error is None]
  common = sorted(set.intersection(*(set(runs[k].checkpointer.all_steps()) for k in live)))
  unreadable = []  # (run index, step, error)
  for step in reversed(common):
    states, data = program.split(state), {}
    try:
      for k in live:
        items, saved = runs[k].checkpointer.restore(step, states[k].checkpoint_tree())
        states[k], data[k] = states[k].replace(**items), saved["data"]
    except ckpt_lib.CheckpointError as err:
      unreadable.append((k, step, err))
      continue
    _clear_newer(runs, live, step, unreadable)
    program.restore_data(data)
    return program.join(state, states), step
  if unreadable:
    k, step, err = unreadable[-1]
    raise ckpt_lib.CheckpointError(f"{err}\nno checkpoint of {runs[k].checkpointer.directory} can be read (a changed "
                                   "model, LoRA spec or optimizer reads as this too); move it aside to start over")
  _clear_newer(runs, live, 0, [])
  return state, 0


def _clear_newer(runs: list[Run], live: list[int], step: int, unreadable: list) -> None:
  """Moves the unreadable checkpoints aside and deletes every other one past ``step`` of the live runs (steps one run
  of a stack saved before a kill, or newer than an unreadable one), so that the resumed runs can save them again."""
  for k, bad, err in unreadable:
    print(f"WARNING: {err}\nmoved it aside to {runs[k].checkpointer.set_aside(bad)}; resuming from step {step}")
  for k in live:
    for newer in [s for s in runs[k].checkpointer.all_steps() if s > step]:
      print(f"deleting checkpoint {runs[k].checkpointer.directory / str(newer)}: the run resumes from step {step} and "
            "writes it again")
      runs[k].checkpointer.delete(newer)


def fit(program: Program, state, loop: LoopConfig, runs: Sequence[Run], *, eval_hook: Callable | None = None,
        fail_fast: bool = False, progress: bool = True) -> tuple[Any, list[RunResult]]:
  """Trains the K runs of ``state`` for ``loop.steps`` steps (module docstring); returns the final state and each
  run's result. ``eval_hook(run_state)`` may add metrics (e.g. generation accuracy) at each evaluation."""
  runs = list(runs)
  if len(runs) != program.size:
    raise ValueError(f"{program.size} runs but {len(runs)} run directories")
  try:
    with lock.hold_all([r.workdir for r in runs], enabled=jax.process_index() == 0):  # one writer per run directory
      return _fit(program, state, loop, runs, eval_hook, fail_fast, progress)
  finally:
    for r in runs:
      r.checkpointer.close()


def _fit(program: Program, state, loop: LoopConfig, runs: list[Run], eval_hook, fail_fast: bool,
         progress: bool) -> tuple[Any, list[RunResult]]:
  if all(r.error is not None for r in runs):  # every run failed in an earlier attempt
    return state, [RunResult("failed", r.error) for r in runs]
  state, start = _resume(program, state, runs)
  # Records past ``start`` were written by an attempt that died before its next checkpoint; they are redone now.
  # A fresh start redoes step 0's evaluation too, so then nothing is kept.
  keep_until = start if start else -1
  for r in runs:
    if r.error is None:
      r.writer.truncate_after(keep_until)
      if r.writer.active:
        metrics_lib.truncate_jsonl(r.workdir / metrics_lib.DIAGNOSTICS_FILE, keep_until)
  return _train(program, state, loop, runs, start, eval_hook, fail_fast, progress)


def _train(program: Program, state, loop: LoopConfig, runs: list[Run], start: int, eval_hook, fail_fast: bool,
           progress: bool) -> tuple[Any, list[RunResult]]:
  stop = {"signal": None}
  previous = signal.signal(signal.SIGTERM, lambda signum, frame: stop.update(signal=signum))
  bar = metrics_lib.Progress(loop.steps, start, active=None if progress else False)
  # (first step, call, stacked metrics, t0): a call's metrics are fetched after the next call is dispatched.
  pending = None
  done_at = 0.0  # when the previous call's metrics arrived (a call's time starts after it, or when it was drawn)

  def alive():
    return [(k, r) for k, r in enumerate(runs) if r.error is None]

  def failed(r: Run, error: Exception):
    if fail_fast:
      raise error
    r.fail(f"{type(error).__name__}: {error}")

  def finish_pending():
    nonlocal pending, done_at
    if pending is None:
      return
    first, call, m, t0 = pending
    pending = None
    m = {key: np.asarray(v, np.float64).reshape(-1, program.size) for key, v in jax.device_get(m).items()}
    now = time.time()
    n = call.last_step - first + 1
    dt = (now - max(t0, done_at) + call.draw_seconds) / n  # seconds per step of this call
    done_at = now
    for i, step in enumerate(range(first, call.last_step + 1)):
      for k, r in alive():
        mk = {key: float(v[i, k]) for key, v in m.items()}
        mk.update(call.host_metrics[i] if call.host_metrics else {})
        error, r.zero_grad_since = check_step(mk, step, r.zero_grad_since, loop.collapse_steps, r.checkpointer)
        if error is not None:
          failed(r, error)
          continue
        mk.update({"train/step_time_s": dt, "train/tokens_per_s": call.tokens / max(dt, 1e-9)})
        if "train/tokens" in mk:
          mk["train/loss_tokens_per_s"] = mk["train/tokens"] / max(dt, 1e-9)
        logged = step % loop.log_every == 0 or step == loop.steps
        if logged or step == call.last_step:  # the schedule is evaluated on the host only where it is recorded
          mk["train/lr"] = float(program.lr_at[k](step - 1))
        r.last = mk
        if logged:
          r.writer.write(step, {**mk, "train/peak_memory_bytes": peak_memory_bytes(),
                                "params/trainable": program.n_trainable[k], "params/total": program.n_total[k]})
      shown = [r.last[program.progress_key] for _, r in alive() if program.progress_key in r.last]
      extra = {"runs": len(alive())} if program.size > 1 else {}
      bar.update(step, **{program.progress_key.split("/")[-1]: float(np.mean(shown)) if shown else math.nan}, **extra)

  def run_eval(step):
    metrics, own = program.evaluate(state), program.split(state)
    for k, r in alive():
      m = dict(metrics[k])
      if eval_hook is not None:
        m.update(eval_hook(own[k]))
      if program.diagnostics is not None:
        m.update(_diagnostics(program.diagnostics(own[k]), step, r))
      r.writer.write(step, m)
      r.last.update(m)

  def save(step):
    own, finite = program.split(state), program.finite(state)
    for k, r in alive():
      if not finite[k]:
        failed(r, NonFiniteLoss(f"the trained parameters are not finite after step {step} (train/loss at step {step} "
                                f"was {r.last.get('train/loss')}); stopping without saving. "
                                f"{last_good(r.checkpointer, step - 1)}"))
        continue
      r.checkpointer.save(step, own[k].checkpoint_tree(), {"data": program.data_state(state, k), **r.record})

  try:
    if start == 0:  # the curve starts at the base model (B = 0 for LoRA)
      run_eval(0)
    step = start
    while step < loop.steps:
      if program.draw_reads_state:
        finish_pending()
        if not alive():
          break
      first = step + 1
      call = program.draw(state, step, lambda: stop["signal"] is not None)
      step, t0 = call.last_step, time.time()  # the device's part of the call starts at dispatch
      state, m = program.train(state, call.batches, call.active)
      finish_pending()
      pending = (first, call, m, t0)
      if not alive():
        break
      if step % loop.eval_every == 0 or step == loop.steps:
        finish_pending()
        run_eval(step)
      if step % loop.checkpoint_every == 0 or step == loop.steps or stop["signal"] is not None:
        finish_pending()
        save(step)
      if stop["signal"] is not None:
        # Raised, not returned: a caller looping over runs must not start the next one on a machine going away.
        raise Preempted(f"preempted by signal {stop['signal']} at step {step}; checkpoint"
                        f"{'s' if program.size > 1 else ''} saved in "
                        + ", ".join(str(r.checkpointer.directory) for _, r in alive()))
    finish_pending()
  finally:
    bar.close()
    signal.signal(signal.SIGTERM, previous)
  return state, [RunResult("done" if r.error is None else "failed", r.error, r.last) for r in runs]


def _diagnostics(diag, step: int, r: Run) -> dict:
  """The means of one run's per-module LoRA diagnostics (the whole table goes to its DIAGNOSTICS_FILE)."""
  diag = {key: {n: float(v) for n, v in d.items()} for key, d in jax.device_get(diag).items()}
  if not diag:
    return {}
  if r.writer.active:
    metrics_lib.append_line(r.workdir / metrics_lib.DIAGNOSTICS_FILE, json.dumps({"step": step, "modules": diag}))
  return {f"lora/{key}_mean": float(np.mean([d[key] for d in diag.values()])) for key in ("rel_update", "norm_a",
                                                                                       "norm_b")}
