"""Policy-gradient RL: the estimator against exact expectations (float64), REINFORCE on-policy, group advantages,
the learner scoring exactly what the sampler generated, the switches, a tiny run that learns, exact resume."""

import functools
import itertools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lora_jax import checkpoint, generate, lora, optim, rl, train
from lora_jax.models import transformer
from tests._tolerance import assert_exact, config64, to64

CONFIG = transformer.ModelConfig(architecture="llama", vocab_size=50, hidden_size=32, intermediate_size=64,
                                 num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8)
MODEL = transformer.CausalLM(CONFIG)
PARAMS = transformer.init_params(CONFIG, jax.random.key(0))
CACHE = functools.partial(transformer.init_cache, CONFIG)
MODEL64 = transformer.CausalLM(config64(CONFIG))  # where exactness is claimed (under the x64 fixture)
CACHE64 = functools.partial(transformer.init_cache, config64(CONFIG))
EOS = 49


def test_group_advantages_sum_to_zero_and_are_reward_minus_group_mean(x64):
  rewards = np.random.default_rng(0).random((5, 7))
  adv = np.asarray(rl.group_advantages(rewards))
  np.testing.assert_allclose(adv.sum(axis=1), 0.0, atol=1e-15)
  np.testing.assert_allclose(adv, rewards - rewards.mean(axis=1, keepdims=True), rtol=0, atol=1e-15)  # no std
  assert adv.dtype == np.float64


def _expected_update(logp_fn, theta, outcomes, sampler_logp, rewards, G):
  """E over every group of G outcomes drawn from the sampler of -grad pg_loss, by exact enumeration."""
  groups = np.asarray(list(itertools.product(range(len(outcomes)), repeat=G)))  # [groups, G]
  weights = np.exp(sampler_logp.sum(axis=1)[groups].sum(axis=1))  # probability of each group under the sampler
  assert abs(weights.sum() - 1) < 1e-12

  def minus_grad(group):
    adv = rl.group_advantages(rewards[group][None])[0]
    mask = jnp.ones((G, outcomes.shape[1]))
    loss = lambda th: rl.pg_loss(logp_fn(th)[group], sampler_logp[group], adv, mask)[0]
    return jax.tree.map(jnp.negative, jax.grad(loss)(theta))

  grads = jax.jit(jax.vmap(minus_grad))(jnp.asarray(groups))
  return jax.tree.map(lambda g: jnp.tensordot(weights, g, axes=1), grads)


@pytest.mark.parametrize("on_policy", [True, False], ids=["on_policy", "off_policy"])
def test_estimator_equals_the_analytic_gradient_on_a_bandit(x64, on_policy):
  """One-token bandit, K = 4 arms, groups of G = 3: E[-grad loss] = (G-1)/G * grad E_p[R] exactly, sampling from the
  learner itself or from another policy (the ratio p/q corrects for it; (G-1)/G: the group mean includes the sample)."""
  K, G = 4, 3
  rng = np.random.default_rng(1)
  theta = jnp.asarray(rng.normal(size=K))
  rewards = jnp.asarray(rng.random(K))
  q_logits = theta if on_policy else jnp.asarray(rng.normal(size=K))
  outcomes = np.arange(K)[:, None]  # each outcome is one token
  logp_fn = lambda th: jax.nn.log_softmax(th)[:, None]  # [K, 1] log p of each outcome's token
  sampler_logp = jax.nn.log_softmax(q_logits)[:, None]
  got = _expected_update(logp_fn, theta, outcomes, sampler_logp, rewards, G)
  analytic = jax.grad(lambda th: jnp.sum(jax.nn.softmax(th) * rewards))(theta)
  np.testing.assert_allclose(got, (G - 1) / G * analytic, rtol=1e-12, atol=1e-15)
  assert np.abs(analytic).max() > 1e-3  # a real gradient, not zero against zero


def test_estimator_equals_the_analytic_gradient_for_two_token_sequences(x64):
  """Sequences of two tokens (3 x 3 of them) from p(a) p(b|a), groups of 2, on-policy: token log-probs summed by the
  loss give exactly (G-1)/G * grad E_p[R(a, b)]."""
  K, G = 3, 2
  rng = np.random.default_rng(2)
  theta = {"first": jnp.asarray(rng.normal(size=K)), "second": jnp.asarray(rng.normal(size=(K, K)))}
  outcomes = np.asarray([(a, b) for a in range(K) for b in range(K)])
  rewards = jnp.asarray(rng.random(len(outcomes)))

  def logp_fn(th):  # [K*K, 2]: log p(a), log p(b | a)
    first = jax.nn.log_softmax(th["first"])[outcomes[:, 0]]
    second = jax.nn.log_softmax(th["second"], axis=-1)[outcomes[:, 0], outcomes[:, 1]]
    return jnp.stack([first, second], axis=1)

  got = _expected_update(logp_fn, theta, outcomes, logp_fn(theta), rewards, G)
  analytic = jax.grad(lambda th: jnp.sum(jnp.exp(logp_fn(th).sum(axis=1)) * rewards))(theta)
  for key in theta:
    np.testing.assert_allclose(got[key], (G - 1) / G * analytic[key], rtol=1e-12, atol=1e-15)
    assert np.abs(analytic[key]).max() > 1e-3


def _sampled_batch(params, adapters, n_prompts=3, G=4, T=5, seed=0, model=MODEL, cache=CACHE):
  prompts = [[3, 14, 15], [9, 2], [7, 7, 8, 1]][:n_prompts]
  repeated = [p for p in prompts for _ in range(G)]
  out = generate.generate(model, params, adapters, repeated, max_new_tokens=T, eos_id=EOS, init_cache=cache,
                          sampling=generate.SamplingConfig(temperature=1.0), rng=jax.random.key(seed), prompt_width=6)
  batch = rl.completion_batch(repeated, out.tokens, out.lengths, 6, 0)
  rewards = np.random.default_rng(seed).integers(0, 2, size=(n_prompts, G)).astype(np.float32)
  return batch, out, np.asarray(rl.group_advantages(rewards)).reshape(-1)


def test_learner_scores_exactly_what_the_sampler_generated(x64):
  """The full forward's log-prob of each sampled token equals the KV-cache sampler's (ratio 1 on-policy), with
  prompts of different lengths left-padded and completions cut by EOS."""
  params = to64(PARAMS)
  batch, out, _ = _sampled_batch(params, {}, model=MODEL64, cache=CACHE64)
  logp, entropy = jax.jit(functools.partial(rl.token_logprobs, MODEL64))(params, {}, batch)
  mask = batch["mask"]
  assert_exact(np.asarray(logp) * mask, np.asarray(out.logprobs) * mask)
  assert (mask.sum(axis=1) == out.lengths).all() and 0 < mask.mean() <= 1
  assert np.all(np.asarray(entropy) > 0)


def test_on_policy_ratio_one_reduces_to_reinforce_with_a_baseline(x64):
  spec = lora.LoraSpec(rank=2, targets=("all-linear",), dtype="float64")
  params, adapters = lora.create(to64(PARAMS), spec, jax.random.key(3))
  adapters = jax.tree.map(lambda x: x + 0.1, adapters)  # B != 0
  batch, _, adv = _sampled_batch(params, adapters, model=MODEL64, cache=CACHE64)
  trainable, frozen = lora.split(params, adapters, spec)
  logp = lambda tr: rl.token_logprobs(MODEL64, *lora.combine(tr, frozen), batch)[0]
  sampler_logp = jax.jit(logp)(trainable)  # on-policy: the sampler is the learner
  pg = jax.jit(jax.grad(lambda tr: rl.pg_loss(logp(tr), sampler_logp, jnp.asarray(adv), batch["mask"])[0]))(trainable)
  n = len(adv)
  reinforce = jax.jit(jax.grad(lambda tr: -jnp.sum(adv[:, None] * logp(tr) * batch["mask"]) / n))(trainable)
  for a, b in zip(jax.tree.leaves(pg), jax.tree.leaves(reinforce)):
    assert_exact(a, b)
  loss, aux = rl.pg_loss(sampler_logp, sampler_logp, jnp.asarray(adv), batch["mask"])
  assert float(aux["kl_sampler"]) == 0.0 and float(aux["ratio_max"]) == 1.0
  np.testing.assert_allclose(float(loss), -np.sum(adv * batch["mask"].sum(axis=1)) / n, rtol=1e-12)


def test_clipping_and_kl_switches(x64):
  mask = jnp.ones((2, 1))
  adv = jnp.asarray([1.0, -1.0])
  sampler = jnp.log(jnp.asarray([[0.2], [0.2]]))
  f = lambda lp, **kw: rl.pg_loss(lp[:, None], sampler, adv, mask, **kw)[0]
  logp = jnp.log(jnp.asarray([0.4, 0.4]))  # ratio 2 for both tokens
  plain = jax.grad(f)(logp)
  np.testing.assert_allclose(plain, [-1.0, 1.0], rtol=1e-12)  # -(1/N) * ratio * A
  clipped = jax.grad(functools.partial(f, clip_eps=0.2))(logp)
  # A > 0 and ratio above 1 + eps: clipped, no gradient; A < 0: the pessimistic unclipped term keeps its gradient.
  np.testing.assert_allclose(clipped, [0.0, 1.0], rtol=1e-12)
  base = jnp.log(jnp.asarray([[0.1], [0.8]]))
  with_kl, aux = rl.pg_loss(logp[:, None], sampler, adv, mask, kl_coef=0.5, base_logp=base)
  r = np.exp(np.log([0.1, 0.8]) - np.log([0.4, 0.4]))
  k3 = (r - 1) - np.log(r)
  np.testing.assert_allclose(float(with_kl), float(f(logp)) + 0.5 * k3.sum() / 2, rtol=1e-12)
  np.testing.assert_allclose(float(aux["kl_base"]), k3.mean(), rtol=1e-12)
  with pytest.raises(ValueError, match="base_logp"):
    rl.pg_loss(logp[:, None], sampler, adv, mask, kl_coef=0.5)


@pytest.mark.parametrize("field,value,match", [
    ("group_size", 1, "group_size must be >= 2"), ("temperature", 0.7, "temperature must be 1.0"),
    ("steps_per_sample", 3, "divisible by rl.steps_per_sample"), ("clip_eps", -0.1, "clip_eps")])
def test_config_errors_name_the_field(field, value, match):
  with pytest.raises(ValueError, match=match):
    rl.RLConfig(**{field: value})


def test_round_indices_cover_every_problem_once_per_epoch():
  seen = np.concatenate([rl.round_indices(10, 5, seed=0, round_index=k) for k in range(4)])
  assert sorted(seen[:10]) == list(range(10)) and sorted(seen[10:]) == list(range(10))
  assert not np.array_equal(seen[:10], seen[10:])  # each epoch its own order
  np.testing.assert_array_equal(rl.round_indices(10, 5, 0, 3), rl.round_indices(10, 5, 0, 3))


# -- A tiny run ---------------------------------------------------------------------------------------------------------
# Random-init model over 50 tokens; reward 1 when the first completion token is one of ten "good" ids (~0.2 at start).

GOOD = " ".join(str(i) for i in range(1, 11))
PROBLEMS = [rl.Problem((5 + i % 7, 20 + i % 5, 30 + i), GOOD) for i in range(12)]
POLICY = rl.Policy(model=MODEL, init_cache=CACHE, decode=lambda ids: " ".join(map(str, ids)), eos_id=EOS, pad_id=0,
                   width=3)


def first_token_reward(text: str, answer: str) -> float:
  return float(bool(text) and text.split()[0] in answer.split())


def run(workdir, steps, *, spec, lr=3e-2, steps_per_sample=1, checkpoint_every=None):
  optim_config = optim.OptimConfig(lr=lr)
  params, adapters = lora.create(jax.tree.map(jnp.copy, PARAMS), spec, jax.random.key(1))  # full FT donates them
  state = train.init_state(params, adapters, spec, optim_config, seed=0)
  cfg = rl.RLConfig(group_size=8, prompts_per_step=4, max_new_tokens=2, steps_per_sample=steps_per_sample,
                    eval_batch_size=8)
  loop = train.LoopConfig(steps=steps, log_every=1, eval_every=2, checkpoint_every=checkpoint_every or steps,
                          seed=0)
  return rl.fit(POLICY, state, optim_config, cfg, loop, PROBLEMS, PROBLEMS[:6], first_token_reward, workdir,
                progress=False)


def records(path):
  return [json.loads(l) for l in (path / "metrics.jsonl").read_text().splitlines()]


def test_a_tiny_rl_run_raises_the_mean_reward(tmp_path):
  run(tmp_path / "run", 14, spec=lora.LoraSpec(rank=4, targets=("all-linear", "unembed")), lr=2e-2)
  rewards = [r["train/reward"] for r in records(tmp_path / "run") if "train/reward" in r]
  assert len(rewards) == 14
  assert np.mean(rewards[-5:]) > rewards[0] + 0.3, rewards
  evals = [r["eval/accuracy"] for r in records(tmp_path / "run") if "eval/accuracy" in r]
  assert evals[-1] > evals[0]
  first = records(tmp_path / "run")[1]
  for key in ("train/completion_length", "train/entropy", "train/kl_sampler", "train/kl_base", "train/tokens_per_s"):
    assert np.isfinite(first[key]), key


TIMING = ("train/sample_time_s", "train/step_time_s", "train/tokens_per_s", "train/peak_memory_bytes")  # not bitwise


@pytest.mark.slow
def test_resume_is_exact_and_staleness_shows_in_the_ratio(tmp_path):
  """Full FT through the same step, two optimizer steps per sampling round: the second learns from one-step-stale
  samples (ratio != 1). A run stopped at step 2 and resumed equals an uninterrupted one, bitwise, logs included."""
  spec = lora.LoraSpec.full()
  straight, _ = run(tmp_path / "straight", 4, spec=spec, steps_per_sample=2, checkpoint_every=2)
  run(tmp_path / "resumed", 2, spec=spec, steps_per_sample=2, checkpoint_every=2)
  assert checkpoint.Checkpointer(tmp_path / "resumed" / "checkpoints").latest_step() == 2
  resumed, _ = run(tmp_path / "resumed", 4, spec=spec, steps_per_sample=2, checkpoint_every=2)
  for a, b in zip(jax.tree.leaves(straight.trainable), jax.tree.leaves(resumed.trainable)):
    np.testing.assert_array_equal(a, b)
  strip = lambda rs: [{k: v for k, v in r.items() if k not in TIMING} for r in rs]
  assert strip(records(tmp_path / "resumed")) == strip(records(tmp_path / "straight"))
  logged = [r for r in records(tmp_path / "straight") if "train/loss" in r]
  assert [r["train/staleness"] for r in logged] == [0.0, 1.0, 0.0, 1.0]
  assert logged[0]["train/kl_sampler"] < 1e-6 and logged[1]["train/kl_sampler"] > 1e-4  # stale: p != q
  with pytest.raises(ValueError, match="multiple of rl.steps_per_sample"):
    run(tmp_path / "bad", 3, spec=spec, steps_per_sample=2, checkpoint_every=2)


def test_sigterm_finishes_the_round_saves_and_raises_preempted(tmp_path):
  import os
  import signal

  calls = {"n": 0}

  def reward_then_term(text, answer):
    calls["n"] += 1
    if calls["n"] == 6 + 32 + 1:  # step 0 evaluates 6 problems; then 4 prompts x 8 per round: round 2 starts
      os.kill(os.getpid(), signal.SIGTERM)
    return first_token_reward(text, answer)

  spec = lora.LoraSpec(rank=2, targets=("all-linear",))
  optim_config = optim.OptimConfig(lr=1e-2)
  params, adapters = lora.create(jax.tree.map(jnp.copy, PARAMS), spec, jax.random.key(1))
  state = train.init_state(params, adapters, spec, optim_config, seed=0)
  cfg = rl.RLConfig(group_size=8, prompts_per_step=4, max_new_tokens=2, eval_batch_size=8)
  loop = train.LoopConfig(steps=4, log_every=1, eval_every=4, checkpoint_every=4)
  handler = signal.getsignal(signal.SIGTERM)
  with pytest.raises(train.Preempted, match="preempted by signal 15 at step 2"):
    rl.fit(POLICY, state, optim_config, cfg, loop, PROBLEMS, PROBLEMS[:6], reward_then_term, tmp_path, progress=False)
  assert checkpoint.Checkpointer(tmp_path / "checkpoints").all_steps() == [2]
  assert signal.getsignal(signal.SIGTERM) is handler


def test_sampling_in_chunks_scores_every_completion():
  spec = lora.LoraSpec(rank=2, targets=("all-linear",))
  params, adapters = lora.create(PARAMS, spec, jax.random.key(1))
  state = train.init_state(params, adapters, spec, optim.OptimConfig(lr=1e-3), seed=0)
  chunked = rl.RLConfig(group_size=4, prompts_per_step=4, max_new_tokens=2, sample_batch_size=8, track_base_kl=False)
  batch, metrics = rl.sample_round(POLICY, state, PROBLEMS[:4], first_token_reward, chunked, jax.random.key(0))
  assert batch["targets"].shape == (16, 2) and batch["advantages"].shape == (16,)
  np.testing.assert_allclose(batch["advantages"].reshape(4, 4).sum(axis=1), 0.0, atol=1e-6)
  assert 0 <= metrics["train/reward"] <= 1 and metrics["train/completion_length"] > 0
  with pytest.raises(ValueError, match="sample_batch_size 5 must be 0 or divide"):
    rl.RLConfig(group_size=4, prompts_per_step=4, sample_batch_size=5)


def test_steps_without_signal_never_count_towards_a_collapse(tmp_path):
  """A step whose groups all had equal rewards has a zero gradient by design: it ends a streak of zero gradients and
  never counts in one; consecutive zero gradients of steps with signal do collapse."""
  from lora_jax import loop as loop_lib

  ck = checkpoint.Checkpointer(tmp_path / "checkpoints")
  zero = {"train/loss": 0.0, "train/grad_norm": 0.0}
  since = None
  for step in range(1, 4):  # two zero-gradient steps with signal, then one without, then two more with signal
    error, since = loop_lib.check_step({**zero, "train/groups_with_signal": 0.5 if step != 3 else 0.0}, step,
                                       since, 3, ck)
    assert error is None
  assert since is None
  for step in (4, 5):
    error, since = loop_lib.check_step({**zero, "train/groups_with_signal": 0.5}, step, since, 3, ck)
    assert error is None
  error, since = loop_lib.check_step({**zero, "train/groups_with_signal": 0.5}, 6, since, 3, ck)
  assert isinstance(error, loop_lib.Collapsed) and "steps 4-6" in str(error)
  ck.close()
