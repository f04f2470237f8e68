"""Pieces every experiment config shares: the sweep-argument parser, LoRA defaults and the tiny base model."""

from __future__ import annotations

import ml_collections

from lora_jax.spec import LoraSpec


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


def point_arg(point: str | dict) -> str:
  """A sweep point as the arg string ``get_config`` takes: ``{"tiny": True, "rank": 4}`` -> ``"tiny,rank=4"``."""
  if isinstance(point, str):
    return point
  parts = []
  for key, value in point.items():
    if not isinstance(value, (str, int, float)):
      raise ValueError(f"sweep point {point!r}: {key!r} is a {type(value).__name__}; give str, int, float or bool")
    if isinstance(value, bool):  # a bare word sets a bool in parse_arg
      text = "" if value else "false"
    else:
      text = repr(value) if isinstance(value, float) else str(value)  # repr: the float exactly, e.g. 0.0003
    if any(c in f"{key}{text}" for c in ",="):
      raise ValueError(f"sweep point {point!r}: {key}={text!r} holds ',' or '=', which the arg string cannot carry")
    parts.append(f"{key}={text}" if text else key)
  return ",".join(parts)


# Module names (and the embed/unembed presets) that `rank_pattern` / `alpha_pattern` have a config field for, so
# `--config.lora.rank_pattern.k_proj=32` works on a locked config. A kernel matches at most one of them, so their
# order does not matter; regex patterns need `LoraSpec(rank_pattern=...)` itself.
PATTERN_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "embed", "unembed")


def lora_defaults(rank: int = 16) -> ml_collections.ConfigDict:
  """Every ``lora.LoraSpec`` field (see its comments and the README's table), adapting every weight matrix incl.
  the unembedding as the study's main runs did; alpha 32, alpha/r, uniform A and B = 0 are the spec's defaults."""
  fields = LoraSpec(rank=rank, targets=("all-linear", "unembed")).to_dict()
  config = ml_collections.ConfigDict({k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()
                                      if k not in ("layers", "rank_pattern", "alpha_pattern")})
  config.layers = ml_collections.config_dict.placeholder(tuple)  # None = every layer.
  config.rank_pattern = _per_module(int)  # Rank of a module (e.g. rank_pattern.k_proj=32); None = `rank`.
  config.alpha_pattern = _per_module(float)  # Alpha of a module; None = `alpha`.
  return config


def _per_module(kind: type) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict({name: ml_collections.config_dict.placeholder(kind) for name in PATTERN_MODULES})


def lora_spec(config: ml_collections.ConfigDict) -> LoraSpec:
  """The ``lora.LoraSpec`` of a config's ``lora`` fields (per-module ranks and alphas left at None dropped)."""
  fields = config.to_dict()
  for name in ("rank_pattern", "alpha_pattern"):
    fields[name] = {k: v for k, v in fields[name].items() if v is not None}
  return LoraSpec.from_dict(fields)


def tiny_base_config() -> ml_collections.ConfigDict:
  """The tiny Llama-style base pretrained on the synthetic corpus (``synthetic.pretraining_corpus``: every token and
  format of the fine-tuning tasks, in other combinations); cached by these values under ``cache_dir``."""
  c = ml_collections.ConfigDict()
  c.hidden_size = 64  # Residual width.
  c.intermediate_size = 192  # MLP width.
  c.num_layers = 2  # Decoder layers.
  c.num_heads = 4  # Query heads.
  c.num_kv_heads = 2  # Key/value heads.
  c.corpus_documents = 3000  # Pretraining documents: grammar text and chat dialogues.
  c.chat_fraction = 0.7  # The chat dialogues' share of them.
  c.dialect_fraction = 0.0  # The share of the text documents in the dialect's plain register (synthetic.dialect_text).
  c.steps = 150  # Pretraining steps (full training from random init).
  c.lr = 3e-3  # Pretraining LR.
  c.batch_size = 16  # Pretraining rows per step.
  c.seq_len = 64  # Pretraining row length.
  c.seed = 0  # Init, corpus, split and data-order seed of the pretraining (its own; the runs' seeds do not touch it).
  c.cache_dir = ".cache/lora_jax/tiny_base"  # Where the pretrained base (an HF directory) is kept.
  return c


# The study's base models: hub id -> the preset with its shapes (Qwen3-8B-Base has Qwen3-8B's).
REAL_MODELS = {"meta-llama/Llama-3.2-1B": "meta-llama/Llama-3.2-1B", "meta-llama/Llama-3.1-8B": "meta-llama/Llama-3.1-8B",
               "Qwen/Qwen3-8B-Base": "Qwen/Qwen3-8B"}


def preset(model: str, **changes):
  """The ``transformer.ModelConfig`` of one of the study's hub ids, from shapes alone (nothing downloaded)."""
  from lora_jax.models import transformer

  if model not in REAL_MODELS:
    raise ValueError(f"model {model!r} is not one of the study's models with a preset: {sorted(REAL_MODELS)}")
  return transformer.ModelConfig.from_preset(REAL_MODELS[model], **changes)


# The tinker-cookbook LR rule's exponent of (2000 / hidden_size) per model family (../shared/reference/blog.md).
COOKBOOK_LR_EXPONENT = {"llama": 0.781, "mistral": 0.781, "qwen3": 0.0775, "qwen3_moe": 0.0775}


def cookbook_lr(architecture: str, hidden_size: int, lora: bool) -> float:
  """The study's LR rule (tinker-cookbook ``get_lr``): 5e-5 · (10 if LoRA) · (2000 / hidden_size)^p."""
  if architecture not in COOKBOOK_LR_EXPONENT:
    raise ValueError(f"no cookbook LR exponent for architecture {architecture!r}; known: {sorted(COOKBOOK_LR_EXPONENT)}")
  return 5e-5 * (10.0 if lora else 1.0) * (2000.0 / hidden_size) ** COOKBOOK_LR_EXPONENT[architecture]


def study_base(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The CPU study's base recipe, one for every family (in place, returned): the tiny base widened to hidden 128 (rank
  64 is half the width), pretrained until its held-out NLL has flattened (1,200 steps on 20,000 documents, ~1M loss
  tokens, ~1 epoch; ~75 s on 2 cores), with the dialect's plain register in 10% of its text documents: the setting
  that passed calibration (docs/results/calibration/: base 02c0c957, -0.004 nats over its last quarter, step-0 NLL on
  the dialect task 2.17 against ln(vocab) 4.65)."""
  c.hidden_size = 128
  c.intermediate_size = 384
  c.corpus_documents = 20_000
  c.steps = 1200
  c.dialect_fraction = 0.1
  return c


def lr_grid(center: float, factor: float, below: int, above: int) -> list[float]:
  """A log-spaced LR grid ``center · factor^k`` for k in [-below, above], rounded to 3 significant digits."""
  return [float(f"{center * factor**k:.3g}") for k in range(-below, above + 1)]
