"""A quantized frozen base (QLoRA): NF4 numerics against bitsandbytes on this CPU, int8 by its closed-form bound, the
quantized forward, training that never touches the base, and a PEFT QLoRA model's logits against ours."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

torch = pytest.importorskip("torch")
bnb_functional = pytest.importorskip("bitsandbytes.functional")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from _tolerance import assert_close, model_bound  # noqa: E402
from lora_jax import hf, lora, model_lora, optim, peft_io, quant, train  # noqa: E402
from lora_jax.models import transformer  # noqa: E402

RNG = np.random.default_rng(0)
W = (RNG.standard_normal((96, 256)) * 0.05).astype(np.float32)  # a PyTorch weight [out, in]
W[3, 10] = 0.9  # an outlier: its block's scale is set by it
W[5, :64] = 0.0  # an all-zero block (absmax 0)


def _bnb(w, block, nested):
  q, state = bnb_functional.quantize_4bit(torch.from_numpy(w), blocksize=block, quant_type="nf4",
                                          compress_statistics=nested)
  return q.numpy().reshape(-1), state, bnb_functional.dequantize_4bit(q, state).numpy()


def test_the_tables_are_bitsandbytes_own():
  np.testing.assert_array_equal(quant.NF4_LEVELS, bnb_functional.get_4bit_type("nf4", device="cpu").numpy())
  np.testing.assert_array_equal(quant.dynamic_map(), bnb_functional.create_dynamic_map(signed=True).numpy())


@pytest.mark.parametrize("block", [64, 128])
def test_nf4_codes_and_values_equal_bitsandbytes(block):
  """The same packed bytes, absmaxes and dequantized values as bitsandbytes.quantize_4bit / dequantize_4bit for the
  same tensor and block size; and bitsandbytes' round-trip bound: each value within half the widest gap between NF4
  levels of its block's absmax."""
  packed, state, theirs = _bnb(W, block, nested=False)
  ours = quant.quantize_array(jnp.asarray(W.T), quant.QuantSpec("nf4", block))  # our kernel is [in, out]
  np.testing.assert_array_equal(np.asarray(ours.codes), packed)
  np.testing.assert_array_equal(np.asarray(ours.absmax), state.absmax.numpy())
  values = np.asarray(quant.dequantize(ours)).T
  np.testing.assert_array_equal(values, theirs)
  half_gap = float(np.max(np.diff(quant.NF4_LEVELS))) / 2
  bound = np.repeat(state.absmax.numpy(), block).reshape(W.shape) * half_gap * (1 + 1e-6)
  assert np.all(np.abs(values - W) <= bound) and np.all(np.abs(theirs - W) <= bound)


def test_double_quantization_matches_bitsandbytes_up_to_its_approximate_search():
  """4-bit codes equal. The offset (the absmaxes' mean) is a float32 sum in another order than torch's: equal to
  float32 rounding (a few ulps), and so are the second-level absmaxes. The absmaxes' 8-bit codes equal except where
  bitsandbytes' CPU binary search (BinSearch Direct2, then one neighbour compared) lands on the farther of two levels:
  there ours is the nearer one. Every value in a block whose absmax code agrees equals theirs to float32 rounding."""
  packed, state, theirs = _bnb(W, 64, nested=True)
  ours = quant.quantize_array(jnp.asarray(W.T), quant.QuantSpec("nf4", 64, double_quant=True))
  np.testing.assert_array_equal(np.asarray(ours.codes), packed)
  ulps = 8 * np.finfo(np.float32).eps
  np.testing.assert_allclose(float(ours.offset), float(state.offset), rtol=ulps)
  np.testing.assert_allclose(np.asarray(ours.absmax2), state.state2.absmax.numpy(), rtol=ulps)
  a, b = np.asarray(ours.absmax), state.absmax.numpy()
  differ = np.nonzero(a != b)[0]
  assert len(differ) <= 0.05 * len(a)
  levels = quant.dynamic_map()
  exact = np.max(np.abs(W.reshape(-1, 64)), axis=-1)
  block_of = np.repeat(np.asarray(ours.absmax2), 256)[: len(a)]
  scaled = (exact - np.float32(ours.offset)) / block_of
  for i in differ:  # ours nearer (or as near) than theirs
    assert abs(scaled[i] - levels[a[i]]) <= abs(scaled[i] - levels[b[i]]), (i, scaled[i], a[i], b[i])
  values = np.asarray(quant.dequantize(ours)).T.reshape(-1, 64)
  same = np.ones(len(a), bool)
  same[differ] = False
  np.testing.assert_allclose(values[same], theirs.reshape(-1, 64)[same], rtol=ulps, atol=ulps * np.abs(W).max())


def test_int8_round_trip_is_within_half_a_step():
  ours = quant.quantize_array(jnp.asarray(W.T), quant.QuantSpec("int8", 64))
  absmax = np.max(np.abs(W.reshape(-1, 64)), axis=-1)
  values = np.asarray(quant.dequantize(ours)).T
  step = np.repeat(absmax, 64).reshape(W.shape) / 127
  assert np.all(np.abs(values - W) <= step / 2 * (1 + 1e-5) + 1e-12)
  assert ours.codes.dtype == jnp.int8 and ours.nbytes == W.size + 4 * W.size // 64


def test_stored_bytes_are_a_quarter_plus_scales():
  spec = quant.QuantSpec("nf4", 64, double_quant=True)
  q = quant.quantize_array(jnp.asarray(W.T), spec)
  assert q.nbytes == W.size // 2 + W.size // 64 + 4 * (-(-W.size // 64 // 256)) + 4  # 4.13 bits per value


# ----------------------------------------------------------------------------------------------------------------------
# A quantized base in the forward pass and in training.

CONFIG = transformer.ModelConfig.tiny_llama()
TOKENS = jnp.asarray(np.random.default_rng(1).integers(0, CONFIG.vocab_size, (2, 8)), jnp.int32)


@functools.cache
def _base():
  return CONFIG, transformer.init_params(CONFIG, jax.random.key(0)), model_lora.layouts(CONFIG)


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_the_quantized_forward_is_the_base_dequantized_layer_by_layer(kind):
  config, params, layouts = _base()
  model = transformer.CausalLM(config)
  qparams = lora.quantize_base(params, quant.QuantSpec(kind, 64, double_quant=kind == "nf4"), layouts)
  kernels = [x for x in jax.tree.leaves(qparams, is_leaf=quant.is_quantized) if quant.is_quantized(x)]
  assert kernels and not quant.is_quantized(qparams["lm_head"]["kernel"])  # all-linear: the head stays full
  qparams, adapters = lora.create(qparams, lora.LoraSpec(rank=4), jax.random.key(1), layouts=layouts)
  adapters = jax.tree.map(lambda ad: ad.replace(b=0.05 * jnp.ones_like(ad.b)), adapters,
                          is_leaf=lambda x: isinstance(x, lora.Adapter))
  ours = lora.apply(model, qparams, adapters, TOKENS)
  np.testing.assert_array_equal(ours, lora.apply(model, quant.dequantize_tree(qparams), adapters, TOKENS))
  full = lora.apply(model, params, adapters, TOKENS)
  assert 0 < float(jnp.max(jnp.abs(ours - full))) < 0.5 * float(jnp.max(jnp.abs(full)))
  merged, _ = lora.merge(qparams, adapters)  # merging dequantizes: the merged kernels are full precision
  assert not any(quant.is_quantized(x) for x in jax.tree.leaves(merged, is_leaf=quant.is_quantized))
  assert_close(model.apply({"params": merged}, TOKENS), ours, model_bound(config, seq_len=8, rank=4))


def test_a_qlora_run_trains_only_its_adapters(tmp_path):
  """train.setup with quant=: the base is stored NF4 in the frozen state, the loss falls, the base never changes and
  has no gradient or optimizer state (the trainable tree holds adapters only)."""
  from test_train import CONFIG as config, CountingBatches  # a learnable pattern, restorable batches

  params = transformer.init_params(config, jax.random.key(0))
  spec = lora.LoraSpec(rank=4, targets=("all-linear", "unembed"))
  optim_config = optim.OptimConfig(lr=1e-2)
  s = train.setup(config, spec, optim_config, params, quant=quant.QuantSpec("nf4", 64, double_quant=True))
  frozen = jax.tree.leaves(s.state.frozen, is_leaf=quant.is_quantized)
  assert any(quant.is_quantized(x) for x in frozen)
  assert not any(quant.is_quantized(x) for x in jax.tree.leaves(s.state.trainable, is_leaf=quant.is_quantized))
  loop = train.LoopConfig(steps=40, log_every=1, eval_every=40, checkpoint_every=40)
  evals = [next(CountingBatches(batch=8))]
  state, last = train.fit(s.model, s.state, optim_config, loop, CountingBatches(), lambda: evals, tmp_path / "run",
                          progress=False, setup=s)
  import json
  evals = [json.loads(l)["eval/nll"] for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
           if "eval/nll" in l]
  assert len(evals) == 2 and evals[-1] < 0.85 * evals[0]  # held-out NLL at steps 0 and 40
  for a, b in zip(frozen, jax.tree.leaves(state.frozen, is_leaf=quant.is_quantized)):  # the base never moved
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
      np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_bad_quantization_input_names_the_kernel():
  config, params, layouts = _base()
  with pytest.raises(ValueError, match=r"model/layers_0/mlp/down_proj/kernel: 2048 values per kernel \(shape \(64, 32\)\) are not a multiple of QuantSpec.block_size=96"):
    lora.quantize_base(params, quant.QuantSpec("nf4", 96), layouts)
  with pytest.raises(ValueError, match="an embedding: only dense kernels"):
    lora.quantize_base(params, quant.QuantSpec("nf4", targets=("embed",)), layouts)
  with pytest.raises(ValueError, match="QuantSpec.kind must be one of"):
    quant.QuantSpec("fp4")
  qparams = lora.quantize_base(params, quant.QuantSpec("nf4"), layouts)
  with pytest.raises(ValueError, match="init_a='pissa' on .* a quantized kernel"):
    lora.create(qparams, lora.LoraSpec(rank=2, init_a="pissa"), jax.random.key(0), layouts=layouts)
  with pytest.raises(ValueError, match="would train quantized kernels"):
    lora.split(qparams, {}, lora.LoraSpec.full())


# ----------------------------------------------------------------------------------------------------------------------
# Against PEFT QLoRA (transformers + bitsandbytes 4-bit on this CPU).


@pytest.fixture(scope="module")
def hf_base(tmp_path_factory):
  torch.manual_seed(0)
  cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-5)
  model = transformers.LlamaForCausalLM(cfg).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      p.copy_(1 + 0.2 * torch.randn_like(p) if "norm" in name else 0.2 * torch.randn_like(p))
  path = tmp_path_factory.mktemp("llama")
  model.save_pretrained(path)
  return path


def _dequantized_torch_base(hf_base, q4):
  """The full-precision HF model with every Linear4bit's weight replaced by bitsandbytes' own dequantization of it:
  the function a QLoRA layer computes (x·deq(W)ᵀ), evaluated in float32 matmuls."""
  full = transformers.AutoModelForCausalLM.from_pretrained(hf_base, attn_implementation="eager").eval()
  quantized = {n: m for n, m in q4.named_modules() if type(m).__name__ == "Linear4bit"}
  with torch.no_grad():
    for name, module in full.named_modules():
      if name in quantized:
        w = quantized[name].weight
        module.weight.copy_(bnb_functional.dequantize_4bit(w.data, w.quant_state))
  return full, len(quantized)


def test_peft_qlora_logits_equal_ours_and_the_adapter_loads_on_the_full_precision_base(hf_base, tmp_path):
  """transformers + bitsandbytes quantize the same kernels to the same bytes; PEFT's QLoRA function (its LoRA on
  bitsandbytes' dequantized weights) gives our logits; the adapter also loads on the full-precision base."""
  ids = np.random.default_rng(2).integers(0, 64, (2, 9))
  bnb_config = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                               bnb_4bit_use_double_quant=False, bnb_4bit_compute_dtype=torch.float32)
  q4 = transformers.AutoModelForCausalLM.from_pretrained(hf_base, quantization_config=bnb_config, device_map="cpu",
                                                         attn_implementation="eager")
  dequantized, n_quantized = _dequantized_torch_base(hf_base, q4)
  config, params = hf.load(hf_base)
  layouts = model_lora.layouts(config)
  qparams = lora.quantize_base(params, quant.QuantSpec("nf4", 64), layouts)
  ours_quantized = {k for k, v in traverse_util.flatten_dict(qparams).items() if quant.is_quantized(v)}
  assert len(ours_quantized) == n_quantized == 7 * config.num_layers  # every linear layer but the head, as theirs
  for layer, name in ((0, "self_attn.q_proj"), (1, "mlp.down_proj")):  # the same bytes (before a CPU forward
    theirs = q4.get_submodule(f"model.layers.{layer}.{name}").weight.data.numpy().reshape(-1)  # repacks them)
    module = qparams["model"][f"layers_{layer}"]
    for part in name.split("."):
      module = module[part]
    np.testing.assert_array_equal(np.asarray(module["kernel"].codes), theirs)

  peft_model = peft.get_peft_model(q4, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj",
                                                                                             "down_proj"]))
  torch.manual_seed(1)
  with torch.no_grad():
    for name, p in peft_model.named_parameters():
      if "lora_" in name:
        p.copy_(0.3 * torch.randn_like(p))
  peft_model.eval().save_pretrained(tmp_path / "adapter")
  adapters, _ = peft_io.load_peft(tmp_path / "adapter", qparams, config, layouts)
  model = transformer.CausalLM(config)
  ours = np.asarray(lora.apply(model, qparams, adapters, jnp.asarray(ids)))
  bound = model_bound(config, seq_len=ids.shape[1], rank=4)
  with torch.no_grad():
    theirs = peft.PeftModel.from_pretrained(dequantized, str(tmp_path / "adapter"))(torch.as_tensor(ids)).logits
  assert_close(theirs.numpy(), ours, bound)
  with torch.no_grad():  # bitsandbytes' own CPU 4-bit matmul is approximate: near ours, not within float32 rounding
    fast = peft_model(torch.as_tensor(ids)).logits.numpy()
  assert np.abs(fast - ours).max() <= 0.1 * np.abs(ours).max()

  # QLoRA users load the adapter on the full-precision base: PEFT there equals ours on the full-precision params.
  spec = lora.LoraSpec(rank=4, alpha=8.0, targets=("q_proj", "v_proj", "down_proj"))
  peft_io.save_peft(config, adapters, spec, tmp_path / "ours", str(hf_base))
  full = transformers.AutoModelForCausalLM.from_pretrained(hf_base, attn_implementation="eager").eval()
  with torch.no_grad():
    on_full = peft.PeftModel.from_pretrained(full, str(tmp_path / "ours"))(torch.as_tensor(ids)).logits.numpy()
  assert_close(on_full, np.asarray(lora.apply(model, params, adapters, jnp.asarray(ids))), bound)
