"""Policy-gradient RL for LoRA and full fine-tuning: the study's algorithm, with resume like the supervised trainer.

One sampling round: ``prompts_per_step`` prompts, ``group_size`` completions each, sampled from the current policy
with the KV-cache generator (``lora_jax.generate``, temperature 1, per-token log-probs, EOS), scored by a reward
``reward(completion_text, answer)``. Advantages are the reward minus the mean reward of the prompt's group (no std
normalisation). The loss is the importance-weighted policy gradient, per completion token t of completion i

    loss = -(1/N) sum_i sum_t ratio_it * A_i,    ratio_it = p_learner(y_it | ...) / p_sampler(y_it | ...)

(sum over a completion's tokens, mean over the N completions of the minibatch: no length normalisation), with
p_sampler fixed (no gradient). Its gradient is -(1/N) sum ratio * A * grad log p_learner; on-policy (ratio = 1) that
is REINFORCE with the group mean as baseline, whose expectation is (G-1)/G times the gradient of the expected reward
(the baseline includes the sample itself). No KL penalty, no clipping (the study's setting); PPO-style clipping
(``clip_eps``) and a KL-to-base penalty (``kl_coef``) are switches, off by default.

Staleness is a config field: ``steps_per_sample`` optimizer steps per round, each on its own part of the round's
groups, so the k-th step of a round learns from samples drawn k steps before (1 = on-policy: sampler and learner are
the same parameters, and the ratio only absorbs the numerical difference between the cached sampler and the full
forward). LoRA and full FT go through the same step (``train.TrainState``: full FT is ``LoraSpec.full()``); a step
may average its gradient over micro-batches (``grad_accum``) for large groups at real scale. Runs are
single-process (one host, its devices).

``fit`` runs the loop into a run directory as ``train.fit`` does: ``metrics.jsonl`` every ``log_every`` steps
(``train/reward``, ``train/completion_length``, ``train/entropy``, ``train/kl_sampler``, ``train/kl_base``,
``train/tokens_per_s``: completion tokens sampled plus token slots the learner processed, per second of the step,
sampling included, ...), greedy held-out accuracy (``eval/accuracy``) every ``eval_every`` steps, Orbax
checkpoints at round boundaries, and bitwise-exact resume: a round's prompts and sampling key depend only on the
seeds and the round index, and its samples only on the parameters at its start.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from etils import epath

from lora_jax import generate, lora, optim, train
from lora_jax import loop as loop_lib
from lora_jax import metrics as metrics_lib


@dataclasses.dataclass(frozen=True)
class RLConfig:
  """One sampling round and the loss; the defaults are the study's setting (no clipping, no KL, on-policy)."""

  group_size: int = 8  # Completions sampled per prompt (G); advantages are relative to the group's mean.
  prompts_per_step: int = 8  # Prompts per sampling round.
  max_new_tokens: int = 8  # Completion length cap (EOS ends a completion earlier).
  temperature: float = 1.0  # Sampling temperature; must be 1: the ratio compares the policies themselves.
  steps_per_sample: int = 1  # Optimizer steps per round (1 = on-policy; k > 1: the round's j-th step, j < k, learns
  # from samples j steps stale, on its own 1/k of the groups).
  clip_eps: float = 0.0  # PPO clipping of the ratio to [1 - eps, 1 + eps] (pessimistic min); 0 = none (the study).
  kl_coef: float = 0.0  # Penalty coefficient on KL(learner || base) per token (k3 estimator); 0 = none (the study).
  track_base_kl: bool = True  # Log KL(learner || base): needs a copy of the initial trainable parameters (for full
  # FT a second copy of the model).
  eval_batch_size: int = 64  # Prompts per greedy-generation batch of the held-out evaluation.
  sample_batch_size: int = 0  # Completions generated per batch when sampling a round (bounds the KV cache); 0 = all
  # of the round's at once.

  def __post_init__(self):
    for name in ("group_size", "prompts_per_step", "max_new_tokens", "steps_per_sample", "eval_batch_size"):
      if getattr(self, name) < 1:
        raise ValueError(f"rl.{name} must be >= 1, got {getattr(self, name)}")
    if self.group_size < 2:
      raise ValueError(f"rl.group_size must be >= 2 (the advantage is relative to the group), got {self.group_size}")
    if self.temperature != 1.0:
      raise ValueError(f"rl.temperature must be 1.0 (the importance ratio uses log-probs of the policy at temperature "
                       f"1), got {self.temperature}")
    if self.prompts_per_step % self.steps_per_sample:
      raise ValueError(f"rl.prompts_per_step {self.prompts_per_step} must be divisible by rl.steps_per_sample "
                       f"{self.steps_per_sample} (each step learns from whole groups)")
    rows = self.prompts_per_step * self.group_size
    if self.sample_batch_size < 0 or (self.sample_batch_size and rows % self.sample_batch_size):
      raise ValueError(f"rl.sample_batch_size {self.sample_batch_size} must be 0 or divide the round's "
                       f"{rows} completions (prompts_per_step * group_size)")
    if self.clip_eps < 0 or self.kl_coef < 0:
      raise ValueError(f"rl.clip_eps and rl.kl_coef must be >= 0, got {self.clip_eps}, {self.kl_coef}")


@dataclasses.dataclass(frozen=True)
class Problem:
  """A prompt (token ids, as the policy sees it) and the reference answer its reward compares against."""

  prompt: tuple[int, ...]
  answer: str


def group_advantages(rewards_PG) -> jax.Array:
  """Reward minus the mean reward of its group (rows are groups); no std normalisation (the study's)."""
  rewards_PG = jnp.asarray(rewards_PG)
  return rewards_PG - jnp.mean(rewards_PG, axis=-1, keepdims=True)


def completion_batch(prompts: Sequence[Sequence[int]], tokens_NT, lengths_N, width: int, pad_id: int) -> dict:
  """The learner's inputs for completions of left-padded prompts: ``inputs, segment_ids, positions`` [N, W+T-1]
  (prompt and completion, the last completion token dropped), ``targets`` and ``mask`` [N, T] (tokens up to EOS).

  The logits at input position W-1+t predict completion token t; positions count from each prompt's first token, as
  ``generate`` does, so the learner scores exactly what the sampler generated.
  """
  tokens_NT = np.asarray(tokens_NT, np.int32)
  N, T = tokens_NT.shape
  seq = np.full((N, width + T), pad_id, np.int32)
  seg = np.zeros((N, width + T), np.int32)
  for i, p in enumerate(prompts):
    if len(p) > width:
      raise ValueError(f"prompt {i} has {len(p)} tokens, more than the width {width}")
    seq[i, width - len(p):width] = p
    seg[i, width - len(p):] = 1
  seq[:, width:] = tokens_NT
  pos = np.maximum(np.cumsum(seg, axis=1) - 1, 0).astype(np.int32)
  mask = (np.arange(T)[None, :] < np.asarray(lengths_N)[:, None]).astype(np.float32)
  return {"inputs": seq[:, :-1], "segment_ids": seg[:, :-1], "positions": pos[:, :-1], "targets": tokens_NT,
          "mask": mask}


def token_logprobs(model: nn.Module, params, adapters, batch: dict) -> tuple[jax.Array, jax.Array]:
  """(log p of each completion token, entropy of the next-token distribution there), both [N, T], at least fp32."""
  logits = lora.apply(model, params, adapters, batch["inputs"], positions=batch["positions"],
                      segment_ids=batch["segment_ids"], check_unused=False)
  T = batch["targets"].shape[1]
  logits = logits[:, -T:]
  logp_all = jax.nn.log_softmax(logits.astype(jnp.promote_types(logits.dtype, jnp.float32)))
  logp = jnp.take_along_axis(logp_all, batch["targets"][..., None].astype(jnp.int32), axis=-1)[..., 0]
  entropy = -jnp.sum(jnp.exp(logp_all) * logp_all, axis=-1)
  return logp, entropy


def k3(log_r):
  """The k3 estimator of KL per sample, (r - 1) - log r with r = q/p for samples from p: >= 0, unbiased."""
  return jnp.expm1(log_r) - log_r


def pg_loss(logp, sampler_logp, advantages, mask, *, clip_eps: float = 0.0, kl_coef: float = 0.0,
            base_logp=None) -> tuple[jax.Array, dict]:
  """The importance-weighted policy-gradient loss (module docstring) and diagnostics; all per-token arrays [N, T].

  ``sampler_logp`` gets no gradient. ``clip_eps > 0``: per token -min(r·A, clip(r, 1-eps, 1+eps)·A) (PPO).
  ``kl_coef > 0``: plus kl_coef · k3 estimate of KL(learner || base) summed over tokens (needs ``base_logp``).
  """
  n = logp.shape[0]
  log_ratio = logp - jax.lax.stop_gradient(sampler_logp)
  ratio = jnp.exp(log_ratio)
  adv = advantages[:, None]
  objective = ratio * adv
  if clip_eps > 0:
    objective = jnp.minimum(objective, jnp.clip(ratio, 1 - clip_eps, 1 + clip_eps) * adv)
  loss = -jnp.sum(objective * mask) / n
  tokens = jnp.maximum(jnp.sum(mask), 1.0)
  aux = {"kl_sampler": jnp.sum(k3(-log_ratio) * mask) / tokens,
         "ratio_max": jnp.max(jnp.where(mask > 0, ratio, 0.0)),
         "ratio_min": jnp.min(jnp.where(mask > 0, ratio, jnp.inf))}
  if base_logp is not None:
    kl_base = k3(base_logp - logp) * mask
    aux["kl_base"] = jnp.sum(kl_base) / tokens
    if kl_coef > 0:
      loss = loss + kl_coef * jnp.sum(kl_base) / n
  elif kl_coef > 0:
    raise ValueError("pg_loss: kl_coef > 0 needs base_logp")
  return loss, aux


def make_rl_step(model: nn.Module, tx: optax.GradientTransformation, cfg: RLConfig,
                 grad_accum: int = 1) -> Callable:
  """``rl_step(state, batch) -> (state, metrics)``: one optimizer step on a minibatch of scored completions.

  ``batch``: ``completion_batch``'s arrays plus ``sampler_logp`` [N, T], ``advantages`` [N] and, when the base KL
  is tracked or penalised, ``base_logp`` [N, T]. With ``grad_accum`` > 1 the rows are split into that many
  micro-batches whose gradients are averaged (the same gradient, less activation memory); the per-token
  diagnostics are then means of the micro-batches' means.
  """

  def loss_and_grads(trainable, frozen, mb):
    def loss_fn(tr):
      params, adapters = lora.combine(tr, frozen)
      logp, entropy = token_logprobs(model, params, adapters, mb)
      loss, aux = pg_loss(logp, mb["sampler_logp"], mb["advantages"], mb["mask"], clip_eps=cfg.clip_eps,
                          kl_coef=cfg.kl_coef, base_logp=mb.get("base_logp"))
      aux["entropy"] = jnp.sum(entropy * mb["mask"]) / jnp.maximum(jnp.sum(mb["mask"]), 1.0)
      return loss, aux

    return jax.value_and_grad(loss_fn, has_aux=True)(trainable)

  def rl_step(state: train.TrainState, batch):
    if grad_accum == 1:
      (loss, aux), grads = loss_and_grads(state.trainable, state.frozen, batch)
    else:  # means over the micro-batches, the extreme ratios their max and min
      def combine(carry, new):
        total = jax.tree.map(jnp.add, carry, new)
        total[0][1].update(ratio_max=jnp.maximum(carry[0][1]["ratio_max"], new[0][1]["ratio_max"]),
                           ratio_min=jnp.minimum(carry[0][1]["ratio_min"], new[0][1]["ratio_min"]))
        return total

      def init(zeros):  # the identities of the sum, max and min
        zeros[0][1].update(ratio_max=jnp.full_like(zeros[0][1]["ratio_max"], -jnp.inf),
                           ratio_min=jnp.full_like(zeros[0][1]["ratio_min"], jnp.inf))
        return zeros

      (loss, aux), grads = train.accumulate(lambda mb, i: loss_and_grads(state.trainable, state.frozen, mb), batch,
                                            grad_accum, combine, init)
      mean = lambda x: x / grad_accum  # noqa: E731
      grads, loss = jax.tree.map(mean, grads), mean(loss)
      aux = {k: v if k in ("ratio_max", "ratio_min") else mean(v) for k, v in aux.items()}
    updates, opt_state = tx.update(grads, state.opt_state, state.trainable)
    trainable = optax.apply_updates(state.trainable, updates)
    metrics = {"train/loss": loss, "train/grad_norm": optax.tree.norm(grads), "train/update_norm":
               optax.tree.norm(updates), **{f"train/{k}": v for k, v in aux.items()}}
    return state.replace(step=state.step + 1, trainable=trainable, opt_state=opt_state), metrics

  return rl_step


def round_indices(n_problems: int, prompts_per_step: int, seed: int, round_index: int) -> np.ndarray:
  """Which problems a round samples: consecutive slices of a seeded permutation per epoch over the problems."""
  pos = round_index * prompts_per_step + np.arange(prompts_per_step)
  epochs, at = pos // n_problems, pos % n_problems
  perms = {int(e): np.random.default_rng([seed, int(e)]).permutation(n_problems) for e in np.unique(epochs)}
  return np.asarray([perms[int(e)][a] for e, a in zip(epochs, at)])


@dataclasses.dataclass(frozen=True)
class Policy:
  """What sampling, scoring and evaluation need besides the state: the model, its KV cache and the tokenizer's ids."""

  model: nn.Module
  init_cache: Callable  # init_cache(batch, max_len) -> the model's empty KV cache
  decode: Callable[[Sequence[int]], str]  # completion token ids (EOS excluded) -> text for the reward
  eos_id: int
  pad_id: int
  width: int  # Every prompt is left-padded to this many tokens (one compiled program).


def _texts(policy: Policy, tokens_NT, lengths_N) -> list[str]:
  out = []
  for t, n in zip(np.asarray(tokens_NT), np.asarray(lengths_N)):
    n = int(n) - int(n > 0 and t[n - 1] == policy.eos_id)
    out.append(policy.decode(t[:n].tolist()))
  return out


def sample_round(policy: Policy, state: train.TrainState, problems: Sequence[Problem],
                 reward_fn: Callable[[str, str], float], cfg: RLConfig, rng: jax.Array,
                 base_logprobs: Callable | None = None) -> tuple[dict, dict]:
  """Samples G completions per problem from the state's policy and scores them: the learner's batch (all groups,
  ``completion_batch`` + ``sampler_logp``, ``advantages``, maybe ``base_logp``) and the round's metrics."""
  params, adapters = lora.combine(state.trainable, state.frozen)
  G = cfg.group_size
  prompts = [p.prompt for p in problems for _ in range(G)]
  chunk = cfg.sample_batch_size or len(prompts)
  parts = [generate.generate(policy.model, params, adapters, prompts[i:i + chunk], max_new_tokens=cfg.max_new_tokens,
                             eos_id=policy.eos_id, init_cache=policy.init_cache, pad_id=policy.pad_id,
                             sampling=generate.SamplingConfig(temperature=cfg.temperature),
                             rng=rng if chunk == len(prompts) else jax.random.fold_in(rng, i // chunk),
                             prompt_width=policy.width)
           for i in range(0, len(prompts), chunk)]
  out = generate.Generation(*(np.concatenate([getattr(p, f) for p in parts]) for f in ("tokens", "logprobs",
                                                                                       "lengths")))
  texts = _texts(policy, out.tokens, out.lengths)
  rewards = np.asarray([reward_fn(t, problems[i // G].answer) for i, t in enumerate(texts)], np.float32)
  rewards_PG = rewards.reshape(len(problems), G)
  batch = completion_batch(prompts, out.tokens, out.lengths, policy.width, policy.pad_id)
  batch["sampler_logp"] = np.asarray(out.logprobs, np.float32)
  batch["advantages"] = np.asarray(group_advantages(rewards_PG)).reshape(-1)
  if base_logprobs is not None:
    batch["base_logp"] = np.asarray(base_logprobs(state.frozen, batch))
  lengths = np.asarray(out.lengths)
  metrics = {"train/reward": float(rewards.mean()), "train/reward_std": float(rewards.std()),
             "train/groups_with_signal": float(np.mean(rewards_PG.std(axis=1) > 0)),
             "train/completion_length": float(lengths.mean()), "train/sampled_tokens": float(lengths.sum()),
             "train/truncated": float(np.mean((lengths == cfg.max_new_tokens) & (np.asarray(out.tokens)[:, -1] !=
                                                                                 policy.eos_id)))}
  return batch, metrics


def evaluate(policy: Policy, state: train.TrainState, problems: Sequence[Problem],
             reward_fn: Callable[[str, str], float], cfg: RLConfig) -> dict[str, float]:
  """Greedy held-out accuracy (mean reward of the greedy completion) and mean completion length."""
  params, adapters = lora.combine(state.trainable, state.frozen)
  rewards, lengths = [], []
  for start in range(0, len(problems), cfg.eval_batch_size):
    chunk = list(problems[start:start + cfg.eval_batch_size])
    prompts = [p.prompt for p in chunk]
    prompts += [prompts[-1]] * (cfg.eval_batch_size - len(prompts))  # one shape: one compiled program
    out = generate.generate(policy.model, params, adapters, prompts, max_new_tokens=cfg.max_new_tokens,
                            eos_id=policy.eos_id, init_cache=policy.init_cache, pad_id=policy.pad_id,
                            prompt_width=policy.width)
    texts = _texts(policy, out.tokens[:len(chunk)], out.lengths[:len(chunk)])
    rewards += [reward_fn(t, p.answer) for t, p in zip(texts, chunk)]
    lengths += np.asarray(out.lengths[:len(chunk)]).tolist()
  return {"eval/accuracy": float(np.mean(rewards)), "eval/completion_length": float(np.mean(lengths))}


@functools.lru_cache(maxsize=4)
def _compiled(model: nn.Module, optim_config: optim.OptimConfig, cfg: RLConfig, grad_accum: int):
  """The jitted RL steps (one round's ``steps_per_sample`` steps scanned in one call, ``train.jit_train_steps``) and
  base log-prob function of a model and settings (cached: runs in one process share them)."""
  steps = train.jit_train_steps(make_rl_step(model, optim.make_optimizer(optim_config), cfg, grad_accum))
  base = jax.jit(lambda reference, frozen, batch: token_logprobs(model, *lora.combine(reference, frozen), batch)[0])
  return steps, base


def program(policy: Policy, state: train.TrainState, optim_config: optim.OptimConfig, cfg: RLConfig,
            loop: train.LoopConfig, problems: Sequence[Problem], eval_problems: Sequence[Problem],
            reward_fn: Callable[[str, str], float], *, data_seed: int = 0) -> loop_lib.Program:
  """One RL run as the loop runs it (``loop.Program``, K = 1): a call is one sampling round, drawn from the state
  the previous round left, and its ``steps_per_sample`` optimizer steps, each on its own part of the groups."""
  m = cfg.steps_per_sample
  for name in ("steps", "checkpoint_every", "eval_every"):
    if getattr(loop, name) % m:
      raise ValueError(f"train.{name} {getattr(loop, name)} must be a multiple of rl.steps_per_sample {m} "
                       "(checkpoints and evaluations fall between sampling rounds)")
  if not problems or not eval_problems:
    raise ValueError(f"RL needs training and held-out problems; got {len(problems)} and {len(eval_problems)}")
  rows = cfg.prompts_per_step * cfg.group_size // m
  if rows % loop.grad_accum:
    raise ValueError(f"train.grad_accum {loop.grad_accum} must divide the completions per step ({rows})")
  steps_fn, base_fn = _compiled(policy.model, optim_config, cfg, loop.grad_accum)
  reference = jax.tree.map(jnp.copy, state.trainable) if (cfg.track_base_kl or cfg.kl_coef > 0) else None
  base_logprobs = None if reference is None else functools.partial(base_fn, reference)
  key = jax.random.key(loop.seed)
  trainable_finite = jax.jit(loop_lib.all_finite)
  n_trainable = sum(x.size for x in jax.tree.leaves(state.trainable))

  def draw(st, step, stopped):  # a round is never cut: SIGTERM is answered at its end
    del stopped
    if step % m:
      raise ValueError(f"the run is at step {step}, not at a round boundary (rl.steps_per_sample {m}): its "
                       "checkpoint was written with another steps_per_sample")
    round_index, t0 = step // m, time.time()
    chosen = [problems[i] for i in round_indices(len(problems), cfg.prompts_per_step, data_seed, round_index)]
    batch, sampled = sample_round(policy, st, chosen, reward_fn, cfg, jax.random.fold_in(key, round_index),
                                  base_logprobs)
    seconds = time.time() - t0
    parts = {k: np.asarray(v).reshape((m, -1) + np.shape(v)[1:]) for k, v in batch.items()}
    # Each step learns from its own part of the groups: its signal is that part's (groups whose rewards differ).
    signal_parts = np.any(parts["advantages"].reshape(m, -1, cfg.group_size) != 0, axis=-1).mean(axis=-1)
    host = [{**sampled, "train/groups_with_signal": float(signal_parts[part]), "train/sample_time_s": seconds / m,
             "train/staleness": float(part)} for part in range(m)]
    # Per step: the round's sampled completion tokens and the learner's token slots, shared over its steps.
    tokens = (sampled["train/sampled_tokens"] + batch["mask"].size) / m
    return loop_lib.Call(step + m, parts, np.ones(m, bool), tokens, host, draw_seconds=seconds)

  def train_call(st, batches, active):
    rest, metrics = steps_fn(st.frozen, st.replace(frozen=None), batches, active)
    return rest.replace(frozen=st.frozen), metrics

  return loop_lib.Program(
      size=1, draw=draw, train=train_call,
      evaluate=lambda st: [evaluate(policy, st, eval_problems, reward_fn, cfg)],
      split=lambda st: [st], join=lambda st, states: states[0],
      finite=lambda st: np.array([bool(trainable_finite(st.trainable))]),
      data_state=lambda st, k: {"round": int(st.step) // m}, restore_data=lambda data: None,
      lr_at=[optim.schedule(optim_config)], n_trainable=[n_trainable],
      n_total=[n_trainable + sum(x.size for x in jax.tree.leaves(state.frozen))], progress_key="train/reward",
      draw_reads_state=True)


def fit(policy: Policy, state: train.TrainState, optim_config: optim.OptimConfig, cfg: RLConfig,
        loop: train.LoopConfig, problems: Sequence[Problem], eval_problems: Sequence[Problem],
        reward_fn: Callable[[str, str], float], workdir: str | epath.PathLike, *, data_seed: int = 0,
        record: dict | None = None, writer: metrics_lib.MetricWriter | None = None,
        progress: bool = True) -> tuple[train.TrainState, dict]:
  """Trains ``state`` by policy gradient for ``loop.steps`` optimizer steps in ``lora_jax.loop`` (``program``),
  resuming from ``workdir``'s newest checkpoint (module docstring). SIGTERM finishes the round, saves and raises
  ``train.Preempted``; a non-finite loss raises ``train.NonFiniteLoss`` without saving. Returns the final state and
  the last metrics."""
  prog = program(policy, state, optim_config, cfg, loop, problems, eval_problems, reward_fn, data_seed=data_seed)
  runs = loop_lib.open_runs([workdir], loop, records=[record], writers=[writer])
  state, (result,) = loop_lib.fit(prog, state, loop, runs, fail_fast=True, progress=progress)
  return state, result.metrics


def tokenizer_policy(model: nn.Module, init_cache: Callable, tokenizer, width: int) -> Policy:
  """A ``Policy`` over a Hugging Face tokenizer (its EOS and pad ids; completions decoded without special tokens)."""
  return Policy(model=model, init_cache=init_cache,
                decode=functools.partial(tokenizer.decode, skip_special_tokens=True),
                eos_id=tokenizer.eos_token_id, pad_id=tokenizer.pad_token_id or 0, width=width)
