"""Decoder-only transformers (Llama 3, Mistral, Qwen3, Qwen3-MoE) in plain Flax linen.

One implementation covers all four families; it reproduces the Hugging Face PyTorch models numerically
(fp32 logits agree to ~1e-5, see tests/test_hf.py): GQA, RoPE in HF's rotate_half layout with `llama3`
frequency scaling, RMSNorm computed in fp32, SwiGLU MLPs, Mistral sliding windows, Qwen3 per-head q/k norms
and Qwen3-MoE top-k routing.

Parameter names follow the HF module tree (`model/layers_0/self_attn/q_proj/kernel`, ...). Other code (the
LoRA transform, the HF/PEFT exporters, sharding rules) relies on these names: keep them. Every linear layer is an
`nn.Dense` with a 2-D `[in, out]` kernel and no bias; MoE experts are `nn.Einsum` modules with stacked
`[experts, in, out]` kernels. This module never imports the LoRA code.

Shape suffixes:
  B batch                  T query length               S key/value length (the cache length when decoding)
  D hidden size (embed)    V vocabulary                 F MLP hidden size (intermediate)
  H query heads            G key/value heads            R = H // G query heads per key/value head
  K head dimension         E experts                    X experts per token (top-k)
  N = B * T tokens         L layers
"""

from __future__ import annotations

import dataclasses
import functools
import json
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

ARCHITECTURES = ("llama", "mistral", "qwen3", "qwen3_moe")
_ROPE_SCALING_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Shapes and numerics of a decoder-only transformer; field names follow HF where one exists."""

  architecture: str  # HF model_type: 'llama', 'mistral', 'qwen3' or 'qwen3_moe'.
  vocab_size: int  # Number of token embeddings (and logits).
  hidden_size: int  # Width D of the residual stream.
  intermediate_size: int  # Hidden size F of the dense SwiGLU MLPs.
  num_layers: int  # Number of decoder layers (HF num_hidden_layers).
  num_heads: int  # Query heads H (HF num_attention_heads).
  num_kv_heads: int  # Key/value heads G for grouped-query attention; divides num_heads.
  head_dim: int  # Per-head width K (not always hidden_size // num_heads: Qwen3 and Llama-3.2-1B differ).
  rms_norm_eps: float = 1e-6  # Epsilon inside every RMSNorm.
  rope_theta: float = 10000.0  # RoPE base frequency.
  rope_scaling: dict | None = None  # None or llama3 rope: factor, low/high_freq_factor, original_max_position_embeddings.
  max_position_embeddings: int = 8192  # Trained context length; informational, written back on HF export.
  tie_word_embeddings: bool = False  # If True the output head reuses embed_tokens (no lm_head parameter).
  sliding_window: int | None = None  # Mistral local attention: a query sees its last `sliding_window` keys (itself too).
  qk_norm: bool = False  # Qwen3: RMSNorm over head_dim on each query and key head before RoPE.
  num_experts: int = 0  # MoE experts per sparse layer; 0 means every MLP is dense.
  num_experts_per_tok: int = 0  # Top-k experts mixed per token.
  moe_intermediate_size: int = 0  # Hidden size of each expert's SwiGLU MLP.
  norm_topk_prob: bool = False  # Renormalize the top-k router probabilities to sum to one.
  decoder_sparse_step: int = 1  # Layer i is sparse if (i + 1) % decoder_sparse_step == 0 and i not in mlp_only_layers.
  mlp_only_layers: tuple[int, ...] = ()  # Layers that keep a dense MLP although MoE is on.
  initializer_range: float = 0.02  # Std of the normal init of kernels and embeddings (HF's default).
  param_dtype: str = "float32"  # Storage dtype of parameters.
  dtype: str = "float32"  # Compute dtype of activations; softmax and RMSNorm statistics are always fp32.
  scan_layers: bool = False  # Stack layers into one nn.scan module `layers` (leading layer axis) instead of layers_{i}.
  remat: bool = False  # Rematerialize each decoder layer in the backward pass (nn.remat).

  def __post_init__(self):
    set_ = functools.partial(object.__setattr__, self)
    set_("param_dtype", jnp.dtype(self.param_dtype).name)
    set_("dtype", jnp.dtype(self.dtype).name)
    set_("mlp_only_layers", tuple(int(i) for i in self.mlp_only_layers))
    if self.rope_scaling is not None:
      set_("rope_scaling", dict(self.rope_scaling))
    self._validate()

  def _validate(self):
    if self.architecture not in ARCHITECTURES:
      raise ValueError(f"architecture {self.architecture!r} is not one of {ARCHITECTURES}")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
    if self.rope_scaling is not None:
      missing = [k for k in _ROPE_SCALING_KEYS if k not in self.rope_scaling]
      extra = sorted(set(self.rope_scaling) - set(_ROPE_SCALING_KEYS))
      if missing or extra:
        raise ValueError(f"rope_scaling must have exactly the llama3 keys {_ROPE_SCALING_KEYS}; "
                         f"missing {missing}, unexpected {extra}")
    if self.sliding_window is not None and self.sliding_window < 1:
      raise ValueError(f"sliding_window must be None or >= 1, got {self.sliding_window}")
    if self.num_experts:
      if not 0 < self.num_experts_per_tok <= self.num_experts or self.moe_intermediate_size <= 0:
        raise ValueError("MoE needs 0 < num_experts_per_tok <= num_experts and moe_intermediate_size > 0, got "
                         f"{self.num_experts_per_tok=}, {self.num_experts=}, {self.moe_intermediate_size=}")
      if self.scan_layers and len({self.is_moe_layer(i) for i in range(self.num_layers)}) > 1:
        raise ValueError("scan_layers needs identical layers, but this config mixes dense and MoE MLPs "
                         f"(mlp_only_layers={self.mlp_only_layers}, decoder_sparse_step={self.decoder_sparse_step})")

  def __hash__(self):
    # The rope_scaling dict makes the generated hash fail; hash a canonical serialization instead.
    return hash(json.dumps(dataclasses.asdict(self), sort_keys=True))

  def is_moe_layer(self, layer: int) -> bool:
    """Whether decoder layer `layer` has a sparse MoE block (HF Qwen3-MoE rule)."""
    return (self.num_experts > 0 and layer not in self.mlp_only_layers
            and (layer + 1) % self.decoder_sparse_step == 0)

  def replace(self, **changes) -> ModelConfig:
    """A copy with some fields changed (validated again)."""
    return dataclasses.replace(self, **changes)

  # Tiny presets for tests: a few thousand parameters, run on a CPU in milliseconds. `changes` override fields.
  @classmethod
  def tiny_llama(cls, **changes) -> ModelConfig:
    """A tiny Llama-3 shaped config (GQA 4:2, llama3 rope scaling, untied head)."""
    rope_scaling = dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=16)
    return cls(**{**_TINY, "architecture": "llama", "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
                  "rope_scaling": rope_scaling, **changes})

  @classmethod
  def tiny_mistral(cls, **changes) -> ModelConfig:
    """A tiny Mistral shaped config with a sliding window of 4 tokens."""
    return cls(**{**_TINY, "architecture": "mistral", "rms_norm_eps": 1e-5, "sliding_window": 4, **changes})

  @classmethod
  def tiny_qwen3(cls, **changes) -> ModelConfig:
    """A tiny Qwen3 shaped config (q/k norms, head_dim != hidden_size // num_heads, tied embeddings)."""
    return cls(**{**_TINY, "architecture": "qwen3", "head_dim": 16, "rope_theta": 1e6, "qk_norm": True,
                  "tie_word_embeddings": True, **changes})

  @classmethod
  def tiny_qwen3_moe(cls, **changes) -> ModelConfig:
    """A tiny Qwen3-MoE shaped config: 4 experts, top-2, every layer sparse."""
    return cls(**{**_TINY, "architecture": "qwen3_moe", "rope_theta": 1e6, "qk_norm": True, "num_experts": 4,
                  "num_experts_per_tok": 2, "moe_intermediate_size": 16, "norm_topk_prob": True, **changes})

  @classmethod
  def from_preset(cls, name: str, **changes) -> ModelConfig:
    """The config of a released model by its HF hub id (shapes only, e.g. for memory planning)."""
    if name not in PRESETS:
      raise KeyError(f"unknown preset {name!r}; known: {sorted(PRESETS)}")
    return cls(**{**PRESETS[name], **changes})


_TINY = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
             head_dim=8)
_LLAMA3_ROPE = dict(factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192)

# Released models, keyed by HF hub id; the values are copied from their config.json files.
PRESETS: dict[str, dict[str, Any]] = {
    "meta-llama/Llama-3.2-1B": dict(
        architecture="llama", vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_layers=16,
        num_heads=32, num_kv_heads=8, head_dim=64, rms_norm_eps=1e-5, rope_theta=500000.0,
        rope_scaling=_LLAMA3_ROPE, max_position_embeddings=131072, tie_word_embeddings=True),
    "meta-llama/Llama-3.1-8B": dict(
        architecture="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32,
        num_heads=32, num_kv_heads=8, head_dim=128, rms_norm_eps=1e-5, rope_theta=500000.0,
        rope_scaling={**_LLAMA3_ROPE, "factor": 8.0}, max_position_embeddings=131072),
    "Qwen/Qwen3-8B": dict(
        architecture="qwen3", vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_layers=36,
        num_heads=32, num_kv_heads=8, head_dim=128, rms_norm_eps=1e-6, rope_theta=1000000.0,
        max_position_embeddings=40960, qk_norm=True),
    "Qwen/Qwen3-30B-A3B": dict(
        architecture="qwen3_moe", vocab_size=151936, hidden_size=2048, intermediate_size=6144, num_layers=48,
        num_heads=32, num_kv_heads=4, head_dim=128, rms_norm_eps=1e-6, rope_theta=1000000.0,
        max_position_embeddings=40960, qk_norm=True, num_experts=128, num_experts_per_tok=8,
        moe_intermediate_size=768, norm_topk_prob=True),
    "mistralai/Mistral-7B-v0.3": dict(
        architecture="mistral", vocab_size=32768, hidden_size=4096, intermediate_size=14336, num_layers=32,
        num_heads=32, num_kv_heads=8, head_dim=128, rms_norm_eps=1e-5, rope_theta=1000000.0,
        max_position_embeddings=32768, sliding_window=None),
}


# ----------------------------------------------------------------------------------------------------------------
# Building blocks.


def _kernel_init(config: ModelConfig, names: tuple[str, ...]):
  return nn.with_logical_partitioning(nn.initializers.normal(config.initializer_range), names)


def _dense(config: ModelConfig, features: int, names: tuple[str, str], name: str) -> nn.Dense:
  return nn.Dense(features, use_bias=False, dtype=config.dtype, param_dtype=config.param_dtype,
                  kernel_init=_kernel_init(config, names), name=name)


def _at_least_f32(dtype):
  """float32 for bf16/fp16/fp32 statistics, float64 kept (x64 exactness tests)."""
  return jnp.promote_types(dtype, jnp.float32)


class RMSNorm(nn.Module):
  """RMSNorm over the last axis, statistics in fp32, then `scale * x` in the input dtype (as HF)."""

  config: ModelConfig
  axis_name: str = "norm"  # Logical axis of the scale: 'norm', or 'head_dim' for Qwen3's per-head q/k norms.

  @nn.compact
  def __call__(self, x):
    scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, (self.axis_name,)),
                       (x.shape[-1],), self.config.param_dtype)
    x32 = x.astype(_at_least_f32(x.dtype))
    x32 = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.config.rms_norm_eps)
    return scale.astype(x.dtype) * x32.astype(x.dtype)


def rope_inv_freq(config: ModelConfig) -> np.ndarray:
  """RoPE inverse frequencies [K/2] in float32, with HF's `llama3` scaling when configured."""
  dim = config.head_dim
  inv_freq = (1.0 / (np.float32(config.rope_theta) ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim))))
  inv_freq = inv_freq.astype(np.float32)
  if config.rope_scaling is None:
    return inv_freq
  s = config.rope_scaling
  old_len = s["original_max_position_embeddings"]
  low_freq_wavelen = old_len / s["low_freq_factor"]
  high_freq_wavelen = old_len / s["high_freq_factor"]
  wavelen = (2 * np.pi / inv_freq).astype(np.float32)
  scaled = np.where(wavelen > low_freq_wavelen, inv_freq / s["factor"], inv_freq)
  smooth = (old_len / wavelen - s["low_freq_factor"]) / (s["high_freq_factor"] - s["low_freq_factor"])
  smoothed = (1 - smooth) * scaled / s["factor"] + smooth * scaled
  is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
  return np.where(is_medium, smoothed, scaled).astype(np.float32)


def rope_cos_sin(config: ModelConfig, positions_BT: jax.Array) -> tuple[jax.Array, jax.Array]:
  """cos and sin tables [B, T, K] for the given positions, computed in fp32 and cast to the compute dtype."""
  freqs_BTk = positions_BT.astype(jnp.float32)[..., None] * jnp.asarray(rope_inv_freq(config))
  emb_BTK = jnp.concatenate([freqs_BTk, freqs_BTk], axis=-1)
  return jnp.cos(emb_BTK).astype(config.dtype), jnp.sin(emb_BTK).astype(config.dtype)


def apply_rope(x_BTHK: jax.Array, cos_BTK: jax.Array, sin_BTK: jax.Array) -> jax.Array:
  """Rotates heads by position using HF's rotate_half convention (first half paired with second half)."""
  x1, x2 = jnp.split(x_BTHK, 2, axis=-1)
  rotated = jnp.concatenate([-x2, x1], axis=-1)
  return x_BTHK * cos_BTK[:, :, None, :] + rotated * sin_BTK[:, :, None, :]


def segment_positions(segment_ids_BT: jax.Array) -> jax.Array:
  """Positions that restart at 0 where a packed document starts (a new segment id)."""
  B, T = segment_ids_BT.shape
  idx_BT = jnp.broadcast_to(jnp.arange(T), (B, T))
  is_start = jnp.concatenate([jnp.ones((B, 1), bool), segment_ids_BT[:, 1:] != segment_ids_BT[:, :-1]], axis=1)
  start_BT = jax.lax.cummax(jnp.where(is_start, idx_BT, 0), axis=1)
  return (idx_BT - start_BT).astype(jnp.int32)


def attention_mask(q_index_T, kv_index_S, q_segment_BT, kv_segment_BS, sliding_window: int | None) -> jax.Array:
  """Boolean [B, T, S]: causal by sequence index, same segment only, and within the sliding window if any."""
  causal_TS = kv_index_S[None, :] <= q_index_T[:, None]
  if sliding_window is not None:  # HF: kv_idx > q_idx - sliding_window.
    causal_TS &= kv_index_S[None, :] > q_index_T[:, None] - sliding_window
  return causal_TS[None] & (q_segment_BT[:, :, None] == kv_segment_BS[:, None, :])


class Attention(nn.Module):
  """Grouped-query self-attention with RoPE, optional q/k norm and an optional explicit KV cache.

  The scores are materialized ([B, G, R, T, S]): exact and simple, O(T * S) memory per head.
  """

  config: ModelConfig

  @nn.compact
  def __call__(self, x_BTD, cos_BTK, sin_BTK, mask_BTS, kv=None, cache_index=0):
    c = self.config
    B, T, _ = x_BTD.shape
    H, G, K = c.num_heads, c.num_kv_heads, c.head_dim
    x_ND = x_BTD.reshape(B * T, -1)  # 2-D activations around matmuls are faster on XLA:CPU.
    q_BTHK = _dense(c, H * K, ("embed", "heads"), "q_proj")(x_ND).reshape(B, T, H, K)
    k_BTGK = _dense(c, G * K, ("embed", "kv_heads"), "k_proj")(x_ND).reshape(B, T, G, K)
    v_BTGK = _dense(c, G * K, ("embed", "kv_heads"), "v_proj")(x_ND).reshape(B, T, G, K)
    if c.qk_norm:
      q_BTHK = RMSNorm(c, "head_dim", name="q_norm")(q_BTHK)
      k_BTGK = RMSNorm(c, "head_dim", name="k_norm")(k_BTGK)
    q_BTHK = apply_rope(q_BTHK, cos_BTK, sin_BTK)
    k_BTGK = apply_rope(k_BTGK, cos_BTK, sin_BTK)

    if kv is not None:
      k_cache_BSGK, v_cache_BSGK = kv
      start = (0, cache_index, 0, 0)
      k_BSGK = jax.lax.dynamic_update_slice(k_cache_BSGK, k_BTGK.astype(k_cache_BSGK.dtype), start)
      v_BSGK = jax.lax.dynamic_update_slice(v_cache_BSGK, v_BTGK.astype(v_cache_BSGK.dtype), start)
      kv = (k_BSGK, v_BSGK)
    else:
      k_BSGK, v_BSGK = k_BTGK, v_BTGK

    # Query head h uses key/value head h // R, as HF's repeat_kv.
    q_BTGRK = q_BTHK.reshape(B, T, G, H // G, K)
    scores_BGRTS = jnp.einsum("btgrk,bsgk->bgrts", q_BTGRK, k_BSGK.astype(c.dtype)) * K**-0.5
    wide = _at_least_f32(scores_BGRTS.dtype)
    scores_BGRTS = jnp.where(mask_BTS[:, None, None], scores_BGRTS.astype(wide), jnp.finfo(wide).min)
    probs_BGRTS = jax.nn.softmax(scores_BGRTS, axis=-1).astype(c.dtype)
    out_BTGRK = jnp.einsum("bgrts,bsgk->btgrk", probs_BGRTS, v_BSGK.astype(c.dtype))
    out_ND = _dense(c, c.hidden_size, ("heads", "embed"), "o_proj")(out_BTGRK.reshape(B * T, H * K))
    return out_ND.reshape(B, T, -1), kv


class MLP(nn.Module):
  """SwiGLU MLP: down(silu(gate(x)) * up(x))."""

  config: ModelConfig

  @nn.compact
  def __call__(self, x_ND):
    c = self.config
    gate_NF = _dense(c, c.intermediate_size, ("embed", "mlp"), "gate_proj")(x_ND)
    up_NF = _dense(c, c.intermediate_size, ("embed", "mlp"), "up_proj")(x_ND)
    return _dense(c, c.hidden_size, ("mlp", "embed"), "down_proj")(nn.silu(gate_NF) * up_NF)


class Experts(nn.Module):
  """E SwiGLU experts with stacked kernels [E, in, out], applied by `nn.Einsum` to per-expert inputs [E, N, D]."""

  config: ModelConfig

  @nn.compact
  def __call__(self, x_END):
    c = self.config
    E, D, F = c.num_experts, c.hidden_size, c.moe_intermediate_size

    def einsum(shape, spec, names, name):
      return nn.Einsum(shape, spec, use_bias=False, dtype=c.dtype, param_dtype=c.param_dtype,
                       kernel_init=_kernel_init(c, names), name=name)

    gate_ENF = einsum((E, D, F), "end,edf->enf", ("experts", "embed", "mlp"), "gate_proj")(x_END)
    up_ENF = einsum((E, D, F), "end,edf->enf", ("experts", "embed", "mlp"), "up_proj")(x_END)
    return einsum((E, F, D), "enf,efd->end", ("experts", "mlp", "embed"), "down_proj")(nn.silu(gate_ENF) * up_ENF)


class MoE(nn.Module):
  """Qwen3-MoE sparse block: softmax router (fp32), top-k experts, optional renormalization of the top-k weights.

  Cost, honestly: this is a *dense* implementation. Every expert runs on every token and the outputs are mixed
  with weights that are zero outside each token's top-k, so FLOPs and activation memory are E / X times those of
  a sparse (dispatching) MoE: 16x for Qwen3-30B-A3B (E=128, X=8), and the [E, N, D] / [E, N, F] intermediates are
  materialized. Exact and simple, fine for tiny models and correctness tests; not for training real MoE models.
  The router logits are sown into 'intermediates' (name 'router_logits') for an auxiliary load-balancing loss.
  """

  config: ModelConfig

  @nn.compact
  def __call__(self, x_ND):
    c = self.config
    logits_NE = _dense(c, c.num_experts, ("embed", "experts"), "gate")(x_ND)
    self.sow("intermediates", "router_logits", logits_NE)
    probs_NE = jax.nn.softmax(logits_NE.astype(_at_least_f32(logits_NE.dtype)), axis=-1)
    top_p_NX, top_i_NX = jax.lax.top_k(probs_NE, c.num_experts_per_tok)
    if c.norm_topk_prob:
      top_p_NX = top_p_NX / jnp.sum(top_p_NX, axis=-1, keepdims=True)
    top_p_NX = top_p_NX.astype(logits_NE.dtype)
    weights_NE = jnp.einsum("nx,nxe->ne", top_p_NX, jax.nn.one_hot(top_i_NX, c.num_experts, dtype=top_p_NX.dtype))
    x_END = jnp.broadcast_to(x_ND, (c.num_experts, *x_ND.shape))
    y_END = Experts(c, name="experts")(x_END)
    return jnp.einsum("end,ne->nd", y_END, weights_NE.astype(y_END.dtype))


class DecoderLayer(nn.Module):
  """Pre-norm decoder layer: x + attn(norm(x)), then x + mlp(norm(x)); `moe` picks the sparse MLP."""

  config: ModelConfig
  moe: bool = False

  @nn.compact
  def __call__(self, x_BTD, kv, cos_BTK, sin_BTK, mask_BTS, cache_index):
    c = self.config
    B, T, D = x_BTD.shape
    h_BTD = RMSNorm(c, name="input_layernorm")(x_BTD)
    attn_BTD, kv = Attention(c, name="self_attn")(h_BTD, cos_BTK, sin_BTK, mask_BTS, kv, cache_index)
    x_BTD = x_BTD + attn_BTD
    h_ND = RMSNorm(c, name="post_attention_layernorm")(x_BTD).reshape(B * T, D)
    mlp = MoE(c, name="mlp") if self.moe else MLP(c, name="mlp")
    return x_BTD + mlp(h_ND).reshape(B, T, D), kv


class Decoder(nn.Module):
  """Embedding, decoder layers and final norm (HF's `model.*` submodule); returns hidden states [B, T, D]."""

  config: ModelConfig

  def setup(self):
    c = self.config
    self.embed_tokens = nn.Embed(c.vocab_size, c.hidden_size, dtype=c.dtype, param_dtype=c.param_dtype,
                                 embedding_init=_kernel_init(c, ("vocab", "embed")))
    layer_cls = nn.remat(DecoderLayer, prevent_cse=not c.scan_layers) if c.remat else DecoderLayer
    if c.scan_layers:
      scanned = nn.scan(layer_cls, variable_axes={"params": 0, "intermediates": 0},
                        split_rngs={"params": True, "dropout": True},
                        in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast), out_axes=0,
                        length=c.num_layers, metadata_params={nn.PARTITION_NAME: "layers"})
      self.layers = scanned(c, moe=c.is_moe_layer(0))
    else:
      # A list attribute in setup names its modules layers_0, layers_1, ...
      self.layers = [layer_cls(c, moe=c.is_moe_layer(i)) for i in range(c.num_layers)]
    self.norm = RMSNorm(c)

  def __call__(self, input_ids_BT, positions_BT, mask_BTS, kv=None, cache_index=0):
    """Final-normed hidden states [B, T, D] and the updated (k, v) cache stacks (None without a cache)."""
    c = self.config
    x_BTD = self.embed_tokens(input_ids_BT)
    cos_BTK, sin_BTK = rope_cos_sin(c, positions_BT)
    if c.scan_layers:
      x_BTD, kv = self.layers(x_BTD, kv, cos_BTK, sin_BTK, mask_BTS, cache_index)
    else:
      new_kv = []
      for i, layer in enumerate(self.layers):
        layer_kv = None if kv is None else (kv[0][i], kv[1][i])
        x_BTD, layer_kv = layer(x_BTD, layer_kv, cos_BTK, sin_BTK, mask_BTS, cache_index)
        new_kv.append(layer_kv)
      if kv is not None:
        kv = (jnp.stack([k for k, _ in new_kv]), jnp.stack([v for _, v in new_kv]))
    return self.norm(x_BTD), kv


class CausalLM(nn.Module):
  """Causal language model: `(input_ids [B, T], positions, segment_ids) -> float32 logits [B, T, V]`.

  segment_ids [B, T] mark packed documents (0 = padding): a token attends only to earlier tokens of its own
  segment. Without explicit positions they restart at 0 at each segment start (or count from the cache index
  when decoding). With `cache=init_cache(...)` the call also returns the updated cache: `(logits, cache)`.
  """

  config: ModelConfig

  def setup(self):
    self.model = Decoder(self.config)
    if not self.config.tie_word_embeddings:
      self.lm_head = _dense(self.config, self.config.vocab_size, ("embed", "vocab"), None)

  def __call__(self, input_ids, positions=None, segment_ids=None, cache=None):
    """Float32 logits [B, T, V]; `(logits, new_cache)` when a cache is passed."""
    c = self.config
    B, T = input_ids.shape
    index = jnp.zeros((), jnp.int32) if cache is None else cache["index"]
    if segment_ids is None:
      segment_ids = jnp.ones((B, T), jnp.int32)
    if positions is None:
      if cache is None:
        positions = segment_positions(segment_ids)
      else:
        positions = jnp.broadcast_to(index + jnp.arange(T, dtype=jnp.int32), (B, T))
    q_index_T = index + jnp.arange(T, dtype=jnp.int32)
    if cache is None:
      kv, kv_segment_ids, kv_index_S = None, segment_ids, q_index_T
    else:
      kv = (cache["k"], cache["v"])
      kv_segment_ids = jax.lax.dynamic_update_slice(cache["segment_ids"], segment_ids.astype(jnp.int32),
                                                    (0, index))
      kv_index_S = jnp.arange(cache["segment_ids"].shape[1], dtype=jnp.int32)
    mask_BTS = attention_mask(q_index_T, kv_index_S, segment_ids, kv_segment_ids, c.sliding_window)

    h_BTD, kv = self.model(input_ids, positions, mask_BTS, kv, index)
    if c.tie_word_embeddings:
      logits_BTV = self.model.embed_tokens.attend(h_BTD)
    else:
      logits_BTV = self.lm_head(h_BTD.reshape(B * T, -1)).reshape(B, T, -1)
    logits_BTV = logits_BTV.astype(_at_least_f32(logits_BTV.dtype))
    if cache is None:
      return logits_BTV
    return logits_BTV, dict(k=kv[0], v=kv[1], segment_ids=kv_segment_ids, index=index + T)


# ----------------------------------------------------------------------------------------------------------------
# Helpers that return plain (unboxed) trees.


def init_cache(config: ModelConfig, batch: int, max_len: int, dtype=None) -> dict[str, jax.Array]:
  """An empty KV cache: k, v [L, B, S, G, K], segment_ids [B, S] (0 = empty slot) and the write index.

  The cache keeps every position (no rolling buffer, also with a sliding window: the mask applies the window).
  Size it for prompt + generated tokens: XLA clamps writes past max_len, which would silently corrupt it.
  """
  shape = (config.num_layers, batch, max_len, config.num_kv_heads, config.head_dim)
  dtype = config.dtype if dtype is None else dtype
  return dict(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype),
              segment_ids=jnp.zeros((batch, max_len), jnp.int32), index=jnp.zeros((), jnp.int32))


def _boxed_init(config: ModelConfig, rng: jax.Array):
  return CausalLM(config).init(rng, jnp.zeros((1, 1), jnp.int32))["params"]


def init_params(config: ModelConfig, rng: jax.Array) -> dict[str, Any]:
  """Randomly initialized parameters as a plain tree of arrays (no logical-axis boxes); jit it to place shards."""
  return nn.meta.unbox(_boxed_init(config, rng))


def abstract_params(config: ModelConfig) -> dict[str, Any]:
  """The parameter tree as jax.ShapeDtypeStruct leaves, without allocating anything."""
  return nn.meta.unbox(jax.eval_shape(functools.partial(_boxed_init, config), jax.random.key(0)))


def logical_axes(config: ModelConfig) -> dict[str, Any]:
  """The parameter tree with a tuple of logical axis names (e.g. ('embed', 'heads')) at each leaf."""
  boxed = jax.eval_shape(functools.partial(_boxed_init, config), jax.random.key(0))
  return jax.tree.map(lambda p: tuple(p.names), boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))


def param_count(config: ModelConfig) -> int:
  """Number of parameters of the model described by `config`."""
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract_params(config)))


def expert_rank_pattern(config: ModelConfig, rank: int) -> dict[str, int]:
  """The study's MoE rule as a LoRA ``rank_pattern``: each expert gets rank // experts-per-token (at least 1), so
  the active experts together hold the total rank. Empty for dense models."""
  if not config.num_experts:
    return {}
  return {r"(.*/)?experts/(gate|up|down)_proj": max(1, rank // config.num_experts_per_tok)}


MOE_EXPERT_RANKS = ("total/active", "same")


def model_spec(spec, config: ModelConfig, moe_expert_rank: str = "total/active"):
  """The LoRA spec to use on a model of ``config``: the one place that applies model-dependent rules.

  ``moe_expert_rank="total/active"`` (the study's) gives each expert ``rank // experts-per-token`` through
  ``rank_pattern`` (explicit entries win); ``"same"`` keeps ``spec.rank``. A tied model's ``unembed`` target needs
  no rule here: ``lora.create`` with ``trace_layouts`` puts it on the output (``attend``) side of the embedding.
  """
  if moe_expert_rank not in MOE_EXPERT_RANKS:
    raise ValueError(f"moe_expert_rank {moe_expert_rank!r}; valid: {list(MOE_EXPERT_RANKS)}")
  if spec.is_full or moe_expert_rank == "same" or not config.num_experts:
    return spec
  return dataclasses.replace(spec, rank_pattern={**spec.rank_pattern, **expert_rank_pattern(config, spec.rank)})


def untie_embeddings(config: ModelConfig, params, adapters=None):
  """A tied model as an untied one computing the same function: ``lm_head = embed_tokens^T``, the output-side
  (``unembed``) adapter moved to ``lm_head``; returns ``(config, params, adapters)`` (adapters may be merged then)."""
  from lora_jax import lora

  if not config.tie_word_embeddings:
    return config, params, adapters
  params, adapters = lora.untie(params, adapters or {}, ("model", "embed_tokens"), ("lm_head",))
  return config.replace(tie_word_embeddings=False), params, adapters
