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
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lora_jax import losses

ARCHITECTURES = ("llama", "mistral", "qwen3", "qwen3_moe")
ATTENTION_IMPLEMENTATIONS = ("auto", "xla", "cudnn", "splash")
# remat -> what a rematerialised layer saves for the backward pass (None: nn.remat's default, only its inputs).
# 'save_matmuls': the outputs of matmuls without batch dimensions, i.e. every projection (activations are 2-D
# [N, D] around them) but not the batched attention einsums.
REMAT_POLICIES = {"none": None, "full": None,
                  "save_matmuls": jax.checkpoint_policies.dots_with_no_batch_dims_saveable}
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
  # What each decoder layer keeps for the backward pass: 'none' (everything), 'full' (only its input; recompute the
  # layer, nn.remat) or 'save_matmuls' (keep the outputs of the 2-D projection matmuls, recompute the rest). A bool
  # is read as False -> 'none', True -> 'full'.
  remat: str = "none"
  # Attention kernel: 'xla' (exact [B, G, R, T, S] scores; the reference, any platform), 'cudnn' (cuDNN flash
  # attention through jax.nn.dot_product_attention; NVIDIA GPUs, bf16/fp16), 'splash' (the TPU splash-attention
  # Pallas kernel; sequences that are not a multiple of 128 long, e.g. a model.init on one token, run 'xla') or
  # 'auto' (splash on TPU, cudnn on GPU, else xla). The KV-cache decode path always runs 'xla' (its scores are
  # [B, G, R, T, S] with T the few new tokens).
  attention: str = "auto"
  # Loss without full logits: 0 computes the [B, T, V] logits at once; N > 0 computes the loss over N sequence
  # positions at a time ([B, N, V] logits, recomputed in the backward pass), see CausalLM.nll_sum.
  loss_chunk_size: int = 0

  def __post_init__(self):
    set_ = functools.partial(object.__setattr__, self)
    set_("param_dtype", jnp.dtype(self.param_dtype).name)
    set_("dtype", jnp.dtype(self.dtype).name)
    set_("mlp_only_layers", tuple(int(i) for i in self.mlp_only_layers))
    if isinstance(self.remat, (bool, np.bool_)):
      set_("remat", "full" if self.remat else "none")
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
    if self.remat not in REMAT_POLICIES:
      raise ValueError(f"remat {self.remat!r} is not one of {tuple(REMAT_POLICIES)} (or a bool)")
    if self.attention not in ATTENTION_IMPLEMENTATIONS:
      raise ValueError(f"attention {self.attention!r} is not one of {ATTENTION_IMPLEMENTATIONS}")
    if not isinstance(self.loss_chunk_size, (int, np.integer)) or self.loss_chunk_size < 0:
      raise ValueError(f"loss_chunk_size must be an int >= 0 (0 = full logits), got {self.loss_chunk_size!r}")
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


class MaskInfo(NamedTuple):
  """What the attention mask is made of, without the [B, T, S] mask itself (kernels build it blockwise).

  A query at sequence index q_index[t] sees keys at kv_index[s] <= q_index[t] (within the sliding window) of its own
  segment. segment ids are None when the batch is not packed (one document per row, no padding).
  """

  q_index_T: jax.Array
  kv_index_S: jax.Array
  q_segment_BT: jax.Array | None
  kv_segment_BS: jax.Array | None

  def dense(self, sliding_window: int | None) -> jax.Array:
    """The boolean [B, T, S] mask (B is 1 without segment ids)."""
    ones = jnp.ones((1, self.q_index_T.shape[0]), jnp.int32)
    q_seg = ones if self.q_segment_BT is None else self.q_segment_BT
    kv_seg = jnp.ones((1, self.kv_index_S.shape[0]), jnp.int32) if self.kv_segment_BS is None else self.kv_segment_BS
    return attention_mask(self.q_index_T, self.kv_index_S, q_seg, kv_seg, sliding_window)


def resolve_attention(config: ModelConfig, seq_len: int, decoding: bool, platform: str | None = None) -> str:
  """The attention implementation `config.attention` means for this call: 'auto' picks by platform and shapes.

  The platform is ``platform``, else that of the mesh in context (``jax.sharding.use_abstract_mesh``, as the trainer
  traces its steps: a TPU mesh compiled from a CPU host is TPU), else this process's default backend.
  """
  if decoding:
    return "xla"  # The KV-cache path: a few queries against the cache; its scores are small.
  if config.attention == "splash" and seq_len % 128:
    return "xla"  # The kernel's blocks are multiples of 128 long.
  if config.attention != "auto":
    return config.attention
  mesh = jax.sharding.get_abstract_mesh()
  device = None if mesh.empty else mesh.abstract_device
  platform = platform or (device.platform if device is not None else jax.default_backend())
  # Over several chips the kernel runs in shard_map over the mesh in context: without one, XLA could not partition
  # it, so 'auto' keeps the exact attention there.
  mesh_known = not mesh.empty or jax.device_count() == 1
  if platform == "tpu" and seq_len % 128 == 0 and mesh_known:
    return "splash"
  if platform in ("gpu", "cuda", "rocm") and config.dtype in ("bfloat16", "float16"):
    return "cudnn"
  return "xla"


def attention_xla(q_BTHK, k_BSGK, v_BSGK, mask: MaskInfo, sliding_window: int | None) -> jax.Array:
  """Exact attention with materialised [B, G, R, T, S] scores (softmax in at least fp32): the reference."""
  B, T, H, K = q_BTHK.shape
  G = k_BSGK.shape[2]
  dtype = q_BTHK.dtype
  # Query head h uses key/value head h // R, as HF's repeat_kv.
  q_BTGRK = q_BTHK.reshape(B, T, G, H // G, K)
  scores_BGRTS = jnp.einsum("btgrk,bsgk->bgrts", q_BTGRK, k_BSGK.astype(dtype)) * K**-0.5
  wide = _at_least_f32(scores_BGRTS.dtype)
  mask_BTS = mask.dense(sliding_window)
  scores_BGRTS = jnp.where(mask_BTS[:, None, None], scores_BGRTS.astype(wide), jnp.finfo(wide).min)
  probs_BGRTS = jax.nn.softmax(scores_BGRTS, axis=-1).astype(dtype)
  out_BTGRK = jnp.einsum("bgrts,bsgk->btgrk", probs_BGRTS, v_BSGK.astype(dtype))
  return out_BTGRK.reshape(B, T, H, K)


def attention_cudnn(q_BTHK, k_BSGK, v_BSGK, mask: MaskInfo, sliding_window: int | None,
                    implementation: str = "cudnn") -> jax.Array:
  """Causal attention through jax.nn.dot_product_attention (cuDNN flash attention: no scores in memory).

  GQA, the causal mask and the sliding window go to the kernel as such; packed segments become a boolean
  [B, 1, T, S] mask (one per example, not per head). `implementation='xla'` runs the same call with XLA's
  reference kernel (how the CPU tests check this wrapper).
  """
  B, T, H, K = q_BTHK.shape
  if k_BSGK.shape[1] != T:
    raise ValueError(f"model.attention='cudnn' needs as many keys as queries (no KV cache), got T={T}, "
                     f"S={k_BSGK.shape[1]}")
  seg_mask = None
  if mask.q_segment_BT is not None:
    seg_mask = (mask.q_segment_BT[:, :, None] == mask.kv_segment_BS[:, None, :])[:, None]
  window = None if sliding_window is None else (sliding_window - 1, 0)  # HF: kv_idx > q_idx - sliding_window.
  dtype = q_BTHK.dtype
  return jax.nn.dot_product_attention(q_BTHK, k_BSGK.astype(dtype), v_BSGK.astype(dtype), mask=seg_mask,
                                      scale=K**-0.5, is_causal=True, local_window_size=window,
                                      implementation=implementation)


# The mesh axes a batch and the attention heads are split over (lora_jax.sharding's default rules): the splash
# kernel, a Pallas custom call, runs per device inside shard_map over them.
_BATCH_MESH_AXES = ("data", "fsdp")
_HEAD_MESH_AXIS = "tensor"


@functools.lru_cache(maxsize=64)
def _splash_kernel(heads: int, seq_len: int, sliding_window: int | None, interpret: bool):
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as splash_mask

  if sliding_window is None:
    one = splash_mask.CausalMask((seq_len, seq_len))
  else:  # window (left, right) = (sliding_window - 1, 0): HF's kv_idx > q_idx - sliding_window, and causal.
    one = splash_mask.LocalMask((seq_len, seq_len), (sliding_window - 1, 0), offset=0)
  block = next(b for b in (512, 256, 128) if seq_len % b == 0)
  sizes = splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                            block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
  # Built once per shape as concrete host arrays (not tracers of the trace that first asks): the kernel holds
  # constant mask-block tables that every later trace reuses, also when compiling for a TPU mesh from a CPU host.
  with jax.ensure_compile_time_eval(), jax.default_device(jax.local_devices(backend="cpu")[0]):
    return splash.make_splash_mha(splash_mask.MultiHeadMask([one] * heads), block_sizes=sizes, head_shards=1,
                                  q_seq_shards=1, interpret=interpret)


def attention_splash(q_BTHK, k_BSGK, v_BSGK, mask: MaskInfo, sliding_window: int | None,
                     interpret: bool = False) -> jax.Array:
  """Causal attention with the TPU splash-attention Pallas kernel (blockwise, no scores in memory).

  GQA is native to the kernel (query heads grouped per key/value head), packed segments are its SegmentIds, the
  sliding window a LocalMask. Under a mesh (use_abstract_mesh) it runs per device in shard_map over the batch axes
  (data, fsdp) and the head axis (tensor). `interpret=True` runs the kernel in the Pallas interpreter (CPU tests).
  """
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash

  B, T, H, K = q_BTHK.shape
  G = k_BSGK.shape[2]
  if k_BSGK.shape[1] != T or T % 128:
    raise ValueError(f"model.attention='splash' needs a sequence length that is a multiple of 128 and as many keys "
                     f"as queries (no KV cache), got T={T}, S={k_BSGK.shape[1]}; use 'xla' or 'auto'")
  dtype = q_BTHK.dtype
  # The kernel does not scale: scale the queries (HF scales the scores; equal up to rounding).
  q_BHTK = (q_BTHK * jnp.asarray(K**-0.5, dtype)).transpose(0, 2, 1, 3)
  k_BGSK = k_BSGK.astype(dtype).transpose(0, 2, 1, 3)
  v_BGSK = v_BSGK.astype(dtype).transpose(0, 2, 1, 3)
  packed = mask.q_segment_BT is not None
  segments = (mask.q_segment_BT.astype(jnp.int32), mask.kv_segment_BS.astype(jnp.int32)) if packed else ()

  def local(q_BHTK, k_BGSK, v_BGSK, *segments):
    kernel = _splash_kernel(q_BHTK.shape[1], T, sliding_window, interpret)
    if packed:
      return jax.vmap(lambda q, k, v, qs, ks: kernel(q, k, v, segment_ids=splash.SegmentIds(qs, ks)))(
          q_BHTK, k_BGSK, v_BGSK, *segments)
    return jax.vmap(kernel)(q_BHTK, k_BGSK, v_BGSK)

  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty and jax.device_count() > 1 and not interpret:
    raise ValueError("model.attention='splash' on several devices needs the mesh in context: trace the step "
                     "inside `with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):` (or use 'auto' / 'xla')")
  if mesh.empty or mesh.size == 1:
    out_BHTK = local(q_BHTK, k_BGSK, v_BGSK, *segments)
  else:
    P = jax.sharding.PartitionSpec
    batch = tuple(a for a in _BATCH_MESH_AXES if a in mesh.axis_names and mesh.shape[a] > 1) or None
    heads = _HEAD_MESH_AXIS if _HEAD_MESH_AXIS in mesh.axis_names and mesh.shape[_HEAD_MESH_AXIS] > 1 else None
    if heads is not None and G % mesh.shape[heads]:
      raise ValueError(f"model.attention='splash': {G} key/value heads do not split over mesh axis {heads!r} "
                       f"of size {mesh.shape[heads]}")
    qkv = P(batch, heads, None, None)
    seg = (P(batch, None),) * len(segments)
    out_BHTK = jax.shard_map(local, mesh=mesh, in_specs=(qkv, qkv, qkv, *seg), out_specs=qkv,
                             check_vma=False)(q_BHTK, k_BGSK, v_BGSK, *segments)
  return out_BHTK.transpose(0, 2, 1, 3).astype(dtype)


def dot_product_attention(q_BTHK, k_BSGK, v_BSGK, mask: MaskInfo, config: ModelConfig, decoding: bool = False):
  """Grouped-query attention [B, T, H, K] by the implementation `config.attention` resolves to."""
  implementation = resolve_attention(config, q_BTHK.shape[1], decoding)
  if implementation == "splash":
    return attention_splash(q_BTHK, k_BSGK, v_BSGK, mask, config.sliding_window)
  if implementation == "cudnn":
    return attention_cudnn(q_BTHK, k_BSGK, v_BSGK, mask, config.sliding_window)
  return attention_xla(q_BTHK, k_BSGK, v_BSGK, mask, config.sliding_window)


class Attention(nn.Module):
  """Grouped-query self-attention with RoPE, optional q/k norm and an optional explicit KV cache.

  The attention itself is `dot_product_attention`: exact materialised scores ('xla', O(T * S) memory per head) or
  a kernel that never stores them ('cudnn', 'splash'), by `config.attention`.
  """

  config: ModelConfig

  @nn.compact
  def __call__(self, x_BTD, cos_BTK, sin_BTK, mask: MaskInfo, kv=None, cache_index=0):
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
      zero = jnp.zeros((), cache_index.dtype)  # a literal 0 would be int64 under jax_enable_x64
      start = (zero, cache_index, zero, zero)
      k_BSGK = jax.lax.dynamic_update_slice(k_cache_BSGK, k_BTGK.astype(k_cache_BSGK.dtype), start)
      v_BSGK = jax.lax.dynamic_update_slice(v_cache_BSGK, v_BTGK.astype(v_cache_BSGK.dtype), start)
      kv = (k_BSGK, v_BSGK)
    else:
      k_BSGK, v_BSGK = k_BTGK, v_BTGK

    out_BTHK = dot_product_attention(q_BTHK.astype(c.dtype), k_BSGK, v_BSGK, mask, c, decoding=kv is not None)
    out_ND = _dense(c, c.hidden_size, ("heads", "embed"), "o_proj")(out_BTHK.reshape(B * T, H * K))
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
  def __call__(self, x_BTD, kv, cos_BTK, sin_BTK, mask: MaskInfo, cache_index):
    c = self.config
    B, T, D = x_BTD.shape
    h_BTD = RMSNorm(c, name="input_layernorm")(x_BTD)
    attn_BTD, kv = Attention(c, name="self_attn")(h_BTD, cos_BTK, sin_BTK, mask, kv, cache_index)
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
    layer_cls = DecoderLayer
    if c.remat != "none":
      layer_cls = nn.remat(DecoderLayer, prevent_cse=not c.scan_layers, policy=REMAT_POLICIES[c.remat])
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

  def __call__(self, input_ids_BT, positions_BT, mask: MaskInfo, kv=None, cache_index=0):
    """Final-normed hidden states [B, T, D] and the updated (k, v) cache stacks (None without a cache)."""
    c = self.config
    x_BTD = self.embed_tokens(input_ids_BT)
    cos_BTK, sin_BTK = rope_cos_sin(c, positions_BT)
    if c.scan_layers:
      x_BTD, kv = self.layers(x_BTD, kv, cos_BTK, sin_BTK, mask, cache_index)
    else:
      new_kv = []
      for i, layer in enumerate(self.layers):
        layer_kv = None if kv is None else (kv[0][i], kv[1][i])
        x_BTD, layer_kv = layer(x_BTD, layer_kv, cos_BTK, sin_BTK, mask, cache_index)
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
    h_BTD, new_cache = self.hidden_states(input_ids, positions, segment_ids, cache)
    logits_BTV = self.unembed(h_BTD)
    return logits_BTV if cache is None else (logits_BTV, new_cache)

  def hidden_states(self, input_ids, positions=None, segment_ids=None, cache=None):
    """Final-normed hidden states [B, T, D] and the new cache (None without one); see the class docstring."""
    B, T = input_ids.shape
    index = jnp.zeros((), jnp.int32) if cache is None else cache["index"]
    if positions is None:
      if cache is not None:
        positions = jnp.broadcast_to(index + jnp.arange(T, dtype=jnp.int32), (B, T))
      elif segment_ids is not None:
        positions = segment_positions(segment_ids)
      else:
        positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    q_index_T = index + jnp.arange(T, dtype=jnp.int32)
    if cache is None:
      kv = None
      mask = MaskInfo(q_index_T, q_index_T, segment_ids, segment_ids)
    else:
      kv = (cache["k"], cache["v"])
      if segment_ids is None:
        segment_ids = jnp.ones((B, T), jnp.int32)
      kv_segment_ids = jax.lax.dynamic_update_slice(cache["segment_ids"], segment_ids.astype(jnp.int32),
                                                    (jnp.zeros((), index.dtype), index))
      mask = MaskInfo(q_index_T, jnp.arange(cache["segment_ids"].shape[1], dtype=jnp.int32), segment_ids,
                      kv_segment_ids)
    h_BTD, kv = self.model(input_ids, positions, mask, kv, index)
    if cache is None:
      return h_BTD, None
    return h_BTD, dict(k=kv[0], v=kv[1], segment_ids=mask.kv_segment_BS, index=index + T)

  def unembed(self, h_BTD):
    """Float32 (at least) logits [B, T, V] of hidden states: the tied embedding's `attend` or `lm_head`."""
    B, T, _ = h_BTD.shape
    if self.config.tie_word_embeddings:
      logits_BTV = self.model.embed_tokens.attend(h_BTD)
    else:
      logits_BTV = self.lm_head(h_BTD.reshape(B * T, -1)).reshape(B, T, -1)
    return logits_BTV.astype(_at_least_f32(logits_BTV.dtype))

  def nll_sum(self, input_ids, targets, loss_mask, positions=None, segment_ids=None):
    """(sum of masked token NLL, number of loss tokens), without full logits when `config.loss_chunk_size` > 0."""
    h_BTD, _ = self.hidden_states(input_ids, positions, segment_ids)
    return self.hidden_nll_sum(h_BTD, targets, loss_mask)

  def hidden_nll_sum(self, h_BTD, targets, loss_mask):
    """`nll_sum` of final hidden states: the loss head alone (in sequence chunks when `loss_chunk_size` > 0)."""
    if not self.config.loss_chunk_size:
      return losses.masked_nll_sum(self.unembed(h_BTD), targets, loss_mask)
    return losses.chunked_nll_sum(self, type(self).unembed, h_BTD, targets, loss_mask, self.config.loss_chunk_size)


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
