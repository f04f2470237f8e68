"""A quantized frozen base (QLoRA): kernels stored as NF4 or int8 codes with block-wise absmax scales, dequantized
one module at a time inside the forward pass (``lora.apply``), never all at once.

NF4 follows bitsandbytes (QLoRA's reference) bit for bit: each block of ``block_size`` consecutive values of the
weight in PyTorch's [out, in] order is scaled by the reciprocal of its absmax, each value goes to the nearest of the 16
NF4 levels (ties to the lower one), and two codes share a byte, the first in the high nibble. Double quantization
(``double_quant``) stores the absmaxes minus their mean as 8-bit codes of bitsandbytes' signed dynamic map, in blocks
of 256 with a float32 absmax each. int8 is symmetric block-wise absmax: round(x * 127 / absmax).

Own numerics rather than a library: Qwix (the maintained JAX quantization library) has NF4 levels but quantizes
through its own module rewriting and tiling, with neither bitsandbytes' packing, its reciprocal-then-multiply scaling
nor double quantization, so it cannot give bitsandbytes' codes; the arithmetic here is ~100 lines and is checked
against bitsandbytes itself (tests/test_quant.py).

    params = lora.quantize_base(params, quant.QuantSpec("nf4"))  # the targeted kernels become QuantizedKernel
    params, adapters = lora.create(params, spec, rng)            # DoRA's m from the 4-bit weights, as PEFT's
    logits = lora.apply(model, params, adapters, tokens)         # each layer dequantizes its own kernel
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np

KINDS = ("nf4", "int8")
# The 16 NF4 levels (QLoRA, appendix E), as float32 values; bitsandbytes' get_4bit_type("nf4").
NF4_LEVELS = np.array([-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
                       -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
                       0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
                       0.7229568362236023, 1.0], np.float32)


@dataclasses.dataclass(frozen=True)
class QuantSpec:
  """Which kernels of the frozen base are stored quantized, and how."""

  kind: str = "nf4"  # "nf4" (4-bit NormalFloat, as bitsandbytes / QLoRA) or "int8" (symmetric absmax).
  block_size: int = 64  # Consecutive values (in [out, in] order) sharing one absmax; bitsandbytes' default is 64.
  double_quant: bool = False  # Store the absmaxes as 8-bit codes too (QLoRA's double quantization).
  double_block_size: int = 256  # Absmaxes per second-level block (bitsandbytes: 256).
  targets: tuple[str, ...] = ("all-linear",)  # lora.LoraSpec target syntax; QLoRA leaves the output head full.
  exclude: tuple[str, ...] = ()

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ValueError(f"QuantSpec.kind must be one of {list(KINDS)}, got {self.kind!r}")
    for name in ("block_size", "double_block_size"):
      value = getattr(self, name)
      if not isinstance(value, int) or value < 2 or value % 2:
        raise ValueError(f"QuantSpec.{name} must be an even integer >= 2, got {value!r}")
    for name in ("targets", "exclude"):
      if isinstance(getattr(self, name), str):
        raise ValueError(f"QuantSpec.{name} must be a list of patterns, got the string {getattr(self, name)!r}")
      object.__setattr__(self, name, tuple(getattr(self, name)))

  def to_dict(self) -> dict[str, Any]:
    """Plain-JSON dict of every field."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


@functools.cache
def dynamic_map() -> np.ndarray:
  """bitsandbytes' signed 8-bit dynamic map (create_dynamic_map(signed=True)): 256 sorted float32 levels in [-1, 1].

  For exponent e = 0..6, 2^e levels per sign at 10^(e-6) times the midpoints of 2^e + 1 points spaced evenly over
  [0.1, 1], plus 0 and 1. The points are float32 as torch.linspace makes them: a float32 step, the first half counted
  from the start and the rest from the end, each point rounded once from start + step·i (a fused multiply-add).
  """
  levels = []
  for e in range(7):
    n = 2 ** e + 1
    start, end = np.float32(0.1), np.float32(1.0)
    step = np.float64((end - start) / np.float32(n - 1))  # float32 step; float64 holds step·i + start exactly enough
    points = np.array([start + step * i if i < n // 2 else end - step * (n - 1 - i) for i in range(n)]).astype(
        np.float32)
    means = (points[:-1] + points[1:]) / np.float32(2.0)
    magnitude = means * np.float32(10.0 ** (e - 6))
    levels += magnitude.tolist() + (-magnitude).tolist()
  levels += [0.0, 1.0]
  return np.sort(np.array(levels, np.float32))


def _nearest(scaled: jax.Array, levels: np.ndarray) -> jax.Array:
  """Index of the nearest of the sorted ``levels`` (a value exactly between two goes to the lower), as uint8."""
  bounds = jnp.asarray((levels[:-1] + levels[1:]) / np.float32(2.0))
  return jnp.searchsorted(bounds, scaled, side="left").astype(jnp.uint8)


def _blocks(x: jax.Array, block: int) -> tuple[jax.Array, jax.Array]:
  """x [..., n] (n a multiple of block) as [..., n/block, block], and each block's absmax (float32)."""
  b = x.astype(jnp.float32).reshape(x.shape[:-1] + (x.shape[-1] // block, block))
  return b, jnp.max(jnp.abs(b), axis=-1)


def _scaled(b: jax.Array, absmax: jax.Array) -> jax.Array:
  """Each block times the reciprocal of its absmax, clipped to [-1, 1], as bitsandbytes; an all-zero block stays 0
  (bitsandbytes floors the absmax at 1e-38, a denormal that XLA on CPU flushes to zero)."""
  inverse = jnp.where(absmax > 0, 1.0 / jnp.where(absmax > 0, absmax, 1.0), 0.0)
  return jnp.clip(b * inverse[..., None], -1.0, 1.0)


def quantize_nf4(x: jax.Array, block: int) -> tuple[jax.Array, jax.Array]:
  """x [..., n] -> (NF4 codes [..., n] uint8, one per value, absmax [..., n/block] float32)."""
  b, absmax = _blocks(x, block)
  return _nearest(_scaled(b, absmax), NF4_LEVELS).reshape(x.shape), absmax


def quantize_int8(x: jax.Array, block: int) -> tuple[jax.Array, jax.Array]:
  """x [..., n] -> (int8 codes round(x * 127 / absmax) [..., n], absmax [..., n/block] float32)."""
  b, absmax = _blocks(x, block)
  return jnp.round(_scaled(b, absmax) * 127.0).astype(jnp.int8).reshape(x.shape), absmax


def quantize_dynamic(x: jax.Array, block: int) -> tuple[jax.Array, jax.Array]:
  """x [..., n] -> (codes of the signed dynamic map [..., n] uint8, absmax [..., ceil(n/block)]); the last block may be
  partial (bitsandbytes' quantize_blockwise, used for the absmaxes of double quantization)."""
  n = x.shape[-1]
  padded = jnp.pad(x.astype(jnp.float32), [(0, 0)] * (x.ndim - 1) + [(0, -n % block)])
  b, absmax = _blocks(padded, block)
  codes = _nearest(_scaled(b, absmax), dynamic_map()).reshape(padded.shape)[..., :n]
  return codes, absmax


def dequantize_dynamic(codes: jax.Array, absmax: jax.Array, block: int) -> jax.Array:
  """Inverse of ``quantize_dynamic``: level[code] * its block's absmax, float32."""
  n = codes.shape[-1]
  values = jnp.take(jnp.asarray(dynamic_map()), codes.astype(jnp.int32))
  return values * jnp.repeat(absmax, block, axis=-1)[..., :n]


def pack_nibbles(codes: jax.Array) -> jax.Array:
  """uint8 codes < 16 [..., n] (n even) -> [..., n/2] bytes, the first of each pair in the high nibble."""
  return (codes[..., 0::2] << 4) | codes[..., 1::2]


def unpack_nibbles(packed: jax.Array) -> jax.Array:
  """Inverse of ``pack_nibbles``, elementwise on the repeated bytes: an interleave (stack + reshape) made the TPU
  compiler keep every layer's unpacked codes at once (measured: 5.5 vs 2.1 GiB of temporaries, Llama-3.2-1B)."""
  shifts = jnp.tile(jnp.asarray([4, 0], packed.dtype), packed.shape[-1])
  return (jnp.repeat(packed, 2, axis=-1) >> shifts) & 15


@flax.struct.dataclass
class QuantizedKernel:
  """A frozen kernel stored quantized. Its values run over each stack index's kernel transposed to ``order`` (the
  [out, in] order of a PyTorch weight for a dense kernel) and flattened; nn.scan slices every array's leading axes."""

  codes: jax.Array  # nf4: uint8 [*stack, n/2], two codes a byte; int8: int8 [*stack, n].
  absmax: jax.Array  # float32 [*stack, n/block]; with double_quant, uint8 dynamic-map codes of (absmax - offset).
  absmax2: Any = None  # double_quant: float32 [*stack, ceil(blocks/double_block)], the codes' block absmaxes.
  offset: Any = None  # double_quant: float32 [*stack], the mean absmax subtracted before coding.
  kind: str = flax.struct.field(pytree_node=False, default="nf4")
  block_size: int = flax.struct.field(pytree_node=False, default=64)
  double_block_size: int = flax.struct.field(pytree_node=False, default=256)
  inner_shape: tuple[int, ...] = flax.struct.field(pytree_node=False, default=())  # kernel shape, stack excluded
  order: tuple[int, ...] = flax.struct.field(pytree_node=False, default=())  # storage order of the inner axes
  dtype: Any = flax.struct.field(pytree_node=False, default=jnp.float32)  # what dequantize returns

  @property
  def shape(self) -> tuple[int, ...]:
    """The kernel's shape (stack axes included), as the array it stands for."""
    return tuple(self.codes.shape[:-1]) + self.inner_shape

  @property
  def ndim(self) -> int:
    """Number of axes of the kernel it stands for."""
    return len(self.shape)

  @property
  def nbytes(self) -> int:
    """Bytes the stored arrays take."""
    return sum(int(a.size) * a.dtype.itemsize for a in (self.codes, self.absmax, self.absmax2, self.offset)
               if a is not None)


def quantize_array(w: jax.Array, spec: QuantSpec, n_stack: int = 0, order: tuple[int, ...] | None = None,
                   where: str = "kernel") -> QuantizedKernel:
  """A kernel [*stack, *inner] stored by ``spec``; ``order`` (default: the inner axes reversed, [out, in] for a dense
  kernel) is the storage order whose flattening the blocks run over."""
  stack, inner = tuple(w.shape[:n_stack]), tuple(w.shape[n_stack:])
  order = tuple(reversed(range(len(inner)))) if order is None else tuple(order)
  n = math.prod(inner)
  if n % spec.block_size:
    raise ValueError(f"{where}: {n} values per {'layer' if n_stack else 'kernel'} (shape {tuple(w.shape)}) are not a "
                     f"multiple of QuantSpec.block_size={spec.block_size}; pick a block size that divides it")
  flat = jnp.transpose(w, tuple(range(n_stack)) + tuple(n_stack + i for i in order)).reshape(stack + (n,))
  if spec.kind == "nf4":
    codes, absmax = quantize_nf4(flat, spec.block_size)
    codes = pack_nibbles(codes)
  else:
    codes, absmax = quantize_int8(flat, spec.block_size)
  absmax2 = offset = None
  if spec.double_quant:
    offset = jnp.mean(absmax, axis=-1)
    absmax, absmax2 = quantize_dynamic(absmax - offset[..., None], spec.double_block_size)
  return QuantizedKernel(codes, absmax, absmax2, offset, spec.kind, spec.block_size, spec.double_block_size, inner,
                         order, jnp.dtype(w.dtype))


def dequantize(q: QuantizedKernel) -> jax.Array:
  """The kernel's values [*stack, *inner] in ``q.dtype``: level (or code / 127) times its block's absmax, in float32."""
  absmax = q.absmax
  if q.absmax2 is not None:
    absmax = dequantize_dynamic(absmax, q.absmax2, q.double_block_size) + q.offset[..., None]
  if q.kind == "nf4":
    values = _levels_of(unpack_nibbles(q.codes), NF4_LEVELS)
  else:
    values = q.codes.astype(jnp.float32) / 127.0
  stack = tuple(q.codes.shape[:-1])
  values = values.reshape(stack + (-1, q.block_size)) * absmax.astype(jnp.float32)[..., None]
  stored = values.reshape(stack + tuple(q.inner_shape[i] for i in q.order))
  n = len(stack)
  inverse = tuple(n + q.order.index(i) for i in range(len(q.order)))
  return jnp.transpose(stored, tuple(range(n)) + inverse).astype(q.dtype)


def _levels_of(codes: jax.Array, levels: np.ndarray) -> jax.Array:
  """levels[codes] (float32) by a tree of selects on the code's bits: elementwise, so XLA fuses it with the rest of
  the dequantization (no gather)."""
  values = [np.float32(v) for v in levels]
  bit = 0
  while len(values) > 1:
    on = ((codes >> bit) & 1).astype(bool)
    values = [jnp.where(on, values[i + 1], values[i]) for i in range(0, len(values), 2)]
    bit += 1
  return jnp.asarray(values[0], jnp.float32)


def is_quantized(x) -> bool:
  """True for a QuantizedKernel."""
  return isinstance(x, QuantizedKernel)


def dequantize_tree(params):
  """``params`` with every QuantizedKernel dequantized (a full-precision copy: for checks and export, not training)."""
  return jax.tree.map(lambda x: dequantize(x) if is_quantized(x) else x, params, is_leaf=is_quantized)
