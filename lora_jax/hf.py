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

PEFT LoRA adapter directories are `lora_jax.peft_io`'s.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import itertools
import json
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


def base_identity(path_or_hub_id: str | os.PathLike) -> dict[str, str]:
  """What a run records about its base: ``base_model`` (an absolute path, or the hub id) and ``base_fingerprint``."""
  path = pathlib.Path(path_or_hub_id).expanduser()
  name = str(path.resolve()) if path.exists() else str(path_or_hub_id)
  return {"base_model": name, "base_fingerprint": fingerprint(resolve_checkpoint(path_or_hub_id))}


# How a model is run, not which model it is.
_RUNTIME_FIELDS = ("param_dtype", "dtype", "scan_layers", "remat", "attention", "loss_chunk_size")


def model_fields(config: ModelConfig) -> dict[str, Any]:
  """The fields of ``config`` that define the model (not how it is run), as plain JSON values."""
  return json.loads(json.dumps({k: v for k, v in dataclasses.asdict(config).items() if k not in _RUNTIME_FIELDS}))


def fingerprint(root: str | os.PathLike) -> str:
  """A short hash of a checkpoint directory's shapes (config.json) and weights, cheap for any size.

  It hashes the model's shape fields, every safetensors header (names, dtypes, shapes) and up to 64 sampled 4 KiB
  blocks of each file's tensor data, so two bases with the same shapes but different weights differ, while the
  same files always give the same value on any machine.
  """
  root = pathlib.Path(root)
  digest = hashlib.sha256(json.dumps(model_fields(load_config(root)), sort_keys=True).encode())
  for file in _weight_files(root):
    with open(file, "rb") as f:
      size = os.fstat(f.fileno()).st_size
      header_len = int.from_bytes(f.read(8), "little")
      digest.update(f.read(header_len))
      start = 8 + header_len
      blocks = 64
      for i in range(blocks):
        f.seek(start + (size - start) * i // blocks)
        digest.update(f.read(4096))
  return digest.hexdigest()[:16]


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
class TensorEntry:
  """One HF tensor and where it lives in our tree."""
  key: str  # HF tensor name.
  path: tuple[str, ...]  # Our param path.
  index: tuple[int, ...]  # Index into the stacked leading axes (layer, expert) of our array.
  hf_shape: tuple[int, ...]  # Shape of the HF (torch layout) tensor.
  transpose: bool  # torch [out, in] <-> our [in, out].


def natural_key(key: str):
  """Sort key that orders numbers inside names numerically (layers.2 before layers.10)."""
  return [int(s) if s.isdigit() else s for s in re.split(r"(\d+)", key)]


def tensor_entries(config: ModelConfig, shapes: dict[tuple[str, ...], tuple[int, ...]]) -> list[TensorEntry]:
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
      entries.append(TensorEntry(key, path, index, hf_shape, transpose))
  return sorted(entries, key=lambda e: natural_key(e.key))


def param_shapes(config: ModelConfig) -> dict[tuple[str, ...], tuple[int, ...]]:
  """Shape of every parameter of a model of ``config``, by path."""
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


def open_safetensors(stack: contextlib.ExitStack, file: pathlib.Path):
  """A numpy ``safe_open`` handle on ``file``, closed with ``stack``; a corrupt file names itself."""
  try:
    return stack.enter_context(safetensors.safe_open(str(file), framework="numpy"))
  except Exception as e:  # safetensors raises its own SafetensorError (truncated file, bad header, ...).
    raise ValueError(f"{file}: not a readable safetensors file ({e})") from e


def _check(available: dict[str, tuple[pathlib.Path, tuple[int, ...]]], entries: list[TensorEntry],
           config: ModelConfig, root: pathlib.Path):
  """Raises one ValueError listing every missing, unexpected and mis-shaped tensor."""
  expected = {e.key: e for e in entries}
  ignored = {k for k in available if _IGNORED_KEYS.fullmatch(k)}
  if config.tie_word_embeddings:
    ignored.add("lm_head.weight")  # Some tied checkpoints store a copy of the embedding; HF ignores it too.
  missing = [k for k in expected if k not in available]
  unexpected = sorted(set(available) - set(expected) - ignored, key=natural_key)
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
  shapes = param_shapes(config)
  entries = tensor_entries(config, shapes)
  flat_shardings = flax.traverse_util.flatten_dict(shardings) if shardings is not None else None
  with contextlib.ExitStack() as stack:
    handles, available = {}, {}
    for file in _weight_files(root):
      handles[file] = handle = open_safetensors(stack, file)
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


def _read_region(handles, available, entries: list[TensorEntry], shape, region, dtype) -> np.ndarray:
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
  shapes = param_shapes(config)
  flat = flax.traverse_util.flatten_dict(params)
  got = {path: tuple(np.shape(leaf)) for path, leaf in flat.items()}
  if got != shapes:
    diff = sorted(f'{"/".join(p)}: params {got.get(p)}, config {shapes.get(p)}'
                  for p in set(got) | set(shapes) if got.get(p) != shapes.get(p))
    raise ValueError("params do not match the config:\n  " + "\n  ".join(diff[:20]))

  entries = tensor_entries(config, shapes)
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
