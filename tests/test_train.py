"""Tests for lora_jax.train: one loop for LoRA and full FT, exact accumulation, exact resume, loud NaN stops."""

import json
import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lora_jax import checkpoint, lora, train
from lora_jax.models import transformer

CONFIG = transformer.ModelConfig(architecture="llama", vocab_size=24, hidden_size=32, intermediate_size=64,
                                 num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8)
MODEL = transformer.CausalLM(CONFIG)


class CountingBatches:
  """Deterministic batches of a learnable pattern (next token = token + 1 mod 24), with a restorable position."""

  def __init__(self, batch=4, seq=8, fail_at=None, on_batch=None):
    self.index, self.batch, self.seq = 0, batch, seq
    self.fail_at, self.on_batch = fail_at, on_batch

  def __next__(self):
    if self.fail_at is not None and self.index == self.fail_at:
      raise RuntimeError("simulated crash")
    if self.on_batch is not None:
      self.on_batch(self.index)
    rng = np.random.default_rng(self.index)
    start = rng.integers(0, 24, size=(self.batch, 1))
    seq = (start + np.arange(self.seq + 1)) % 24
    self.index += 1
    mask = np.ones((self.batch, self.seq), np.float32)
    mask[:, :2] = 0.0  # a "prompt" without loss
    return {"inputs": seq[:, :-1].astype(np.int32), "targets": seq[:, 1:].astype(np.int32), "loss_mask": mask}

  def state(self):
    return {"index": self.index}

  def restore(self, state):
    self.index = state["index"]


def eval_batches():
  it = CountingBatches(batch=8)
  it.index = 10_000
  return [next(it) for _ in range(2)]


def initial_state(spec, optim, seed=0):
  params = transformer.init_params(CONFIG, jax.random.key(seed))
  params, adapters = lora.create(params, spec, jax.random.key(1))
  return train.init_state(params, adapters, spec, optim, seed=0)


LORA = lora.LoraSpec(rank=4, targets=("all-linear", "unembed"))
OPTIM = train.OptimConfig(lr=1e-2)


def run(tmp_path, name, spec=LORA, optim=OPTIM, steps=6, batches=None, **loop_kw):
  loop = train.LoopConfig(steps=steps, log_every=1, eval_every=3, checkpoint_every=3, **loop_kw)
  state = initial_state(spec, optim)
  return train.fit(MODEL, state, optim, loop, batches or CountingBatches(), eval_batches, tmp_path / name,
                   record={"base": "test"}, progress=False)


def leaves(state):
  return [np.asarray(x) for x in jax.tree.leaves(state.checkpoint_tree())]


@pytest.mark.parametrize("spec", [LORA, lora.LoraSpec.full()], ids=["lora", "full"])
def test_lora_and_full_finetuning_lower_the_loss_and_leave_evidence(tmp_path, spec):
  optim = train.OptimConfig(lr=3e-2 if spec.targets else 3e-3)
  state, last = run(tmp_path, "run", spec=spec, optim=optim, steps=30)
  records = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
  losses = [r["train/loss"] for r in records if "train/loss" in r]
  evals = [r["eval/nll"] for r in records if "eval/nll" in r]
  assert losses[-1] < 0.8 * losses[0]
  assert evals[-1] < evals[0]
  assert {"train/lr", "train/grad_norm", "train/update_norm", "train/tokens_per_s", "train/step_time_s",
          "train/peak_memory_bytes", "params/trainable", "params/total"} <= set(next(r for r in records
                                                                                    if "train/loss" in r))
  assert records[0]["step"] == 0 and "eval/nll" in records[0]  # the curve starts at the base model
  assert last["eval/perplexity"] == pytest.approx(np.exp(last["eval/nll"]))
  if spec.targets:
    assert "lora/rel_update_mean" in records[-1] and (tmp_path / "run" / "lora_diagnostics.jsonl").exists()
  assert list((tmp_path / "run" / "tensorboard").iterdir())


def test_gradient_accumulation_equals_one_big_batch(tmp_path):
  big = train.make_train_step(MODEL, train.make_optimizer(OPTIM), grad_accum=1)
  acc = train.make_train_step(MODEL, train.make_optimizer(OPTIM), grad_accum=4)
  batch = next(CountingBatches(batch=8))
  batch["loss_mask"][1, 3:] = 0.0  # unequal token counts per micro-batch: accumulation must weight by tokens
  s1, m1 = jax.jit(big)(initial_state(LORA, OPTIM), batch)
  s2, m2 = jax.jit(acc)(initial_state(LORA, OPTIM), batch)
  np.testing.assert_allclose(m1["train/loss"], m2["train/loss"], rtol=1e-6)
  np.testing.assert_allclose(m1["train/grad_norm"], m2["train/grad_norm"], rtol=1e-5)
  for a, b in zip(jax.tree.leaves(s1.trainable), jax.tree.leaves(s2.trainable)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("spec", [LORA, lora.LoraSpec.full()], ids=["lora", "full"])
def test_resume_after_a_crash_equals_an_uninterrupted_run(tmp_path, spec):
  straight, _ = run(tmp_path, "straight", spec=spec, steps=8)
  with pytest.raises(RuntimeError, match="simulated crash"):
    run(tmp_path, "crashed", spec=spec, steps=8, batches=CountingBatches(fail_at=5))
  assert checkpoint.Checkpointer(tmp_path / "crashed" / "checkpoints").latest_step() == 3
  resumed, _ = run(tmp_path, "crashed", spec=spec, steps=8)
  for a, b in zip(leaves(straight), leaves(resumed)):
    np.testing.assert_array_equal(a, b)  # bitwise, data position included
  records = lambda d: [json.loads(l) for l in (tmp_path / d / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in records("crashed")] == [r["step"] for r in records("straight")]  # no duplicates
  assert [r.get("train/loss") for r in records("crashed")] == [r.get("train/loss") for r in records("straight")]


def test_sigterm_saves_a_checkpoint_and_stops(tmp_path):
  def term(index):
    if index == 4:
      os.kill(os.getpid(), signal.SIGTERM)

  state, _ = run(tmp_path, "run", steps=8, batches=CountingBatches(on_batch=term))
  assert int(state.step) == 5
  assert checkpoint.Checkpointer(tmp_path / "run" / "checkpoints").latest_step() == 5
  resumed, _ = run(tmp_path, "run", steps=8)
  straight, _ = run(tmp_path, "straight", steps=8)
  for a, b in zip(leaves(straight), leaves(resumed)):
    np.testing.assert_array_equal(a, b)


def test_adapter_only_checkpoints_for_lora(tmp_path):
  run(tmp_path, "lora", spec=lora.LoraSpec(rank=1, targets=("q_proj",)), steps=3)
  run(tmp_path, "full", spec=lora.LoraSpec.full(), steps=3)
  size = lambda d: sum(f.stat().st_size for f in (tmp_path / d / "checkpoints").rglob("*") if f.is_file())
  n_params = sum(x.size for x in jax.tree.leaves(transformer.init_params(CONFIG, jax.random.key(0))))
  assert size("full") > 3 * 4 * n_params * 0.9  # weights + two Adam moments
  assert size("lora") < size("full") - 2 * 4 * n_params  # no base weights, no moments of them
  assert checkpoint.Checkpointer(tmp_path / "lora" / "checkpoints").restore_record(3)["base"] == "test"


def test_nan_loss_stops_loudly_and_keeps_the_last_good_checkpoint(tmp_path):
  optim = train.OptimConfig(lr=1e30)  # explodes after a couple of steps
  with pytest.raises(train.NonFiniteLoss, match="at step .*Last good checkpoint"):
    run(tmp_path, "nan", optim=optim, steps=30)
  ck = checkpoint.Checkpointer(tmp_path / "nan" / "checkpoints")
  for step in ck.all_steps():
    restored, _ = ck.restore(step, initial_state(LORA, optim).checkpoint_tree())
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(restored))


def test_optimizer_config_errors_and_schedules():
  with pytest.raises(ValueError, match="unknown optim.schedule 'cosin'; valid"):
    train.OptimConfig(lr=1.0, schedule="cosin")
  with pytest.raises(ValueError, match="needs total_steps > warmup_steps"):
    train.OptimConfig(lr=1.0, schedule="cosine", warmup_steps=10, total_steps=5)
  s = train.schedule(train.OptimConfig(lr=1.0, schedule="linear", warmup_steps=2, total_steps=6))
  assert [round(float(s(i)), 3) for i in range(7)] == [0.0, 0.5, 1.0, 0.75, 0.5, 0.25, 0.0]
  assert float(train.schedule(train.OptimConfig(lr=3e-4))(1000)) == pytest.approx(3e-4)


def test_lora_plus_and_clipping_in_the_optimizer():
  optim = train.OptimConfig(lr=1.0, lr_b_ratio=4.0, grad_clip_norm=1e-3, b1=0.0, b2=0.0, eps=0.0)
  state = initial_state(LORA, optim)
  tx = train.make_optimizer(optim)
  grads = jax.tree.map(lambda x: jnp.full_like(x, 5.0), state.trainable)
  updates, _ = tx.update(grads, state.opt_state, state.trainable)
  ad = updates["lora"]["lm_head"]
  assert float(ad.a[0, 0]) == pytest.approx(-1.0) and float(ad.b[0, 0]) == pytest.approx(-4.0)


def test_mixed_precision_bf16_compute_and_base_with_fp32_trainables(tmp_path):
  config = CONFIG.replace(dtype="bfloat16", param_dtype="bfloat16")
  model = transformer.CausalLM(config)
  params = transformer.init_params(config, jax.random.key(0))
  assert params["lm_head"]["kernel"].dtype == jnp.bfloat16
  for spec in (LORA, lora.LoraSpec.full()):
    params2, adapters = lora.create(params, spec, jax.random.key(1))
    state = train.init_state(params2, adapters, spec, OPTIM, seed=0)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state.trainable))
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state.opt_state) if x.ndim)
    loop = train.LoopConfig(steps=10, log_every=1, eval_every=10, checkpoint_every=10)
    state, _ = train.fit(model, state, OPTIM, loop, CountingBatches(), eval_batches, tmp_path / str(spec.is_full),
                         progress=False)
    losses = [json.loads(l)["train/loss"] for l in (tmp_path / str(spec.is_full) / "metrics.jsonl").read_text()
              .splitlines() if "train/loss" in l]
    assert losses[-1] < losses[0]
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(state.frozen))  # the frozen base stays bf16
