"""The LoRA rules that depend on this project's models (``models.transformer``): MoE expert ranks and untying a
tied output head. ``lora`` itself works on any Flax parameter tree; the models know nothing of LoRA."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from lora_jax import lora
from lora_jax.models import transformer


def expert_rank_pattern(config: transformer.ModelConfig, rank: int) -> dict[str, int]:
  """The study's MoE rule as a LoRA ``rank_pattern``: each expert gets rank // experts-per-token (at least 1), so
  the active experts together hold the total rank. Empty for dense models."""
  if not config.num_experts:
    return {}
  return {r"(.*/)?experts/(gate|up|down)_proj": max(1, rank // config.num_experts_per_tok)}


MOE_EXPERT_RANKS = ("total/active", "same")


def model_spec(spec: lora.LoraSpec, config: transformer.ModelConfig, moe_expert_rank: str = "total/active"):
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


def untie_embeddings(config: transformer.ModelConfig, params, adapters=None):
  """A tied model as an untied one computing the same function: ``lm_head = embed_tokens^T``, the output-side
  (``unembed``) adapter moved to ``lm_head``; returns ``(config, params, adapters)`` (adapters may be merged then)."""
  if not config.tie_word_embeddings:
    return config, params, adapters
  params, adapters = lora.untie(params, adapters or {}, ("model", "embed_tokens"), ("lm_head",))
  return config.replace(tie_word_embeddings=False), params, adapters


def layouts(config: transformer.ModelConfig) -> dict:
  """``lora.trace_layouts`` of a ``CausalLM`` of ``config`` (kernels with more than two axes, tied heads), traced on
  a dummy batch: what ``lora.create`` needs for this project's models."""
  return lora.trace_layouts(transformer.CausalLM(config), jnp.zeros((1, 8), jnp.int32))
