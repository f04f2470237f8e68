"""Fine-tune with LoRA and/or full fine-tuning from an ml-collections config; ends in a report.

    python -m experiments.main --config experiments/configs/finetune.py:tiny --workdir runs/tiny \\
        [--config.optim.lr=1e-3] [--overwrite]

Each method in ``config.methods`` trains into ``WORKDIR/<method>`` through the same data, step, evaluation and
logging (``lora_jax.train``); rerunning the same command resumes from the newest checkpoints. ``WORKDIR`` holds
``config.json``, ``run_info.json`` and ``report.md``; each run dir holds ``metrics.jsonl``, TensorBoard events,
``summary.txt`` (what was adapted) and Orbax checkpoints (adapter-only for LoRA).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib.metadata
import json
import pathlib
import platform
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags, logging
from etils import epath
from jax.experimental import multihost_utils
from ml_collections import config_flags

from experiments import report
from lora_jax import data, distributed, generate, hf, lora, metrics, sharding, synthetic, train
from lora_jax.models import transformer

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file[:arg].", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for this experiment's runs and report.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Delete a workdir that holds a run of a different config.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0 for a manual multi-process "
                                   "run (TPU pods and tpu.gpu_launch need none).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes of a manual multi-process run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index in a manual multi-process run.")

PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "transformers", "datasets", "numpy",
            "ml-collections")


def prepare_workdir(workdir: epath.Path, config: ml_collections.ConfigDict, overwrite: bool) -> None:
  """Creates the workdir, or checks it belongs to this config (refusing another config's run unless overwrite)."""
  text = config.to_json_best_effort(indent=2, sort_keys=True)
  saved = workdir / "config.json"
  if saved.exists() and json.loads(saved.read_text()) != json.loads(text):
    if not overwrite:
      old, new = json.loads(saved.read_text()), json.loads(text)
      diff = sorted(k for k in set(_flat(old)) | set(_flat(new)) if _flat(old).get(k) != _flat(new).get(k))
      raise SystemExit(f"{workdir} holds a run of a different config (differs in: {', '.join(diff[:10])}). "
                       "Use another --workdir, or --overwrite to delete it.")
    if jax.process_index() == 0:
      workdir.rmtree()
  if jax.process_index() != 0:  # process 0 writes the run's files (all processes write checkpoints)
    return
  workdir.mkdir(parents=True, exist_ok=True)
  saved.write_text(text + "\n")
  (workdir / "run_info.json").write_text(json.dumps(run_info(), indent=2) + "\n")


def _flat(d, prefix=""):
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flat(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def run_info() -> dict:
  """Git commit, package versions, Python and devices: what a result needs to be reproduced."""
  try:
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                            cwd=pathlib.Path(__file__).parent).stdout.strip()
    dirty = bool(subprocess.run(["git", "status", "--porcelain"], capture_output=True, text=True,
                                cwd=pathlib.Path(__file__).parent).stdout.strip())
  except (OSError, subprocess.CalledProcessError):
    commit, dirty = "unknown", None
  return {
      "git_commit": commit, "git_dirty": dirty, "python": platform.python_version(), "argv": sys.argv,
      "packages": {p: importlib.metadata.version(p) for p in PACKAGES},
      "devices": [str(d) for d in jax.devices()], "process_count": jax.process_count(),
  }


def tiny_base(c: ml_collections.ConfigDict) -> pathlib.Path:
  """The tiny base model as an HF directory: pretrained on the synthetic corpus once, then reused from the cache.

  Every process takes part (on a 1-D fsdp mesh over all devices); process 0 writes the files.
  """
  key = hashlib.sha256(c.to_json(sort_keys=True).encode()).hexdigest()[:12]
  out = pathlib.Path(c.cache_dir) / key
  if (out / "config.json").exists():
    print(f"reusing the tiny base model in {out}")
    return out
  lead = jax.process_index() == 0
  print(f"pretraining the tiny base model ({c.steps} steps on a synthetic corpus) into {out}")
  tokenizer = synthetic.char_tokenizer()
  model_config = transformer.ModelConfig(
      architecture="llama", vocab_size=len(tokenizer), hidden_size=c.hidden_size,
      intermediate_size=c.intermediate_size, num_layers=c.num_layers, num_heads=c.num_heads,
      num_kv_heads=c.num_kv_heads, head_dim=c.hidden_size // c.num_heads, tie_word_embeddings=False)
  work = out.with_name(out.name + ".partial")
  corpus_file = work / "corpus.jsonl"
  if lead:
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    corpus_file.write_text("".join(json.dumps(r) + "\n" for r in synthetic.corpus(c.corpus_documents, seed=c.seed)))
  multihost_utils.sync_global_devices("tiny_base corpus written")
  sources = data.load([str(corpus_file)], tokenizer, seq_len=c.seq_len)
  train_part, eval_part = data.split(sources[0], 32, seed=c.seed)
  batches = data.BatchIterator([train_part], batch_size=c.batch_size, seq_len=c.seq_len, seed=c.seed,
                               process_index=jax.process_index(), process_count=jax.process_count())
  evals = eval_batches([eval_part], c.batch_size, c.seq_len)
  spec = lora.LoraSpec.full()
  mesh = sharding.make_mesh({"fsdp": -1})
  param_sh = sharding.param_shardings(transformer.abstract_params(model_config),
                                      transformer.logical_axes(model_config), mesh)
  params = transformer.init_params(model_config, jax.random.key(c.seed))
  optim = train.OptimConfig(lr=c.lr)
  state = train.init_state(params, {}, spec, optim, c.seed)
  loop = train.LoopConfig(steps=c.steps, log_every=10, eval_every=c.steps, checkpoint_every=c.steps)
  state, last = train.fit(transformer.CausalLM(model_config), state, optim, loop, batches, lambda: evals,
                          work / "pretrain", mesh=mesh, param_shardings=param_sh)
  params, _ = lora.combine(state.trainable, state.frozen)
  params = multihost_utils.process_allgather(params, tiled=True)  # tiny: every process holds it whole
  if lead:
    hf.save_params(params, model_config, work)
    tokenizer.save_pretrained(work)
    print(f"tiny base: eval NLL {last['eval/nll']:.4f} after pretraining")
    shutil.rmtree(out, ignore_errors=True)
    work.rename(out)
  multihost_utils.sync_global_devices("tiny_base saved")
  return out


def eval_batches(sources, batch_size: int, seq_len: int) -> list[dict]:
  """Every held-out example once, in order, as batches (the last one padded, without loss on padding)."""
  it = data.BatchIterator(sources, batch_size=batch_size, seq_len=seq_len, seed=0, shuffle=False, num_epochs=1,
                          drop_remainder=False)
  return list(it)


def arithmetic_accuracy_hook(config: ml_collections.ConfigDict, model, tokenizer):
  """Eval hook: exact-match accuracy of greedy answers to held-out arithmetic problems (None when off)."""
  n = config.eval.arithmetic_examples
  if not n:
    return None
  task = synthetic.arithmetic(n, seed=config.seed + 1)  # a different seed from the training problems
  init_cache = functools.partial(transformer.init_cache, model.config)

  def hook(state: train.TrainState) -> dict:
    params, adapters = lora.combine(state.trainable, state.frozen)
    answers = generate.generate_text(model, params, adapters, tokenizer, task.prompts, chat=True,
                                     max_new_tokens=config.eval.max_new_tokens, init_cache=init_cache)
    return {"eval/accuracy": float(np.mean([synthetic.reward(p, a) for p, a in zip(task.prompts, answers)]))}

  return hook


def make_spec(method: str, config: ml_collections.ConfigDict,
              model_config: transformer.ModelConfig | None = None) -> lora.LoraSpec:
  """The LoRA spec of a method: the config's for ``lora`` (with the MoE expert-rank rule), ``full()`` for ``full``."""
  if method == "full":
    return lora.LoraSpec.full()
  if method != "lora":
    raise SystemExit(f"config.methods: unknown method {method!r}; valid: lora, full")
  spec = lora.LoraSpec.from_dict(config.lora.to_dict())
  if config.moe_expert_rank not in ("total/active", "same"):
    raise SystemExit(f"config.moe_expert_rank {config.moe_expert_rank!r}; valid: 'total/active', 'same'")
  if model_config is not None and config.moe_expert_rank == "total/active":
    # Explicit rank_pattern entries come first, so they win over the rule.
    spec = dataclasses.replace(spec, rank_pattern={**spec.rank_pattern,
                                                   **transformer.expert_rank_pattern(model_config, spec.rank)})
  return spec


def make_optim(method: str, config: ml_collections.ConfigDict) -> train.OptimConfig:
  """The optimizer config of a method (full FT's LR is ``lr * full_lr_ratio``)."""
  o = config.optim
  lr = o.lr * (o.full_lr_ratio if method == "full" else 1.0)
  return train.OptimConfig(lr=lr, schedule=o.schedule, warmup_steps=o.warmup_steps, total_steps=config.train.steps,
                           b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay, grad_clip_norm=o.grad_clip_norm,
                           lr_b_ratio=o.lr_b_ratio if method == "lora" else 1.0)


def run(config: ml_collections.ConfigDict, workdir: str | epath.PathLike, overwrite: bool = False) -> dict:
  """Runs every method of ``config`` into ``workdir`` (local or gs://), writes the report; returns its summary
  (``report.summarize``) on process 0."""
  workdir = epath.Path(workdir)
  prepare_workdir(workdir, config, overwrite)
  model_dir = tiny_base(config.tiny_base) if config.model.name == "tiny" else config.model.name
  if not model_dir:
    raise SystemExit("config.model.name is empty: give an HF directory or hub id (or use the 'tiny' config arg)")
  model_config = hf.load_config(model_dir, scan_layers=config.model.scan_layers, remat=config.model.remat,
                                param_dtype=config.model.param_dtype).replace(dtype=config.model.dtype)
  mesh = sharding.make_mesh(config.mesh.to_dict())
  param_sh = sharding.param_shardings(transformer.abstract_params(model_config), transformer.logical_axes(model_config),
                                      mesh, config.sharding_rules.to_dict())
  params = hf.load_params(model_dir, model_config, shardings=param_sh)  # each host reads only its slices
  model = transformer.CausalLM(model_config)
  from transformers import AutoTokenizer

  tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
  d = config.data
  specs = [synthetic.materialize(s, n=d.synthetic_examples, seed=config.seed, cache_dir=d.cache_dir)
           for s in d.train]
  sources = data.load(specs, tokenizer, seq_len=d.seq_len, template=d.template,
                      train_on_inputs=d.train_on_inputs, cache_dir=d.cache_dir)
  splits = [data.split(s, d.eval_size, seed=config.seed) for s in sources]
  evals = eval_batches([e for _, e in splits], d.batch_size, d.seq_len)
  layouts = lora.trace_layouts(model, jnp.zeros((1, 8), jnp.int32))

  for method in config.methods:
    spec, optim = make_spec(method, config, model_config), make_optim(method, config)
    run_dir = workdir / method
    run_dir.mkdir(parents=True, exist_ok=True)
    base_params, adapters = lora.create(params, spec, jax.random.key(config.seed), layouts=layouts)
    (run_dir / "summary.txt").write_text(lora.summary(base_params, adapters, spec) + "\n")
    (run_dir / "lora_spec.json").write_text(spec.to_json() + "\n")
    state = train.init_state(base_params, adapters, spec, optim, config.seed)
    batches = data.BatchIterator([t for t, _ in splits], batch_size=d.batch_size, seq_len=d.seq_len,
                                 seed=config.seed, packing=d.packing, process_index=jax.process_index(),
                                 process_count=jax.process_count())
    loop = train.LoopConfig(**config.train.to_dict(), seed=config.seed)
    print(f"== {method}: lr {optim.lr:g}, {sum(x.size for x in jax.tree.leaves(state.trainable)):,} trainable")
    record = {"base_model": str(model_dir), "method": method, "lora_spec": spec.to_dict()}
    wandb = {"project": config.wandb.project, "name": f"{workdir.name}/{method}",
             "config": config.to_dict()} if config.wandb.project else None
    writer = metrics.MetricWriter(run_dir, wandb=wandb)
    hook = arithmetic_accuracy_hook(config, model, tokenizer)
    train.fit(model, state, optim, loop, batches, lambda: evals, run_dir, record=record, writer=writer,
              eval_hook=hook, mesh=mesh, param_shardings=param_sh)
    writer.close()
  if jax.process_index() == 0:
    table, runs = report.write(workdir)
    print("\n" + table)
    print(f"report: {workdir / 'report.md'} (curves: report.png); metrics: {workdir}/<method>/metrics.jsonl; "
          f"TensorBoard: tensorboard --logdir {workdir}")
    return runs
  return {}


def main(argv):
  logging.set_verbosity(logging.WARNING)  # Orbax logs every file it writes at INFO
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if _WORKDIR.value is None:
    raise app.UsageError("--workdir is required")
  distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  run(_CONFIG.value, _WORKDIR.value, _OVERWRITE.value)


if __name__ == "__main__":
  flags.mark_flag_as_required("config")
  app.run(main)
