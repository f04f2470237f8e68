"""The RL experiment behind ``experiments.main`` for configs with an ``rl`` section (``experiments/configs/rl.py``).

    python -m experiments.main --config experiments/configs/rl.py:tiny,method=lora,rank=1 --workdir runs/rl_tiny

Each method in ``config.methods`` trains by policy gradient (``lora_jax.rl``) into ``WORKDIR/<method>``:
``metrics.jsonl`` (``train/reward``, ``eval/accuracy``, ``train/completion_length``, ``train/entropy``,
``train/kl_sampler``, ``train/kl_base``, ``train/tokens_per_s``, ...), TensorBoard events, ``summary.txt``,
``lora_spec.json`` and Orbax checkpoints; ``WORKDIR`` holds ``config.json``, ``run_info.json`` and ``report.md``. The
same command resumes (bitwise); SIGTERM saves at the end of the sampling round and stops with status 143.

Tasks: ``arithmetic`` (every problem ``a+b=`` with operands in ``[0, data.max_operand]``, a held-out part for the
greedy accuracy; on the tiny base after a short supervised warm-up, cached like the tiny base), ``gsm8k`` and
``math`` (a local JSON/JSONL file or a hub dataset ``ID[:CONFIG]``, read with ``datasets``, fields by task).
"""

from __future__ import annotations

import functools
import hashlib
import json
import pathlib
import shutil

import jax
import ml_collections
import numpy as np
from etils import epath

from experiments import report, tiny_base
from experiments import run as run_lib
from lora_jax import data, hf, lora, optim, rewards, rl, sharding, synthetic, train
from lora_jax.models import transformer

TASKS = ("arithmetic", "gsm8k", "math")
FIELDS = {"gsm8k": ("question", "answer"), "math": ("problem", "solution")}  # question and answer fields per task


def rl_config(config: ml_collections.ConfigDict) -> rl.RLConfig:
  """The ``rl.RLConfig`` of a config's ``rl`` fields."""
  return rl.RLConfig(**config.rl.to_dict())


def learner_rows(config: ml_collections.ConfigDict) -> int:
  """Completions per optimizer step: prompts_per_step * group_size / steps_per_sample."""
  r = config.rl
  return r.prompts_per_step * r.group_size // r.steps_per_sample


def check_config(config: ml_collections.ConfigDict) -> None:
  """Checks an RL config without model or data; raises ValueError naming the field and what was expected."""
  from experiments.configs import common

  run_lib.check_methods_and_model(config)
  cfg = rl_config(config)
  if "lora" in config.methods:
    spec = common.lora_spec(config.lora)
    if spec.dropout:
      raise ValueError(f"config.lora.dropout must be 0 for RL (the importance ratio compares the learner with the "
                       f"sampler, which has no dropout), got {spec.dropout}")
  for method in config.methods:
    run_lib.make_optim(method, config)
  loop = train.LoopConfig(**config.train.to_dict(), seed=config.seed)
  if learner_rows(config) % loop.grad_accum:
    raise ValueError(f"config.train.grad_accum {loop.grad_accum} must divide the completions per step "
                     f"{learner_rows(config)} (rl.prompts_per_step * rl.group_size / rl.steps_per_sample)")
  for name in ("steps", "checkpoint_every", "eval_every"):
    if getattr(loop, name) % cfg.steps_per_sample:
      raise ValueError(f"config.train.{name} {getattr(loop, name)} must be a multiple of config.rl.steps_per_sample "
                       f"{cfg.steps_per_sample}")
  d = config.data
  if d.task not in TASKS:
    raise ValueError(f"config.data.task {d.task!r}; valid: {list(TASKS)}")
  rewards.get(d.task)
  if d.batch_size != learner_rows(config):
    raise ValueError(f"config.data.batch_size {d.batch_size} must equal the learner's rows per step, "
                     f"rl.prompts_per_step * rl.group_size / rl.steps_per_sample = {learner_rows(config)}")
  if d.seq_len != d.max_prompt_tokens + cfg.max_new_tokens:
    raise ValueError(f"config.data.seq_len {d.seq_len} must equal data.max_prompt_tokens + rl.max_new_tokens = "
                     f"{d.max_prompt_tokens + cfg.max_new_tokens}")
  if d.eval_size < 1:
    raise ValueError(f"config.data.eval_size must be >= 1 (held-out prompts for the greedy accuracy), got "
                     f"{d.eval_size}")
  if d.task == "arithmetic" and (d.max_operand + 1) ** 2 <= d.eval_size:
    raise ValueError(f"config.data.eval_size {d.eval_size} leaves no training problems out of "
                     f"{(d.max_operand + 1) ** 2} (data.max_operand {d.max_operand})")
  if d.task != "arithmetic" and not d.train:
    raise ValueError(f"config.data.train is empty: task {d.task!r} needs a JSON/JSONL file or a hub dataset id")
  mesh = sharding.make_mesh(config.mesh.to_dict())
  sharding.check_rules(config.sharding_rules.to_dict(), mesh.axis_names)
  if jax.process_count() > 1:
    raise ValueError("RL runs are single-process (one host, any number of its devices); this is process "
                     f"{jax.process_index()} of {jax.process_count()}")
  if config.warmup.steps and config.model.name != "tiny":
    raise ValueError("config.warmup.steps > 0 is the tiny base's supervised warm-up; set it to 0 for other models")


# -- Problems ----------------------------------------------------------------------------------------------------------

def _prompt_ids(tokenizer, text: str, chat: bool) -> tuple[int, ...]:
  if chat:
    ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                        tokenize=True)
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids
  else:
    ids = tokenizer(text)["input_ids"]
  return tuple(int(i) for i in ids)


def arithmetic_pairs(max_operand: int, eval_size: int, seed: int) -> tuple[list, list]:
  """Every addition problem with operands in [0, max_operand], as (prompt, answer), split into (train, held-out)."""
  pairs = [(f"{a}+{b}=", str(a + b)) for a in range(max_operand + 1) for b in range(max_operand + 1)]
  order = np.random.default_rng(seed).permutation(len(pairs))
  held = set(order[:eval_size].tolist())
  return ([p for i, p in enumerate(pairs) if i not in held], [p for i, p in enumerate(pairs) if i in held])


def _read_records(source: str, split: str) -> list[dict]:
  path = pathlib.Path(source)
  if path.suffix in (".json", ".jsonl"):
    if not path.exists():
      raise FileNotFoundError(f"config.data.train: {source} does not exist")
    text = path.read_text()
    return json.loads(text) if path.suffix == ".json" else [json.loads(l) for l in text.splitlines() if l.strip()]
  import datasets

  name, _, subset = source.partition(":")
  return list(datasets.load_dataset(name, subset or None, split=split))


def task_pairs(config: ml_collections.ConfigDict) -> tuple[list, list]:
  """(train, held-out) (question text, answer) pairs of the config's task."""
  d = config.data
  if d.task == "arithmetic":
    return arithmetic_pairs(d.max_operand, d.eval_size, config.eval_seed)
  q, a = FIELDS[d.task]
  out = []
  for source, split in ((d.train, d.train_split), (d.eval or d.train, d.eval_split)):
    records = _read_records(source, split)
    missing = [k for k in (q, a) if records and k not in records[0]]
    if missing:
      raise ValueError(f"{source} ({split}): records lack {missing} (task {d.task} reads {q!r} and {a!r}); "
                       f"fields: {sorted(records[0])}")
    bad = [(i, why) for i, r in enumerate(records) if (why := rewards.unscorable(d.task, r[a])) is not None]
    if bad:
      raise ValueError(f"{source} ({split}): record {bad[0][0]}'s {a!r} cannot be scored by the {d.task} reward: "
                       f"{bad[0][1]} ({len(bad)} of {len(records)} records)")
    out.append([(d.prompt_template.format(question=r[q]), r[a]) for r in records])
  train_pairs, eval_pairs = out
  if not d.eval:  # one source: hold out eval_size of it
    order = np.random.default_rng(config.eval_seed).permutation(len(train_pairs))
    held = set(order[:d.eval_size].tolist())
    eval_pairs = [p for i, p in enumerate(train_pairs) if i in held]
    train_pairs = [p for i, p in enumerate(train_pairs) if i not in held]
  return train_pairs, eval_pairs[:d.eval_size]


def problems(config: ml_collections.ConfigDict, tokenizer,
             pairs: tuple[list, list]) -> tuple[list[rl.Problem], list[rl.Problem], int]:
  """Tokenised (train, held-out) problems of ``task_pairs``' pairs and the prompt width; prompts over
  data.max_prompt_tokens are skipped (too many skipped is an error)."""
  train_pairs, eval_pairs = pairs
  cap = config.data.max_prompt_tokens
  out = []
  for pairs in (train_pairs, eval_pairs):
    made = [rl.Problem(_prompt_ids(tokenizer, q, config.data.chat), a) for q, a in pairs]
    kept = [p for p in made if len(p.prompt) <= cap]
    if len(kept) < len(made) / 2 or not kept:
      raise ValueError(f"config.data.max_prompt_tokens {cap}: {len(made) - len(kept)} of {len(made)} prompts are "
                       "longer; raise it")
    out.append(kept)
  width = max(len(p.prompt) for p in out[0] + out[1])
  return out[0], out[1], width


# -- The tiny base's supervised warm-up --------------------------------------------------------------------------------

def warmed_base(config: ml_collections.ConfigDict) -> pathlib.Path:
  """The tiny base after ``config.warmup.steps`` of full supervised fine-tuning on the task's training problems
  (prompt -> answer, loss on the answer), so the RL start reward is neither 0 nor 1; cached by its settings."""
  base = tiny_base.pretrained(config.tiny_base)
  w = config.warmup
  if not w.steps:
    return base
  settings = {"base": str(base), "warmup": w.to_dict(), "max_operand": config.data.max_operand,
              "eval_size": config.data.eval_size, "eval_seed": config.eval_seed}
  key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
  out = pathlib.Path(w.cache_dir) / key
  if (out / "config.json").exists():
    print(f"reusing the warmed-up tiny base in {out}")
    return out
  print(f"warming up the tiny base: {w.steps} supervised steps on the training problems into {out}")
  work = out.with_name(out.name + ".partial")
  work.mkdir(parents=True, exist_ok=True)
  train_pairs, _ = task_pairs(config)
  records = [synthetic.as_record(q, a) for q, a in train_pairs]
  (work / "warmup.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
  tokenizer = synthetic.char_tokenizer()
  (source,) = data.load([str(work / "warmup.jsonl")], tokenizer, seq_len=w.seq_len)
  batches = data.BatchIterator([source], batch_size=w.batch_size, seq_len=w.seq_len, seed=w.seed)
  evals = data.eval_batches([source], batch_size=w.batch_size, seq_len=w.seq_len)[:2]
  model_config = hf.load_config(base)
  optim_config = optim.OptimConfig(lr=w.lr)
  s = train.setup(model_config, lora.LoraSpec.full(), optim_config, lambda _: hf.load_params(base, model_config),
                  seed=w.seed)
  loop = train.LoopConfig(steps=w.steps, log_every=max(1, w.steps // 5), eval_every=w.steps,
                          checkpoint_every=w.steps)
  state, _ = train.fit(s.model, s.state, optim_config, loop, batches, lambda: evals, work / "sft", progress=False)
  params, _ = lora.combine(state.trainable, state.frozen)
  hf.save_params(params, model_config, work)
  tokenizer.save_pretrained(work)
  shutil.rmtree(out, ignore_errors=True)
  work.rename(out)
  return out


# -- The run -----------------------------------------------------------------------------------------------------------

def run(config: ml_collections.ConfigDict, workdir: str | epath.PathLike, overwrite: bool = False) -> dict:
  """Runs every method of an RL config into ``workdir`` (checked before anything is written; one writer:
  ``run.one_writer``); returns a summary (method -> last metrics)."""
  workdir = epath.Path(workdir)
  with run_lib.one_writer([workdir]):
    return _run(config, workdir, overwrite)


def _run(config: ml_collections.ConfigDict, workdir: epath.Path, overwrite: bool) -> dict:
  conflict = run_lib.refuse_conflict(workdir, config, overwrite)
  try:
    check_config(config)
    pairs = task_pairs(config)  # the data's errors (a missing field, an unscorable answer) before any model is built
    model_dir = warmed_base(config) if config.model.name == "tiny" else config.model.name
    model_config = run_lib.load_model_config(config, model_dir)
    mesh = None if jax.device_count() == 1 else dict(config.mesh.to_dict())
    plans = {m: (run_lib.make_spec(m, config, model_config), run_lib.make_optim(m, config)) for m in config.methods}
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    train_problems, eval_problems, width = problems(config, tokenizer, pairs)
    reward_fn = rewards.get(config.data.task)
    cfg = rl_config(config)
  except ValueError as e:
    raise SystemExit(f"not started, {workdir} untouched: {e}") from e
  run_lib.start_workdir(workdir, config, overwrite=conflict is not None, model_dir=model_dir)
  print(f"RL on {config.data.task}: {len(train_problems)} training and {len(eval_problems)} held-out problems, "
        f"prompts padded to {width} tokens")
  base = {}

  def load_base(shardings):
    if "params" not in base:
      base["params"] = hf.load_params(model_dir, model_config, shardings=shardings)
    return base["params"]

  out = {}
  try:
    for method in config.methods:
      spec, optim_config = plans[method]
      s = train.setup(model_config, spec, optim_config, load_base, mesh=mesh, rules=config.sharding_rules.to_dict(),
                      seed=config.seed)
      run_dir = workdir / method
      record, writer = run_lib.start_run_dir(run_dir, s.state, spec, method, model_dir, model_config, config,
                                             f"{workdir.name}/{method}")
      loop = train.LoopConfig(**config.train.to_dict(), seed=config.seed)
      print(f"== {method}: lr {optim_config.lr:g}, {sum(x.size for x in jax.tree.leaves(s.state.trainable)):,} "
            "trainable")
      policy = rl.tokenizer_policy(s.model, functools.partial(transformer.init_cache, model_config), tokenizer, width)
      try:
        _, last = rl.fit(policy, s.state, optim_config, cfg, loop, train_problems, eval_problems, reward_fn, run_dir,
                         data_seed=config.data_seed, record=record, writer=writer)
      finally:
        writer.close()
      out[method] = last
      del s
  except train.Preempted:
    report.write_rl(workdir)
    raise
  table, _ = report.write_rl(workdir)
  print("\n" + table)
  print(f"report: {workdir / 'report.md'}; metrics: {workdir}/<method>/metrics.jsonl")
  return out

