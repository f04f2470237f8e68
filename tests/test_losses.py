"""lora_jax.losses: the chunked cross-entropy equals the full-logits one (float64) and never forms [tokens, vocab]."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lora_jax import lora, losses, train
from lora_jax.models import transformer
from lora_jax.models.transformer import CausalLM, ModelConfig

B, T = 2, 11


def _batch(vocab, seed=0):
  rng = np.random.default_rng(seed)
  return {"inputs": jnp.asarray(rng.integers(0, vocab, (B, T)), jnp.int32),
          "targets": jnp.asarray(rng.integers(0, vocab, (B, T)), jnp.int32),
          "loss_mask": jnp.asarray(rng.integers(0, 2, (B, T)), jnp.float64 if jax.config.jax_enable_x64 else jnp.float32),
          "segment_ids": jnp.asarray([[1] * 4 + [2] * 7, [1] * 11])}


def _state(config, spec):
  params = transformer.init_params(config, jax.random.key(0))
  model = CausalLM(config)
  adapters = {}
  if not spec.is_full:
    params, adapters = lora.create(params, spec, jax.random.key(1),
                                   layouts=lora.trace_layouts(model, jnp.zeros((1, 2), jnp.int32)))
  trainable, frozen = lora.split(params, adapters, spec)
  # Nonzero B matrices, so that the adapters (the unembedding's too) change the logits.
  return jax.tree.map(lambda x: x + 0.05, trainable), frozen


@pytest.mark.parametrize("tied", [False, True])
def test_chunked_loss_and_gradients_equal_full_logits_in_float64(tied):
  with jax.enable_x64(True):
    dtypes = dict(dtype="float64", param_dtype="float64", num_layers=1)
    # Untied (lm_head), and tied (the embedding's `attend`) with scanned, rematerialised layers.
    config = ModelConfig.tiny_qwen3(scan_layers=True, remat="full", **dtypes) if tied else \
        ModelConfig.tiny_llama(**dtypes)
    spec = lora.LoraSpec(rank=4, targets=("all-linear", "unembed"), dtype="float64")
    trainable, frozen = _state(config, spec)
    unembed = ("model", "embed_tokens@attend") if tied else ("lm_head",)
    assert unembed in [path for path, _ in lora.adapter_items(trainable["lora"])]
    batch = _batch(config.vocab_size)

    def loss_and_grads(chunk):
      model = CausalLM(config.replace(loss_chunk_size=chunk))
      f = lambda tr: train.nll_sum(model, tr, frozen, batch, jax.random.key(0), train=False)
      return jax.jit(jax.value_and_grad(f, has_aux=True))(trainable)

    (total, count), grads = loss_and_grads(0)
    (c_total, c_count), c_grads = loss_and_grads(4)  # 3 chunks, the last padded
    assert c_total.dtype == jnp.float64 and float(c_count) == float(count) == float(batch["loss_mask"].sum())
    np.testing.assert_allclose(c_total, total, rtol=1e-13)
    flat, c_flat = jax.tree.leaves_with_path(grads), jax.tree.leaves(c_grads)
    assert any("lm_head" in str(p) or "embed_tokens" in str(p) for p, _ in flat)  # the unembedding's adapter
    scale = max(float(np.abs(g).max()) for _, g in flat)
    for (_, want), got in zip(flat, c_flat):
      np.testing.assert_allclose(got, want, rtol=0, atol=1e-12 * scale)


def _all_shapes(jaxpr):
  for eqn in jaxpr.eqns:
    for var in eqn.outvars:
      yield tuple(getattr(var.aval, "shape", ()))
    for param in eqn.params.values():
      for sub in param if isinstance(param, (list, tuple)) else (param,):
        inner = getattr(sub, "jaxpr", sub)
        if hasattr(inner, "eqns"):
          yield from _all_shapes(inner)


def test_chunked_loss_never_forms_full_logits():
  config = ModelConfig.tiny_llama(vocab_size=4096, num_layers=1)
  spec = lora.LoraSpec(rank=4, targets=("all-linear", "unembed"))
  trainable, frozen = _state(config, spec)
  batch = _batch(config.vocab_size)
  full_size = B * T * config.vocab_size

  def biggest(chunk):
    model = CausalLM(config.replace(loss_chunk_size=chunk))
    f = lambda tr: train.nll_sum(model, tr, frozen, batch, jax.random.key(0), train=False)[0]
    jaxpr = jax.make_jaxpr(jax.grad(f))(trainable).jaxpr
    return max(int(np.prod(s)) for s in _all_shapes(jaxpr))

  assert biggest(0) >= full_size  # the reference forms [B, T, V] logits (and their gradient)
  assert biggest(4) == B * 4 * config.vocab_size  # forward and backward: one [B, 4, V] chunk at a time


def test_masked_nll_sum_matches_a_direct_computation():
  logits = jnp.asarray([[[0.0, 1.0, 2.0], [3.0, 0.0, 0.0]]])
  total, count = losses.masked_nll_sum(logits, jnp.asarray([[2, 0]]), jnp.asarray([[1.0, 0.0]]))
  expected = -(2.0 - np.log(1 + np.e + np.e**2))
  np.testing.assert_allclose([float(total), float(count)], [expected, 1.0], rtol=1e-6)
  with pytest.raises(ValueError, match="loss_chunk_size must be an int >= 0"):
    ModelConfig.tiny_llama(loss_chunk_size=-1)
