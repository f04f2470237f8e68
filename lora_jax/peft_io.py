"""PEFT LoRA adapter directories (adapter_config.json + adapter_model.safetensors) <-> adapter trees.

`save_peft` writes an adapter tree as a PEFT directory (optionally `for_serving`, in the form vLLM and SGLang compute
exactly), `load_peft` reads one back into adapters and the LoraSpec that makes them, `read_peft` / `peft_modules`
inspect one as stored. Module names come from `lora_jax.hf` (`hf_module_name`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import json
import math
import os
import pathlib
import re
from typing import Any

import flax.traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import safetensors.numpy

from lora_jax import lora
from lora_jax.hf import TensorEntry, hf_module_name, natural_key, open_safetensors, param_shapes, tensor_entries
from lora_jax.models.transformer import ModelConfig

# PEFT LoRA adapters (adapter_config.json + adapter_model.safetensors).
#
# Tensor keys are `base_model.model.<HF module>.lora_A.weight` [r, in] (our A transposed) and `.lora_B.weight`
# [out, r] (our B transposed); embeddings use `.lora_embedding_A` [r, vocab] and `.lora_embedding_B` [dim, r].
# Scan-stacked adapters are written one module per layer, MoE expert adapters one module per expert
# (`model.layers.{i}.mlp.experts.{e}.gate_proj`, the transformers 4 layout, which PEFT on transformers 5 converts to
# its fused experts on load). Per-module ranks and alphas become PEFT `rank_pattern` / `alpha_pattern` entries, keyed
# by the HF leaf name ('q_proj') where all such modules agree and by the full module name otherwise; PEFT matches a
# key k against a module name n by `re.match(rf"(.*\.)?({k})$", n)`.

PEFT_CONFIG_FILE = "adapter_config.json"
PEFT_WEIGHTS_FILE = "adapter_model.safetensors"
VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # The ranks vLLM accepts (--max-lora-rank choices).
_PEFT_PREFIX = "base_model.model."
_PEFT_SUFFIXES = {".lora_A.weight": "a", ".lora_B.weight": "b", ".lora_embedding_A": "a", ".lora_embedding_B": "b",
                  ".lora_magnitude_vector": "m"}  # m: DoRA's magnitude [out]
_EXPERT_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
# adapter_config.json fields that change the adapted function in ways an Adapter tree cannot hold: field -> value
# that is fine.
_PEFT_UNSUPPORTED = {"bias": "none", "modules_to_save": None, "lora_bias": False,
                     "fan_in_fan_out": False, "target_parameters": None, "trainable_token_indices": None,
                     "layer_replication": None, "use_qalora": False, "alora_invocation_tokens": None,
                     "use_bdlora": None}


@dataclasses.dataclass(frozen=True)
class _Slice:
  """One PEFT LoRA module and where its A and B live in our adapter tree."""
  name: str  # HF module name, e.g. 'model.layers.0.self_attn.q_proj'.
  module_path: tuple[str, ...]  # Key of the adapter in our tree.
  index: tuple[int, ...]  # Index into the adapter's stack axis (scanned layers), then its expert axis.
  embed: bool  # An nn.Embed adapter: PEFT lora_embedding_A / lora_embedding_B.
  expert: bool  # One expert of a stacked MoE kernel.
  rank: int
  scale: float


def _slices(adapters) -> list[_Slice]:
  """Every PEFT module of an adapter tree; layers that LoraSpec.layers leaves out of a scanned kernel are skipped."""
  out = []
  for module_path, ad in lora.adapter_items(adapters):
    where = "/".join(module_path)
    expert = ad.layout.roles == ("shared", "in", "out") and "experts" in module_path
    head = ad.layout.kind == "attend"  # a tied model's output side: PEFT's lm_head (lora_A [r, D], lora_B [V, r])
    if ad.layout.roles != ("in", "out") and not expert and not head:
      raise ValueError(f"adapter '{where}' has kernel axes {ad.layout.roles}; PEFT holds LoRA of 2-D weights and "
                       "of stacked MoE experts only")
    scale = ad.scale_array()
    if scale.ndim > 1 or (scale.ndim == 1 and "layers" not in module_path):
      raise ValueError(f"adapter '{where}' has stack axes {scale.shape}; only a scanned layer axis is supported")
    for stack in np.ndindex(scale.shape):
      s = float(scale[stack])
      if stack and s == 0.0:
        continue  # A layer left out by LoraSpec.layers inside a scan-stacked kernel: not an adapter at all.
      layer = stack[0] if stack else None
      for e in range(ad.a.shape[len(stack)]) if expert else [None]:
        name = "lm_head" if head else hf_module_name(module_path, layer, e)
        out.append(_Slice(name, tuple(module_path),
                          stack + (() if e is None else (e,)), ad.layout.kind == "embed", expert, ad.rank, s))
  return out


def serving_rank(rank: int) -> int:
  """The smallest rank vLLM accepts that is >= `rank` (what `for_serving` pads to); above 512 is an error."""
  for allowed in VLLM_RANKS:
    if rank <= allowed:
      return allowed
  raise ValueError(f"rank {rank} is above 512, the largest LoRA rank vLLM serves; merge the adapter instead "
                   "(python -m lora_jax.cli.export --merged)")


def _json_number(x: float):
  return int(x) if float(x).is_integer() else float(x)


def _peft_alpha(scale: float, rank: int, rslora: bool) -> float:
  """The PEFT lora_alpha giving `scale` (alpha/r, or alpha/sqrt(r) with rsLoRA), rounded to float32 precision."""
  alpha = scale * (math.sqrt(rank) if rslora else rank)
  return float(str(np.float32(alpha)))  # Our scales are float32; this drops the float32 rounding noise.


def _compress_patterns(values: dict[Any, float], default, leaf=lambda n: n.rsplit(".", 1)[-1], full=str):
  """Pattern dict for per-module values: one `leaf` key where all modules of that leaf agree, else `full` keys.

  Modules whose value is the default get no entry. Works for HF names (PEFT patterns) and, with other `leaf` and
  `full` functions, for our module paths (LoraSpec patterns).
  """
  by_leaf: dict[str, list] = {}
  for module in values:
    by_leaf.setdefault(leaf(module), []).append(module)
  out = {}
  for name, modules in sorted(by_leaf.items()):
    if len({values[m] for m in modules}) == 1:
      modules = modules[:1]
      keys = [name]
    else:
      modules = sorted(modules, key=lambda m: natural_key(full(m)))
      keys = [full(m) for m in modules]
    for key, m in zip(keys, modules):
      if not math.isclose(values[m], default, rel_tol=1e-6):
        out[key] = _json_number(values[m])
  return out


def _check_peft_experts(config: ModelConfig, slices: list[_Slice], ranks: dict, alphas: dict, r: int,
                        alpha: float, rslora: bool):
  """Refuses MoE adapters that PEFT on transformers 5 would load into a different function."""
  problems = []
  if config.architecture == "qwen3_moe":
    dense = sorted({s.name for s in slices if not s.expert and s.name.rsplit(".", 1)[-1] in _EXPERT_PROJECTIONS},
                   key=natural_key)
    if dense:
      problems.append(f"adapters on the dense MLP of layers without experts ({dense[0]}, ...): for qwen3_moe PEFT "
                      "maps the names gate_proj/up_proj/down_proj to the fused experts, so it would drop them; "
                      "leave these layers' MLP out (LoraSpec.exclude)")
  experts = [s for s in slices if s.expert]
  if experts and rslora:
    problems.append("expert adapters with rsLoRA: PEFT fuses gate_proj and up_proj into one rank-2r LoRA and would "
                    "scale it by alpha/sqrt(2r); use scaling 'alpha/r', or for_serving (which folds the scales)")
  odd = sorted({s.name for s in experts if ranks[s.name] != r or not math.isclose(alphas[s.name], alpha,
                                                                                    rel_tol=1e-6)},
               key=natural_key)
  if odd:
    problems.append(f"expert adapters with a rank or alpha other than the global r={r}, lora_alpha={alpha} "
                    f"({odd[0]}, ...): PEFT ignores rank_pattern/alpha_pattern for fused experts; use for_serving "
                    "(which folds the scales and pads ranks)")
  by_layer: dict[str, set[str]] = {}
  for s in experts:
    prefix, _, rest = s.name.partition(".experts.")
    by_layer.setdefault(prefix, set()).add(rest.rsplit(".", 1)[-1])
  for prefix, kinds in sorted(by_layer.items(), key=lambda kv: natural_key(kv[0])):
    if ("gate_proj" in kinds) != ("up_proj" in kinds):
      problems.append(f"{prefix}.experts: only one of gate_proj/up_proj is adapted; PEFT fuses them into "
                      "gate_up_proj and can load both or neither")
  if problems:
    raise ValueError("these adapters can't be written as a PEFT adapter that loads correctly:\n  "
                     + "\n  ".join(problems))


def save_peft(params_config: ModelConfig, adapters, spec: lora.LoraSpec, out_dir: str | os.PathLike,
              base_model_name_or_path: str, for_serving: bool = False) -> None:
  """Writes `adapters` as a PEFT LoRA directory; `for_serving` folds every scale into B and pads to a vLLM rank.

  Normal export keeps rank, alpha, rsLoRA and per-module rank/alpha patterns (PEFT reproduces our function
  exactly). `for_serving` writes what vLLM and SGLang compute correctly: every module's scale folded into B, all
  ranks zero-padded to one vLLM rank R (`serving_rank` of the largest rank), r = lora_alpha = R, no patterns, no
  rsLoRA; padding adds zero rows/columns, so the function is unchanged. On a tied model the two sides are apart, as
  in PEFT: the `embed` adapter (lookup) is `embed_tokens`' lora_embedding_A/B, the `unembed` adapter (our
  `Embed.attend` side) is `lm_head`'s lora_A/B.
  """
  config = params_config
  if spec.extra_trainable:
    raise ValueError(f"the spec also trains base parameters (extra_trainable={list(spec.extra_trainable)}), which "
                     "a PEFT LoRA adapter does not carry; export a merged model instead")
  slices = _slices(adapters)
  if not slices:
    raise ValueError("no adapters to export")
  tree = dict(lora.adapter_items(adapters))
  dora = [s.name for s in slices if tree[s.module_path].m is not None]
  if dora and (for_serving or len(dora) != len(slices) or any(s.expert for s in slices)):
    raise ValueError("DoRA adapters export to PEFT only as plain DoRA on linear layers (every adapter DoRA, no MoE "
                     "experts) and never for serving (vLLM and SGLang serve LoRA, not DoRA): export a merged model "
                     f"instead (DoRA modules: {dora[:3]})")
  rslora = spec.scaling == "alpha/sqrt(r)" and not for_serving
  if for_serving:
    r = serving_rank(max(s.rank for s in slices))
    alpha = float(r)
  else:
    r = spec.rank
    alpha = float(spec.rank if spec.scaling == "none" else spec.alpha)  # s = 1 is alpha = r.

  ranks, alphas, tensors = {}, {}, {}

  def put(name, a_in_r, b_r_out, embed):  # our layout: A [in, r], B [r, out]
    kind = ("lora_embedding_A", "lora_embedding_B") if embed else ("lora_A.weight", "lora_B.weight")
    tensors[f"{_PEFT_PREFIX}{name}.{kind[0]}"] = np.ascontiguousarray(a_in_r.T)
    tensors[f"{_PEFT_PREFIX}{name}.{kind[1]}"] = np.ascontiguousarray(b_r_out.T)

  for s in slices:
    ad = tree[s.module_path]
    dtype = np.dtype(ad.a.dtype)
    a = np.asarray(jax.device_get(ad.a[s.index]), np.float32)
    b = np.asarray(jax.device_get(ad.b[s.index]), np.float32)
    if for_serving:
      b = b * s.scale
      a = np.pad(a, ((0, 0), (0, r - s.rank)))
      b = np.pad(b, ((0, r - s.rank), (0, 0)))
      ranks[s.name], alphas[s.name] = r, alpha
    else:
      ranks[s.name], alphas[s.name] = s.rank, _peft_alpha(s.scale, s.rank, rslora)
    a, b = a.astype(dtype), b.astype(dtype)
    put(s.name, a, b, s.embed)
    if ad.m is not None:
      m = np.asarray(jax.device_get(ad.m[s.index]), np.float32)
      tensors[f"{_PEFT_PREFIX}{s.name}.lora_magnitude_vector"] = np.ascontiguousarray(m.astype(dtype))
  _check_peft_experts(config, slices, ranks, alphas, r, alpha, rslora)

  adapter_config = dict(
      peft_type="LORA", task_type="CAUSAL_LM", base_model_name_or_path=str(base_model_name_or_path),
      r=r, lora_alpha=_json_number(alpha), use_rslora=rslora,
      target_modules=sorted({n.rsplit(".", 1)[-1] for n in ranks}),
      rank_pattern=_compress_patterns(ranks, r), alpha_pattern=_compress_patterns(alphas, alpha),
      # PEFT's default layers_pattern (None) takes the first number in a module name: the layer index here.
      layers_to_transform=None if spec.layers is None else list(spec.layers), layers_pattern=None,
      lora_dropout=spec.dropout, init_lora_weights="gaussian" if spec.init_a == "gaussian" else True,
      bias="none", use_dora=bool(dora), modules_to_save=None, fan_in_fan_out=False, inference_mode=True,
      ensure_weight_tying=False, exclude_modules=None, target_parameters=None, lora_bias=False)
  out_dir = pathlib.Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  safetensors.numpy.save_file(tensors, str(out_dir / PEFT_WEIGHTS_FILE), metadata={"format": "pt"})
  with open(out_dir / PEFT_CONFIG_FILE, "w") as f:
    json.dump(adapter_config, f, indent=2)
    f.write("\n")


def read_peft(adapter_dir: str | os.PathLike) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
  """(adapter_config dict, {tensor key: array}) of a PEFT directory, read as stored."""
  root = pathlib.Path(adapter_dir)
  if not (root / PEFT_CONFIG_FILE).exists():
    raise FileNotFoundError(f"{root}: no {PEFT_CONFIG_FILE}; not a PEFT adapter directory")
  if not (root / PEFT_WEIGHTS_FILE).exists():
    found = sorted(p.name for p in root.iterdir())
    raise FileNotFoundError(f"{root}: no {PEFT_WEIGHTS_FILE} (found {found}); a .bin adapter must be converted "
                            "to safetensors first")
  with open(root / PEFT_CONFIG_FILE) as f:
    adapter_config = json.load(f)
  with contextlib.ExitStack() as stack:
    handle = open_safetensors(stack, root / PEFT_WEIGHTS_FILE)
    tensors = {k: handle.get_tensor(k) for k in handle.keys()}
  return adapter_config, tensors


def _peft_pattern_value(patterns: dict[str, Any] | None, name: str, default):
  """The value PEFT uses for module `name` (first key k with re.match(rf'(.*\\.)?({k})$', name))."""
  for key, value in (patterns or {}).items():
    if re.match(rf"(.*\.)?({key})$", name):
      return value
  return default


def peft_modules(tensors: dict[str, np.ndarray]) -> tuple[dict[str, dict[str, Any]], list[str]]:
  """Groups PEFT tensors by module: ({HF module name: {'a', 'b' (as stored), 'm' (DoRA), 'embed'}}, problems)."""
  modules: dict[str, dict[str, Any]] = {}
  problems = []
  for key, value in tensors.items():
    if key.endswith(".base_layer.weight"):
      continue  # PEFT also saves copies of adapted embedding weights; the base model has them.
    suffix = next((s for s in _PEFT_SUFFIXES if key.endswith(s)), None)
    if suffix is None or not key.startswith(_PEFT_PREFIX):
      problems.append(f"{key}: not a LoRA tensor (expected {_PEFT_PREFIX}<module>.lora_A.weight / lora_B.weight / "
                      "lora_embedding_A / lora_embedding_B / lora_magnitude_vector)")
      continue
    name = key[len(_PEFT_PREFIX):-len(suffix)]
    kind = _PEFT_SUFFIXES[suffix]
    entry = modules.setdefault(name, {"embed": "embedding" in suffix})
    entry[kind] = value
    if kind != "m" and entry["embed"] != ("embedding" in suffix):
      problems.append(f"{name}: mixes lora_A/B and lora_embedding_A/B tensors")
  for name, entry in modules.items():
    if "a" not in entry or "b" not in entry:
      problems.append(f"{name}: has lora_{'A' if 'a' in entry else 'B'} but not lora_{'B' if 'a' in entry else 'A'}")
  return modules, problems


def load_peft(adapter_dir: str | os.PathLike, params, config: ModelConfig,
              layouts=None) -> tuple[Any, lora.LoraSpec]:
  """Reads a PEFT LoRA directory into (adapters, LoraSpec) for `params`; the spec reproduces rank, alpha, patterns.

  Everything is checked before anything is built: a module the model lacks, a tensor whose shape does not fit its
  kernel, or a PEFT feature an adapter tree can't hold (bias, modules_to_save, ...) raises one ValueError
  listing every problem. `layouts` (lora.trace_layouts) is needed for scanned layers and MoE experts.
  """
  adapter_config, tensors = read_peft(adapter_dir)
  where = str(adapter_dir)
  problems = []
  if adapter_config.get("peft_type") != "LORA":
    problems.append(f"peft_type is {adapter_config.get('peft_type')!r}, not 'LORA'")
  for field, fine in _PEFT_UNSUPPORTED.items():
    value = adapter_config.get(field, fine)
    if value != fine and not (fine is None and not value):
      problems.append(f"{field}={value!r} is not supported (only {fine!r})")
  layers_pattern = adapter_config.get("layers_pattern")
  if layers_pattern not in (None, "", "layers", ["layers"]):
    problems.append(f"layers_pattern={layers_pattern!r}: only 'layers' is supported")
  modules, tensor_problems = peft_modules(tensors)
  problems += tensor_problems
  modules = {n: m for n, m in modules.items() if "a" in m and "b" in m}  # The incomplete ones are problems already.

  dora = bool(adapter_config.get("use_dora", False))
  for name, m in modules.items():
    if dora != ("m" in m):
      problems.append(f"{name}: " + ("no lora_magnitude_vector, but use_dora is true" if dora
                                     else "a lora_magnitude_vector, but use_dora is not true"))
  r, alpha = int(adapter_config.get("r", 8)), float(adapter_config.get("lora_alpha", 8))
  rslora = bool(adapter_config.get("use_rslora", False))
  rank_pattern, alpha_pattern = adapter_config.get("rank_pattern") or {}, adapter_config.get("alpha_pattern") or {}

  entries = {e.key[: -len(".weight")]: e for e in tensor_entries(config, param_shapes(config))}
  if config.tie_word_embeddings:  # lm_head is the output side of the tied embedding: our `embed_tokens@attend`
    e = entries["model.embed_tokens"]
    entries["lm_head"] = dataclasses.replace(e, key="lm_head.weight", path=lora.attend_key(e.path[:-1]) + e.path[-1:])
  found: dict[str, tuple[TensorEntry, int, float, float]] = {}  # HF module name -> (entry, rank, alpha, scale)
  for name, m in sorted(modules.items(), key=lambda kv: natural_key(kv[0])):
    e = entries.get(name)
    if e is None or e.path[-1] not in lora.MATRIX_PARAMS:
      close = _closest_names(name, entries)
      problems.append(f"{name}: no such {'matrix ' if e is not None else ''}module in this {config.architecture} "
                      f"model (closest: {close})")
      continue
    a, b = m["a"], m["b"]
    rank = a.shape[0] if a.ndim else 0
    lookup = e.path[-1] == "embedding" and not e.path[-2].endswith(lora.ATTEND_SUFFIX)
    if lookup:  # torch [V, D]: lora_embedding_A [r, V], lora_embedding_B [D, r]
      want_a, want_b = (rank, e.hf_shape[0]), (e.hf_shape[1], rank)
    else:  # torch [out, in]: lora_A [r, in], lora_B [out, r]
      want_a, want_b = (rank, e.hf_shape[1]), (e.hf_shape[0], rank)
    if m["embed"] != lookup:
      problems.append(f"{name}: {'embedding' if m['embed'] else 'linear'} LoRA tensors on a "
                      f"{'linear' if m['embed'] else 'embedding'} module")
    elif a.ndim != 2 or b.ndim != 2 or tuple(a.shape) != want_a or tuple(b.shape) != want_b:
      problems.append(f"{name}: A {tuple(a.shape)}, B {tuple(b.shape)} do not fit its weight "
                      f"{e.hf_shape} (expected A {want_a}, B {want_b})")
    elif "m" in m and (m["embed"] or tuple(m["m"].shape) != (e.hf_shape[0],)):
      problems.append(f"{name}: lora_magnitude_vector {tuple(m['m'].shape)} does not fit its weight {e.hf_shape} "
                      f"(expected ({e.hf_shape[0]},): DoRA on linear layers)")
    elif _peft_pattern_value(rank_pattern, name, r) != rank:
      problems.append(f"{name}: tensors have rank {rank} but the config gives it rank "
                      f"{_peft_pattern_value(rank_pattern, name, r)}")
    else:
      a_m = float(_peft_pattern_value(alpha_pattern, name, alpha))
      found[name] = (e, rank, a_m, a_m / (math.sqrt(rank) if rslora else rank))
  if not modules and not problems:
    problems.append("the adapter holds no LoRA tensors")
  if problems:
    raise ValueError(f"PEFT adapter {where} can't be loaded into this {config.architecture} model:\n  "
                     + "\n  ".join(problems))

  spec, template = _spec_for(found, adapter_config, params, layouts, modules, where)
  return _fill(template, modules, spec), spec


def _closest_names(name: str, entries: dict) -> str:
  return ", ".join(difflib.get_close_matches(name, list(entries), n=3, cutoff=0.0))


def _spec_for(found, adapter_config, params, layouts, modules, where):
  """A LoraSpec whose lora.create gives exactly the modules, ranks and scales of the PEFT adapter, and its template."""
  per_path: dict[tuple[str, ...], list[tuple[int, float]]] = {}
  alpha = float(adapter_config.get("lora_alpha", 8))
  rslora = bool(adapter_config.get("use_rslora", False))
  for e, rank, alpha_m, _ in found.values():
    per_path.setdefault(e.path[:-1], []).append((rank, alpha_m))
  ranks, alphas = {}, {}
  for path, values in per_path.items():
    if len({v[0] for v in values}) > 1 or len({v[1] for v in values}) > 1:
      raise ValueError(f"PEFT adapter {where}: the layers or experts stacked in '{'/'.join(path)}' have different "
                       "ranks or alphas, which one stacked adapter can't hold; load with scan_layers=False")
    ranks[path], alphas[path] = values[0][0], values[0][1]

  path_keys = (lambda path: path[-1], "/".join)  # LoraSpec patterns: a plain name, or the '/'-joined path.
  layers = adapter_config.get("layers_to_transform")
  dtypes = {np.dtype(m[k].dtype).name for m in modules.values() for k in ("a", "b")}
  init = adapter_config.get("init_lora_weights", True)
  base = dict(rank=int(adapter_config.get("r", 8)), alpha=alpha, scaling="alpha/sqrt(r)" if rslora else "alpha/r",
              rank_pattern=_compress_patterns(ranks, int(adapter_config.get("r", 8)), *path_keys),
              alpha_pattern=_compress_patterns(alphas, alpha, *path_keys),
              layers=None if layers is None else ([layers] if isinstance(layers, int) else list(layers)),
              dropout=float(adapter_config.get("lora_dropout", 0.0)),
              init_a="gaussian" if init == "gaussian" else "uniform",
              dtype=dtypes.pop() if len(dtypes) == 1 else "float32",
              variant="dora" if adapter_config.get("use_dora") else "lora")
  wanted = set(found)
  leaf_targets = tuple(sorted({p[-1] for p in per_path}))
  path_targets = tuple(sorted("/".join(p) for p in per_path))
  for targets in (leaf_targets, path_targets):
    spec = lora.LoraSpec(targets=targets, **base)
    try:
      _, template = lora.create(params, spec, jax.random.key(0), layouts=layouts)
    except ValueError as err:
      raise ValueError(f"PEFT adapter {where}: can't build matching adapters: {err}") from err
    slices = {s.name: s for s in _slices(template)}
    if set(slices) == wanted:
      break
  else:
    extra = sorted(set(slices) - wanted, key=natural_key)
    missing = sorted(wanted - set(slices), key=natural_key)
    raise ValueError(f"PEFT adapter {where}: its set of adapted modules can't be expressed as a LoraSpec for these "
                     f"params (layers of one scanned kernel adapted differently?); the spec would also adapt "
                     f"{extra[:5]} and miss {missing[:5]}; try scan_layers=False")
  bad = [n for n, s in slices.items() if not math.isclose(s.scale, found[n][3], rel_tol=1e-6)]
  if bad:
    raise ValueError(f"PEFT adapter {where}: scales of {bad[:5]} can't be reproduced by a LoraSpec")
  return spec, template


def _fill(template, modules, spec: lora.LoraSpec):
  """The template adapters with A, B (our layout: their transposes) and DoRA's m taken from the PEFT tensors."""
  tree = dict(lora.adapter_items(template))
  arrays = {path: (np.zeros(ad.a.shape, np.float32), np.zeros(ad.b.shape, np.float32),
                   None if ad.m is None else np.array(ad.m, np.float32)) for path, ad in tree.items()}
  for s in _slices(template):
    m = modules[s.name]
    a, b, mag = arrays[s.module_path]
    a[s.index] = m["a"].T
    b[s.index] = m["b"].T
    if mag is not None:
      mag[s.index] = m["m"]
  dtype = jnp.dtype(spec.dtype)
  filled = {path: ad.replace(a=jnp.asarray(arrays[path][0], dtype), b=jnp.asarray(arrays[path][1], dtype),
                             m=None if ad.m is None else jnp.asarray(arrays[path][2], dtype))
            for path, ad in tree.items()}
  return flax.traverse_util.unflatten_dict(filled)
