"""Tests for lora_jax.optim: config validation, the schedules, LoRA+ and clipping, plain Adam's first step."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lora_jax import lora, optim
from lora_jax.models import transformer

CONFIG = transformer.ModelConfig(architecture="llama", vocab_size=24, hidden_size=32, intermediate_size=64,
                                 num_layers=1, num_heads=4, num_kv_heads=2, head_dim=8)


def trainable(spec):
  params = transformer.init_params(CONFIG, jax.random.key(0))
  params, adapters = lora.create(params, spec, jax.random.key(1))
  return lora.split(params, adapters, spec)[0]


def test_optimizer_config_errors_and_schedules():
  with pytest.raises(ValueError, match="unknown optim.schedule 'cosin'; valid"):
    optim.OptimConfig(lr=1.0, schedule="cosin")
  with pytest.raises(ValueError, match="needs total_steps > warmup_steps"):
    optim.OptimConfig(lr=1.0, schedule="cosine", warmup_steps=10, total_steps=5)
  with pytest.raises(ValueError, match="optim.lr must be > 0"):
    optim.OptimConfig(lr=0.0)
  s = optim.schedule(optim.OptimConfig(lr=1.0, schedule="linear", warmup_steps=2, total_steps=6))
  assert [round(float(s(i)), 3) for i in range(7)] == [0.0, 0.5, 1.0, 0.75, 0.5, 0.25, 0.0]
  s = optim.schedule(optim.OptimConfig(lr=2.0, schedule="warmup_constant", warmup_steps=4))
  assert [float(s(i)) for i in (0, 2, 4, 100)] == [0.0, 1.0, 2.0, 2.0]
  s = optim.schedule(optim.OptimConfig(lr=1.0, schedule="cosine", total_steps=4))
  assert [round(float(s(i)), 6) for i in range(5)] == [1.0, round(0.5 + 0.5 * np.cos(np.pi / 4), 6), 0.5,
                                                      round(0.5 - 0.5 * np.cos(np.pi / 4), 6), 0.0]
  assert float(optim.schedule(optim.OptimConfig(lr=3e-4))(1000)) == pytest.approx(3e-4)
  assert float(optim.schedule(optim.OptimConfig(lr=3e-4), scale=4.0)(0)) == pytest.approx(1.2e-3)
  assert set(optim.SCHEDULES) == {"constant", "warmup_constant", "linear", "cosine"}


def test_lora_plus_and_clipping_in_the_optimizer():
  optim_config = optim.OptimConfig(lr=1.0, lr_b_ratio=4.0, grad_clip_norm=1e-3, b1=0.0, b2=0.0, eps=0.0)
  params = trainable(lora.LoraSpec(rank=4, targets=("all-linear", "unembed")))
  tx = optim.make_optimizer(optim_config)
  grads = jax.tree.map(lambda x: jnp.full_like(x, 5.0), params)
  updates, _ = tx.update(grads, tx.init(params), params)
  ad = updates["lora"]["lm_head"]
  # Clipping scales all gradients alike, and b1 = b2 = eps = 0 makes Adam's step lr * sign(g): the ratio is LoRA+'s.
  assert float(ad.a[0, 0]) == pytest.approx(-1.0) and float(ad.b[0, 0]) == pytest.approx(-4.0)


def test_first_adam_step_is_lr_times_sign_and_weight_decay_is_decoupled():
  params = trainable(lora.LoraSpec.full())
  grads = jax.tree.map(lambda x: jnp.where(jnp.arange(x.size).reshape(x.shape) % 2, 3.0, -0.5), params)
  tx = optim.make_optimizer(optim.OptimConfig(lr=0.1, eps=0.0, weight_decay=0.5))
  updates, _ = tx.update(grads, tx.init(params), params)
  # float32 bound: 1 - b2 and Adam's bias correction 1 - b2**1 round differently from 0.001 (relative ~1e-5).
  for u, g, p in zip(jax.tree.leaves(updates), jax.tree.leaves(grads), jax.tree.leaves(params)):
    np.testing.assert_allclose(u, -0.1 * (np.sign(g) + 0.5 * p), rtol=1e-4, atol=1e-6)
