"""Pieces every experiment config shares: the sweep-argument parser, LoRA defaults and the tiny base model."""

from __future__ import annotations

import ml_collections

from lora_jax import lora


def parse_arg(arg: str, **defaults) -> ml_collections.ConfigDict:
  """Parses ``"tiny,rank=16,method=lora"`` into typed fields; a bare word sets a bool; unknown keys are errors."""
  out = dict(defaults)
  for part in filter(None, (p.strip() for p in (arg or "").split(","))):
    key, sep, value = part.partition("=")
    if key not in defaults:
      raise ValueError(f"unknown config argument {key!r} in {arg!r}; valid: {sorted(defaults)}")
    kind = type(defaults[key])
    if not sep:
      if kind is not bool:
        raise ValueError(f"config argument {key!r} needs a value ({key}=...)")
      out[key] = True
    elif kind is bool:
      out[key] = value.lower() in ("1", "true", "yes")
    else:
      out[key] = kind(value)
  return ml_collections.ConfigDict(out)


# Module names (and the embed/unembed presets) that `rank_pattern` / `alpha_pattern` have a config field for, so
# `--config.lora.rank_pattern.k_proj=32` works on a locked config. A kernel matches at most one of them, so their
# order does not matter; regex patterns need `lora.LoraSpec(rank_pattern=...)` itself.
PATTERN_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "embed", "unembed")


def lora_defaults(rank: int = 16) -> ml_collections.ConfigDict:
  """Every ``lora.LoraSpec`` field (see its comments and the README's table), adapting every weight matrix incl.
  the unembedding as the study's main runs did; alpha 32, alpha/r, uniform A and B = 0 are the spec's defaults."""
  fields = lora.LoraSpec(rank=rank, targets=("all-linear", "unembed")).to_dict()
  config = ml_collections.ConfigDict({k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()
                                      if k not in ("layers", "rank_pattern", "alpha_pattern")})
  config.layers = ml_collections.config_dict.placeholder(tuple)  # None = every layer.
  config.rank_pattern = _per_module(int)  # Rank of a module (e.g. rank_pattern.k_proj=32); None = `rank`.
  config.alpha_pattern = _per_module(float)  # Alpha of a module; None = `alpha`.
  return config


def _per_module(kind: type) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict({name: ml_collections.config_dict.placeholder(kind) for name in PATTERN_MODULES})


def lora_spec(config: ml_collections.ConfigDict) -> lora.LoraSpec:
  """The ``lora.LoraSpec`` of a config's ``lora`` fields (per-module ranks and alphas left at None dropped)."""
  fields = config.to_dict()
  for name in ("rank_pattern", "alpha_pattern"):
    fields[name] = {k: v for k, v in fields[name].items() if v is not None}
  return lora.LoraSpec.from_dict(fields)


def tiny_base_config() -> ml_collections.ConfigDict:
  """The tiny Llama-style base pretrained on the synthetic corpus; cached by these values under ``cache_dir``."""
  c = ml_collections.ConfigDict()
  c.hidden_size = 64  # Residual width.
  c.intermediate_size = 192  # MLP width.
  c.num_layers = 2  # Decoder layers.
  c.num_heads = 4  # Query heads.
  c.num_kv_heads = 2  # Key/value heads.
  c.corpus_documents = 3000  # Synthetic corpus size.
  c.steps = 150  # Pretraining steps (full training from random init).
  c.lr = 3e-3  # Pretraining LR.
  c.batch_size = 16  # Pretraining rows per step.
  c.seq_len = 64  # Pretraining row length.
  c.seed = 0  # Init, corpus, split and data-order seed of the pretraining (its own; the runs' seeds do not touch it).
  c.cache_dir = ".cache/lora_jax/tiny_base"  # Where the pretrained base (an HF directory) is kept.
  return c
