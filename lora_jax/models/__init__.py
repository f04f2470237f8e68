"""Plain Flax models. They never import the LoRA code."""

from lora_jax.models.transformer import (
    ARCHITECTURES,
    PRESETS,
    CausalLM,
    ModelConfig,
    abstract_params,
    init_cache,
    init_params,
    logical_axes,
    param_count,
)

__all__ = [
    "ARCHITECTURES", "PRESETS", "CausalLM", "ModelConfig", "abstract_params", "init_cache", "init_params",
    "logical_axes", "param_count",
]
