"""Tests for lora_jax.train: one loop for LoRA and full FT, exact accumulation, exact resume, loud stops on NaN,
collapse and SIGTERM, logs without repeats after a resume, and golden values of one step."""

import dataclasses
import json
import os
import re
import shutil
import signal

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests._tolerance import assert_exact, config64
from lora_jax import checkpoint, lora, metrics, optim, train
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


def model():
  """The test model; float64 under the x64 fixture (where exactness is claimed)."""
  return transformer.CausalLM(config64(CONFIG)) if jax.config.jax_enable_x64 else MODEL


def initial_state(spec, optim_config, seed=0):
  if jax.config.jax_enable_x64:
    params = transformer.init_params(config64(CONFIG), jax.random.key(seed))
    spec = dataclasses.replace(spec, dtype="float64")
  else:
    params = transformer.init_params(CONFIG, jax.random.key(seed))
  params, adapters = lora.create(params, spec, jax.random.key(1))
  return train.init_state(params, adapters, spec, optim_config, seed=0)


LORA = lora.LoraSpec(rank=4, targets=("all-linear", "unembed"))
DORA = dataclasses.replace(LORA, variant="dora")
OPTIM = optim.OptimConfig(lr=1e-2)


def run(tmp_path, name, spec=LORA, optim_config=OPTIM, steps=6, batches=None, **loop_kw):
  loop = train.LoopConfig(**{"steps": steps, "log_every": 1, "eval_every": 3, "checkpoint_every": 3, **loop_kw})
  state = initial_state(spec, optim_config)
  return train.fit(model(), state, optim_config, loop, batches or CountingBatches(), eval_batches, tmp_path / name,
                   record={"base": "test"}, progress=False)


def leaves(state):
  return [np.asarray(x) for x in jax.tree.leaves(state.checkpoint_tree())]


@pytest.mark.parametrize("spec", [LORA, lora.LoraSpec.full(), DORA], ids=["lora", "full", "dora"])
def test_lora_and_full_finetuning_lower_the_loss_and_leave_evidence(tmp_path, spec):
  optim_config = optim.OptimConfig(lr=3e-2 if spec.targets else 3e-3)
  state, last = run(tmp_path, "run", spec=spec, optim_config=optim_config, steps=30)
  records = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
  losses = [r["train/loss"] for r in records if "train/loss" in r]
  evals = [r["eval/nll"] for r in records if "eval/nll" in r]
  assert losses[-1] < 0.8 * losses[0]
  assert evals[-1] < evals[0]
  first = next(r for r in records if "train/loss" in r)
  assert {"train/lr", "train/grad_norm", "train/update_norm", "train/tokens_per_s", "train/loss_tokens_per_s",
          "train/tokens", "train/step_time_s", "train/peak_memory_bytes", "params/trainable",
          "params/total"} <= set(first)
  # tokens/s counts every processed slot (4 rows x 8, the 2-token prompts included); loss tokens/s only 4 x 6.
  assert first["train/tokens"] == 24
  assert first["train/tokens_per_s"] / first["train/loss_tokens_per_s"] == pytest.approx(32 / 24, rel=1e-12)
  assert records[0]["step"] == 0 and "eval/nll" in records[0]  # the curve starts at the base model
  assert last["eval/perplexity"] == pytest.approx(np.exp(last["eval/nll"]))
  if spec.targets:
    assert "lora/rel_update_mean" in records[-1] and (tmp_path / "run" / "lora_diagnostics.jsonl").exists()
  assert list((tmp_path / "run" / "tensorboard").iterdir())


def test_gradient_accumulation_equals_one_big_batch(tmp_path, x64):
  big = train.make_train_step(model(), optim.make_optimizer(OPTIM), grad_accum=1)
  acc = train.make_train_step(model(), optim.make_optimizer(OPTIM), grad_accum=4)
  batch = next(CountingBatches(batch=8))
  batch["loss_mask"][1, 3:] = 0.0  # unequal token counts per micro-batch: accumulation must weight by tokens
  s1, m1 = jax.jit(big)(initial_state(LORA, OPTIM), batch)
  s2, m2 = jax.jit(acc)(initial_state(LORA, OPTIM), batch)
  # The same sums in another order: equal up to float64 rounding.
  assert_exact(m1["train/loss"], m2["train/loss"])
  assert_exact(m1["train/grad_norm"], m2["train/grad_norm"])
  for a, b in zip(jax.tree.leaves(s1.trainable), jax.tree.leaves(s2.trainable)):
    assert_exact(a, b)


@pytest.mark.parametrize("spec", [LORA, lora.LoraSpec.full(), DORA], ids=["lora", "full", "dora"])
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


# Each kind of file an Orbax checkpoint is made of, damaged one at a time: (glob under the checkpoint, damage).
CHECKPOINT_DAMAGE = [("_CHECKPOINT_METADATA", "delete"), ("record/metadata", "truncate"),
                     ("trainable/_METADATA", "delete"), ("trainable/manifest.ocdbt", "delete"),
                     ("trainable/ocdbt.process_0/manifest.ocdbt", "truncate"), ("trainable/d/*", "truncate"),
                     ("trainable/ocdbt.process_0/d/*", "truncate"), ("opt_state/d/*", "truncate"),
                     ("step/_METADATA", "truncate")]


def test_a_corrupt_newest_checkpoint_is_moved_aside_and_the_rerun_finishes_bitwise(tmp_path, capsys):
  straight, _ = run(tmp_path, "straight", steps=9)
  with pytest.raises(RuntimeError, match="simulated crash"):
    run(tmp_path, "crashed", steps=9, batches=CountingBatches(fail_at=8))
  assert checkpoint.Checkpointer(tmp_path / "crashed" / "checkpoints").all_steps() == [3, 6]
  set_aside = []
  for pattern, damage in CHECKPOINT_DAMAGE:
    work = tmp_path / pattern.replace("/", "_").replace("*", "x")
    shutil.copytree(tmp_path / "crashed", work)
    files = [f for f in (work / "checkpoints" / "6").glob(pattern) if f.is_file()]
    assert files, pattern
    for f in files:
      f.unlink() if damage == "delete" else f.write_bytes(f.read_bytes()[:len(f.read_bytes()) // 2])
    capsys.readouterr()
    resumed, _ = run(tmp_path, work.name, steps=9)  # used to stop with StepAlreadyExistsError at step 6
    for a, b in zip(leaves(straight), leaves(resumed)):
      np.testing.assert_array_equal(a, b)
    out = capsys.readouterr().out
    if (work / "checkpoints" / "6.corrupt").is_dir():
      set_aside.append(pattern)
      assert re.search(r"checkpoints/6 can't be read.*\nmoved it aside to .*checkpoints/6\.corrupt; resuming from "
                       r"step 3", out), out
    assert checkpoint.Checkpointer(work / "checkpoints").all_steps() == [6, 9]
  # The array data, its index and the metadata are read on restore: damaging them is caught and set aside.
  assert {"trainable/_METADATA", "trainable/d/*", "opt_state/d/*", "record/metadata"} <= set(set_aside), set_aside
  print("set aside:", set_aside)


def test_no_readable_checkpoint_is_an_error_that_touches_nothing(tmp_path):
  with pytest.raises(RuntimeError, match="simulated crash"):
    run(tmp_path, "crashed", steps=9, batches=CountingBatches(fail_at=8))
  ckpt = tmp_path / "crashed" / "checkpoints"
  before = sorted(p.name for p in ckpt.iterdir())
  with pytest.raises(checkpoint.CheckpointError, match="no checkpoint of .*checkpoints can be read .*move it aside"):
    run(tmp_path, "crashed", spec=lora.LoraSpec(rank=8, targets=("all-linear", "unembed")), steps=9)  # other shapes
  assert sorted(p.name for p in ckpt.iterdir()) == before


def test_sigterm_saves_a_checkpoint_and_raises_preempted_and_a_rerun_resumes(tmp_path):
  def term(index):
    if index == 4:  # while fetching step 5's batch
      os.kill(os.getpid(), signal.SIGTERM)

  handler = signal.getsignal(signal.SIGTERM)
  with pytest.raises(train.Preempted, match=r"preempted by signal 15 at step 5; checkpoint saved in .*checkpoints"):
    run(tmp_path, "run", steps=8, batches=CountingBatches(on_batch=term))
  assert checkpoint.Checkpointer(tmp_path / "run" / "checkpoints").latest_step() == 5
  assert signal.getsignal(signal.SIGTERM) is handler  # fit put the caller's handler back
  resumed, _ = run(tmp_path, "run", steps=8)
  straight, _ = run(tmp_path, "straight", steps=8)
  for a, b in zip(leaves(straight), leaves(resumed)):
    np.testing.assert_array_equal(a, b)


def test_sigterm_during_an_evaluation_saves_that_step_and_raises_preempted(tmp_path):
  def hook(state):
    if int(state.step) == 3:
      os.kill(os.getpid(), signal.SIGTERM)
    return {}

  loop = train.LoopConfig(steps=8, log_every=1, eval_every=3, checkpoint_every=100)
  with pytest.raises(train.Preempted, match="at step 3"):
    train.fit(MODEL, initial_state(LORA, OPTIM), OPTIM, loop, CountingBatches(), eval_batches, tmp_path / "run",
              eval_hook=hook, progress=False)
  assert checkpoint.Checkpointer(tmp_path / "run" / "checkpoints").all_steps() == [3]


def test_adapter_only_checkpoints_for_lora(tmp_path):
  run(tmp_path, "lora", spec=lora.LoraSpec(rank=1, targets=("q_proj",)), steps=3)
  run(tmp_path, "full", spec=lora.LoraSpec.full(), steps=3)
  size = lambda d: sum(f.stat().st_size for f in (tmp_path / d / "checkpoints").rglob("*") if f.is_file())
  n_params = sum(x.size for x in jax.tree.leaves(transformer.init_params(CONFIG, jax.random.key(0))))
  assert size("full") > 3 * 4 * n_params * 0.9  # weights + two Adam moments
  assert size("lora") < size("full") - 2 * 4 * n_params  # no base weights, no moments of them
  assert checkpoint.Checkpointer(tmp_path / "lora" / "checkpoints").restore_record(3)["base"] == "test"


def restored_nll(run_dir, step):
  """Held-out NLL of a run's checkpoint at ``step`` (the LoRA tiny run's)."""
  state = initial_state(LORA, OPTIM)
  restored, _ = checkpoint.Checkpointer(run_dir / "checkpoints").restore(step, state.checkpoint_tree())
  return train.evaluate(jax.jit(train.make_eval_step(MODEL)), state.replace(**restored), eval_batches())["eval/nll"]


@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")  # 1e39 -> float32 inf, on purpose
@pytest.mark.parametrize("lr", [1e30, 1e39], ids=["nan-loss", "inf-params"])
def test_a_non_finite_run_stops_and_names_a_checkpoint_that_is_good(tmp_path, lr):
  # Three sane steps, then a resume at an absurd LR: 1e30 gives huge finite parameters whose loss is NaN one step
  # later; 1e39 (inf in float32) gives infinite parameters at once. Before the fix, both named step 4, and the
  # second saved it: checkpoint 4 held inf, or finite arrays whose loss is NaN.
  run(tmp_path, "run", steps=3, checkpoint_every=1, keep_checkpoints=10)
  with pytest.raises(train.NonFiniteLoss, match=r"(at|after) step [45]\b.*Last good checkpoint: step 3 in "):
    run(tmp_path, "run", optim_config=optim.OptimConfig(lr=lr), steps=30, checkpoint_every=1, keep_checkpoints=10)
  ck = checkpoint.Checkpointer(tmp_path / "run" / "checkpoints")
  for step in ck.all_steps():
    restored, _ = ck.restore(step, initial_state(LORA, OPTIM).checkpoint_tree())
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(restored)), step  # nothing non-finite is saved
  assert np.isfinite(restored_nll(tmp_path / "run", 3))
  if lr == 1e39:
    assert ck.all_steps() == [1, 2, 3]


def test_nan_from_the_first_steps_says_there_is_no_good_checkpoint(tmp_path):
  with pytest.raises(train.NonFiniteLoss, match="at step 2; stopping. No good checkpoint in "):
    run(tmp_path, "nan", optim_config=optim.OptimConfig(lr=1e30), steps=30, checkpoint_every=1)


def zero_state(spec):
  """A collapsed start: with every parameter 0 the logits are 0, the loss is ln(vocab) and every gradient is 0."""
  state = initial_state(spec, OPTIM)
  return state.replace(trainable=jax.tree.map(jnp.zeros_like, state.trainable),
                       frozen=jax.tree.map(jnp.zeros_like, state.frozen))


def test_a_collapsed_run_stops_after_collapse_steps_of_zero_gradients(tmp_path):
  spec = lora.LoraSpec.full()
  loop = train.LoopConfig(steps=30, log_every=1, eval_every=100, checkpoint_every=2, collapse_steps=5)
  with pytest.raises(train.Collapsed, match=r"exactly 0 for 5 steps \(steps 1-5, train/loss 3.17805\).*"
                                            r"stopping at step 5. No good checkpoint in "):
    train.fit(MODEL, zero_state(spec), OPTIM, loop, CountingBatches(), eval_batches, tmp_path / "zero", progress=False)
  losses = [r["train/loss"] for r in read(tmp_path / "zero") if "train/loss" in r]
  np.testing.assert_allclose(losses, np.log(CONFIG.vocab_size), rtol=1e-6)  # the symptom: ln(vocab), not NaN
  off = train.LoopConfig(steps=8, log_every=1, eval_every=100, checkpoint_every=100, collapse_steps=0)
  state, _ = train.fit(MODEL, zero_state(spec), OPTIM, off, CountingBatches(), eval_batches, tmp_path / "off",
                       progress=False)
  assert int(state.step) == 8


def test_a_collapse_names_the_newest_checkpoint_from_before_the_zero_gradients(tmp_path):
  class Masked(CountingBatches):
    def __next__(self):  # from step 5 on no token has a loss, so every gradient is exactly 0
      batch = super().__next__()
      return {**batch, "loss_mask": batch["loss_mask"] * (self.index <= 4)}

  with pytest.raises(train.Collapsed, match=r"steps 5-7.*stopping at step 7. Last good checkpoint: step 3 in "):
    run(tmp_path, "run", steps=30, batches=Masked(), checkpoint_every=1, keep_checkpoints=10, collapse_steps=3)


def read(run_dir, name="metrics.jsonl"):
  return [json.loads(l) for l in (run_dir / name).read_text().splitlines()]


def test_resumed_runs_log_each_step_once(tmp_path):
  """A crash before the first checkpoint, then one after an evaluation past the newest checkpoint: every log of the
  resumed run equals the uninterrupted run's (before the fix, lora_diagnostics.jsonl repeated step 6, and a crash
  before any checkpoint left steps 0-2 in both logs twice)."""
  kw = dict(steps=10, eval_every=2, checkpoint_every=4)
  run(tmp_path, "straight", **kw)
  for fail_at in (2, 6):  # dies fetching step 3's, then step 7's batch
    with pytest.raises(RuntimeError, match="simulated crash"):
      run(tmp_path, "crashed", batches=CountingBatches(fail_at=fail_at), **kw)
  run(tmp_path, "crashed", **kw)
  for name in ("metrics.jsonl", metrics.DIAGNOSTICS_FILE):
    steps = lambda d: [(r["step"], "train/loss" in r) for r in read(tmp_path / d, name)]  # noqa: E731
    assert steps("crashed") == steps("straight"), name
    assert len(set(steps("crashed"))) == len(steps("crashed")), name
  assert [r["step"] for r in read(tmp_path / "crashed", metrics.DIAGNOSTICS_FILE)] == [0, 2, 4, 6, 8, 10]


@pytest.mark.slow
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


class TinyLM(nn.Module):
  """Embedding, a tanh layer and an unembedding, all float64: a model with no float32 inside (unlike the
  transformer, which keeps logits, attention scores and norm statistics in float32 by design)."""

  vocab: int = 7
  hidden: int = 4

  @nn.compact
  def __call__(self, tokens, train=False):
    f64 = dict(dtype=jnp.float64, param_dtype=jnp.float64)
    x = nn.Embed(self.vocab, self.hidden, name="embed", **f64)(tokens)
    x = jnp.tanh(nn.Dense(self.hidden, use_bias=False, name="hidden", **f64)(x))
    return nn.Dense(self.vocab, use_bias=False, name="head", **f64)(x)


def golden_setup(spec):
  """Fixed inputs of the golden test: every value from numpy's PCG64 uniforms, which are exact on every platform."""
  rng = np.random.default_rng(0)
  uniform = lambda *shape: rng.uniform(-0.5, 0.5, shape)  # noqa: E731
  params = {"embed": {"embedding": uniform(7, 4)}, "hidden": {"kernel": uniform(4, 4)},
            "head": {"kernel": uniform(4, 7)}}
  params, adapters = lora.create(params, spec, jax.random.key(0))
  adapters = jax.tree.map(lambda x: uniform(*x.shape), adapters)  # B != 0, so A and B both get gradients
  tokens = np.array([[1, 5, 2, 6, 0, 3, 4], [4, 4, 1, 0, 2, 6, 5]])
  batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
           "loss_mask": np.array([[0, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 0]], np.float64)}
  optim_config = optim.OptimConfig(lr=0.1, b1=0.9, b2=0.99, eps=1e-3)  # eps ~ |g| keeps the step sensitive to g
  return train.init_state(params, adapters, spec, optim_config, seed=0), batch, optim.make_optimizer(optim_config)


# Golden values of one step, printed by this test's set-up (jax 0.10.2, optax 0.2.8, x64) and pasted here. They are
# independent of the CPU: the test passes unchanged under XLA_FLAGS=--xla_cpu_max_isa=SSE4_2 (no FMA, 128-bit
# vectors), AVX and AVX2. The loss is also checked against a numpy forward pass below. A change of any of them is a
# change of the trainer's arithmetic (loss normalization, LoRA scaling, Adam), to be explained before updating them.
GOLDEN = {
    "lora": {"train/loss": 1.977673253275412, "train/grad_norm": 0.3468002818316201,
             "lora/head/a": [-0.15649588254945496, 0.5489108835997908],
             "lora/head/b": [0.16224681548818173, -0.08862448653500384],
             "lora/hidden/a": [0.38659100898183746, 0.35906122028167964],
             "lora/hidden/b": [0.21143914969547412, 0.3257330692510787]},
    "full": {"train/loss": 1.9543203838951206, "train/grad_norm": 0.19849680896283792,
             "params/embed/embedding": [0.04342079618386348, -0.31364304291291184],
             "params/head/kernel": [-0.07905987527303537, 0.3483104504205971],
             "params/hidden/kernel": [0.09288413591506339, 0.06578659278996063]},
}


def numpy_loss(state, batch):
  """The masked mean NLL of TinyLM, written out in numpy (an independent check of the trainer's loss)."""
  params, adapters = lora.combine(state.trainable, state.frozen)
  p = jax.tree.map(np.asarray, params)

  def dense(x, name):
    y = x @ p[name]["kernel"]
    if name in adapters:
      ad = adapters[name]
      y = y + ad.scale * (x @ np.asarray(ad.a)) @ np.asarray(ad.b)
    return y

  logits = dense(np.tanh(dense(p["embed"]["embedding"][batch["inputs"]], "hidden")), "head")
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  nll = -np.take_along_axis(logp, batch["targets"][..., None], -1)[..., 0]
  return (nll * batch["loss_mask"]).sum() / batch["loss_mask"].sum()


@pytest.mark.parametrize("method", ["lora", "full"])
def test_one_train_step_matches_golden_values(x64, method):
  spec = lora.LoraSpec(rank=2, alpha=4.0, targets=("hidden", "head"), dtype="float64") if method == "lora" else \
      lora.LoraSpec.full()
  state, batch, tx = golden_setup(spec)
  new, m = jax.jit(train.make_train_step(TinyLM(), tx))(state, batch)
  golden = GOLDEN[method]
  assert float(m["train/loss"]) == pytest.approx(numpy_loss(state, batch), rel=1e-12)
  np.testing.assert_allclose([float(m["train/loss"]), float(m["train/grad_norm"])],
                             [golden["train/loss"], golden["train/grad_norm"]], rtol=1e-10)
  trained = {"/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path): np.asarray(x).reshape(-1)[:2]
             for path, x in jax.tree_util.tree_flatten_with_path(new.trainable)[0]}
  assert set(trained) == set(golden) - {"train/loss", "train/grad_norm"}
  for name, x in trained.items():
    np.testing.assert_allclose(x, golden[name], rtol=1e-10, err_msg=name)


def test_chunk_steps_end_calls_at_every_evaluation_and_checkpoint():
  chunk = lambda k, e, c: train.LoopConfig(steps=100, steps_per_call=k, eval_every=e, checkpoint_every=c).chunk_steps
  assert chunk(10, 50, 100) == 10
  assert chunk(8, 12, 12) == 6  # the largest divisor of 12 up to 8
  assert chunk(10, 3, 3) == 3 and chunk(4, 7, 100) == 1 and chunk(1, 50, 100) == 1
  with pytest.raises(ValueError, match=r"LoopConfig.steps_per_call must be >= 1, got 0"):
    train.LoopConfig(steps=10, steps_per_call=0)


CHUNKED = dict(steps=10, eval_every=4, checkpoint_every=4, steps_per_call=4)


def test_several_steps_per_call_train_as_one_step_per_call(tmp_path, x64):
  chunked, last = run(tmp_path, "chunked", **CHUNKED)
  single, _ = run(tmp_path, "single", **{**CHUNKED, "steps_per_call": 1})
  a, b = read(tmp_path / "chunked"), read(tmp_path / "single")
  assert [(r["step"], sorted(r)) for r in a] == [(r["step"], sorted(r)) for r in b]  # the same records
  # The scanned step is compiled apart from the single one: the same arithmetic, up to rounding (float64 here).
  for key in ("train/loss", "eval/nll"):
    assert_exact(np.asarray([r[key] for r in a if key in r], np.float64),
                 np.asarray([r[key] for r in b if key in r], np.float64))
  for x, y in zip(leaves(chunked), leaves(single)):
    assert_exact(x, y)
  assert int(chunked.step) == 10 and last["train/lr"] == OPTIM.lr  # the last call is short (steps 9-10)


@pytest.mark.slow
def test_resume_inside_a_call_of_several_steps_is_exact(tmp_path):
  straight, _ = run(tmp_path, "straight", **CHUNKED)
  with pytest.raises(RuntimeError, match="simulated crash"):  # dies fetching step 6's batch, inside call 5-8
    run(tmp_path, "crashed", batches=CountingBatches(fail_at=5), **CHUNKED)
  assert checkpoint.Checkpointer(tmp_path / "crashed" / "checkpoints").latest_step() == 4
  resumed, _ = run(tmp_path, "crashed", **CHUNKED)

  def term(index):
    if index == 5:  # while fetching step 6's batch: the call ends at step 6 (steps 7-8 masked), saved there
      os.kill(os.getpid(), signal.SIGTERM)

  with pytest.raises(train.Preempted, match="at step 6"):
    run(tmp_path, "preempted", batches=CountingBatches(on_batch=term), **CHUNKED)
  assert checkpoint.Checkpointer(tmp_path / "preempted" / "checkpoints").all_steps() == [4, 6]
  after_preemption, _ = run(tmp_path, "preempted", **CHUNKED)
  for name, state in (("crashed", resumed), ("preempted", after_preemption)):
    for a, b in zip(leaves(straight), leaves(state)):
      np.testing.assert_array_equal(a, b, err_msg=name)  # bitwise: a short call runs the same program, masked
    steps = [(r["step"], "train/loss" in r) for r in read(tmp_path / name)]
    assert steps == [(r["step"], "train/loss" in r) for r in read(tmp_path / "straight")], name


def test_nan_inside_a_call_of_several_steps_stops_at_its_step(tmp_path):
  with pytest.raises(train.NonFiniteLoss, match="at step 2; stopping. No good checkpoint in "):
    run(tmp_path, "nan", optim_config=optim.OptimConfig(lr=1e30), **CHUNKED)
  assert not (tmp_path / "nan" / "checkpoints").exists() or \
      checkpoint.Checkpointer(tmp_path / "nan" / "checkpoints").all_steps() == []
