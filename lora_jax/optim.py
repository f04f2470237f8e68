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


def schedule(cfg: OptimConfig, scale: float = 1.0, lr=None) -> optax.Schedule:
  """The learning-rate schedule of ``cfg`` (times ``scale``); ``lr`` (may be traced) replaces ``cfg.lr``."""
  peak = (cfg.lr if lr is None else lr) * scale
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


HYPERPARAMETERS = ("lr", "lr_b_ratio", "weight_decay")  # the fields a run of a stack may set per run (lora_jax.stack)


def make_optimizer(cfg: OptimConfig, hyper: dict | None = None) -> optax.GradientTransformation:
  """Global-norm clipping (optional) then Adam(W) over the trainable tree, B with its own LR under LoRA+.

  ``hyper`` maps some of ``HYPERPARAMETERS`` to values (traced scalars inside a ``jax.vmap`` over stacked runs) that
  replace ``cfg``'s; the optimizer state's structure does not depend on them.
  """
  hyper = dict(hyper or {})
  unknown = sorted(set(hyper) - set(HYPERPARAMETERS))
  if unknown:
    raise ValueError(f"make_optimizer: unknown hyperparameter(s) {unknown}; valid: {list(HYPERPARAMETERS)}")
  lr, ratio = hyper.get("lr"), hyper.get("lr_b_ratio", cfg.lr_b_ratio)
  weight_decay = hyper.get("weight_decay", cfg.weight_decay)

  def adam(scale):
    return optax.adamw(schedule(cfg, scale, lr), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=weight_decay)

  separate_b = "lr_b_ratio" in hyper or cfg.lr_b_ratio != 1.0
  tx = lora.optimizer(adam(1.0), tx_b=adam(ratio) if separate_b else None)
  if cfg.grad_clip_norm is not None:
    tx = optax.chain(optax.clip_by_global_norm(cfg.grad_clip_norm), tx)
  return tx
