"""LoRA as functional transforms over Flax (linen) parameter trees.

The API, all pure functions over pytrees::

    spec = LoraSpec(rank=16, targets=("all-linear", "unembed"))
    params, adapters = create(params, spec, rng)              # A, B for the targeted kernels
    logits = apply(model, params, adapters, tokens)           # x·W + s·(x·A)·B, W never touched
    trainable, frozen = split(params, adapters, spec)         # what the optimizer sees / what it never sees
    tx = optimizer(optax.adam(1e-4), tx_b=optax.adam(1.6e-3)) # optional LoRA+ (separate LR for B)
    merged, errors = merge(params, adapters)                  # W + s·A·B in float32, cast back

Design: interception of Flax module calls, with the adapters placed beside the kernels.
``apply`` inserts each adapter's ``lora_a``, ``lora_b`` and ``lora_scale`` into the parameter dict of the module that
owns the kernel, then runs the unmodified model under ``nn.intercept_methods``. When an ``nn.Dense``,
``nn.DenseGeneral``, ``nn.Einsum`` or ``nn.Embed`` with an adapter is called, the interceptor runs the module as usual
(x·W) and adds s·(x·A)·B computed from the module's own input. Why this route:

- The update is factored by construction: W + s·B·A is never formed, and since only the adapters are differentiated
  (``split``), no full-size weight gradient exists. XLA's FLOP count shows it (``benchmarks/flops.py``).
- Because the adapters sit in the ``params`` collection beside the kernel, Flax's own lifted transforms treat them
  like the kernel: an unmodified ``nn.scan(variable_axes={"params": 0})`` slices the stacked adapters per layer, and
  ``nn.remat`` / ``nn.vmap`` / ``jax.jit`` / ``jax.grad`` need nothing special. No model code changes.
- A jaxpr rewrite would have to rediscover which ``dot_general`` belongs to which kernel after XLA-level
  transformations (the failure mode of implicit-array approaches that silently densify); module interception keys on
  the parameter path, which is exactly what the user targeted. Kernels used outside those four layer types (e.g. a
  raw ``jnp.dot`` on ``self.param``) are reported as an error by ``apply`` instead of being silently skipped.

Conventions (PEFT/loralib and the "LoRA Without Regret" study): A has the kernel's input axes and the rank axis,
B the rank axis and the kernel's output axes (Flax layout, i.e. the transpose of PEFT's ``lora_A.weight [r, in]`` /
``lora_B.weight [out, r]``); scale s = alpha/r by default; A ~ U(±1/sqrt(d_in)), B = 0, so the model is unchanged at
step 0. Adapters are ``Adapter`` pytree nodes whose only leaves are A and B; the resolved scale, layout and dropout
rate are static metadata, so an adapter tree describes itself and ``apply``/``merge`` need no spec.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util

from lora_jax import quant
from lora_jax import spec as spec_lib

Path = tuple[str, ...]

PRESETS = ("all-linear", "attention", "mlp", "unembed", "embed")
EXTRA_PRESETS = ("all", "bias", "norm")
MATRIX_PARAMS = ("kernel", "embedding")
ROLES = ("in", "out", "shared")
KINDS = ("dense", "embed", "attend")
# Adapter-tree key suffix of an adapter on an nn.Embed's output side (``Embed.attend``, a tied unembedding):
# ``("model", "embed_tokens@attend")`` sits beside the input-side adapter ``("model", "embed_tokens")``.
ATTEND_SUFFIX = "@attend"

_ATTN_CONTEXT = re.compile(r".*(attn|attention).*")
_MLP_CONTEXT = re.compile(r".*(mlp|ffn|feed_?forward|moe|expert).*")
_ATTN_NAMES = re.compile(r"(q|k|v|o|qkv|query|key|value|out|wq|wk|wv|wo|c_attn|kv)(_proj)?")
_MLP_NAMES = re.compile(r"(gate_proj|up_proj|down_proj|gate_up_proj|fc\d?|c_fc|w[123]|wi(_\d)?|fc_in|fc_out)")
_UNEMBED_NAMES = re.compile(r"(lm_head|unembed|unembedding|output|head|logits|embed_out|output_projection)")
_ROUTER_NAMES = re.compile(r"(router|gate)")
_NORM_NAMES = re.compile(r".*(norm|ln).*")


# ---------------------------------------------------------------------------------------------------------------------
# The spec (``lora_jax.spec``, re-exported here).

LoraSpec = spec_lib.LoraSpec
_compile = spec_lib._compile


# ---------------------------------------------------------------------------------------------------------------------
# Adapters and layouts.


@dataclasses.dataclass(frozen=True)
class Layout:
  """How a kernel's axes (as the module sees them, stack axes excluded) split into input, output and shared axes."""

  kind: str  # "dense" (Dense, DenseGeneral, Einsum), "embed" (nn.Embed lookup: A is gathered by token id) or
  # "attend" (nn.Embed.attend, the output side of a tied embedding: x·E^T, so the kernel's [V, D] is ("out", "in")).
  roles: tuple[str, ...]  # Per kernel axis: "in" (contracted with x), "out" (in the output), "shared" (both).
  tied: bool = False  # An embedding used both for lookup and as the output head (its adapters can't be merged).

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ValueError(f"unknown layout kind {self.kind!r}; valid: {list(KINDS)}")
    if "in" not in self.roles or "out" not in self.roles or any(r not in ROLES for r in self.roles):
      raise ValueError(f"a layout needs at least one 'in' and one 'out' axis, got roles {self.roles}")


@flax.struct.dataclass
class Adapter:
  """One LoRA adapter: A [*stack, *shared, *in, r] and B [*stack, *shared, r, *out]; the rest is static metadata."""

  a: jax.Array
  b: jax.Array
  param: str = flax.struct.field(pytree_node=False, default="kernel")  # Name of the adapted parameter.
  layout: Layout = flax.struct.field(pytree_node=False, default=Layout("dense", ("in", "out")))
  scale: Any = flax.struct.field(pytree_node=False, default=1.0)  # float, or nested tuples over the stack axes.
  dropout: float = flax.struct.field(pytree_node=False, default=0.0)
  runs: int = flax.struct.field(pytree_node=False, default=0)  # >0: K runs' adapters for per-row inference
  # (``stack_adapters``): A [*stack, K, *shared, *in, r], B [*stack, K, *shared, r, *out], scale over [*stack, K].
  m: Any = None  # DoRA's magnitude [*stack, *shared, *out] (one per output column); None for plain LoRA.

  @property
  def rank(self) -> int:
    """The adapter's rank r."""
    return self.a.shape[-1]

  @property
  def n_stack(self) -> int:
    """Number of leading stack axes (nn.scan / nn.vmap over layers)."""
    return self.a.ndim - 1 - sum(r != "out" for r in self.layout.roles) - (1 if self.runs else 0)

  def scale_array(self) -> np.ndarray:
    """The scale as a float32 array over the stack axes (zero on layers that are not selected)."""
    return np.asarray(self.scale, np.float32)


def _is_adapter(x) -> bool:
  return isinstance(x, Adapter)


def attend_key(module_path: Path) -> Path:
  """Adapter-tree key of the output-side (``attend``) adapter of the nn.Embed at ``module_path``."""
  return module_path[:-1] + ((module_path[-1] if module_path else "") + ATTEND_SUFFIX,)


def module_path_of(key: Path, adapter: Adapter) -> Path:
  """Path of the module an adapter belongs to (its tree key without the ``@attend`` suffix)."""
  return _module_of(key, adapter.layout.kind)


def _module_of(key: Path, kind: str) -> Path:
  if kind != "attend":
    return key
  name = key[-1][: -len(ATTEND_SUFFIX)]
  return key[:-1] + ((name,) if name else ())


def kernel_path(key: Path, adapter: Adapter) -> Path:
  """Path of the parameter an adapter adapts (e.g. ``(..., "q_proj", "kernel")``)."""
  return module_path_of(key, adapter) + (adapter.param,)


def _variable_names(adapter: Adapter) -> tuple[str, str, str]:
  """Names of A, B and the scale beside the kernel in the module's parameters."""
  if adapter.layout.kind == "attend":
    return "lora_attend_a", "lora_attend_b", "lora_attend_scale"
  return "lora_a", "lora_b", "lora_scale"


MAGNITUDE = "lora_magnitude"  # DoRA's m beside the kernel in the module's parameters (dense kernels only).


def adapter_items(adapters) -> list[tuple[Path, Adapter]]:
  """(module path, Adapter) pairs of an adapter tree, in a stable order."""
  out = []

  def walk(node, path):
    if isinstance(node, Adapter):
      out.append((path, node))
    elif isinstance(node, Mapping):
      for k in sorted(node):
        walk(node[k], path + (k,))
    else:
      raise TypeError(f"adapter tree holds a {type(node).__name__} at {'/'.join(path)}; expected dict or Adapter")

  walk(adapters, ())
  return out


def _unflatten(items: Mapping[Path, Any]):
  if () in items:  # the model itself is the adapted layer (e.g. a bare nn.Dense)
    return items[()]
  return traverse_util.unflatten_dict(dict(items)) if items else {}


def _layout_axes(layout: Layout):
  """Axis positions (in the kernel) of the shared, in and out roles."""
  shared = [i for i, r in enumerate(layout.roles) if r == "shared"]
  ins = [i for i, r in enumerate(layout.roles) if r == "in"]
  outs = [i for i, r in enumerate(layout.roles) if r == "out"]
  return shared, ins, outs


def _adapter_shapes(kernel_shape, layout: Layout, n_stack: int, rank: int):
  stack, inner = tuple(kernel_shape[:n_stack]), tuple(kernel_shape[n_stack:])
  shared, ins, outs = _layout_axes(layout)
  sh = tuple(inner[i] for i in shared)
  a_shape = stack + sh + tuple(inner[i] for i in ins) + (rank,)
  b_shape = stack + sh + (rank,) + tuple(inner[i] for i in outs)
  return a_shape, b_shape


def _delta_einsum(layout: Layout, n_stack: int) -> str:
  """einsum string A,B -> ΔW in the kernel's own axis order."""
  _, kernel, a, b, _ = _axis_letters(layout, n_stack)
  return f"{a},{b}->{kernel}"


def delta(adapter: Adapter) -> jax.Array:
  """s·A·B in float32, shaped like the adapted kernel (for merging and checks; never used in the forward pass)."""
  if adapter.runs:
    raise ValueError(f"a stack of {adapter.runs} runs' adapters (stack_adapters) has no single ΔW; merge one run's")
  wide = jnp.promote_types(adapter.a.dtype, jnp.float32)  # float32, or float64 under x64
  a = adapter.a.astype(wide)
  b = adapter.b.astype(wide)
  d = jnp.einsum(_delta_einsum(adapter.layout, adapter.n_stack), a, b, precision=jax.lax.Precision.HIGHEST)
  scale = adapter.scale_array()
  return d * scale.reshape(scale.shape + (1,) * (d.ndim - scale.ndim))


def _axis_letters(layout: Layout, n_stack: int) -> tuple[str, str, str, str, str]:
  """einsum letters: (stack, kernel in its axis order, A, B, the column index = stack + shared + out)."""
  letters = iter("abcdefghijklmnopstuvwxyz")  # r and q name rank axes
  stack = "".join(next(letters) for _ in range(n_stack))
  axis = [next(letters) for _ in layout.roles]
  shared, ins, outs = _layout_axes(layout)
  a = stack + "".join(axis[i] for i in shared + ins) + "r"
  b = stack + "".join(axis[i] for i in shared) + "r" + "".join(axis[i] for i in outs)
  column = stack + "".join(axis[i] for i in shared + outs)
  return stack, stack + "".join(axis), a, b, column


def column_norm(w, a, b, scale, layout: Layout, n_stack: int = 0) -> jax.Array:
  """||W + s·A·B|| over the input axes, per output column ([*stack, *shared, *out]), in float32 or wider.

  Factored, never forming W + s·A·B: ||W||² + 2s·Σ_r (WᵀA)_r B_r + s²·Bᵀ(AᵀA)B, which costs a kernel-sized read of W
  and O((d_in + d_out)·r²) beyond it. ``scale`` is a number or an array over the stack axes.
  """
  wide = jnp.promote_types(jnp.promote_types(a.dtype, w.dtype), jnp.float32)
  w, a, b = (jnp.asarray(v).astype(wide) for v in (w, a, b))
  _, k, a_s, b_s, col = _axis_letters(layout, n_stack)
  hi = jax.lax.Precision.HIGHEST
  ww = jnp.einsum(f"{k},{k}->{col}", w, w, precision=hi)
  wa = jnp.einsum(f"{k},{a_s}->{col}r", w, a, precision=hi)
  cross = jnp.einsum(f"{col}r,{b_s}->{col}", wa, b, precision=hi)
  lead = b_s[:b_s.index("r")]  # stack + shared
  gram = jnp.einsum(f"{a_s},{a_s.replace('r', 'q')}->{lead}rq", a, a, precision=hi)
  quad = jnp.einsum(f"{lead}rq,{b_s},{b_s.replace('r', 'q')}->{col}", gram, b, b, precision=hi)
  s = jnp.asarray(scale, wide)
  s = s.reshape(s.shape + (1,) * (ww.ndim - s.ndim))
  return jnp.sqrt(jnp.maximum(ww + 2.0 * s * cross + s * s * quad, 0.0))


def dora_factor(w, a, b, m, scale, layout: Layout, n_stack: int = 0) -> jax.Array:
  """DoRA's m / ||W + s·A·B|| per output column (the norm a constant for gradients, as PEFT), and exactly 1 where the
  scale is 0 (layers ``LoraSpec.layers`` leaves out: their magnitude never trains)."""
  norm = jax.lax.stop_gradient(column_norm(w, a, b, scale, layout, n_stack))
  s = jnp.asarray(scale, norm.dtype)
  s = s.reshape(s.shape + (1,) * (norm.ndim - s.ndim))
  return jnp.where(s != 0, m.astype(norm.dtype) / jnp.where(s != 0, norm, 1.0), 1.0)


def to_kernel_axes(v, layout: Layout, n_stack: int) -> jax.Array:
  """A per-column array [*stack, *shared, *out] with size-1 input axes, in the kernel's axis order (to scale W)."""
  shared, ins, outs = _layout_axes(layout)
  v = jnp.reshape(v, v.shape + (1,) * len(ins))
  order = shared + outs + ins  # kernel axis index of each of v's inner axes
  return jnp.transpose(v, tuple(range(n_stack)) + tuple(n_stack + order.index(i) for i in range(len(order))))


# ---------------------------------------------------------------------------------------------------------------------
# Matching parameters to targets.


def _path_str(path: Path) -> str:
  return "/".join(str(p) for p in path)


def _kernel_group(module_path: Path, param: str) -> str:
  """Classifies a matrix parameter for the presets: embed, unembed, attention, mlp, router or other."""
  if module_path and str(module_path[-1]).endswith(ATTEND_SUFFIX):
    return "unembed"  # the output side of a tied embedding
  if param == "embedding":
    return "embed"
  parts = [str(p).lower() for p in module_path]
  name = parts[-1] if parts else ""
  context = parts[:-1]
  if any(_ATTN_CONTEXT.fullmatch(p) for p in context):
    return "attention"
  if any(_MLP_CONTEXT.fullmatch(p) for p in context):
    return "router" if _ROUTER_NAMES.fullmatch(name) else "mlp"
  if _UNEMBED_NAMES.fullmatch(name):
    return "unembed"
  if _ATTN_NAMES.fullmatch(name):
    return "attention"
  if _MLP_NAMES.fullmatch(name):
    return "mlp"
  return "other"


def _preset_hits(preset: str, module_path: Path, param: str) -> bool:
  group = _kernel_group(module_path, param)
  if preset == "all-linear":
    return group in ("attention", "mlp", "other")
  return group == preset


def _pattern_hits(pattern: str, module_path: Path, param: str | None = None) -> bool:
  """True if a target/exclude/pattern entry selects this module (and matrix parameter)."""
  if pattern in PRESETS:
    return param is not None and _preset_hits(pattern, module_path, param)
  mod = _path_str(module_path)
  if re.fullmatch(r"[A-Za-z0-9_\-@]+", pattern) and module_path and pattern == str(module_path[-1]):
    return True
  if re.fullmatch(pattern, mod):
    return True
  return param is not None and re.fullmatch(pattern, f"{mod}/{param}") is not None


def _closest(pattern: str, candidates: Sequence[str], n: int = 12) -> list[str]:
  scored = sorted(candidates, key=lambda c: -difflib.SequenceMatcher(None, pattern, c).ratio())
  return scored[:n]


def _first_pattern_value(patterns: Mapping[str, Any], module_path: Path, param: str, default):
  for pattern, value in patterns.items():
    if _pattern_hits(pattern, module_path, param):
      return value
  return default


def _layer_index(spec: LoraSpec, module_path: Path) -> int | None:
  m = re.search(spec.layer_pattern, _path_str(module_path))
  return int(m.group(1)) if m else None


def _scale(spec: LoraSpec, rank: int, alpha: float) -> float:
  if spec.scaling == "alpha/r":
    return alpha / rank
  if spec.scaling == "alpha/sqrt(r)":
    return alpha / math.sqrt(rank)
  return 1.0


@dataclasses.dataclass(frozen=True)
class _Target:
  module_path: Path
  param: str
  layout: Layout
  n_stack: int
  rank: int
  scale: np.ndarray  # over the stack axes; zero where a layer is not selected


def _default_layout(path: Path, arr, layouts: Mapping[str, Layout] | None) -> tuple[Layout, int]:
  module_path, param = path[:-1], path[-1]
  key = _path_str(module_path)
  if layouts is not None and key in layouts:
    layout = layouts[key]
  elif layouts is not None and arr.ndim > 2:
    raise ValueError(
        f"kernel '{_path_str(path)}' (shape {tuple(arr.shape)}) belongs to a module that trace_layouts did not see "
        "called as nn.Dense, nn.DenseGeneral, nn.Einsum or nn.Embed (e.g. an nn.Conv): LoRA can't adapt it; "
        "leave it out of LoraSpec.targets or add it to LoraSpec.exclude")
  elif param == "embedding":
    layout = Layout("embed", ("in", "out"))
  elif arr.ndim == 2:
    layout = Layout("dense", ("in", "out"))
  else:
    raise ValueError(
        f"kernel '{_path_str(path)}' has shape {tuple(arr.shape)}: a kernel with more than 2 axes is ambiguous "
        "(scan-stacked layers, or a multi-axis DenseGeneral/Einsum). Pass layouts=lora.trace_layouts(model, "
        "*example_inputs) to create() so the module types are read off the model."
    )
  n_stack = arr.ndim - len(layout.roles)
  if n_stack < 0:
    raise ValueError(f"kernel '{_path_str(path)}' has shape {tuple(arr.shape)} but its layout has "
                     f"{len(layout.roles)} axes ({layout.roles})")
  return layout, n_stack


def _plan(params, spec: LoraSpec, layouts: Mapping[str, Layout] | None) -> list[_Target]:
  """Resolves the spec against a parameter tree: which kernels get adapters, with which layout, rank and scale."""
  flat = traverse_util.flatten_dict(params)
  if not flat and spec.targets:
    raise ValueError("the parameter tree is empty")
  matrices = {p: v for p, v in flat.items() if p[-1] in MATRIX_PARAMS}
  if layouts is not None:
    # The output side of each embedding the model calls through `attend` (a tied unembedding) is a target of its
    # own, keyed `<module>@attend`; presets skip kernels of modules LoRA can't adapt (e.g. nn.Conv).
    for key, layout in layouts.items():
      if layout.kind == "attend":
        module_path = tuple(key[: -len(ATTEND_SUFFIX)].split("/")) if key != ATTEND_SUFFIX else ()
        if module_path + ("embedding",) in flat:
          matrices[attend_key(module_path) + ("embedding",)] = flat[module_path + ("embedding",)]
    adaptable = {p for p in matrices if _path_str(p[:-1]) in layouts or matrices[p].ndim <= 2}
  else:
    adaptable = set(matrices)
  all_paths = [_path_str(p) for p in flat]
  chosen: dict[Path, None] = {}
  for pattern in spec.targets:
    hits = [p for p in matrices if _pattern_hits(pattern, p[:-1], p[-1])
            and (p in adaptable or pattern not in PRESETS)]
    if not hits:
      _check_non_matrix_hits(pattern, flat)
      tied = ("\nA model whose output head is its embedding (tied) has an 'unembed' target only when create() gets "
              "layouts=lora.trace_layouts(model, *example_inputs)." if pattern == "unembed" and layouts is None
              else "")
      raise ValueError(
          f"LoRA target {pattern!r} matches no kernel. Parameter paths (closest first):\n  "
          + "\n  ".join(_closest(pattern, all_paths))
          + f"\nPresets: {list(PRESETS)}; plain names match a module's last path component; regexes fullmatch "
          "'/'-joined module or parameter paths." + tied
      )
    chosen.update(dict.fromkeys(hits))
  for pattern in spec.exclude:
    chosen = {p: None for p in chosen if not _pattern_hits(pattern, p[:-1], p[-1])}

  targets = []
  for path in chosen:
    module_path, param = path[:-1], path[-1]
    arr = matrices[path]
    layout, n_stack = _default_layout(path, arr, layouts)
    stack_shape = tuple(arr.shape[:n_stack])
    mask = np.ones(stack_shape, np.float32)
    if spec.layers is not None:
      if n_stack:
        if any(i >= stack_shape[0] or i < 0 for i in spec.layers):
          raise ValueError(f"LoraSpec.layers {spec.layers} out of range for '{_path_str(path)}' which stacks "
                           f"{stack_shape[0]} layers")
        keep = np.zeros(stack_shape[0], np.float32)
        keep[list(spec.layers)] = 1.0
        mask = mask * keep.reshape((-1,) + (1,) * (n_stack - 1))
      elif _layer_index(spec, module_path) not in spec.layers:
        continue
    rank = int(_first_pattern_value(spec.rank_pattern, module_path, param, spec.rank))
    alpha = float(_first_pattern_value(spec.alpha_pattern, module_path, param, spec.alpha))
    inner = arr.shape[n_stack:]
    _, ins, outs = _layout_axes(layout)
    d_in, d_out = math.prod(inner[i] for i in ins), math.prod(inner[i] for i in outs)
    if rank > min(d_in, d_out):
      if spec.rank_policy == "error":
        raise ValueError(f"rank {rank} for '{_path_str(path)}' exceeds min(d_in, d_out) = min({d_in}, {d_out}); "
                         f"kernel shape {tuple(arr.shape)}. LoraSpec.rank_policy='clip' clips it to "
                         f"{min(d_in, d_out)} (a full-rank update), recorded in lora.summary")
      rank = min(d_in, d_out)
    targets.append(_Target(module_path, param, layout, n_stack, rank, mask * _scale(spec, rank, alpha)))
  if spec.targets and not targets:
    raise ValueError(f"LoRA targets {list(spec.targets)} minus exclude {list(spec.exclude)} and layers "
                     f"{spec.layers} leave no kernel to adapt")
  return targets


def _check_non_matrix_hits(pattern: str, flat: Mapping[Path, Any]):
  """A target that selects only a bias, a norm scale or a module without a kernel is named in the error."""
  if pattern in PRESETS:
    return
  for path, value in flat.items():
    module_path, param = path[:-1], path[-1]
    if param in MATRIX_PARAMS:
      continue
    if re.fullmatch(pattern, _path_str(path)):
      raise ValueError(f"LoRA target {pattern!r} hits parameter '{_path_str(path)}' (shape "
                       f"{tuple(np.shape(value))}), which is not a matrix; LoRA adapts 'kernel' and 'embedding' only")
    if _pattern_hits(pattern, module_path):
      names = sorted(p[-1] for p in flat if p[:-1] == module_path)
      raise ValueError(f"LoRA target {pattern!r} hits module '{_path_str(module_path)}', which has no kernel or "
                       f"embedding to adapt (its parameters: {names})")


# ---------------------------------------------------------------------------------------------------------------------
# Creating adapters.


def create(params, spec: LoraSpec, rng: jax.Array, layouts: Mapping[str, Layout] | None = None):
  """Makes adapters for the kernels ``spec`` targets; returns ``(params, adapters)``.

  ``params`` comes back unchanged except with ``init_a="pissa"``, where the top-r part is moved out of W into the
  adapter (W_res = W - s·A·B). ``layouts`` (from ``trace_layouts``) is needed for kernels with more than two axes.
  """
  params = _unboxed(params)
  targets = _plan(params, spec, layouts)
  flat = traverse_util.flatten_dict(params)
  dtype = jnp.dtype(spec.dtype)
  out_adapters, new_params = {}, dict(flat)
  for i, t in enumerate(targets):
    path = _module_of(t.module_path, t.layout.kind) + (t.param,)
    kernel = flat[path]
    a_shape, b_shape = _adapter_shapes(kernel.shape, t.layout, t.n_stack, t.rank)
    key = jax.random.fold_in(rng, i)
    scale = t.scale
    if spec.init_a == "pissa" and quant.is_quantized(kernel):
      raise ValueError(f"init_a='pissa' on '{_path_str(path)}', a quantized kernel: PiSSA moves W's top-r part into "
                       "the adapter and keeps the residual, which a quantized base can't store; create the adapters "
                       "before quantize() (or use init_a='uniform')")
    if spec.init_a == "pissa":
      a, b = _pissa(kernel, t)
      if t.layout.tied:
        raise ValueError(f"init_a='pissa' on '{_path_str(path)}', one side of a tied embedding: moving its top-r "
                         "part out of the shared weight would change the other side too; exclude it")
      stub = Adapter(a, b, t.param, t.layout, _nested(scale), spec.dropout)
      new_params[path] = (kernel.astype(jnp.float32) - delta(stub)).astype(kernel.dtype)
    else:
      _, ins, _ = _layout_axes(t.layout)
      d_in = math.prod(kernel.shape[t.n_stack + j] for j in ins)
      if spec.init_a == "uniform":
        bound = 1.0 / math.sqrt(d_in)
        a = jax.random.uniform(key, a_shape, jnp.float32, -bound, bound)
      else:  # gaussian, as PEFT's init_lora_weights="gaussian": std 1/r
        a = jax.random.normal(key, a_shape, jnp.float32) / t.rank
      b = jnp.zeros(b_shape, jnp.float32)
    # Layers left out by `spec.layers` keep A = B = 0 (their scale is 0 too), so they stay exactly zero.
    mask = (scale != 0).astype(np.float32)
    a = a * mask.reshape(mask.shape + (1,) * (a.ndim - mask.ndim))
    a, b = a.astype(dtype), b.astype(dtype)
    m = None
    if spec.variant == "dora":
      if t.layout.kind != "dense":
        raise ValueError(f"variant='dora' on '{_path_str(path)}', an embedding ({t.layout.kind} side): DoRA adapts "
                         "dense kernels here; exclude it (e.g. exclude=('embed',)) or use variant='lora'")
      w = quant.dequantize(new_params[path]) if quant.is_quantized(new_params[path]) else new_params[path]
      m = column_norm(w, a, b, scale, t.layout, t.n_stack).astype(dtype)  # ||W + s·A·B|| = ||W|| (B = 0)
    out_adapters[t.module_path] = Adapter(a, b, t.param, t.layout, _nested(scale), spec.dropout, m=m)
  return traverse_util.unflatten_dict(new_params), _unflatten(out_adapters)


def quantize_base(params, spec: quant.QuantSpec, layouts: Mapping[str, Layout] | None = None):
  """``params`` with every kernel ``spec`` targets (LoraSpec target syntax; ``layouts`` for kernels of more than two
  axes) stored as a ``quant.QuantizedKernel`` (QLoRA's frozen base); blocks run over [*shared, *out, *in] order."""
  params = _unboxed(params)
  plan = _plan(params, LoraSpec(rank=1, targets=spec.targets, exclude=spec.exclude), layouts)
  flat = dict(traverse_util.flatten_dict(params))
  for t in plan:
    if t.layout.kind != "dense":
      raise ValueError(f"QuantSpec targets '{_path_str(t.module_path)}', an embedding: only dense kernels are "
                       "stored quantized (QLoRA keeps embeddings and the output head in full precision)")
    path = t.module_path + (t.param,)
    shared, ins, outs = _layout_axes(t.layout)
    flat[path] = quant.quantize_array(flat[path], spec, t.n_stack, tuple(shared + outs + ins), _path_str(path))
  return traverse_util.unflatten_dict(flat)


def _unboxed(params):
  """``params`` without Flax partitioning metadata (``nn.LogicallyPartitioned`` boxes from ``model.init``)."""
  return nn.meta.unbox(params)


def _nested(scale: np.ndarray):
  """Static (hashable) form of a scale array: a float or nested tuples."""
  return float(scale) if scale.ndim == 0 else tuple(_nested(s) for s in scale)


def _pissa(kernel, t: _Target):
  """A, B from the top-r SVD of W (per stack/shared index), scaled so that s·A·B is W's top-r part."""
  w = jnp.asarray(kernel, jnp.float32)
  shared, ins, outs = _layout_axes(t.layout)
  n = t.n_stack
  perm = list(range(n)) + [n + i for i in shared + ins + outs]
  w = jnp.transpose(w, perm)
  lead = w.shape[: n + len(shared)]
  in_shape = tuple(kernel.shape[n + i] for i in ins)
  out_shape = tuple(kernel.shape[n + i] for i in outs)
  m = w.reshape(lead + (math.prod(in_shape), math.prod(out_shape)))
  u, s, vt = jnp.linalg.svd(m, full_matrices=False)
  scale = np.broadcast_to(t.scale.reshape(t.scale.shape + (1,) * len(shared)), lead)
  safe = np.where(scale == 0, 1.0, scale)[..., None]
  root = jnp.sqrt(s[..., : t.rank] / safe)
  a = u[..., :, : t.rank] * root[..., None, :]
  b = root[..., :, None] * vt[..., : t.rank, :]
  return a.reshape(lead + in_shape + (t.rank,)), b.reshape(lead + (t.rank,) + out_shape)


def trace_layouts(model: nn.Module, *args, method=None, **kwargs) -> dict[str, Layout]:
  """Reads each Dense/DenseGeneral/Einsum/Embed kernel's axis roles off the model by tracing it abstractly.

  An embedding called through ``attend`` (the output head of a tied model) gets a second entry,
  ``"<path>@attend"``, and both of its entries are marked ``tied`` when it is also used for lookup.
  """
  layouts: dict[str, Layout] = {}

  def record(next_fun, a, kw, context):
    module = context.module
    if context.method_name == "__call__":
      layout = _module_layout(module, a, kw)
      if layout is not None:
        layouts[_path_str(module.path)] = layout
    elif context.method_name == "attend" and isinstance(module, nn.Embed):
      layouts[_path_str(attend_key(tuple(module.path)))] = Layout("attend", ("out", "in"))
    return next_fun(*a, **kw)

  def run(rng):
    with nn.intercept_methods(record):
      return model.init(rng, *args, method=method, **kwargs)

  jax.eval_shape(run, jax.random.key(0))
  for key, layout in list(layouts.items()):
    if layout.kind == "attend" and key[: -len(ATTEND_SUFFIX)] in layouts:
      layouts[key] = dataclasses.replace(layout, tied=True)
      lookup = key[: -len(ATTEND_SUFFIX)]
      layouts[lookup] = dataclasses.replace(layouts[lookup], tied=True)
  return layouts


def _module_layout(module: nn.Module, args, kwargs) -> Layout | None:
  if isinstance(module, nn.Embed):
    return Layout("embed", ("in", "out"))
  if isinstance(module, nn.Dense):
    return Layout("dense", ("in", "out"))
  if isinstance(module, nn.DenseGeneral):
    if module.batch_dims:
      raise ValueError(f"nn.DenseGeneral '{_path_str(module.path)}' uses batch_dims={module.batch_dims}, which "
                       "LoRA does not support; use nn.Einsum with a shared axis instead")
    features = module.features if isinstance(module.features, Sequence) else (module.features,)
    axis = module.axis if isinstance(module.axis, Sequence) else (module.axis,)
    return Layout("dense", ("in",) * len(axis) + ("out",) * len(features))
  if isinstance(module, nn.Einsum):
    lhs, rhs, out = _parse_einsum(_einsum_str(module, args, kwargs), module)
    roles = []
    for c in rhs:
      if c in lhs and c in out:
        roles.append("shared")
      elif c in lhs:
        roles.append("in")
      elif c in out:
        roles.append("out")
      else:
        raise ValueError(f"nn.Einsum '{_path_str(module.path)}': kernel axis {c!r} is summed out; LoRA can't adapt it")
    return Layout("dense", tuple(roles))
  return None


def _einsum_str(module, args, kwargs) -> str:
  s = kwargs.get("einsum_str") or (args[1] if len(args) > 1 else None) or module.einsum_str
  return s.replace(" ", "")


def _parse_einsum(s: str, module) -> tuple[str, str, str]:
  if "..." in s or s.count(",") != 1 or "->" not in s:
    raise ValueError(f"nn.Einsum '{_path_str(module.path)}': LoRA needs an explicit 'lhs,rhs->out' einsum "
                     f"without '...', got {s!r}")
  ins, out = s.split("->")
  lhs, rhs = ins.split(",")
  return lhs, rhs, out


# ---------------------------------------------------------------------------------------------------------------------
# Running the model with adapters.


def _check_fit(params, adapters):
  """Adapters must fit the kernels they adapt: every mismatch is listed with paths and shapes."""
  flat = traverse_util.flatten_dict(params)
  problems = []
  for key, ad in adapter_items(adapters):
    path = kernel_path(key, ad)
    if path not in flat:
      problems.append(f"'{_path_str(path)}': no such parameter (adapter A {tuple(ad.a.shape)})")
      continue
    kernel = flat[path]
    n_stack = kernel.ndim - len(ad.layout.roles)
    expected = _adapter_shapes(kernel.shape, ad.layout, n_stack, ad.rank) if n_stack >= 0 else None
    if expected is not None and ad.runs:  # the run axis sits right after the stack axes
      expected = tuple(e[:n_stack] + (ad.runs,) + e[n_stack:] for e in expected)
    if expected != (tuple(ad.a.shape), tuple(ad.b.shape)):
      problems.append(f"'{_path_str(path)}' has shape {tuple(kernel.shape)} but the adapter has A "
                      f"{tuple(ad.a.shape)}, B {tuple(ad.b.shape)}"
                      + (f" (expected A {expected[0]}, B {expected[1]})" if expected else ""))
    elif ad.m is not None:
      shared, _, outs = _layout_axes(ad.layout)
      m_shape = tuple(kernel.shape[:n_stack]) + tuple(kernel.shape[n_stack + i] for i in shared + outs)
      if tuple(ad.m.shape) != m_shape:
        problems.append(f"'{_path_str(path)}' has shape {tuple(kernel.shape)} but the DoRA magnitude has shape "
                        f"{tuple(ad.m.shape)} (expected {m_shape}: one per output column)")
  if problems:
    raise ValueError("adapters do not fit the parameters:\n  " + "\n  ".join(problems))


def inject(params, adapters, scales: Mapping[Path, Any] | None = None):
  """Parameter tree with each adapter's lora_a, lora_b and lora_scale placed beside the kernel it adapts.

  ``scales`` (adapter key -> array shaped like ``scale_array()``, may be traced) replaces the adapters' static scales,
  e.g. one run's scale alpha/r inside a ``jax.vmap`` over stacked runs of different ranks (``lora_jax.stack``).
  """
  _check_fit(params, adapters)
  flat = dict(traverse_util.flatten_dict(params))
  scales = scales or {}
  for key, ad in adapter_items(adapters):
    module_path = module_path_of(key, ad)
    scale = scales[key] if key in scales else jnp.asarray(ad.scale_array())
    for name, value in zip(_variable_names(ad), (ad.a, ad.b, scale)):
      flat[module_path + (name,)] = value
    if ad.m is not None:
      flat[module_path + (MAGNITUDE,)] = ad.m
  return traverse_util.unflatten_dict(flat)


def apply(model: nn.Module, params, adapters, *args, train: bool = False, collections: Mapping | None = None,
          check_unused: bool = True, scales: Mapping[Path, Any] | None = None, rows=None, **kwargs):
  """``model.apply`` with adapters: each adapted layer computes x·W + s·(dropout(x)·A)·B.

  ``train=True`` turns on adapter dropout (needs ``rngs={"dropout": key}``). ``collections`` holds variable
  collections other than ``params`` (e.g. batch_stats). ``scales`` overrides the adapters' scales s (``inject``).
  With adapters of K runs (``stack_adapters``), ``rows`` [B] says which run each batch row uses: row i computes
  x_i·W + s_r·(x_i·A_r)·B_r for r = rows[i], gathering A_r and B_r per row (never a per-row W + ΔW).
  Other keyword arguments go to ``model.apply``.
  """
  params = _unboxed(params)
  items = adapter_items(adapters)
  quantized = any(quant.is_quantized(x) for x in jax.tree.leaves(params, is_leaf=quant.is_quantized))
  if not items and not quantized:
    return model.apply({"params": params, **(collections or {})}, *args, **kwargs)
  info = {path: ad for path, ad in items}
  stacked = [p for p, ad in items if ad.runs]
  if stacked and rows is None:
    raise ValueError(f"adapters of {info[stacked[0]].runs} runs (stack_adapters): pass rows=[run of each batch row]")
  if rows is not None and len(stacked) != len(items):
    raise ValueError("rows= is for adapters of several runs (stack_adapters); these adapters are one run's")
  if rows is not None:
    rows = jnp.asarray(rows, jnp.int32)
  dora_dropout = [_path_str(p) for p, ad in items if ad.m is not None and ad.dropout > 0]
  if train and dora_dropout:
    raise ValueError(f"DoRA adapters {dora_dropout[:3]} with adapter dropout in training: not supported (PEFT runs an "
                     "extra base matmul on the dropped input); train with LoraSpec.dropout=0")
  if train and any(ad.dropout > 0 for ad in info.values()) and "dropout" not in (kwargs.get("rngs") or {}):
    raise ValueError("LoRA dropout is on (train=True, dropout > 0): pass rngs={'dropout': key} to lora.apply")
  used: set[Path] = set()

  def interceptor(next_fun, a, kw, context):
    module = context.module
    path = tuple(module.path)
    if isinstance(module, nn.Embed) and context.method_name == "attend":
      path = attend_key(path)
    elif context.method_name != "__call__" or not isinstance(module, (nn.Dense, nn.DenseGeneral, nn.Einsum,
                                                                      nn.Embed)):
      return next_fun(*a, **kw)
    ad = info.get(path)
    names = _variable_names(ad) if ad is not None else ()
    kernel = module.get_variable("params", "kernel") if quantized and not isinstance(module, nn.Embed) else None
    base = (lambda: _quantized_base_output(module, a, kw, kernel)) if quant.is_quantized(kernel) else \
        (lambda: next_fun(*a, **kw))
    if ad is None or not module.has_variable("params", names[0]):
      return base()
    used.add(path)
    y = base()
    lora_a, lora_b, scale = (module.get_variable("params", n) for n in names)
    if rows is not None:
      return y + _delta_output_per_row(module, ad.layout.kind, a, kw, lora_a, lora_b, scale, rows, y.dtype)
    d = _delta_output(module, ad.layout.kind, a, kw, lora_a, lora_b, scale, ad.dropout, train, y.dtype)
    if ad.m is None:
      return y + d
    return _dora_output(module, ad, a, kw, y, d, lora_a, lora_b, scale)

  try:
    with nn.intercept_methods(interceptor):
      out = model.apply({"params": inject(params, adapters, scales), **(collections or {})}, *args, **kwargs)
  except flax.errors.InvalidRngError as err:
    if "dropout" not in str(err):
      raise
    raise ValueError(
        f"LoRA dropout could not draw from the 'dropout' RNG ({err}). Inside nn.scan / nn.vmap the RNG must be "
        "passed through: add split_rngs={'params': True, 'dropout': True} to the transform (or set "
        "LoraSpec.dropout=0)") from err
  unused = sorted(set(info) - used)
  if check_unused and unused:
    raise ValueError(
        "adapters were never applied, because their module was not called as nn.Dense, nn.DenseGeneral, nn.Einsum "
        "or nn.Embed (a kernel used through a raw jnp.dot is not supported): "
        + ", ".join(_path_str(p) for p in unused)
    )
  return out


def _delta_output(module, kind, args, kwargs, a, b, scale, dropout, train, dtype):
  """s·(x·A)·B for one module call, from the module's own input; W + s·A·B is never formed."""
  precision = getattr(module, "precision", None)
  a, b, scale = a.astype(dtype), b.astype(dtype), scale.astype(dtype)
  x = args[0] if args else kwargs.get("inputs", kwargs.get("query"))
  if kind == "embed":  # lookup: row x of s·A·B
    return scale * jnp.dot(jnp.take(a, x, axis=0), b, precision=precision)
  x = x.astype(dtype)
  if train and dropout > 0:
    keep = jax.random.bernoulli(module.make_rng("dropout"), 1.0 - dropout, x.shape)
    x = jnp.where(keep, x / (1.0 - dropout), 0.0).astype(dtype)
  if isinstance(module, nn.Einsum):
    lhs, rhs, out = _parse_einsum(_einsum_str(module, args, kwargs), module)
    shared = "".join(c for c in rhs if c in lhs and c in out)
    ins = "".join(c for c in rhs if c in lhs and c not in out)
    outs = "".join(c for c in rhs if c not in lhs)
    r = next(c for c in "rzyxwvutsqponmlkjihgfedcba" if c not in lhs + rhs + out)
    keep = "".join(c for c in lhs if c not in ins)
    xa = jnp.einsum(f"{lhs},{shared}{ins}{r}->{keep}{r}", x, a, precision=precision)
    return scale * jnp.einsum(f"{keep}{r},{shared}{r}{outs}->{out}", xa, b, precision=precision)
  if isinstance(module, (nn.Dense, nn.Embed)):  # nn.Embed here: `attend`, x [..., D]·A [D, r]·B [r, V]
    axes = (x.ndim - 1,)
  else:
    axis = module.axis if isinstance(module.axis, Sequence) else (module.axis,)
    axes = tuple(ax % x.ndim for ax in axis)
  xa = jax.lax.dot_general(x, a, ((axes, tuple(range(len(axes)))), ((), ())), precision=precision)
  return scale * jax.lax.dot_general(xa, b, (((xa.ndim - 1,), (0,)), ((), ())), precision=precision)


def _dora_output(module, ad: Adapter, args, kwargs, y, d, a, b, scale):
  """bias + m/||W + s·A·B|| ⊙ (x·W + s·(x·A)·B) per output column, from the module's own y = x·W + bias and d."""
  w = module.get_variable("params", ad.param)
  w = quant.dequantize(w) if quant.is_quantized(w) else w
  factor = dora_factor(w, a, b, module.get_variable("params", MAGNITUDE), scale, ad.layout).astype(y.dtype)
  bias = module.get_variable("params", "bias") if module.has_variable("params", "bias") else None
  if isinstance(module, nn.Einsum):  # factor in the kernel's order of its output letters; bias in y's order
    _, rhs, out = _parse_einsum(_einsum_str(module, args, kwargs), module)
    factor = _to_output(factor, "".join(c for c in rhs if c in out), out)
    bias = None if bias is None else _to_output(bias, "".join(c for c in out if c in rhs), out)
  elif any(r == "shared" for r in ad.layout.roles):
    raise ValueError(f"variant='dora' on '{'/'.join(module.path)}': a {type(module).__name__} with batch axes in "
                     "its kernel is not supported")
  if bias is None:
    return factor * (y + d)
  bias = bias.astype(y.dtype)
  return factor * (y - bias + d) + bias


def _base_output(module, args, kwargs, kernel):
  """What the module's own __call__ computes (x·W + bias, in its dtype), with ``kernel`` (a dequantized
  QuantizedKernel) in place of its stored one."""
  x = args[0] if args else kwargs.get("inputs")
  bias = module.get_variable("params", "bias") if module.has_variable("params", "bias") else None
  x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=module.dtype)
  precision = getattr(module, "precision", None)
  if isinstance(module, nn.Einsum):
    lhs, rhs, out = _parse_einsum(_einsum_str(module, args, kwargs), module)
    y = jnp.einsum(f"{lhs},{rhs}->{out}", x, kernel, precision=precision)
    return y if bias is None else y + _to_output(bias, "".join(c for c in out if c in rhs), out)
  if isinstance(module, nn.DenseGeneral):
    if module.batch_dims:
      raise ValueError(f"'{'/'.join(module.path)}': a quantized kernel in an nn.DenseGeneral with batch_dims is "
                       "not supported")
    axis = module.axis if isinstance(module.axis, Sequence) else (module.axis,)
    axes = tuple(ax % x.ndim for ax in axis)
  else:
    axes = (x.ndim - 1,)
  y = jax.lax.dot_general(x, kernel, ((axes, tuple(range(len(axes)))), ((), ())), precision=precision)
  return y if bias is None else y + bias.reshape((1,) * (y.ndim - bias.ndim) + bias.shape)


def _quantized_base_output(module, args, kwargs, q: quant.QuantizedKernel):
  """``_base_output`` with the kernel dequantized from ``q`` in the forward pass and again in the backward pass
  (a custom VJP), so no dequantized kernel is kept between them: without it JAX's scan would stack every layer's
  dequantized kernel as a residual (they depend on the frozen codes alone), a full-precision copy of the base."""
  x = args[0] if args else kwargs.get("inputs")
  rest_args, rest_kwargs = args[1:], {k: v for k, v in kwargs.items() if k != "inputs"}

  def forward(x, q):
    return _base_output(module, (x,) + rest_args, rest_kwargs, quant.dequantize(q))

  @jax.custom_vjp
  def run(x, q):
    return forward(x, q)

  def run_fwd(x, q):
    return forward(x, q), (x, q)

  def run_bwd(residuals, dy):
    x, q = residuals
    _, vjp = jax.vjp(lambda x: forward(x, q), x)
    return vjp(dy)[0], None  # the frozen codes get no cotangent

  run.defvjp(run_fwd, run_bwd)
  return run(x, q)


def _to_output(v, letters: str, out: str):
  """``v`` (axes named by ``letters``) transposed and reshaped to broadcast against an einsum output ``out``."""
  order = [c for c in out if c in letters]
  v = jnp.transpose(v, [letters.index(c) for c in order])
  return v.reshape([v.shape[order.index(c)] if c in order else 1 for c in out])


def _delta_output_per_row(module, kind, args, kwargs, a, b, scale, rows, dtype):
  """s_r·(x_i·A_r)·B_r with r = rows[i] for each batch row i (Punica-style: A and B gathered per row)."""
  if isinstance(module, (nn.Einsum, nn.DenseGeneral)) or a.ndim != 3:
    raise ValueError(f"per-row adapters (rows=) support nn.Dense and nn.Embed layers with 2-D weights; "
                     f"'{'/'.join(module.path)}' is a {type(module).__name__} (A {tuple(a.shape)})")
  precision = getattr(module, "precision", None)
  a, b, scale = a.astype(dtype), b.astype(dtype), scale.astype(dtype)
  x = args[0] if args else kwargs.get("inputs", kwargs.get("query"))
  if x.shape[0] != rows.shape[0]:  # a model that folds [B, T, D] into [B·T, D] around its matmuls (row-major)
    if x.shape[0] % rows.shape[0]:
      raise ValueError(f"'{'/'.join(module.path)}' got {x.shape[0]} input rows for {rows.shape[0]} batch rows: "
                       "per-row adapters need the batch (or batch x tokens, row-major) on the leading axis")
    rows = jnp.repeat(rows, x.shape[0] // rows.shape[0])
  b_rows = jnp.take(b, rows, axis=0)  # [N, r, out]
  s_rows = jnp.take(scale, rows, axis=0).reshape((-1,) + (1,) * (x.ndim if kind == "embed" else x.ndim - 1))
  if kind == "embed":  # lookup: row x of A_r, per batch row
    xa = a[rows.reshape((-1,) + (1,) * (x.ndim - 1)), x]  # [B, ..., r]
  else:
    xa = jnp.einsum("b...i,bir->b...r", x.astype(dtype), jnp.take(a, rows, axis=0), precision=precision)
  return s_rows * jnp.einsum("b...r,bro->b...o", xa, b_rows, precision=precision)


def stack_adapters(trees: Sequence[Any]) -> Any:
  """K adapter trees of one structure (e.g. a sweep's runs) as one, for per-row inference (``apply(rows=)``).

  Each A and B gets a run axis right after its stack axes (so ``nn.scan`` still slices layers), ranks are
  zero-padded to the largest (A's extra columns and B's extra rows are zero, so they add nothing) and each run
  keeps its own scale.
  """
  if not trees:
    raise ValueError("stack_adapters needs at least one adapter tree")
  items = [dict(adapter_items(t)) for t in trees]
  for k, it in enumerate(items[1:], 1):
    if set(it) != set(items[0]):
      raise ValueError(f"adapter tree {k} adapts other modules than tree 0: "
                       f"{sorted(_path_str(p) for p in set(it) ^ set(items[0]))}")
  out = {}
  for key, ref in items[0].items():
    ads = [it[key] for it in items]
    if any(ad.runs for ad in ads):
      raise ValueError(f"'{_path_str(key)}' already holds several runs' adapters")
    if any(ad.m is not None for ad in ads):
      raise ValueError(f"'{_path_str(key)}': per-row inference of DoRA adapters is not supported; merge each run's")
    if any((ad.param, ad.layout, ad.a.shape[:-1]) != (ref.param, ref.layout, ref.a.shape[:-1]) for ad in ads):
      raise ValueError(f"'{_path_str(key)}': the adapters of the runs differ in parameter, layout or shape")
    rank, n = max(ad.rank for ad in ads), ref.n_stack
    a = jnp.stack([jnp.pad(ad.a, [(0, 0)] * (ad.a.ndim - 1) + [(0, rank - ad.rank)]) for ad in ads], axis=n)
    r_axis = ref.b.ndim - 1 - sum(r == "out" for r in ref.layout.roles)  # B is [*stack, *shared, r, *out]
    b = jnp.stack([jnp.pad(ad.b, [(0, rank - ad.rank) if i == r_axis else (0, 0) for i in range(ad.b.ndim)])
                   for ad in ads], axis=n)
    scale = np.stack([ad.scale_array() for ad in ads], axis=-1)  # [*stack, K]
    out[key] = Adapter(a, b, ref.param, ref.layout, _nested(scale), ref.dropout, runs=len(ads))
  return _unflatten(out)


# ---------------------------------------------------------------------------------------------------------------------
# Merging.


def merge(params, adapters):
  """W + s·A·B for every adapter (DoRA: m/||W + s·A·B|| ⊙ (W + s·A·B) per column), computed in float32 and cast
  back (a quantized kernel is dequantized: the merged one is full precision); returns ``(params, max_abs_error)``.

  ``max_abs_error`` maps each merged parameter path to the largest |cast(W + s·A·B) - (W + s·A·B)|: the precision
  lost by storing the merged weight in the kernel's dtype (zero in float32, visible in bfloat16).
  """
  return _fold(params, adapters, +1.0)


def unmerge(params, adapters, norms: Mapping[Path, Any] | None = None):
  """Inverse of ``merge``: W - s·A·B in float32, cast back; returns ``(params, max_abs_error)``.

  DoRA adapters also need ``norms`` = ``dora_norms(params, adapters)`` taken before merging: the merged weight keeps
  only the direction of W + s·A·B and its column norms are m, so ||W + s·A·B|| cannot be read back from it.
  """
  return _fold(params, adapters, -1.0, norms)


def dora_norms(params, adapters) -> dict[Path, jax.Array]:
  """||W + s·A·B|| per output column of every DoRA adapter's kernel (keep them to ``unmerge`` a DoRA merge)."""
  flat = traverse_util.flatten_dict(_unboxed(params))
  def kernel(key, ad):
    w = flat[kernel_path(key, ad)]
    return quant.dequantize(w) if quant.is_quantized(w) else w

  return {key: column_norm(kernel(key, ad), ad.a, ad.b, ad.scale_array(), ad.layout, ad.n_stack)
          for key, ad in adapter_items(adapters) if ad.m is not None}


def _fold(params, adapters, sign: float, norms: Mapping[Path, Any] | None = None):
  params = _unboxed(params)
  _check_fit(params, adapters)
  tied = [_path_str(k) for k, ad in adapter_items(adapters) if ad.layout.tied]
  if tied:
    raise ValueError(
        f"adapters {tied} sit on one side of a tied embedding (lookup or output head); folding them into the "
        "shared weight would change the other side too. Untie the embedding first (a separate output kernel "
        "E^T; for this project's models model_lora.untie_embeddings) and merge into that.")
  missing = [_path_str(k) for k, ad in adapter_items(adapters) if ad.m is not None and k not in (norms or {})]
  if sign < 0 and missing:
    raise ValueError(f"unmerge of DoRA adapters {missing} needs norms=dora_norms(params, adapters) taken before "
                     "merging (a merged DoRA weight no longer holds ||W + s·A·B||)")
  flat = dict(traverse_util.flatten_dict(params))
  errors = {}
  for key, ad in adapter_items(adapters):
    path = kernel_path(key, ad)
    w = quant.dequantize(flat[path]) if quant.is_quantized(flat[path]) else flat[path]  # merged: full precision
    wide = jnp.promote_types(w.dtype, jnp.float32)
    d = delta(ad).astype(wide)
    if ad.m is None:
      exact = w.astype(wide) + sign * d
    else:
      s = ad.scale_array()
      s = s.reshape(s.shape + (1,) * (ad.m.ndim - s.ndim))
      norm = column_norm(w, ad.a, ad.b, ad.scale_array(), ad.layout, ad.n_stack) if sign > 0 else norms[key]
      factor = jnp.where(s != 0, ad.m.astype(wide) / jnp.where(s != 0, jnp.asarray(norm, wide), 1.0), 1.0)
      factor = to_kernel_axes(factor, ad.layout, ad.n_stack)
      exact = factor * (w.astype(wide) + d) if sign > 0 else w.astype(wide) / factor - d
    flat[path] = exact.astype(w.dtype)
    errors[_path_str(path)] = jnp.max(jnp.abs(flat[path].astype(wide) - exact))
  return traverse_util.unflatten_dict(flat), errors


def untie(params, adapters, embedding: Path, head: Path):
  """A tied embedding made into two weights: ``head/kernel = E^T`` (the ``attend`` side) beside ``embedding``.

  The output-side adapter (``<embedding>@attend``) moves to ``head`` as an ordinary dense adapter (its A [D, r] and
  B [r, V] are already a Dense kernel's), the input-side one stays, and neither is marked tied any more, so both
  can be merged. The model must then compute its logits with a dense ``head`` (e.g. a config with untied
  embeddings); ``apply`` on the untied tree equals ``apply`` on the tied one.
  """
  params = _unboxed(params)
  flat = dict(traverse_util.flatten_dict(params))
  if embedding + ("embedding",) not in flat:
    raise ValueError(f"no embedding '{_path_str(embedding + ('embedding',))}' to untie")
  if head + ("kernel",) in flat:
    raise ValueError(f"'{_path_str(head + ('kernel',))}' exists already: the model is not tied")
  flat[head + ("kernel",)] = jnp.swapaxes(flat[embedding + ("embedding",)], 0, 1)
  out = {}
  for key, ad in adapter_items(adapters):
    if key == attend_key(embedding):
      out[head] = ad.replace(param="kernel", layout=Layout("dense", ("in", "out")))
    else:
      out[key] = ad.replace(layout=dataclasses.replace(ad.layout, tied=False)) if ad.layout.tied else ad
  return traverse_util.unflatten_dict(flat), _unflatten(out)


# ---------------------------------------------------------------------------------------------------------------------
# Trainable vs frozen, and the optimizer.


def _extra_hits(pattern: str, path: Path) -> bool:
  if pattern == "all":
    return True
  if pattern == "bias":
    return path[-1] == "bias"
  if pattern == "norm":
    return any(_NORM_NAMES.fullmatch(str(p).lower()) for p in path[:-1])
  return _pattern_hits(pattern, path[:-1], path[-1]) or re.fullmatch(pattern, _path_str(path)) is not None


def split(params, adapters, spec: LoraSpec):
  """Splits into ``(trainable, frozen)``: trainable = {"lora": adapters, "params": extra-trainable base params}."""
  flat = traverse_util.flatten_dict(_unboxed(params))
  extra = {}
  for pattern in spec.extra_trainable:
    hits = {p: v for p, v in flat.items() if _extra_hits(pattern, p)}
    if not hits:
      raise ValueError(f"LoraSpec.extra_trainable {pattern!r} matches no parameter. Parameter paths (closest first):"
                       "\n  " + "\n  ".join(_closest(pattern, [_path_str(p) for p in flat])))
    extra.update(hits)
  quantized = [_path_str(p) for p, v in extra.items() if quant.is_quantized(v)]
  if quantized:
    raise ValueError(f"LoraSpec.extra_trainable would train quantized kernels {quantized[:3]}: a quantized base is "
                     "frozen (QLoRA); train a full-precision base for full fine-tuning")
  frozen = {p: v for p, v in flat.items() if p not in extra}
  return {"lora": adapters, "params": _unflatten(extra)}, _unflatten(frozen)


def combine(trainable, frozen):
  """Inverse of ``split``: returns ``(params, adapters)``."""
  flat = dict(traverse_util.flatten_dict(frozen))
  flat.update(traverse_util.flatten_dict(trainable["params"]))
  return traverse_util.unflatten_dict(flat), trainable["lora"]


def _label(trainable) -> Any:
  """Optimizer label of each trainable leaf: "a", "b", "m" (DoRA) or "extra"."""
  labels = {
      "lora": jax.tree.map(lambda ad: ad.replace(a="a", b="b", m=None if ad.m is None else "m"), trainable["lora"],
                           is_leaf=_is_adapter),
      "params": jax.tree.map(lambda _: "extra", trainable["params"]),
  }
  return labels


def optimizer(tx: optax.GradientTransformation, *, tx_a: optax.GradientTransformation | None = None,
              tx_b: optax.GradientTransformation | None = None,
              tx_extra: optax.GradientTransformation | None = None) -> optax.GradientTransformation:
  """Optimizer over the trainable tree from ``split``; A, B and extra params may each get their own (LoRA+); DoRA's
  magnitudes get ``tx``.

  Gradients and optimizer state exist only for the trainable tree: the frozen base has neither.
  """
  return optax.multi_transform({"a": tx_a or tx, "b": tx_b or tx, "m": tx, "extra": tx_extra or tx}, _label)


# ---------------------------------------------------------------------------------------------------------------------
# Counting, summary and shardings.


def count(adapters) -> int:
  """Trainable adapter parameters, not counting layers left out by ``LoraSpec.layers`` (kept at zero)."""
  total = 0
  for _, ad in adapter_items(adapters):
    active = int(np.count_nonzero(ad.scale_array()))
    size = ad.a.size + ad.b.size + (0 if ad.m is None else ad.m.size)
    per_layer = size // max(1, int(np.prod(ad.scale_array().shape)))
    total += active * per_layer
  return total


def summary(params, adapters, spec: LoraSpec | None = None) -> str:
  """A readable table: which parameters got adapters, shapes, rank, scale, trainable count and percent."""
  flat = traverse_util.flatten_dict(_unboxed(params))
  n_base = sum(int(np.prod(np.shape(v))) for v in flat.values())
  rows = [("parameter", "shape", "A", "B", "rank", "scale")]
  for key, ad in adapter_items(adapters):
    path = kernel_path(key, ad)
    s = ad.scale_array()
    nz = s[s != 0]
    scale = f"{nz.flat[0]:.4g}" if nz.size and np.all(nz == nz.flat[0]) else "varies"
    if s.ndim and np.count_nonzero(s) < s.size:
      scale += f" ({np.count_nonzero(s)}/{s.size} layers)"
    rank = str(ad.rank)
    if spec is not None:
      asked = int(_first_pattern_value(spec.rank_pattern, key, ad.param, spec.rank))
      rank += f" (clipped from {asked})" if asked != ad.rank else ""
    side = {"attend": " (output side)", "embed": " (input side)"}.get(ad.layout.kind, "") if ad.layout.tied else ""
    rows.append((_path_str(path) + side, str(tuple(flat[path].shape)), str(tuple(ad.a.shape)),
                 str(tuple(ad.b.shape)), rank, scale))
  widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
  lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
  lines.insert(1, "  ".join("-" * w for w in widths))
  n_lora = count(adapters)
  n_extra = 0
  if spec is not None:
    trainable, _ = split(params, adapters, spec)
    n_extra = sum(int(np.prod(np.shape(v))) for v in jax.tree.leaves(trainable["params"]))
  n_train = n_lora + n_extra
  lines.append(f"adapters: {len(rows) - 1}; adapter params: {n_lora:,}; extra trainable base params: {n_extra:,}")
  lines.append(f"trainable: {n_train:,} of {n_base + n_lora:,} ({100.0 * n_train / max(1, n_base + n_lora):.4f}%)")
  return "\n".join(lines)


def adapter_partition_specs(adapters, kernel_specs):
  """Shardings for the adapters, from the kernels': A follows the kernel's input axes, B (and DoRA's m) its output axes.

  ``kernel_specs`` is a tree like ``params`` whose leaves are ``PartitionSpec`` or ``NamedSharding``. Returns a tree
  like ``adapters`` (``Adapter`` nodes holding specs/shardings in ``a`` and ``b``); the rank axis is replicated.
  """
  flat = traverse_util.flatten_dict(kernel_specs, is_leaf=lambda _, x: isinstance(x, (jax.sharding.PartitionSpec,
                                                                                    jax.sharding.NamedSharding)))
  out = {}
  for key, ad in adapter_items(adapters):
    path = kernel_path(key, ad)
    if path not in flat:
      raise ValueError(f"no sharding given for '{_path_str(path)}'")
    spec = flat[path]
    mesh = spec.mesh if isinstance(spec, jax.sharding.NamedSharding) else None
    pspec = spec.spec if mesh is not None else spec
    ndim = ad.n_stack + len(ad.layout.roles)
    axes = tuple(pspec) + (None,) * (ndim - len(pspec))
    stack, inner = axes[: ad.n_stack], axes[ad.n_stack :]
    shared, ins, outs = _layout_axes(ad.layout)
    a = jax.sharding.PartitionSpec(*stack, *(inner[i] for i in shared + ins), None)
    b = jax.sharding.PartitionSpec(*stack, *(inner[i] for i in shared), None, *(inner[i] for i in outs))
    m = None if ad.m is None else jax.sharding.PartitionSpec(*stack, *(inner[i] for i in shared + outs))
    if mesh is not None:
      a, b = jax.sharding.NamedSharding(mesh, a), jax.sharding.NamedSharding(mesh, b)
      m = None if m is None else jax.sharding.NamedSharding(mesh, m)
    out[key] = ad.replace(a=a, b=b, m=m)
  return _unflatten(out)
