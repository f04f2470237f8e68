"""Text generation with a KV cache: greedy and sampling, batched prompts, EOS stop, per-token log-probabilities.

    out = generate(model, params, adapters, prompts, max_new_tokens=32, eos_id=tok.eos_token_id, rng=key)
    out.tokens [B, N], out.logprobs [B, N] (log p of each generated token under the model at temperature 1, the
    quantity an importance-sampling policy gradient needs), out.lengths [B] (tokens up to and including EOS).

Prompts are left-padded to a common length; padding has segment id 0, so it is never attended to, and positions
count from each prompt's first real token, as Hugging Face does with an attention mask. Works with or without LoRA
adapters (``adapters={}``). The command line (alpaca-lora's ``generate.py``) is ``lora_jax.cli.generate``.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lora_jax import lora


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  """How the next token is chosen; temperature 0 is greedy."""

  temperature: float = 0.0  # 0 = greedy (argmax).
  top_k: int = 0  # Keep the k most likely tokens; 0 = all.
  top_p: float = 1.0  # Keep the smallest set with this much probability; 1 = all.

  def __post_init__(self):
    if self.temperature < 0 or self.top_k < 0 or not 0 < self.top_p <= 1:
      raise ValueError(f"invalid sampling settings {self}: need temperature >= 0, top_k >= 0, 0 < top_p <= 1")


@dataclasses.dataclass(frozen=True)
class Generation:
  """Generated tokens (padded with ``pad_id`` after EOS), their log-probabilities and lengths."""

  tokens: np.ndarray  # [B, N] int32
  logprobs: np.ndarray  # [B, N] float32 (float64 for a float64 model), 0 after EOS
  lengths: np.ndarray  # [B] generated tokens including EOS


def _choose(logits_BV, rng, sampling: SamplingConfig):
  if sampling.temperature == 0:
    return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
  logits_BV = logits_BV / sampling.temperature
  if sampling.top_k:
    kth = jax.lax.top_k(logits_BV, sampling.top_k)[0][:, -1:]
    logits_BV = jnp.where(logits_BV < kth, -jnp.inf, logits_BV)
  if sampling.top_p < 1:
    sorted_BV = jnp.sort(logits_BV, axis=-1)[:, ::-1]
    cum_BV = jnp.cumsum(jax.nn.softmax(sorted_BV, axis=-1), axis=-1)
    # The smallest logit still inside the nucleus (the first token always is).
    keep = jnp.sum(cum_BV - jax.nn.softmax(sorted_BV, axis=-1) < sampling.top_p, axis=-1, keepdims=True)
    cutoff = jnp.take_along_axis(sorted_BV, keep - 1, axis=-1)
    logits_BV = jnp.where(logits_BV < cutoff, -jnp.inf, logits_BV)
  return jax.random.categorical(rng, logits_BV, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("model", "max_new_tokens", "sampling", "init_cache"))
def _generate(model, params, adapters, tokens_BP, segment_BP, rng, eos_id, pad_id, rows_B, *, max_new_tokens,
              sampling, init_cache):
  B, P = tokens_BP.shape
  positions_BP = jnp.maximum(jnp.cumsum(segment_BP, axis=1) - 1, 0).astype(jnp.int32)
  cache = init_cache(B, P + max_new_tokens)

  def forward(tokens, positions, segments, cache):
    return lora.apply(model, params, adapters, tokens, positions=positions, segment_ids=segments, cache=cache,
                      check_unused=False, rows=rows_B)

  logits_BPV, cache = forward(tokens_BP, positions_BP, segment_BP, cache)
  first = (logits_BPV[:, -1], positions_BP[:, -1] + 1, jnp.zeros((B,), bool), cache)

  def step(carry, key):
    logits_BV, pos_B, done_B, cache = carry
    token_B = _choose(logits_BV, key, sampling)
    wide = jnp.promote_types(logits_BV.dtype, jnp.float32)  # at least float32 (float64 for a float64 model)
    logp_B = jnp.take_along_axis(jax.nn.log_softmax(logits_BV.astype(wide)), token_B[:, None], -1)[:, 0]
    token_B = jnp.where(done_B, pad_id, token_B)
    logp_B = jnp.where(done_B, 0.0, logp_B)
    new_done_B = done_B | (token_B == eos_id)
    logits_B1V, cache = forward(token_B[:, None], pos_B[:, None], jnp.ones((B, 1), jnp.int32), cache)
    return (logits_B1V[:, 0], pos_B + 1, new_done_B, cache), (token_B, logp_B, ~done_B)

  _, (tokens_NB, logp_NB, live_NB) = jax.lax.scan(step, first, jax.random.split(rng, max_new_tokens))
  return tokens_NB.T, logp_NB.T, jnp.sum(live_NB, axis=0)


def generate(model: nn.Module, params, adapters, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
             eos_id: int | None, init_cache, pad_id: int = 0, sampling: SamplingConfig = SamplingConfig(),
             rng: jax.Array | None = None, prompt_width: int | None = None, rows=None) -> Generation:
  """Continues each token-id prompt; ``init_cache(batch, max_len)`` makes the model's empty KV cache.

  Prompts are left-padded to the longest, or to ``prompt_width`` (one compiled program for batches of any prompts).
  With several runs' adapters (``lora.stack_adapters``), ``rows`` names the run each prompt is answered by.
  """
  if not prompts or any(len(p) == 0 for p in prompts):
    raise ValueError("every prompt needs at least one token")
  width = max(len(p) for p in prompts)
  if prompt_width is not None:
    if prompt_width < width:
      raise ValueError(f"prompt_width {prompt_width} is shorter than the longest prompt ({width} tokens)")
    width = prompt_width
  tokens = np.full((len(prompts), width), pad_id, np.int32)
  segments = np.zeros((len(prompts), width), np.int32)
  for i, p in enumerate(prompts):
    tokens[i, width - len(p):] = p
    segments[i, width - len(p):] = 1
  rng = jax.random.key(0) if rng is None else rng
  if rows is not None and len(rows) != len(prompts):
    raise ValueError(f"rows has {len(rows)} entries for {len(prompts)} prompts: give one run index per prompt")
  out = _generate(model, params, adapters, jnp.asarray(tokens), jnp.asarray(segments), rng,
                  -1 if eos_id is None else eos_id, pad_id, None if rows is None else jnp.asarray(rows, jnp.int32),
                  max_new_tokens=max_new_tokens, sampling=sampling, init_cache=init_cache)
  if jax.process_count() > 1:  # outputs may span other hosts' devices: every process gets the whole result
    from jax.experimental import multihost_utils

    out = multihost_utils.process_allgather(out, tiled=True)
  tokens_BN, logp_BN, lengths_B = jax.device_get(out)
  return Generation(np.asarray(tokens_BN), np.asarray(logp_BN), np.asarray(lengths_B))


def generate_text(model, params, adapters, tokenizer, texts: Sequence[str], *, max_new_tokens: int,
                  init_cache, chat: bool = False, sampling: SamplingConfig = SamplingConfig(),
                  rng: jax.Array | None = None, rows=None) -> list[str]:
  """Generates from text prompts (through the chat template when ``chat``) and decodes up to EOS (``rows``: see
  ``generate``)."""
  if chat:
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True,
                                             tokenize=True) for t in texts]
    prompts = [p["input_ids"] if isinstance(p, dict) or hasattr(p, "keys") else p for p in prompts]
  else:
    prompts = [tokenizer(t)["input_ids"] for t in texts]
  out = generate(model, params, adapters, prompts, max_new_tokens=max_new_tokens, eos_id=tokenizer.eos_token_id,
                 init_cache=init_cache, pad_id=tokenizer.pad_token_id or 0, sampling=sampling, rng=rng, rows=rows)
  return [tokenizer.decode(t[: n - int(n > 0 and t[n - 1] == tokenizer.eos_token_id)], skip_special_tokens=True)
          for t, n in zip(out.tokens, out.lengths)]


if __name__ == "__main__":  # the command line moved: say where, rather than run nothing and exit 0
  raise SystemExit("python -m lora_jax.generate moved: run python -m lora_jax.cli.generate")
