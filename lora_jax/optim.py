"""The optimizer: Adam(W) with an optional schedule, global-norm clipping and LoRA+'s separate LR for B."""

from __future__ import annotations

import dataclasses

import optax

from lora_jax import lora

SCHEDULES = ("constant", "warmup_constant", "linear", "cosine")


@dataclasses.dataclass(frozen=True)
class OptimConfig:
  """Adam(W) and its schedule; the study's setting is Adam, constant LR, no warmup, no clipping."""

  lr: float  # Peak learning rate (of A and of full fine-tuning's weights).
  schedule: str = "constant"  # constant | warmup_constant | linear (decay to 0) | cosine (decay to 0).
  warmup_steps: int = 0  # Linear warm-up steps (warmup_constant, linear, cosine).
  total_steps: int = 0  # Steps the decaying schedules decay over.
  b1: float = 0.9  # Adam beta1.
  b2: float = 0.999  # Adam beta2.
  eps: float = 1e-8  # Adam epsilon.
  weight_decay: float = 0.0  # Decoupled weight decay (AdamW); 0 is plain Adam.
  grad_clip_norm: float | None = None  # Clip the global gradient norm to this value; None = no clipping.
  lr_b_ratio: float = 1.0  # LoRA+: learning rate of B = lr_b_ratio * lr (1 = one LR for A and B, the study's).

  def __post_init__(self):
    if self.schedule not in SCHEDULES:
      raise ValueError(f"unknown optim.schedule {self.schedule!r}; valid: {list(SCHEDULES)}")
    if self.schedule in ("linear", "cosine") and self.total_steps <= self.warmup_steps:
      raise ValueError(f"optim.schedule {self.schedule!r} needs total_steps > warmup_steps, got "
                       f"{self.total_steps} <= {self.warmup_steps}")
    if self.lr <= 0:
      raise ValueError(f"optim.lr must be > 0, got {self.lr}")


def schedule(cfg: OptimConfig, scale: float = 1.0) -> optax.Schedule:
  """The learning-rate schedule of ``cfg`` (times ``scale``)."""
  peak = cfg.lr * scale
  if cfg.schedule == "constant":
    return optax.constant_schedule(peak)
  warmup = optax.linear_schedule(0.0, peak, max(cfg.warmup_steps, 1)) if cfg.warmup_steps else None
  if cfg.schedule == "warmup_constant":
    main = optax.constant_schedule(peak)
  elif cfg.schedule == "linear":
    main = optax.linear_schedule(peak, 0.0, cfg.total_steps - cfg.warmup_steps)
  else:
    main = optax.cosine_decay_schedule(peak, cfg.total_steps - cfg.warmup_steps)
  return optax.join_schedules([warmup, main], [cfg.warmup_steps]) if warmup else main


def make_optimizer(cfg: OptimConfig) -> optax.GradientTransformation:
  """Global-norm clipping (optional) then Adam(W) over the trainable tree, B with its own LR under LoRA+."""

  def adam(scale):
    return optax.adamw(schedule(cfg, scale), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay)

  tx = lora.optimizer(adam(1.0), tx_b=adam(cfg.lr_b_ratio) if cfg.lr_b_ratio != 1.0 else None)
  if cfg.grad_clip_norm is not None:
    tx = optax.chain(optax.clip_by_global_norm(cfg.grad_clip_norm), tx)
  return tx
