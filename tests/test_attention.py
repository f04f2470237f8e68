"""Attention implementations (lora_jax.models.transformer, `model.attention`) against the exact reference ('xla').

On CPU: the splash kernel runs in the Pallas interpreter (the kernel's own code, interpreted), the cuDNN wrapper
through jax.nn.dot_product_attention's XLA implementation (the same call with the same GQA, window and segment
arguments; the cuDNN kernel itself needs an NVIDIA GPU). The splash kernel is also lowered for TPU from shapes
(no TPU needed) and, where libtpu is installed, compiled for a v5e chip ahead of time.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import _devices
from _tolerance import U32, assert_close, gamma, model_bound
from lora_jax.models import transformer
from lora_jax.models.transformer import CausalLM, MaskInfo, ModelConfig

B, T, H, G, K = 2, 128, 4, 2, 16  # GQA 4:2; the splash kernel needs T a multiple of 128.
# The splash kernel keeps float32 accumulators whatever the input dtype, so these comparisons stay float32 and are
# bounded by error growth: a score (K), the softmax normaliser and the probabilities times values (2 T), per side.
ATTENTION = 2 * gamma(K + 2 * T, U32)
# The backward pass: the forward (K + 2 T), then dP = dO V^T (K), the softmax's row sums (T) and dQ = dS K or
# dK = dS^T Q (T), plus the recomputed normaliser (T).
ATTENTION_GRAD = 2 * gamma(2 * K + 5 * T, U32)
SEGMENTS = np.array([[1] * 40 + [2] * 70 + [0] * 18, [3] * 128])  # Packed documents, padding (0) at the end.


def _qkv(seed=0, dtype=jnp.float32):
  rng = np.random.default_rng(seed)
  shapes = ((B, T, H, K), (B, T, G, K), (B, T, G, K))
  return tuple(jnp.asarray(2 * rng.normal(size=s), dtype) for s in shapes)


def _mask(packed):
  idx = jnp.arange(T, dtype=jnp.int32)
  seg = jnp.asarray(SEGMENTS, jnp.int32) if packed else None
  return MaskInfo(idx, idx, seg, seg)


IMPLEMENTATIONS = {
    "cudnn": functools.partial(transformer.attention_cudnn, implementation="xla"),
    "splash": functools.partial(transformer.attention_splash, interpret=True),
}


@pytest.mark.parametrize("implementation", sorted(IMPLEMENTATIONS))
@pytest.mark.parametrize("packed,window", [(False, None), (True, None), (True, 7)])
def test_implementations_equal_reference(implementation, packed, window):
  q, k, v = _qkv()
  mask = _mask(packed)
  ref = jax.jit(transformer.attention_xla, static_argnums=4)(q, k, v, mask, window)
  out = jax.jit(IMPLEMENTATIONS[implementation], static_argnums=4)(q, k, v, mask, window)
  assert out.shape == (B, T, H, K)
  assert_close(out, ref, ATTENTION)
  if window is not None:  # The window matters here: without it the outputs differ.
    full = transformer.attention_xla(q, k, v, mask, None)
    assert np.abs(np.asarray(full) - np.asarray(ref)).max() > 1e-2


def test_splash_gradients_equal_reference():
  q, k, v = _qkv(seed=1)
  mask = _mask(True)
  cotangent = jnp.asarray(np.random.default_rng(2).normal(size=(B, T, H, K)), jnp.float32)

  def grads(fn):
    return jax.jit(jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v, mask, 7) * cotangent), argnums=(0, 1, 2)))(q, k, v)

  for got, want in zip(grads(IMPLEMENTATIONS["splash"]), grads(transformer.attention_xla)):
    assert_close(got, want, ATTENTION_GRAD)


def test_model_with_each_attention_equals_xla(monkeypatch):
  monkeypatch.setattr(transformer, "attention_cudnn", IMPLEMENTATIONS["cudnn"])
  monkeypatch.setattr(transformer, "attention_splash", IMPLEMENTATIONS["splash"])
  # Qwen3 (q/k norms, GQA, tied) with a Mistral sliding window, scanned layers, packed segments.
  config = ModelConfig.tiny_qwen3(sliding_window=7, scan_layers=True)
  params = transformer.init_params(config, jax.random.key(0))
  params = jax.tree.map(lambda x: x * 4 if x.ndim == 3 else x, params)  # far from uniform attention
  ids = jnp.asarray(np.random.default_rng(0).integers(0, config.vocab_size, (B, T)), jnp.int32)
  segments = jnp.asarray(SEGMENTS, jnp.int32)
  logits = {impl: jax.jit(CausalLM(config.replace(attention=impl)).apply)({"params": params}, ids,
                                                                             segment_ids=segments)
            for impl in ("xla", "cudnn", "splash")}
  for impl in ("cudnn", "splash"):
    assert_close(logits[impl], logits["xla"], model_bound(config, T))


def test_auto_resolution_and_decoding_fall_back_to_xla():
  config = ModelConfig.tiny_llama(dtype="bfloat16")
  assert transformer.resolve_attention(config, 1024, False, platform="tpu") == "splash"
  assert transformer.resolve_attention(config, 1000, False, platform="tpu") == "xla"  # not a multiple of 128
  assert transformer.resolve_attention(config, 1000, False, platform="gpu") == "cudnn"
  assert transformer.resolve_attention(config.replace(dtype="float32"), 1024, False, platform="gpu") == "xla"
  assert transformer.resolve_attention(config, 1024, False, platform="cpu") == "xla"
  assert transformer.resolve_attention(config.replace(attention="splash"), 8, False) == "xla"  # e.g. model.init
  for impl in ("splash", "cudnn", "auto"):  # the KV-cache path always runs the exact attention
    assert transformer.resolve_attention(config.replace(attention=impl), 1, True, platform="tpu") == "xla"
  # 'auto' takes the platform of the mesh in context (as the trainer traces its steps), not this host's.
  for platform, want in (("tpu", "splash"), ("cpu", "xla")):
    device = jax.sharding.AbstractDevice(device_kind=platform, num_cores=1, platform=platform)
    with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((1,), ("fsdp",), abstract_device=device)):
      assert transformer.resolve_attention(config, 1024, False) == want
  with pytest.raises(ValueError, match="attention 'flash' is not one of"):
    ModelConfig.tiny_llama(attention="flash")
  q, k, v = _qkv()
  with pytest.raises(ValueError, match="multiple of 128"):
    transformer.attention_splash(q[:, :100], k[:, :100], v[:, :100], MaskInfo(*[jnp.arange(100)] * 2, None, None),
                                 None, interpret=True)


def _splash_train_grad(q, k, v, seg):
  idx = jnp.arange(q.shape[1], dtype=jnp.int32)
  out = transformer.attention_splash(q, k, v, MaskInfo(idx, idx, seg, seg), 4096)
  return jnp.sum(out.astype(jnp.float32))


def test_splash_lowers_for_tpu_and_compiles_with_libtpu():
  # Llama-3.1-8B's attention shapes at sequence 8192, two rows: forward and backward kernels.
  shapes = [jax.ShapeDtypeStruct(s, jnp.bfloat16) for s in ((2, 8192, 32, 128), (2, 8192, 8, 128),
                                                             (2, 8192, 8, 128))]
  seg = jax.ShapeDtypeStruct((2, 8192), jnp.int32)
  step = jax.jit(jax.grad(_splash_train_grad, argnums=(0, 1, 2)))
  lowered = step.trace(*shapes, seg).lower(lowering_platforms=("tpu",))
  assert lowered.as_text().count("tpu_custom_call") == 3  # forward, dq and dkv kernels; no [T, S] scores
  try:
    from jax.experimental import topologies

    devices = topologies.get_topology_desc(platform="tpu", topology_name="v5e:1x1").devices
  except Exception as err:  # noqa: BLE001 - any failure here means no TPU compiler on this machine
    pytest.skip(f"no TPU compiler (pip install libtpu): {err}")
  sharding = jax.sharding.SingleDeviceSharding(devices[0])
  shapes = [jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding) for s in (*shapes, seg)]
  memory = step.lower(*shapes).compile().memory_analysis()
  # The scores of one layer would be 2 x 32 x 8192^2 fp32 = 16 GiB; the kernels keep far less than 1 GiB.
  assert memory.temp_size_in_bytes < 2**30


def trainer_steps_lower_splash_for_a_tpu_mesh():
  """The trainer's own jitted steps (``train.setup``'s train and eval steps, ``fit``'s scanned steps) on an 8-device
  mesh with the heads split (fsdp=4, tensor=2), lowered for TPU: splash runs in them, the mesh in context. 'auto'
  on this CPU mesh still lowers the exact attention. Run with 8 fake CPU devices
  (``test_trainer_steps_run_splash_under_their_mesh``)."""
  from lora_jax import lora, optim, sharding, train

  assert jax.device_count() == 8
  mesh = sharding.make_mesh({"fsdp": 4, "tensor": 2})
  optim_config = optim.OptimConfig(lr=1e-3)

  def lowered_steps(attention, platform):
    config = ModelConfig.tiny_llama(dtype="bfloat16", attention=attention, scan_layers=True)
    s = train.setup(config, lora.LoraSpec(rank=4), optim_config, transformer.abstract_params(config), mesh=mesh)
    rows = jax.ShapeDtypeStruct((8, T), jnp.int32, sharding=s.batch_sharding)
    batch = {"inputs": rows, "targets": rows, "loss_mask": jax.ShapeDtypeStruct((8, T), jnp.float32,
                                                                               sharding=s.batch_sharding)}
    stacked_sh = train.stacked_batch_sharding(s.batch_sharding)
    batches = {k: jax.ShapeDtypeStruct((2, *v.shape), v.dtype, sharding=stacked_sh) for k, v in batch.items()}
    active = jax.ShapeDtypeStruct((2,), jnp.bool_, sharding=sharding.replicated(mesh))
    fit_steps = train.jit_train_steps(train.make_train_step(s.model, optim.make_optimizer(optim_config)),
                                      s.state_shardings, s.batch_sharding)
    rest = s.state.replace(frozen=None)
    calls = {"train_step": (s.train_step, (s.state.frozen, rest, batch)), "eval_step": (s.eval_step, (s.state, batch)),
             "fit": (fit_steps, (s.state.frozen, rest, batches, active))}
    return {name: fn.trace(*args).lower(lowering_platforms=(platform,)).as_text()
            for name, (fn, args) in calls.items()}

  for name, text in lowered_steps("splash", "tpu").items():
    # train and fit: forward, dq and dkv kernels (the forward again under remat); eval: the forward kernel.
    assert text.count("tpu_custom_call") >= (1 if name == "eval_step" else 3), name
  for name, text in lowered_steps("auto", "cpu").items():
    assert "tpu_custom_call" not in text and "shard_map" not in text.lower(), name


def test_trainer_steps_run_splash_under_their_mesh():
  import os
  import pathlib
  import subprocess
  import sys

  here = pathlib.Path(__file__).parent
  path = os.pathsep.join(filter(None, [str(here), os.environ.get("PYTHONPATH")]))  # for `from _tolerance import`
  env = {**_devices.env_with_devices(8), "PYTHONPATH": path}
  code = "from tests.test_attention import trainer_steps_lower_splash_for_a_tpu_mesh as f; f()"
  out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600,
                       cwd=here.parent)
  assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
