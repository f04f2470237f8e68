"""The tiny base model of the ``tiny`` configs: a character-level Llama pretrained on a synthetic corpus, cached.

The corpus (``synthetic.pretraining_corpus``) holds every token and format the fine-tuning tasks use (digits, '+',
'=', chat role markers, facts' keys and values) in other combinations: grammar text, chat subtractions, products,
one-digit sums, facts under other keys and sentence continuations. Fine-tuning then teaches skills and facts (two-digit
sums, new facts), not tokens, as in the study. ``INFO_FILE`` beside the weights records the base's card.

``pretrained(config.tiny_base)`` returns an HF model directory (weights, config, tokenizer) under
``cache_dir/<hash of the settings>``: built once by full training from random init through the same set-up and loop
as every run (``train.setup``, ``train.fit``), then reused. An interrupted build resumes from its checkpoint;
separate processes asking for it at once (a sweep's parallel points) build it once: the others wait on a lock file
beside it.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import pathlib
import shutil

import jax
import ml_collections
from jax.experimental import multihost_utils

from experiments import provenance
from lora_jax import data, hf, lora, optim, synthetic, train
from lora_jax.models import transformer

EVAL_SIZE = 64  # Held-out documents per pretraining source (text, chat), at most a tenth of it, for its eval NLL.
INFO_FILE = "base_info.json"  # What every report says of the base: size, pretraining, its held-out NLL curve.


def model_config(c: ml_collections.ConfigDict, vocab_size: int) -> transformer.ModelConfig:
  """The tiny base's architecture from its config (``common.tiny_base_config``)."""
  return transformer.ModelConfig(
      architecture="llama", vocab_size=vocab_size, hidden_size=c.hidden_size,
      intermediate_size=c.intermediate_size, num_layers=c.num_layers, num_heads=c.num_heads,
      num_kv_heads=c.num_kv_heads, head_dim=c.hidden_size // c.num_heads, tie_word_embeddings=False)


def base_info(work: pathlib.Path, c: ml_collections.ConfigDict, params, vocab_size: int) -> dict:
  """The base's card: parameters, pretraining steps and tokens, its held-out NLL at the end and how much it still fell
  over the last quarter of the steps (a flattened loss is near 0), read from the pretraining's metrics."""
  records = [json.loads(line) for line in (work / "pretrain" / "metrics.jsonl").read_text().splitlines()]
  evals = {r["step"]: r["eval/nll"] for r in records if "eval/nll" in r}
  last = max(evals)
  quarter = max((s for s in evals if s <= 0.75 * last), default=0)
  logged = [(r["step"], r["train/tokens"]) for r in records if "train/tokens" in r]  # per step, every 10 steps
  tokens = sum(n * (step - before) for (step, n), before in zip(logged, [0] + [t for t, _ in logged[:-1]]))
  return {"parameters": int(sum(x.size for x in jax.tree.leaves(params))), "vocab_size": vocab_size,
          "pretrain_steps": c.steps,
          "pretrain_loss_tokens": int(tokens), "pretrain_documents": c.corpus_documents,
          "pretrain_eval_nll": evals[last], "pretrain_eval_nll_curve": {str(s): v for s, v in sorted(evals.items())},
          "pretrain_eval_nll_change_last_quarter": evals[last] - evals[quarter],
          "fingerprint": provenance.fingerprint(work)}


def cache_path(c: ml_collections.ConfigDict) -> tuple[pathlib.Path, tuple]:
  """Where the base of these settings is cached, and its pretraining corpus: the key hashes the corpus itself, not
  only its settings, so a changed corpus recipe builds a new base."""
  corpus = synthetic.pretraining_corpus(c.corpus_documents, seed=c.seed, chat_fraction=c.chat_fraction,
                                        dialect_fraction=c.dialect_fraction)
  settings = c.to_dict()
  if not settings["dialect_fraction"]:  # added later: a base without dialect text keeps the key it was built under
    del settings["dialect_fraction"]
  key = hashlib.sha256((json.dumps(settings, sort_keys=True) + json.dumps(corpus)).encode()).hexdigest()[:12]
  return pathlib.Path(c.cache_dir) / key, corpus


def pretrained(c: ml_collections.ConfigDict) -> pathlib.Path:
  """The tiny base model as an HF directory: pretrained on the synthetic corpus once, then reused from the cache.

  Every process takes part (on a 1-D fsdp mesh over all devices); process 0 writes the files.
  """
  out, corpus = cache_path(c)
  with _build_lock(out):
    if (out / "config.json").exists():
      print(f"reusing the tiny base model in {out}")
      return out
    return _build(c, out, corpus)


@contextlib.contextmanager
def _build_lock(out: pathlib.Path):
  """Held while checking for and building ``out``: separate jobs (e.g. the points of `experiments.sweep --parallel 2`
  on a fresh machine) build it once, the others waiting and then reusing it. The processes of one multi-process job
  build it together without it (a lock held by one of them would deadlock the others); a built one needs none (its
  cache may be read-only)."""
  if jax.process_count() > 1 or (out / "config.json").exists():
    yield
    return
  out.parent.mkdir(parents=True, exist_ok=True)
  with open(out.with_name(out.name + ".lock"), "w") as lock:
    try:
      fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      print(f"waiting for another process building the tiny base model in {out}", flush=True)
      fcntl.flock(lock, fcntl.LOCK_EX)
    yield


def _build(c: ml_collections.ConfigDict, out: pathlib.Path, corpus) -> pathlib.Path:
  """Pretrains the tiny base into ``out`` (through ``out.partial``, whose checkpoints let a build resume)."""
  lead = jax.process_index() == 0
  print(f"pretraining the tiny base model ({c.steps} steps on a synthetic corpus) into {out}")
  tokenizer = synthetic.char_tokenizer()
  config = model_config(c, len(tokenizer))
  work = out.with_name(out.name + ".partial")  # its checkpoints let an interrupted build resume
  files = [work / "corpus_text.jsonl", work / "corpus_chat.jsonl"]
  if lead and not all(f.exists() for f in files):
    work.mkdir(parents=True, exist_ok=True)
    for f, records in zip(files, corpus):
      f.write_text("".join(json.dumps(r) + "\n" for r in records))
  multihost_utils.sync_global_devices("tiny_base corpus written")
  # Loss on every token, the chat records' prompts and role markers included: this is pretraining. A record longer
  # than a row (a rare long sentence pair) is skipped.
  sources = data.load([str(f) for f in files], tokenizer, seq_len=c.seq_len, train_on_inputs=True, overflow="skip")
  parts = [data.split(source, min(EVAL_SIZE, len(source) // 10), seed=c.seed) for source in sources]
  batches = data.BatchIterator([p[0] for p in parts], batch_size=c.batch_size, seq_len=c.seq_len, seed=c.seed,
                               process_index=jax.process_index(), process_count=jax.process_count())
  evals = data.eval_batches([p[1] for p in parts], batch_size=c.batch_size, seq_len=c.seq_len)
  optim_config = optim.OptimConfig(lr=c.lr)
  s = train.setup(config, lora.LoraSpec.full(), optim_config,
                  lambda _: transformer.init_params(config, jax.random.key(c.seed)), mesh={"fsdp": -1}, seed=c.seed)
  loop = train.LoopConfig(steps=c.steps, log_every=10, eval_every=max(1, c.steps // 8), checkpoint_every=c.steps)
  state, last = train.fit(s.model, s.state, optim_config, loop, batches, lambda: evals, work / "pretrain",
                          setup=s)
  params, _ = lora.combine(state.trainable, state.frozen)
  params = multihost_utils.process_allgather(params, tiled=True)  # tiny: every process holds it whole
  if lead:
    hf.save_params(params, config, work)
    tokenizer.save_pretrained(work)
    info = base_info(work, c, params, config.vocab_size)
    (work / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
    print(f"tiny base: eval NLL {info['pretrain_eval_nll']:.4f} after pretraining "
          f"({info['pretrain_eval_nll_change_last_quarter']:+.4f} over the last quarter of its steps)")
    shutil.rmtree(out, ignore_errors=True)
    work.rename(out)
  multihost_utils.sync_global_devices("tiny_base saved")
  return out
