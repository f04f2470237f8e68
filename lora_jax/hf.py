"""Hugging Face checkpoint I/O: config.json <-> ModelConfig, safetensors <-> Flax parameter trees.

Supported architectures: LlamaForCausalLM, MistralForCausalLM, Qwen3ForCausalLM, Qwen3MoeForCausalLM. Both
config spellings are read: transformers 4 (`rope_theta`, `rope_scaling`, `torch_dtype`) and transformers 5
(`rope_parameters`, `dtype`). Tensors are read one at a time through `safetensors.safe_open` (memory-mapped), so
loading holds the finished tree plus one tensor, never two copies of the model. Every key and shape is checked
against the config before any tensor data is read: an error leaves nothing half-loaded.

Name mapping (`hf_key`, `hf_module_name`, `param_path`): our param path
`('model', 'layers_0', 'self_attn', 'q_proj', 'kernel')` is HF's `model.layers.0.self_attn.q_proj.weight`; with
`scan_layers` the path has `layers` and the layer index is the leading axis of the array; MoE expert kernels
`mlp/experts/{gate,up,down}_proj` hold all experts on their leading axis and map to
`model.layers.{i}.mlp.experts.{e}.{gate,up,down}_proj.weight`. torch Linear weights are `[out, in]`, our kernels
`[in, out]`: transposed both ways.

PEFT LoRA adapters: `save_peft` writes an adapter tree as a PEFT directory (optionally `for_serving` in the form
vLLM and SGLang compute exactly), `load_peft` reads one back into adapters and the LoraSpec that makes them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import itertools
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
import safetensors
import safetensors.numpy

from lora_jax import lora
from lora_jax.models.transformer import ModelConfig, abstract_params

# HF class name -> our architecture (HF model_type).
SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen3ForCausalLM": "qwen3",
    "Qwen3MoeForCausalLM": "qwen3_moe",
}
_HF_CLASS = {v: k for k, v in SUPPORTED_ARCHITECTURES.items()}
_LEAF_NAMES = ("kernel", "embedding", "scale")
# Checkpoint tensors that carry no parameter of ours and are skipped (old Llama checkpoints stored RoPE buffers).
_IGNORED_KEYS = re.compile(r".*\.rotary_emb\.inv_freq")
_INDEX_FILE = "model.safetensors.index.json"
_SINGLE_FILE = "model.safetensors"


# ----------------------------------------------------------------------------------------------------------------
# Locating a checkpoint.


def resolve_checkpoint(path_or_hub_id: str | os.PathLike, revision: str | None = None) -> pathlib.Path:
  """A local directory for a local path, or for a hub id ('org/name') a snapshot fetched by huggingface_hub."""
  path = pathlib.Path(path_or_hub_id).expanduser()
  if path.exists():
    return path.parent if path.is_file() else path
  name = str(path_or_hub_id)
  if re.fullmatch(r"[\w.-]+/[\w.-]+", name) and not name.startswith("."):
    from huggingface_hub import snapshot_download  # Only users with network access reach this line.
    return pathlib.Path(snapshot_download(
        name, revision=revision, ignore_patterns=["*.bin", "*.pth", "*.pt", "*.gguf", "*.h5", "*.msgpack",
                                                  "original/*"]))
  raise FileNotFoundError(f"{name}: no such local checkpoint directory, and not a hub id of the form org/name")


# ----------------------------------------------------------------------------------------------------------------
# config.json.


def load_config(path_or_hub_id: str | os.PathLike, **changes) -> ModelConfig:
  """Reads config.json (transformers 4 or 5 spelling) into a ModelConfig; `changes` override fields."""
  root = resolve_checkpoint(path_or_hub_id)
  with open(root / "config.json") as f:
    raw = json.load(f)
  return config_from_hf_dict(raw, source=str(root / "config.json")).replace(**changes)


def config_from_hf_dict(raw: dict[str, Any], source: str = "config") -> ModelConfig:
  """Converts a parsed HF config.json dict into a ModelConfig; unsupported features raise."""
  archs = raw.get("architectures") or []
  if len(archs) != 1 or archs[0] not in SUPPORTED_ARCHITECTURES:
    raise ValueError(f"{source}: architecture {archs} is not supported; supported: "
                     f'{", ".join(SUPPORTED_ARCHITECTURES)}')
  arch = SUPPORTED_ARCHITECTURES[archs[0]]

  def unsupported(what):
    raise NotImplementedError(f"{source}: {what} is not supported by lora_jax.models")

  if raw.get("hidden_act", "silu") != "silu":
    unsupported(f'hidden_act={raw["hidden_act"]!r}')
  if raw.get("attention_bias") or raw.get("mlp_bias"):
    unsupported("attention_bias / mlp_bias")

  # transformers 5 nests rope under rope_parameters; transformers 4 has rope_theta and rope_scaling at top level.
  rope = dict(raw.get("rope_parameters") or raw.get("rope_scaling") or {})
  rope_theta = float(rope.pop("rope_theta", raw.get("rope_theta", 10000.0)))
  rope_type = rope.pop("rope_type", rope.pop("type", "default"))
  if rope.pop("partial_rotary_factor", 1.0) != 1.0:
    unsupported("partial_rotary_factor != 1")
  if rope_type == "default":
    rope_scaling = None
  elif rope_type == "llama3":
    rope_scaling = {k: rope[k] for k in ("factor", "low_freq_factor", "high_freq_factor",
                                         "original_max_position_embeddings")}
  else:
    unsupported(f"rope_type={rope_type!r} (only default and llama3)")

  num_layers = raw["num_hidden_layers"]
  if arch == "mistral":
    sliding_window = raw.get("sliding_window", 4096)  # MistralConfig's default when the key is absent.
  elif arch in ("qwen3", "qwen3_moe") and raw.get("use_sliding_window"):
    sliding_window = raw.get("sliding_window", 4096)
    if arch == "qwen3":  # Qwen3 slides only in layers >= max_window_layers (or as listed in layer_types).
      types = raw.get("layer_types") or ["sliding_attention" if i >= raw.get("max_window_layers", 28)
                                         else "full_attention" for i in range(num_layers)]
      if len(set(types)) > 1:
        unsupported("Qwen3 with sliding attention in only some layers")
      sliding_window = sliding_window if types[0] == "sliding_attention" else None
  else:
    sliding_window = None

  num_heads = raw["num_attention_heads"]
  default_head_dim = 128 if arch == "qwen3" else raw["hidden_size"] // num_heads  # HF class defaults.
  dtype = raw.get("dtype") or raw.get("torch_dtype") or "float32"
  fields = dict(
      architecture=arch, vocab_size=raw["vocab_size"], hidden_size=raw["hidden_size"],
      intermediate_size=raw["intermediate_size"], num_layers=num_layers, num_heads=num_heads,
      num_kv_heads=raw.get("num_key_value_heads") or num_heads, head_dim=raw.get("head_dim") or default_head_dim,
      rms_norm_eps=raw.get("rms_norm_eps", 1e-6), rope_theta=rope_theta, rope_scaling=rope_scaling,
      max_position_embeddings=raw.get("max_position_embeddings", 8192),
      tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)), sliding_window=sliding_window,
      qk_norm=arch in ("qwen3", "qwen3_moe"), param_dtype=dtype, dtype=dtype,
      initializer_range=raw.get("initializer_range", 0.02))
  if arch == "qwen3_moe":
    fields.update(
        num_experts=raw["num_experts"] if "num_experts" in raw else raw["num_local_experts"],
        num_experts_per_tok=raw["num_experts_per_tok"], moe_intermediate_size=raw["moe_intermediate_size"],
        norm_topk_prob=bool(raw.get("norm_topk_prob", False)), decoder_sparse_step=raw.get("decoder_sparse_step", 1),
        mlp_only_layers=tuple(raw.get("mlp_only_layers") or ()))
  return ModelConfig(**fields)


def config_to_hf_dict(config: ModelConfig, dtype: str | None = None) -> dict[str, Any]:
  """The HF config.json dict for `config`, readable by transformers 5 and (through duplicate keys) 4."""
  dtype = jnp.dtype(dtype or config.param_dtype).name
  rope_scaling = None if config.rope_scaling is None else {"rope_type": "llama3", **config.rope_scaling}
  raw = dict(
      architectures=[_HF_CLASS[config.architecture]], model_type=config.architecture,
      vocab_size=config.vocab_size, hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
      num_hidden_layers=config.num_layers, num_attention_heads=config.num_heads,
      num_key_value_heads=config.num_kv_heads, head_dim=config.head_dim, hidden_act="silu",
      rms_norm_eps=config.rms_norm_eps, max_position_embeddings=config.max_position_embeddings,
      tie_word_embeddings=config.tie_word_embeddings, attention_bias=False,
      initializer_range=config.initializer_range,
      rope_parameters={"rope_type": "default", "rope_theta": config.rope_theta, **(rope_scaling or {})},
      rope_theta=config.rope_theta, rope_scaling=rope_scaling,  # transformers 4 spelling.
      dtype=dtype, torch_dtype=dtype)
  if config.architecture == "llama":
    raw["mlp_bias"] = False
  if config.architecture == "mistral":
    raw["sliding_window"] = config.sliding_window
  if config.architecture in ("qwen3", "qwen3_moe"):
    raw.update(use_sliding_window=config.sliding_window is not None, sliding_window=config.sliding_window)
    if config.architecture == "qwen3":
      raw["max_window_layers"] = 0  # Our sliding window, when set, applies to every layer.
  if config.architecture == "qwen3_moe":
    raw.update(num_experts=config.num_experts, num_experts_per_tok=config.num_experts_per_tok,
               moe_intermediate_size=config.moe_intermediate_size, norm_topk_prob=config.norm_topk_prob,
               decoder_sparse_step=config.decoder_sparse_step, mlp_only_layers=list(config.mlp_only_layers))
  return raw


# ----------------------------------------------------------------------------------------------------------------
# Name mapping.


def hf_module_name(path: tuple[str, ...], layer: int | None = None, expert: int | None = None) -> str:
  """HF module name of a param or module path, e.g. ('model', 'layers_0', 'self_attn', 'q_proj', 'kernel') ->
  'model.layers.0.self_attn.q_proj'. Scanned paths ('layers') need `layer`; expert kernels need `expert`."""
  path = tuple(path[:-1]) if path and path[-1] in _LEAF_NAMES else tuple(path)
  parts = []
  for name in path:
    numbered = re.fullmatch(r"layers_(\d+)", name)
    if numbered:
      if layer is not None and layer != int(numbered.group(1)):
        raise ValueError(f"{path}: layer={layer} contradicts {name}")
      parts += ["layers", numbered.group(1)]
    elif name == "layers":
      if layer is None:
        raise ValueError(f"{path} is a scanned path: pass layer=")
      parts += ["layers", str(layer)]
    elif name == "experts":
      if expert is None:
        raise ValueError(f"{path} holds stacked experts: pass expert=")
      parts += ["experts", str(expert)]
    else:
      parts.append(name)
  return ".".join(parts)


def hf_key(path: tuple[str, ...], layer: int | None = None, expert: int | None = None) -> str:
  """HF tensor name of a param path, e.g. 'model.layers.0.self_attn.q_proj.weight'."""
  return hf_module_name(path, layer, expert) + ".weight"


def param_path(key: str, scan_layers: bool) -> tuple[tuple[str, ...], tuple[int, ...]]:
  """Inverse of hf_key: (our param path, index into its leading stacked axes: (layer,) if scanned, then (expert,))."""
  parts = key.split(".")
  if len(parts) < 2 or parts[-1] != "weight":
    raise ValueError(f"{key}: not a weight of a supported model")
  path, index, names = [], [], iter(parts[:-1])
  for name in names:
    if name in ("layers", "experts"):
      number = next(names, "")
      if not number.isdigit():
        raise ValueError(f"{key}: expected a number after {name!r}")
      if name == "layers" and not scan_layers:
        path.append(f"layers_{number}")
      else:
        path.append(name)
        index.append(int(number))
    else:
      path.append(name)
  leaf = "embedding" if path[-1] == "embed_tokens" else "scale" if path[-1].endswith("norm") else "kernel"
  return (*path, leaf), tuple(index)


@dataclasses.dataclass(frozen=True)
class _Entry:
  """One HF tensor and where it lives in our tree."""
  key: str  # HF tensor name.
  path: tuple[str, ...]  # Our param path.
  index: tuple[int, ...]  # Index into the stacked leading axes (layer, expert) of our array.
  hf_shape: tuple[int, ...]  # Shape of the HF (torch layout) tensor.
  transpose: bool  # torch [out, in] <-> our [in, out].


def _natural_key(key: str):
  return [int(s) if s.isdigit() else s for s in re.split(r"(\d+)", key)]


def _entries(config: ModelConfig, shapes: dict[tuple[str, ...], tuple[int, ...]]) -> list[_Entry]:
  """All HF tensors of `config`, sorted as HF writes them (layer by layer)."""
  entries = []
  for path, shape in shapes.items():
    ranges = ([range(config.num_layers)] if "layers" in path else []) + (
        [range(config.num_experts)] if "experts" in path else [])
    inner = shape[len(ranges):]
    transpose = path[-1] == "kernel"
    hf_shape = tuple(reversed(inner)) if transpose else tuple(inner)
    for index in itertools.product(*ranges):
      named = dict(zip([n for n in ("layers", "experts") if n in path], index))
      key = hf_key(path, named.get("layers"), named.get("experts"))
      entries.append(_Entry(key, path, index, hf_shape, transpose))
  return sorted(entries, key=lambda e: _natural_key(e.key))


def _shapes(config: ModelConfig) -> dict[tuple[str, ...], tuple[int, ...]]:
  flat = flax.traverse_util.flatten_dict(abstract_params(config))
  return {path: tuple(leaf.shape) for path, leaf in flat.items()}


# ----------------------------------------------------------------------------------------------------------------
# Loading.


def _weight_files(root: pathlib.Path) -> list[pathlib.Path]:
  """The safetensors files of a checkpoint: those named by the index if there is one, else model.safetensors."""
  if (root / _INDEX_FILE).exists():
    with open(root / _INDEX_FILE) as f:
      names = sorted(set(json.load(f)["weight_map"].values()))
  elif (root / _SINGLE_FILE).exists():
    names = [_SINGLE_FILE]
  else:
    raise FileNotFoundError(f"{root}: neither {_SINGLE_FILE} nor {_INDEX_FILE}; found {sorted(os.listdir(root))}")
  files = [root / n for n in names]
  absent = [str(f) for f in files if not f.exists()]
  if absent:
    raise FileNotFoundError(f"{root / _INDEX_FILE} names missing files: {absent}")
  return files


def _open(stack: contextlib.ExitStack, file: pathlib.Path):
  try:
    return stack.enter_context(safetensors.safe_open(str(file), framework="numpy"))
  except Exception as e:  # safetensors raises its own SafetensorError (truncated file, bad header, ...).
    raise ValueError(f"{file}: not a readable safetensors file ({e})") from e


def _check(available: dict[str, tuple[pathlib.Path, tuple[int, ...]]], entries: list[_Entry],
           config: ModelConfig, root: pathlib.Path):
  """Raises one ValueError listing every missing, unexpected and mis-shaped tensor."""
  expected = {e.key: e for e in entries}
  ignored = {k for k in available if _IGNORED_KEYS.fullmatch(k)}
  if config.tie_word_embeddings:
    ignored.add("lm_head.weight")  # Some tied checkpoints store a copy of the embedding; HF ignores it too.
  missing = [k for k in expected if k not in available]
  unexpected = sorted(set(available) - set(expected) - ignored, key=_natural_key)
  misshaped = [f"{k}: checkpoint {available[k][1]} in {available[k][0].name}, config expects {e.hf_shape}"
               for k, e in expected.items() if k in available and available[k][1] != e.hf_shape]
  problems = []
  for title, items in (("missing tensors", missing), ("unexpected tensors", unexpected),
                       ("mis-shaped tensors", misshaped)):
    if items:
      shown = "\n  ".join(items[:20]) + (f"\n  ... and {len(items) - 20} more" if len(items) > 20 else "")
      problems.append(f"{len(items)} {title}:\n  {shown}")
  if problems:
    raise ValueError(f"checkpoint {root} does not match the {config.architecture} config:\n" + "\n".join(problems))


def load_params(path_or_hub_id: str | os.PathLike, config: ModelConfig, dtype=None, shardings=None) -> dict[str, Any]:
  """Reads a (single or sharded) safetensors checkpoint into our param tree, cast to `dtype` (default param_dtype).

  Tensor by tensor: never two full copies in host RAM. With `shardings` (a tree of NamedShardings like the params)
  each array is built straight into its sharding and each process reads only the slices its devices hold.
  """
  root = resolve_checkpoint(path_or_hub_id)
  dtype = np.dtype(jnp.dtype(dtype or config.param_dtype))
  shapes = _shapes(config)
  entries = _entries(config, shapes)
  flat_shardings = flax.traverse_util.flatten_dict(shardings) if shardings is not None else None
  with contextlib.ExitStack() as stack:
    handles, available = {}, {}
    for file in _weight_files(root):
      handles[file] = handle = _open(stack, file)
      for key in handle.keys():
        if key in available:
          raise ValueError(f"{key} appears in both {available[key][0]} and {file}")
        available[key] = (file, tuple(handle.get_slice(key).get_shape()))
    _check(available, entries, config, root)

    by_path = {}
    for e in entries:
      by_path.setdefault(e.path, []).append(e)
    flat = {}
    for path, shape in shapes.items():
      def read(region, path=path, shape=shape):
        return _read_region(handles, available, by_path[path], shape, region, dtype)

      if flat_shardings is None:
        flat[path] = jax.device_put(read(tuple(slice(None) for _ in shape)))
      else:
        flat[path] = jax.make_array_from_callback(shape, flat_shardings[path], read)
  return flax.traverse_util.unflatten_dict(flat)


def _read_region(handles, available, entries: list[_Entry], shape, region, dtype) -> np.ndarray:
  """The block `region` (slices over our array) of one parameter, reading only those slices from the files."""
  bounds = [range(*s.indices(n)) for s, n in zip(region, shape)]
  out = np.empty(tuple(len(b) for b in bounds), dtype)
  for e in entries:
    k = len(e.index)
    if any(i not in b for i, b in zip(e.index, bounds[:k])):
      continue
    inner = [slice(b.start, b.stop, b.step) for b in bounds[k:]]
    file = available[e.key][0]
    try:
      part = handles[file].get_slice(e.key)
      block = part[inner[1], inner[0]].T if e.transpose else part[tuple(inner)]
    except Exception as err:
      raise ValueError(f"{file}: cannot read tensor {e.key} ({err})") from err
    out[tuple(b.index(i) for i, b in zip(e.index, bounds[:k]))] = block
  return out


def load(path_or_hub_id: str | os.PathLike, dtype=None, **config_changes) -> tuple[ModelConfig, dict[str, Any]]:
  """load_config then load_params: (config, params) of a local or hub checkpoint."""
  root = resolve_checkpoint(path_or_hub_id)
  config = load_config(root, **config_changes)
  return config, load_params(root, config, dtype)


# ----------------------------------------------------------------------------------------------------------------
# Saving.


def save_params(params: dict[str, Any], config: ModelConfig, out_dir: str | os.PathLike, dtype=None,
                max_shard_bytes: int = 5 * 2**30) -> None:
  """Writes an HF checkpoint directory (config.json + safetensors, sharded with an index above max_shard_bytes)."""
  out_dir = pathlib.Path(out_dir)
  dtype = np.dtype(jnp.dtype(dtype or config.param_dtype))
  shapes = _shapes(config)
  flat = flax.traverse_util.flatten_dict(params)
  got = {path: tuple(np.shape(leaf)) for path, leaf in flat.items()}
  if got != shapes:
    diff = sorted(f'{"/".join(p)}: params {got.get(p)}, config {shapes.get(p)}'
                  for p in set(got) | set(shapes) if got.get(p) != shapes.get(p))
    raise ValueError("params do not match the config:\n  " + "\n  ".join(diff[:20]))

  entries = _entries(config, shapes)
  shards, size = [[]], 0
  for e in entries:
    nbytes = int(np.prod(e.hf_shape)) * dtype.itemsize
    if shards[-1] and size + nbytes > max_shard_bytes:
      shards.append([])
      size = 0
    shards[-1].append(e)
    size += nbytes
  names = ([_SINGLE_FILE] if len(shards) == 1 else
           [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])

  out_dir.mkdir(parents=True, exist_ok=True)
  with open(out_dir / "config.json", "w") as f:
    json.dump(config_to_hf_dict(config, dtype.name), f, indent=2)
  for name, shard in zip(names, shards):
    tensors = {}
    for e in shard:
      value = np.asarray(jax.device_get(flat[e.path][e.index] if e.index else flat[e.path])).astype(dtype)
      tensors[e.key] = np.ascontiguousarray(value.T if e.transpose else value)
    safetensors.numpy.save_file(tensors, str(out_dir / name), metadata={"format": "pt"})
    del tensors
  if len(shards) > 1:
    index = dict(metadata=dict(total_size=sum(int(np.prod(e.hf_shape)) * dtype.itemsize for e in entries)),
                 weight_map={e.key: name for name, shard in zip(names, shards) for e in shard})
    with open(out_dir / _INDEX_FILE, "w") as f:
      json.dump(index, f, indent=2)
  elif (out_dir / _INDEX_FILE).exists():
    (out_dir / _INDEX_FILE).unlink()  # A stale index would point loaders at old shards.


# ----------------------------------------------------------------------------------------------------------------
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
_PEFT_SUFFIXES = {".lora_A.weight": "a", ".lora_B.weight": "b", ".lora_embedding_A": "a", ".lora_embedding_B": "b"}
_EXPERT_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
# adapter_config.json fields that change the adapted function in ways an Adapter tree cannot hold: field -> value
# that is fine.
_PEFT_UNSUPPORTED = {"use_dora": False, "bias": "none", "modules_to_save": None, "lora_bias": False,
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
    if ad.layout.roles != ("in", "out") and not expert:
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
        out.append(_Slice(hf_module_name(module_path, layer, e), tuple(module_path),
                          stack + (() if e is None else (e,)), ad.layout.kind == "embed", expert, ad.rank, s))
  return out


def serving_rank(rank: int) -> int:
  """The smallest rank vLLM accepts that is >= `rank` (what `for_serving` pads to); above 512 is an error."""
  for allowed in VLLM_RANKS:
    if rank <= allowed:
      return allowed
  raise ValueError(f"rank {rank} is above 512, the largest LoRA rank vLLM serves; merge the adapter instead "
                   "(python -m lora_jax.export --merged)")


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
      modules = sorted(modules, key=lambda m: _natural_key(full(m)))
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
                   key=_natural_key)
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
               key=_natural_key)
  if odd:
    problems.append(f"expert adapters with a rank or alpha other than the global r={r}, lora_alpha={alpha} "
                    f"({odd[0]}, ...): PEFT ignores rank_pattern/alpha_pattern for fused experts; use for_serving "
                    "(which folds the scales and pads ranks)")
  by_layer: dict[str, set[str]] = {}
  for s in experts:
    prefix, _, rest = s.name.partition(".experts.")
    by_layer.setdefault(prefix, set()).add(rest.rsplit(".", 1)[-1])
  for prefix, kinds in sorted(by_layer.items(), key=lambda kv: _natural_key(kv[0])):
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
  rsLoRA; padding adds zero rows/columns, so the function is unchanged. A tied model's embedding adapter also acts
  on the tied output head (our `Embed.attend`): it is written with the equivalent lm_head LoRA
  (lora_A = B, lora_B = A, in our layout) and `ensure_weight_tying`, so PEFT ties the two as well.
  """
  config = params_config
  if spec.extra_trainable:
    raise ValueError(f"the spec also trains base parameters (extra_trainable={list(spec.extra_trainable)}), which "
                     "a PEFT LoRA adapter does not carry; export a merged model instead")
  slices = _slices(adapters)
  if not slices:
    raise ValueError("no adapters to export")
  tree = dict(lora.adapter_items(adapters))
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
    if s.embed and config.tie_word_embeddings:
      # Output head x·(E + s·A·B)^T adds s·(x·B^T)·A^T: a Linear LoRA with lora_A.weight = B, lora_B.weight = A.
      put("lm_head", b.T, a.T, False)
      ranks["lm_head"], alphas["lm_head"] = ranks[s.name], alphas[s.name]
  _check_peft_experts(config, slices, ranks, alphas, r, alpha, rslora)
  tied = config.tie_word_embeddings and "lm_head" in ranks

  adapter_config = dict(
      peft_type="LORA", task_type="CAUSAL_LM", base_model_name_or_path=str(base_model_name_or_path),
      r=r, lora_alpha=_json_number(alpha), use_rslora=rslora,
      # As PEFT writes it: with ensure_weight_tying the tied lm_head is not a target of its own.
      target_modules=sorted({n.rsplit(".", 1)[-1] for n in ranks} - ({"lm_head"} if tied else set())),
      rank_pattern=_compress_patterns(ranks, r), alpha_pattern=_compress_patterns(alphas, alpha),
      # PEFT's default layers_pattern (None) takes the first number in a module name: the layer index here.
      layers_to_transform=None if spec.layers is None else list(spec.layers), layers_pattern=None,
      lora_dropout=spec.dropout, init_lora_weights="gaussian" if spec.init_a == "gaussian" else True,
      bias="none", use_dora=False, modules_to_save=None, fan_in_fan_out=False, inference_mode=True,
      ensure_weight_tying=tied, exclude_modules=None, target_parameters=None, lora_bias=False)
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
    handle = _open(stack, root / PEFT_WEIGHTS_FILE)
    tensors = {k: handle.get_tensor(k) for k in handle.keys()}
  return adapter_config, tensors


def _peft_pattern_value(patterns: dict[str, Any] | None, name: str, default):
  """The value PEFT uses for module `name` (first key k with re.match(rf'(.*\\.)?({k})$', name))."""
  for key, value in (patterns or {}).items():
    if re.match(rf"(.*\.)?({key})$", name):
      return value
  return default


def peft_modules(tensors: dict[str, np.ndarray]) -> tuple[dict[str, dict[str, Any]], list[str]]:
  """Groups PEFT tensors by module: ({HF module name: {'a', 'b' (as stored), 'embed'}}, problems with the keys)."""
  modules: dict[str, dict[str, Any]] = {}
  problems = []
  for key, value in tensors.items():
    if key.endswith(".base_layer.weight"):
      continue  # PEFT also saves copies of adapted embedding weights; the base model has them.
    suffix = next((s for s in _PEFT_SUFFIXES if key.endswith(s)), None)
    if suffix is None or not key.startswith(_PEFT_PREFIX):
      problems.append(f"{key}: not a LoRA tensor (expected {_PEFT_PREFIX}<module>.lora_A.weight / lora_B.weight / "
                      "lora_embedding_A / lora_embedding_B)")
      continue
    name = key[len(_PEFT_PREFIX):-len(suffix)]
    entry = modules.setdefault(name, {"embed": "embedding" in suffix})
    entry[_PEFT_SUFFIXES[suffix]] = value
    if entry["embed"] != ("embedding" in suffix):
      problems.append(f"{name}: mixes lora_A/B and lora_embedding_A/B tensors")
  for name, entry in modules.items():
    if "a" not in entry or "b" not in entry:
      problems.append(f"{name}: has lora_{'A' if 'a' in entry else 'B'} but not lora_{'B' if 'a' in entry else 'A'}")
  return modules, problems


def load_peft(adapter_dir: str | os.PathLike, params, config: ModelConfig,
              layouts=None) -> tuple[Any, lora.LoraSpec]:
  """Reads a PEFT LoRA directory into (adapters, LoraSpec) for `params`; the spec reproduces rank, alpha, patterns.

  Everything is checked before anything is built: a module the model lacks, a tensor whose shape does not fit its
  kernel, or a PEFT feature an adapter tree can't hold (DoRA, bias, modules_to_save, ...) raises one ValueError
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

  r, alpha = int(adapter_config.get("r", 8)), float(adapter_config.get("lora_alpha", 8))
  rslora = bool(adapter_config.get("use_rslora", False))
  rank_pattern, alpha_pattern = adapter_config.get("rank_pattern") or {}, adapter_config.get("alpha_pattern") or {}

  if config.tie_word_embeddings:
    embed_name = hf_module_name(("model", "embed_tokens"))
    head, embed = modules.pop("lm_head", None), modules.get(embed_name)
    if embed is not None and head is None:
      problems.append(f"{embed_name} has a LoRA but lm_head has none: PEFT applies it to the input lookup only, "
                      "while the tied model also uses the embedding as output head (save with "
                      "ensure_weight_tying=True, which adds the tied lm_head LoRA)")
    elif head is not None and (embed is None or not (
        np.array_equal(head["a"], embed["b"].T) and np.array_equal(head["b"], embed["a"].T)
        and _peft_pattern_value(alpha_pattern, "lm_head", alpha)
        == _peft_pattern_value(alpha_pattern, embed_name, alpha))):
      problems.append("lm_head of a tied model has a LoRA that is not the transpose of the embedding's: the "
                      "output head can't be adapted apart from the tied embedding")

  entries = {e.key[: -len(".weight")]: e for e in _entries(config, _shapes(config))}
  found: dict[str, tuple[_Entry, int, float, float]] = {}  # HF module name -> (entry, rank, alpha, scale)
  for name, m in sorted(modules.items(), key=lambda kv: _natural_key(kv[0])):
    e = entries.get(name)
    if e is None or e.path[-1] not in lora.MATRIX_PARAMS:
      close = _closest_names(name, entries)
      problems.append(f"{name}: no such {'matrix ' if e is not None else ''}module in this {config.architecture} "
                      f"model (closest: {close})")
      continue
    a, b = m["a"], m["b"]
    rank = a.shape[0] if a.ndim else 0
    if e.path[-1] == "embedding":  # torch [V, D]: lora_embedding_A [r, V], lora_embedding_B [D, r]
      want_a, want_b = (rank, e.hf_shape[0]), (e.hf_shape[1], rank)
    else:  # torch [out, in]: lora_A [r, in], lora_B [out, r]
      want_a, want_b = (rank, e.hf_shape[1]), (e.hf_shape[0], rank)
    if m["embed"] != (e.path[-1] == "embedding"):
      problems.append(f"{name}: {'embedding' if m['embed'] else 'linear'} LoRA tensors on a "
                      f"{'linear' if m['embed'] else 'embedding'} module")
    elif a.ndim != 2 or b.ndim != 2 or tuple(a.shape) != want_a or tuple(b.shape) != want_b:
      problems.append(f"{name}: A {tuple(a.shape)}, B {tuple(b.shape)} do not fit its weight "
                      f"{e.hf_shape} (expected A {want_a}, B {want_b})")
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
              dtype=dtypes.pop() if len(dtypes) == 1 else "float32")
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
    extra = sorted(set(slices) - wanted, key=_natural_key)
    missing = sorted(wanted - set(slices), key=_natural_key)
    raise ValueError(f"PEFT adapter {where}: its set of adapted modules can't be expressed as a LoraSpec for these "
                     f"params (layers of one scanned kernel adapted differently?); the spec would also adapt "
                     f"{extra[:5]} and miss {missing[:5]}; try scan_layers=False")
  bad = [n for n, s in slices.items() if not math.isclose(s.scale, found[n][3], rel_tol=1e-6)]
  if bad:
    raise ValueError(f"PEFT adapter {where}: scales of {bad[:5]} can't be reproduced by a LoraSpec")
  return spec, template


def _fill(template, modules, spec: lora.LoraSpec):
  """The template adapters with A and B taken from the PEFT tensors (our layout: their transposes)."""
  tree = dict(lora.adapter_items(template))
  arrays = {path: (np.zeros(ad.a.shape, np.float32), np.zeros(ad.b.shape, np.float32)) for path, ad in tree.items()}
  for s in _slices(template):
    m = modules[s.name]
    a, b = arrays[s.module_path]
    a[s.index] = m["a"].T
    b[s.index] = m["b"].T
  dtype = jnp.dtype(spec.dtype)
  filled = {path: ad.replace(a=jnp.asarray(arrays[path][0], dtype), b=jnp.asarray(arrays[path][1], dtype))
            for path, ad in tree.items()}
  return flax.traverse_util.unflatten_dict(filled)
