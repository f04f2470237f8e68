"""Tests for lora_jax.models.transformer (no torch needed; HF parity lives in test_hf.py)."""

import dataclasses
import json

import flax.linen as nn
import flax.traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from _tolerance import assert_exact, config64
from lora_jax.models import transformer
from lora_jax.models.transformer import CausalLM, ModelConfig

TINY = {
    "llama": ModelConfig.tiny_llama,
    "mistral": ModelConfig.tiny_mistral,
    "qwen3": ModelConfig.tiny_qwen3,
    "qwen3_moe": ModelConfig.tiny_qwen3_moe,
}


def _params(config, seed=0):
  """Random params with larger weights than the 0.02 init, so attention and routing are far from uniform."""
  params = transformer.init_params(config, jax.random.key(seed))
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
  return jax.tree.unflatten(treedef, [x + 0.2 * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)])


def _stack_layers(params, num_layers):
  """Converts an unrolled tree (layers_i) into the scan layout (layers with a leading layer axis)."""
  model = dict(params["model"])
  layers = [model.pop(f"layers_{i}") for i in range(num_layers)]
  model["layers"] = jax.tree.map(lambda *xs: jnp.stack(xs), *layers)
  return {**params, "model": model}


def _apply(config, params, *args, **kwargs):
  """Jitted CausalLM.apply (eager op-by-op dispatch is ~10x slower on these tiny models)."""
  return jax.jit(CausalLM(config).apply)({"params": params}, *args, **kwargs)


def _ids(shape, vocab, seed=0):
  return jnp.asarray(np.random.RandomState(seed).randint(1, vocab, shape), jnp.int32)


def test_param_tree_names_follow_hf_modules():
  params = transformer.abstract_params(ModelConfig.tiny_llama())
  flat = {"/".join(k): v.shape for k, v in flax.traverse_util.flatten_dict(params).items()}
  assert flat == {
      "lm_head/kernel": (32, 128),
      "model/embed_tokens/embedding": (128, 32),
      "model/norm/scale": (32,),
      **{f"model/layers_{i}/{k}": s for i in range(2) for k, s in {
          "input_layernorm/scale": (32,), "post_attention_layernorm/scale": (32,),
          "self_attn/q_proj/kernel": (32, 32), "self_attn/k_proj/kernel": (32, 16),
          "self_attn/v_proj/kernel": (32, 16), "self_attn/o_proj/kernel": (32, 32),
          "mlp/gate_proj/kernel": (32, 64), "mlp/up_proj/kernel": (32, 64), "mlp/down_proj/kernel": (64, 32),
      }.items()},
  }


def test_qwen3_tied_scanned_tree():
  config = ModelConfig.tiny_qwen3(scan_layers=True)
  params = transformer.abstract_params(config)
  assert "lm_head" not in params  # Tied: the head is embed_tokens.attend.
  attn = params["model"]["layers"]["self_attn"]
  assert attn["q_proj"]["kernel"].shape == (2, 32, 64)  # Leading layer axis; head_dim 16 * 4 heads.
  assert attn["q_norm"]["scale"].shape == (2, 16) and attn["k_norm"]["scale"].shape == (2, 16)


def test_moe_tree_and_einsum_experts():
  config = ModelConfig.tiny_qwen3_moe(mlp_only_layers=(1,))
  params = transformer.abstract_params(config)
  mlp0, mlp1 = params["model"]["layers_0"]["mlp"], params["model"]["layers_1"]["mlp"]
  assert mlp0["gate"]["kernel"].shape == (32, 4)
  assert {k: v["kernel"].shape for k, v in mlp0["experts"].items()} == {
      "gate_proj": (4, 32, 16), "up_proj": (4, 32, 16), "down_proj": (4, 16, 32)}
  assert set(mlp1) == {"gate_proj", "up_proj", "down_proj"}  # Dense layer kept by mlp_only_layers.

  # The expert kernels are applied by nn.Einsum modules on per-expert inputs (what a LoRA interceptor sees).
  seen = {}

  def record(next_fun, args, kwargs, context):
    if isinstance(context.module, nn.Einsum):
      seen[context.module.path] = (context.module.einsum_str, args[0].shape)
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(record):  # Tracing is enough: eval_shape compiles nothing.
    jax.eval_shape(CausalLM(config).apply, {"params": params}, _ids((2, 3), 128))
  assert seen == {
      ("model", "layers_0", "mlp", "experts", "gate_proj"): ("end,edf->enf", (4, 6, 32)),
      ("model", "layers_0", "mlp", "experts", "up_proj"): ("end,edf->enf", (4, 6, 32)),
      ("model", "layers_0", "mlp", "experts", "down_proj"): ("enf,efd->end", (4, 6, 16)),
  }


def test_all_linear_kernels_are_2d_dense():
  params = transformer.abstract_params(ModelConfig.tiny_qwen3_moe())
  for path, leaf in flax.traverse_util.flatten_dict(params).items():
    if path[-1] == "kernel" and "experts" not in path:
      assert leaf.ndim == 2, path


@pytest.mark.parametrize("scan", [False, True])
def test_logical_axes_match_params(scan):
  config = ModelConfig.tiny_qwen3_moe(scan_layers=scan)
  params = transformer.init_params(config, jax.random.key(0))
  axes = transformer.logical_axes(config)
  flat_axes = flax.traverse_util.flatten_dict(axes, is_leaf=lambda _, x: isinstance(x, tuple))
  flat_params = flax.traverse_util.flatten_dict(params)
  assert set(flat_axes) == set(flat_params)
  for path, names in flat_axes.items():
    assert len(names) == flat_params[path].ndim, path
    assert (names[0] == "layers") == (scan and "layers" in path), path
  layer = ("model", "layers") if scan else ("model", "layers_0")
  prefix = ("layers",) if scan else ()
  assert flat_axes[(*layer, "self_attn", "q_proj", "kernel")] == (*prefix, "embed", "heads")
  assert flat_axes[(*layer, "self_attn", "k_proj", "kernel")] == (*prefix, "embed", "kv_heads")
  assert flat_axes[(*layer, "self_attn", "q_norm", "scale")] == (*prefix, "head_dim")
  assert flat_axes[(*layer, "mlp", "experts", "down_proj", "kernel")] == (*prefix, "experts", "mlp", "embed")
  assert flat_axes[("model", "embed_tokens", "embedding")] == ("vocab", "embed")
  assert flat_axes[("lm_head", "kernel")] == ("embed", "vocab")
  # abstract_params has the same shapes without allocating.
  abstract = transformer.abstract_params(config)
  assert jax.tree.map(lambda x: x.shape, abstract) == jax.tree.map(lambda x: x.shape, params)


@pytest.mark.parametrize("arch", TINY)
def test_scan_matches_unrolled(arch, x64):
  config = config64(TINY[arch]())
  params = _params(config)
  ids = _ids((2, 7), config.vocab_size)
  ref = _apply(config, params, ids)
  scanned = config.replace(scan_layers=True)
  stacked = _stack_layers(params, config.num_layers)
  assert_exact(_apply(scanned, stacked, ids), ref)


def test_remat_and_scan_keep_logits_and_gradients(x64):
  config = config64(ModelConfig.tiny_qwen3_moe())
  params = _params(config)
  ids = _ids((2, 5), config.vocab_size)
  remat = config.replace(scan_layers=True, remat=True)
  stacked = _stack_layers(params, config.num_layers)
  assert_exact(_apply(remat, stacked, ids), _apply(config, params, ids))
  loss = lambda cfg: lambda p: jnp.sum(_apply(cfg, p, ids)[..., 0] ** 2)
  g_ref = _stack_layers(jax.jit(jax.grad(loss(config)))(params), config.num_layers)
  g_remat = jax.jit(jax.grad(loss(remat)))(stacked)
  jax.tree.map(assert_exact, g_remat, g_ref)


@pytest.mark.parametrize("arch", ["mistral", "qwen3_moe"])
def test_segment_ids_isolate_packed_documents(arch, x64):
  config = config64(TINY[arch]())
  params = _params(config)
  model = CausalLM(config)
  doc_a, doc_b = _ids((1, 5), config.vocab_size, seed=1), _ids((1, 7), config.vocab_size, seed=2)
  packed = jnp.concatenate([doc_a, doc_b, jnp.zeros((1, 3), jnp.int32)], axis=1)
  segments = jnp.asarray([[1] * 5 + [2] * 7 + [0] * 3])
  logits = jax.jit(model.apply)({"params": params}, packed, segment_ids=segments)
  assert_exact(logits[:, :5], _apply(config, params, doc_a))
  assert_exact(logits[:, 5:12], _apply(config, params, doc_b))
  assert np.isfinite(np.asarray(logits)).all()  # Padding rows stay finite.
  # Positions restart per segment by default; explicit positions give the same result.
  positions = jnp.asarray([list(range(5)) + list(range(7)) + list(range(3))])
  np.testing.assert_array_equal(transformer.segment_positions(segments), positions)
  assert_exact(_apply(config, params, packed, positions, segments), logits)


def test_sliding_window_masks_distant_keys(x64):
  mask = transformer.attention_mask(jnp.arange(6), jnp.arange(6), jnp.ones((1, 6)), jnp.ones((1, 6)), 3)
  expected = np.array([[max(0, q - 2) <= k <= q for k in range(6)] for q in range(6)])
  np.testing.assert_array_equal(mask[0], expected)
  # The window changes the logits of late tokens only.
  config = config64(ModelConfig.tiny_mistral(sliding_window=3))
  params = _params(config)
  ids = _ids((1, 8), config.vocab_size)
  windowed = _apply(config, params, ids)
  full = _apply(config.replace(sliding_window=None), params, ids)
  assert_exact(windowed[:, :3], full[:, :3])
  assert np.abs(windowed[:, 3:] - full[:, 3:]).max() > 1e-3


@pytest.mark.parametrize("arch,scan", [("llama", False), ("mistral", True), ("qwen3_moe", False)])
def test_kv_cache_decoding_matches_full_forward(arch, scan, x64):
  config = config64(TINY[arch](scan_layers=scan))
  params = _params(config)
  model = CausalLM(config)
  ids = _ids((2, 9), config.vocab_size)
  full = _apply(config, params, ids)

  cache = transformer.init_cache(config, batch=2, max_len=12)
  step = jax.jit(lambda p, x, c: model.apply({"params": p}, x, cache=c))
  logits, cache = step(params, ids[:, :4], cache)  # Prefill.
  outs = [logits]
  for t in range(4, 9):  # One token at a time.
    logits, cache = step(params, ids[:, t:t + 1], cache)
    outs.append(logits)
  assert_exact(jnp.concatenate(outs, axis=1), full)
  assert int(cache["index"]) == 9
  assert cache["k"].shape == (config.num_layers, 2, 12, config.num_kv_heads, config.head_dim)


def test_jit_matches_eager(x64):
  config = config64(ModelConfig.tiny_llama())
  params = _params(config)
  ids = _ids((2, 6), config.vocab_size)
  assert_exact(_apply(config, params, ids), CausalLM(config).apply({"params": params}, ids))


def test_bf16_runs_near_fp32():
  config = ModelConfig.tiny_llama()
  params = _params(config)
  ids = _ids((2, 6), config.vocab_size)
  eager = CausalLM(config).apply({"params": params}, ids)
  bf16 = config.replace(dtype="bfloat16", param_dtype="bfloat16")
  out = _apply(bf16, jax.tree.map(lambda x: x.astype(jnp.bfloat16), params), ids)
  assert out.dtype == jnp.float32
  assert np.abs(out - eager).max() < 0.1 * np.abs(eager).max()


def test_presets_param_counts():
  # Golden totals of the released checkpoints (embeddings and head included).
  expected = {
      "meta-llama/Llama-3.2-1B": 1_235_814_400,
      "meta-llama/Llama-3.1-8B": 8_030_261_248,
      "Qwen/Qwen3-8B": 8_190_735_360,
      "Qwen/Qwen3-30B-A3B": 30_532_122_624,
      "mistralai/Mistral-7B-v0.3": 7_248_023_552,
  }
  assert {name: transformer.param_count(ModelConfig.from_preset(name)) for name in expected} == expected
  with pytest.raises(KeyError, match="known"):
    ModelConfig.from_preset("gpt2")


def test_config_validation_and_serialization():
  config = ModelConfig.tiny_llama(param_dtype=jnp.bfloat16)
  assert config.param_dtype == "bfloat16"
  assert hash(config) == hash(ModelConfig.tiny_llama(param_dtype="bfloat16"))
  assert ModelConfig(**json.loads(json.dumps(dataclasses.asdict(config)))) == config
  with pytest.raises(ValueError, match="multiple of num_kv_heads"):
    ModelConfig.tiny_llama(num_kv_heads=3)
  with pytest.raises(ValueError, match="llama3 keys"):
    ModelConfig.tiny_llama(rope_scaling={"factor": 8.0})
  with pytest.raises(ValueError, match="scan_layers needs identical layers"):
    ModelConfig.tiny_qwen3_moe(mlp_only_layers=(1,), scan_layers=True)
  with pytest.raises(ValueError, match="architecture"):
    ModelConfig.tiny_llama(architecture="gpt2")
  moe = ModelConfig.tiny_qwen3_moe(num_layers=4, decoder_sparse_step=2)
  assert [moe.is_moe_layer(i) for i in range(4)] == [False, True, False, True]
