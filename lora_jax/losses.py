"""Token cross-entropy: from full logits, or in sequence chunks so that no [tokens, vocab] array is ever formed.

`chunked_nll_sum` is what makes long sequences with a 128k-152k vocabulary fit: the unembedding runs on N
sequence positions at a time inside a rematerialised `nn.scan`, so the forward pass keeps only running sums and the
backward pass recomputes one chunk's [B, N, V] logits at a time (float32 logits of 32 x 8192 tokens over Llama 3's
vocabulary would be 128 GiB; a 256-position chunk of 4 rows is 0.5 GiB). The unembedding is called as the model's own
module (an `nn.Dense` or the tied `nn.Embed.attend`), so anything that intercepts those calls — LoRA on the
unembedding — applies per chunk unchanged. Both functions return (sum of masked token NLL, number of loss tokens).

Shape suffixes: B batch, T sequence, D hidden size, V vocabulary, C chunks, N positions per chunk.
"""

from __future__ import annotations

from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp


def masked_nll_sum(logits_BTV, targets_BT, mask_BT) -> tuple[jax.Array, jax.Array]:
  """(sum of -log softmax(logits)[target] over tokens with mask 1, sum of the mask), in at least float32."""
  # At least float32 (bf16 logits are upcast); a float64 model keeps float64 for exactness tests.
  dtype = jnp.promote_types(logits_BTV.dtype, jnp.float32)
  logp_BTV = jax.nn.log_softmax(logits_BTV.astype(dtype))
  nll_BT = -jnp.take_along_axis(logp_BTV, targets_BT[..., None].astype(jnp.int32), axis=-1)[..., 0]
  mask_BT = mask_BT.astype(dtype)
  return jnp.sum(nll_BT * mask_BT), jnp.sum(mask_BT)


def _chunk_nll(logits_BNV, targets_BN, mask_BN):
  # logsumexp - target logit: the same number as -log_softmax[target] without a second [B, N, V] array.
  dtype = jnp.promote_types(logits_BNV.dtype, jnp.float32)
  logits_BNV = logits_BNV.astype(dtype)
  target_BN = jnp.take_along_axis(logits_BNV, targets_BN[..., None].astype(jnp.int32), axis=-1)[..., 0]
  nll_BN = jax.nn.logsumexp(logits_BNV, axis=-1) - target_BN
  mask_BN = mask_BN.astype(dtype)
  return jnp.sum(nll_BN * mask_BN), jnp.sum(mask_BN)


def chunked_nll_sum(module: nn.Module, unembed: Callable, h_BTD, targets_BT, mask_BT,
                    chunk_size: int) -> tuple[jax.Array, jax.Array]:
  """`masked_nll_sum(unembed(module, h), ...)` computed `chunk_size` sequence positions at a time.

  `unembed(module, h_BND) -> logits [B, N, V]` is called inside a lifted (Flax) scan over chunks whose body is
  rematerialised, so only one chunk's logits (and their gradient) exist at any time. Call it from a method of a
  bound `module` (e.g. `CausalLM.nll_sum`). A sequence that is not a multiple of `chunk_size` is padded with
  positions of mask 0.
  """
  if chunk_size < 1:
    raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
  B, T, D = h_BTD.shape
  n = min(chunk_size, T)
  chunks = -(-T // n)
  pad = chunks * n - T
  if pad:
    h_BTD = jnp.pad(h_BTD, ((0, 0), (0, pad), (0, 0)))
    targets_BT = jnp.pad(targets_BT, ((0, 0), (0, pad)))
    mask_BT = jnp.pad(mask_BT, ((0, 0), (0, pad)))
  # Chunks along the sequence keep the batch axis (and its sharding) in place: [C, B, N, ...].
  h_CBND = h_BTD.reshape(B, chunks, n, D).swapaxes(0, 1)
  targets_CBN = targets_BT.reshape(B, chunks, n).swapaxes(0, 1)
  mask_CBN = mask_BT.reshape(B, chunks, n).swapaxes(0, 1)
  dtype = jnp.promote_types(jnp.promote_types(h_BTD.dtype, jnp.float32), mask_BT.dtype)

  def body(mdl, carry, xs):
    h_BND, targets_BN, mask_BN = xs
    total, count = _chunk_nll(unembed(mdl, h_BND), targets_BN, mask_BN)
    return (carry[0] + total.astype(dtype), carry[1] + count.astype(dtype)), None

  scan = nn.scan(nn.remat(body, prevent_cse=False), variable_broadcast="params",
                 split_rngs={"params": False, "dropout": True}, length=chunks)
  zero = jnp.zeros((), dtype)
  (total, count), _ = scan(module, (zero, zero), (h_CBND, targets_CBN, mask_CBN))
  return total, count
