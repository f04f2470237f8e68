"""The mesh axes and the default logical-axis rules, as plain data (no JAX): configs read them without starting JAX;
``lora_jax.sharding`` applies them."""

from __future__ import annotations

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")  # the batch is split over both: FSDP is data parallelism with sharded weights

# Logical axis -> mesh axis. FSDP shards the model (embed) dimension of every matrix; tensor parallelism shards the
# MLP, head and vocabulary dimensions; layers and per-head widths stay whole.
DEFAULT_RULES: dict[str, str | None] = {
    "batch": "data",
    "embed": "fsdp",
    "mlp": "tensor",
    "heads": "tensor",
    "kv_heads": "tensor",
    "vocab": "tensor",
    "experts": None,
    "layers": None,
    "head_dim": None,
    "norm": None,
}
