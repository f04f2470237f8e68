"""The flag-free runner: check a config, start a workdir (its evidence written once), train every method into it
and write the report. ``experiments.main`` is its command line; ``stacked`` and ``rl_run`` build on the same pieces.

``WORKDIR`` holds ``config.json``, ``run_info.json`` (code, machine, base model: ``provenance``) and ``report.md``;
each run dir holds ``metrics.jsonl``, TensorBoard events, ``summary.txt`` (what was adapted), ``lora_spec.json`` and
Orbax checkpoints (adapter-only for LoRA). Nothing is written before the config, the model, the shardings and the
data have been checked.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.metadata
import json
import pathlib
import platform
import sys
from collections.abc import Sequence

import jax
import ml_collections
import numpy as np
from etils import epath
from jax.experimental import multihost_utils

from experiments import provenance, report, tiny_base
from experiments.configs import common
from lora_jax import (checkpoint, data, generate, hf, lock, lora, metrics, model_lora, optim, quant, sharding,
                      synthetic, train)
from lora_jax.models import transformer

PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "transformers", "datasets", "numpy",
            "ml-collections")
METHODS = ("lora", "full")
EXIT_PREEMPTED = 143  # 128 + SIGTERM: what a scheduler sees from a process ended by SIGTERM; rerun to resume


def workdir_conflict(workdir: epath.Path, config: ml_collections.ConfigDict) -> str | None:
  """Why ``workdir`` cannot take this config's runs without --overwrite (it holds another config's runs), or None.

  Read-only. A ``config.json`` with no run next to it (a start that failed before its first step) is no conflict.
  """
  saved = workdir / "config.json"
  if not saved.exists():
    return None
  old, new = json.loads(saved.read_text()), json.loads(config_json(config))
  if old == new or not _has_runs(workdir):
    return None
  old, new = report.flatten(old), report.flatten(new)
  diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
  return (f"{workdir} holds a run of a different config (differs in: {', '.join(diff[:10])}). "
          "Use another --workdir, or --overwrite to delete it.")


def _has_runs(workdir: epath.Path) -> bool:
  return any((d / "metrics.jsonl").exists() or (d / "checkpoints").exists() for d in workdir.iterdir() if d.is_dir())


def config_json(config: ml_collections.ConfigDict) -> str:
  """The config as a run records it in ``config.json``."""
  return config.to_json_best_effort(indent=2, sort_keys=True)


def start_workdir(workdir: epath.Path, config: ml_collections.ConfigDict, overwrite: bool, model_dir=None) -> None:
  """Makes ``workdir`` this config's, once everything is checked: deletes another config's runs (``overwrite``),
  writes ``config.json`` and ``run_info.json`` (with ``model_dir``'s fingerprint). Process 0 writes (all processes
  write checkpoints)."""
  if jax.process_index() != 0:
    return
  if overwrite and workdir.exists():
    workdir.rmtree()
  workdir.mkdir(parents=True, exist_ok=True)
  (workdir / "config.json").write_text(config_json(config) + "\n")
  info = run_info(model_dir)
  previous = workdir / "run_info.json"
  if previous.exists():  # a resume: keep every earlier start's code, so a run resumed across commits says so
    old = json.loads(previous.read_text())
    info["earlier_starts"] = old.get("earlier_starts", []) + [
        {k: old.get(k) for k in ("git_commit", "git_dirty", "git_diff_sha256")}]
  previous.write_text(json.dumps(info, indent=2) + "\n")


def run_info(model_dir=None) -> dict:
  """Git state (``provenance.git_state``), the base model's fingerprint, package versions, Python and devices: what a
  result needs to be reproduced."""
  base = {}
  if model_dir is not None:
    card = pathlib.Path(str(model_dir)) / tiny_base.INFO_FILE
    base = {"base_model": str(model_dir), "base_fingerprint": provenance.fingerprint(model_dir),
            **({"base_card": json.loads(card.read_text())} if card.exists() else {})}
  return {
      **provenance.git_state(), **base, "python": platform.python_version(), "argv": sys.argv,
      "packages": {p: importlib.metadata.version(p) for p in PACKAGES},
      "devices": [str(d) for d in jax.devices()], "process_count": jax.process_count(),
  }


def arithmetic_accuracy_hook(config: ml_collections.ConfigDict, model, tokenizer):
  """Eval hook: exact-match accuracy of greedy answers to held-out arithmetic problems (None when off)."""
  n = config.eval.arithmetic_examples
  if not n:
    return None
  task = synthetic.arithmetic(n, seed=config.data.synthetic_seed + 1)  # other problems than the training records
  init_cache = functools.partial(transformer.init_cache, model.config)

  def hook(state: train.TrainState) -> dict:
    params, adapters = lora.combine(state.trainable, state.frozen)
    answers = generate.generate_text(model, params, adapters, tokenizer, task.prompts, chat=True,
                                     max_new_tokens=config.eval.max_new_tokens, init_cache=init_cache)
    return {"eval/accuracy": float(np.mean([synthetic.reward(p, a) for p, a in zip(task.prompts, answers)]))}

  return hook


def make_spec(method: str, config: ml_collections.ConfigDict,
              model_config: transformer.ModelConfig) -> lora.LoraSpec:
  """The LoRA spec of a method on this model: ``full()`` for full FT, else the config's (``model_lora.model_spec``:
  the MoE expert-rank rule)."""
  if method == "full":
    return lora.LoraSpec.full()
  return model_lora.model_spec(common.lora_spec(config.lora), model_config, config.moe_expert_rank)


def make_quant(method: str, config: ml_collections.ConfigDict) -> quant.QuantSpec | None:
  """The quantized-base spec of a method (QLoRA): the config's ``quant`` for LoRA, None for full FT or kind none."""
  q = config.get("quant")
  if q is None or q.kind == "none" or method == "full":
    return None
  return quant.QuantSpec(q.kind, q.block_size, q.double_quant)


def make_optim(method: str, config: ml_collections.ConfigDict) -> optim.OptimConfig:
  """The optimizer config of a method: ``optim.lr``, except full FT next to a LoRA run (``both``), which gets
  ``lr * full_lr_ratio``."""
  o = config.optim
  lr = o.lr * (o.full_lr_ratio if method == "full" and "lora" in config.methods else 1.0)
  return optim.OptimConfig(lr=lr, schedule=o.schedule, warmup_steps=o.warmup_steps, total_steps=config.train.steps,
                           b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay, grad_clip_norm=o.grad_clip_norm,
                           lr_b_ratio=o.lr_b_ratio if method == "lora" else 1.0)


def abstract_setups(config: ml_collections.ConfigDict, model_config: transformer.ModelConfig,
                    mesh) -> dict[str, train.Setup]:
  """Each method's ``train.setup`` on abstract params: adapters, shardings, state and jitted steps as shapes, nothing
  allocated (what ``run`` checks before it starts; its ``train_step`` lowers and compiles from shapes alone)."""
  return {m: train.setup(model_config, make_spec(m, config, model_config), make_optim(m, config),
                         transformer.abstract_params(model_config), mesh=mesh, rules=config.sharding_rules.to_dict(),
                         seed=config.seed, grad_accum=config.train.grad_accum, quant=make_quant(m, config))
          for m in config.methods}


# config.model fields that go to the ModelConfig.
MODEL_FIELDS = ("scan_layers", "remat", "param_dtype", "dtype", "attention", "loss_chunk_size")


def load_model_config(config: ml_collections.ConfigDict, model_dir) -> transformer.ModelConfig:
  """The base's ``ModelConfig`` with the run's ``config.model`` settings (layout, remat, dtypes, attention, loss
  chunking) — the one place every entry point reads them."""
  changes = {f: config.model[f] for f in MODEL_FIELDS if f in config.model}
  return hf.load_config(model_dir, **changes)


EVAL_SPLITS = ("held_out", "train")


def refuse_conflict(workdir: epath.Path, config: ml_collections.ConfigDict, overwrite: bool) -> str | None:
  """``workdir_conflict`` of the workdir with this config; raises SystemExit naming it unless ``overwrite``."""
  conflict = workdir_conflict(workdir, config)
  if conflict and not overwrite:
    raise SystemExit(conflict)
  return conflict


def start_run_dir(run_dir: epath.Path, state: train.TrainState, spec: lora.LoraSpec, method: str, model_dir,
                  model_config: transformer.ModelConfig, config: ml_collections.ConfigDict,
                  name: str) -> tuple[dict, metrics.MetricWriter]:
  """A method's run directory, its evidence written once (on process 0): ``summary.txt`` (what was adapted) and
  ``lora_spec.json``; returns the record every checkpoint carries (base model, layout, spec, method) and the metric
  writer (W&B run ``name`` when ``config.wandb.project`` is set)."""
  if jax.process_index() == 0:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "summary.txt").write_text(lora.summary(*lora.combine(state.trainable, state.frozen), spec) + "\n")
    (run_dir / "lora_spec.json").write_text(spec.to_json() + "\n")
  record = {**checkpoint.describe_run(model_dir, model_config, spec), "method": method}
  wandb = ({"project": config.wandb.project, "name": name, "config": config.to_dict()}
           if config.get("wandb", {}).get("project") else None)
  return record, metrics.MetricWriter(run_dir, wandb=wandb)


def check_methods_and_model(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError unless ``config.methods`` names one or both of ``METHODS`` and ``config.model.name`` is set."""
  unknown = [m for m in config.methods if m not in METHODS]
  if not config.methods or unknown:
    raise ValueError(f"config.methods {tuple(config.methods)}: give one or both of {list(METHODS)}")
  if not config.model.name:
    raise ValueError("config.model.name is empty: give an HF directory or hub id (or use the 'tiny' config arg)")


def check_config(config: ml_collections.ConfigDict) -> None:
  """Checks what needs no model or data: methods, LoRA spec, optimizer, loop, data settings, mesh and sharding
  rules; raises ValueError naming the field (an RL config, with an ``rl`` section, is ``rl_run``'s)."""
  check_methods_and_model(config)
  if "lora" in config.methods:
    common.lora_spec(config.lora)
    if config.moe_expert_rank not in model_lora.MOE_EXPERT_RANKS:
      raise ValueError(f"config.moe_expert_rank {config.moe_expert_rank!r}; valid: "
                       f"{list(model_lora.MOE_EXPERT_RANKS)}")
  for method in config.methods:
    make_optim(method, config)
  train.LoopConfig(**config.train.to_dict(), seed=config.seed)
  d = config.data
  if d.overflow not in data.OVERFLOW:
    raise ValueError(f"config.data.overflow {d.overflow!r}; valid: {list(data.OVERFLOW)}")
  if d.eval_split not in EVAL_SPLITS:
    raise ValueError(f"config.data.eval_split {d.eval_split!r}; valid: {list(EVAL_SPLITS)}")
  data.resolve_template(d.template)
  data.parse_sources(list(d.train))
  mesh = sharding.make_mesh(config.mesh.to_dict())
  sharding.check_rules(config.sharding_rules.to_dict(), mesh.axis_names)
  rows_split = mesh.shape["data"] * mesh.shape["fsdp"]
  for name, divisor in (("the data x fsdp mesh size", rows_split), ("config.train.grad_accum", config.train.grad_accum),
                        ("the process count", jax.process_count())):
    if d.batch_size % divisor:
      raise ValueError(f"config.data.batch_size {d.batch_size} is not divisible by {name} {divisor}")


def load_data(config: ml_collections.ConfigDict, tokenizer) -> tuple[list[data.TokenizedSource], list[dict]]:
  """The training part of every source and the held-out eval batches (``eval_seed`` picks the held-out examples;
  synthetic sources are generated from ``data.synthetic_seed``)."""
  d = config.data
  specs = [synthetic.materialize(s, n=d.synthetic_examples, seed=d.synthetic_seed, cache_dir=d.cache_dir,
                                 max_operand=d.get("synthetic_max_operand", 99))
           for s in d.train]
  sources = data.load(specs, tokenizer, seq_len=d.seq_len, template=d.template, train_on_inputs=d.train_on_inputs,
                      overflow=d.overflow, cache_dir=d.cache_dir)
  if d.eval_split == "train":  # memorisation: score (a sample of) the very examples trained on
    train = sources
    evals = [s if d.eval_size >= len(s) else data.split(s, d.eval_size, seed=config.eval_seed)[1] for s in sources]
  else:
    splits = [data.split(s, d.eval_size, seed=config.eval_seed) for s in sources]
    train, evals = [t for t, _ in splits], [e for _, e in splits]
  return train, data.eval_batches(evals, batch_size=d.batch_size, seq_len=d.seq_len)


def train_batches(config: ml_collections.ConfigDict, sources: list[data.TokenizedSource]) -> data.BatchIterator:
  """This host's training batches, in the order ``data_seed`` draws."""
  d = config.data
  return data.BatchIterator(sources, batch_size=d.batch_size, seq_len=d.seq_len, seed=config.data_seed,
                            packing=d.packing, process_index=jax.process_index(), process_count=jax.process_count())


@contextlib.contextmanager
def one_writer(workdirs: Sequence[epath.Path]):
  """Holds each workdir's one-writer lock (``lora_jax.lock``, process 0) for the block; another process writing one
  of them stops this command before it writes anything (SystemExit naming the holder)."""
  with contextlib.ExitStack() as held:
    try:
      for w in workdirs:
        held.enter_context(lock.hold(w, enabled=jax.process_index() == 0))
    except lock.DirectoryLocked as e:
      raise SystemExit(f"not started: {e}") from e
    yield


def run(config: ml_collections.ConfigDict, workdir: str | epath.PathLike, overwrite: bool = False) -> dict:
  """Runs every method of ``config`` into ``workdir`` (local or gs://), writes the report; returns its summary
  (``report.summarize``) on process 0.

  Everything is checked before the workdir is touched (config values, each method's spec and state shapes against
  the model, shardings, data); ``config.json`` is written only when training starts. SIGTERM ends the current run
  with a checkpoint and raises ``train.Preempted`` without starting the next one (the report marks it unfinished).
  A second process on the same workdir stops at once (``one_writer``).
  """
  workdir = epath.Path(workdir)
  with one_writer([workdir]):
    return _run(config, workdir, overwrite)


def _run(config: ml_collections.ConfigDict, workdir: epath.Path, overwrite: bool) -> dict:
  conflict = refuse_conflict(workdir, config, overwrite)
  try:
    check_config(config)
    model_dir = tiny_base.pretrained(config.tiny_base) if config.model.name == "tiny" else config.model.name
    model_config = load_model_config(config, model_dir)
    mesh = sharding.make_mesh(config.mesh.to_dict())
    rules = config.sharding_rules.to_dict()
    plans = {m: (make_spec(m, config, model_config), make_optim(m, config)) for m in config.methods}
    abstract_setups(config, model_config, mesh)  # each run's adapters, shardings and state as shapes
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    train_sources, evals = load_data(config, tokenizer)
    train_batches(config, train_sources)
  except ValueError as e:  # DataError is one too
    raise SystemExit(f"not started, {workdir} untouched: {e}") from e
  start_workdir(workdir, config, overwrite=conflict is not None, model_dir=model_dir)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("workdir ready")  # no process writes before process 0 has set it up

  base = {}

  def load_base(shardings):  # read once for every method; each host reads only its slices
    if "params" not in base:
      base["params"] = hf.load_params(model_dir, model_config, shardings=shardings)
    return base["params"]

  try:
    for method in config.methods:
      spec, optim_config = plans[method]
      s = train.setup(model_config, spec, optim_config, load_base, mesh=mesh, rules=rules, seed=config.seed,
                      grad_accum=config.train.grad_accum, quant=make_quant(method, config))
      run_dir = workdir / method
      record, writer = start_run_dir(run_dir, s.state, spec, method, model_dir, model_config, config,
                                     f"{workdir.name}/{method}")
      batches = train_batches(config, train_sources)
      loop = train.LoopConfig(**config.train.to_dict(), seed=config.seed)
      print(f"== {method}: lr {optim_config.lr:g}, {sum(x.size for x in jax.tree.leaves(s.state.trainable)):,} "
            "trainable")
      try:
        train.fit(s.model, s.state, optim_config, loop, batches, lambda: evals, run_dir, record=record,
                  writer=writer, eval_hook=arithmetic_accuracy_hook(config, s.model, tokenizer), setup=s)
      finally:
        writer.close()
      del s  # free this run's state before the next one is set up
  except train.Preempted:
    if jax.process_index() == 0:
      report.write(workdir)  # marks the interrupted run, and any not started, as unfinished
    raise
  if jax.process_index() == 0:
    table, runs = report.write(workdir)
    print("\n" + table)
    print(f"report: {workdir / 'report.md'} (curves: report.png); metrics: {workdir}/<method>/metrics.jsonl; "
          f"TensorBoard: tensorboard --logdir {workdir}")
    return runs
  return {}
