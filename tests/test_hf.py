"""Tests for lora_jax.hf: parity with the transformers PyTorch models, config spellings, save/load, errors.

Reference checkpoints are tiny random HF models built with torch and written with `save_pretrained`.
"""

import json
import math

import flax.traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from _tolerance import assert_close, model_bound  # noqa: E402
from lora_jax import hf  # noqa: E402
from lora_jax.models import transformer  # noqa: E402
from lora_jax.models.transformer import CausalLM, ModelConfig  # noqa: E402

_COMMON = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
               num_key_value_heads=2, head_dim=8, rms_norm_eps=1e-5, attn_implementation="eager")
_LLAMA3_ROPE = dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                    original_max_position_embeddings=8)
_MOE = dict(moe_intermediate_size=16, num_experts=4, num_experts_per_tok=2, norm_topk_prob=True)

# name -> (HF model class, config kwargs). Sequence length in the tests is 12.
HF_MODELS = {
    "llama": ("LlamaForCausalLM", dict(rope_parameters=_LLAMA3_ROPE)),
    "llama_tied": ("LlamaForCausalLM", dict(tie_word_embeddings=True)),
    "mistral": ("MistralForCausalLM", dict(sliding_window=5, rope_parameters=dict(rope_type="default",
                                                                                  rope_theta=1e6))),
    "qwen3": ("Qwen3ForCausalLM", dict(head_dim=16, tie_word_embeddings=True)),
    "qwen3_moe": ("Qwen3MoeForCausalLM", dict(_MOE, mlp_only_layers=[1])),
    "qwen3_moe_all_sparse": ("Qwen3MoeForCausalLM", dict(_MOE, norm_topk_prob=False)),
}


def _hf_model(name, seed=0, **changes):
  """A random HF model whose weights are large enough that attention, RoPE and routing all matter."""
  cls_name, kwargs = HF_MODELS[name]
  cls = getattr(transformers, cls_name)
  config = cls.config_class(**{**_COMMON, **kwargs, **changes})
  torch.manual_seed(seed)
  model = cls(config).eval()
  with torch.no_grad():
    for pname, p in model.named_parameters():
      p.copy_(1 + 0.2 * torch.randn_like(p) if "norm" in pname else 0.2 * torch.randn_like(p))
  return model


def _save_hf(name, path, **changes):
  model = _hf_model(name, **changes)
  model.save_pretrained(path)
  return model


def _hf_logits(model, ids):
  with torch.no_grad():
    return model(torch.as_tensor(np.asarray(ids))).logits.float().numpy()


def _logits(config, params, ids):
  return np.asarray(jax.jit(CausalLM(config).apply)({"params": params}, jnp.asarray(ids)))


def _ids(vocab=96, shape=(2, 12), seed=0):
  return np.random.RandomState(seed).randint(0, vocab, shape)


@pytest.mark.parametrize("name,scan", [
    ("llama", False), ("llama_tied", True), ("mistral", False), ("mistral", True), ("qwen3", True),
    ("qwen3_moe", False), ("qwen3_moe_all_sparse", True)])
def test_logits_match_transformers(tmp_path, name, scan):
  model = _save_hf(name, tmp_path)
  config, params = hf.load(tmp_path, scan_layers=scan)
  ids = _ids()
  ref = _hf_logits(model, ids)
  assert np.abs(ref).max() > 1.0  # Not a near-zero model where any implementation agrees.
  assert_close(_logits(config, params, ids), ref, model_bound(config, ids.shape[1]))
  if name == "mistral":  # The window (5 < 12 tokens) matters: without it the logits differ.
    no_window = _logits(config.replace(sliding_window=None), params, ids)
    assert np.abs(no_window - ref).max() > 1e-2
  if name == "llama":  # So does llama3 rope scaling.
    assert np.abs(_logits(config.replace(rope_scaling=None), params, ids) - ref).max() > 1e-2


def test_rope_inv_freq_matches_transformers():
  hf_config = transformers.LlamaConfig(**{**_COMMON, "head_dim": 64}, rope_parameters={
      **_LLAMA3_ROPE, "original_max_position_embeddings": 8192, "factor": 32.0})
  ref, _ = transformers.modeling_rope_utils.ROPE_INIT_FUNCTIONS["llama3"](hf_config)
  config = hf.config_from_hf_dict({**hf_config.to_dict(), "architectures": ["LlamaForCausalLM"]})
  np.testing.assert_allclose(transformer.rope_inv_freq(config), ref.numpy(), rtol=1e-6)


def test_config_spellings_of_transformers_4_and_5(tmp_path):
  v5 = {"architectures": ["Qwen3MoeForCausalLM"], "vocab_size": 96, "hidden_size": 32, "intermediate_size": 48,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8,
        "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "dtype": "bfloat16", "num_local_experts": 4,
        "num_experts_per_tok": 2, "moe_intermediate_size": 16, "norm_topk_prob": True, "mlp_only_layers": [],
        "use_sliding_window": False, "sliding_window": None,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1e6}}
  v4 = {**v5, "torch_dtype": "bfloat16", "rope_theta": 1e6, "rope_scaling": None, "num_experts": 4}
  for key in ("dtype", "rope_parameters", "num_local_experts"):
    del v4[key]
  configs = [hf.config_from_hf_dict(raw) for raw in (v4, v5)]
  assert configs[0] == configs[1]
  assert configs[0].param_dtype == "bfloat16" and configs[0].rope_theta == 1e6 and configs[0].num_experts == 4

  llama_v4 = {"architectures": ["LlamaForCausalLM"], **{k: v5[k] for k in (
      "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")},
      "num_key_value_heads": 2, "torch_dtype": "float32", "rope_theta": 500000.0,
      "rope_scaling": {"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                       "original_max_position_embeddings": 8}}
  (tmp_path / "config.json").write_text(json.dumps(llama_v4))
  config = hf.load_config(tmp_path)
  assert config.rope_scaling == {k: v for k, v in _LLAMA3_ROPE.items() if k not in ("rope_type", "rope_theta")}
  assert config.rope_theta == 500000.0 and config.head_dim == 8 and not config.qk_norm
  # What we write is read back identically, by us and by transformers.
  assert hf.config_from_hf_dict(hf.config_to_hf_dict(config)) == config
  hf_config = transformers.AutoConfig.for_model(**{
      k: v for k, v in hf.config_to_hf_dict(config).items() if k not in ("architectures",)})
  assert hf_config.rope_parameters["rope_type"] == "llama3" and hf_config.rope_parameters["factor"] == 8.0


def test_sharded_checkpoint(tmp_path):
  model = _save_hf("qwen3_moe", tmp_path)
  model.save_pretrained(tmp_path, max_shard_size="30KB")
  assert (tmp_path / "model.safetensors.index.json").exists()
  (tmp_path / "model.safetensors").unlink(missing_ok=True)
  config, params = hf.load(tmp_path)
  ids = _ids()
  assert_close(_logits(config, params, ids), _hf_logits(model, ids), model_bound(config, ids.shape[1]))


@pytest.mark.parametrize("config", [
    ModelConfig.tiny_llama(scan_layers=True),
    ModelConfig.tiny_mistral(),
    ModelConfig.tiny_qwen3(),
    ModelConfig.tiny_qwen3_moe(num_layers=3, mlp_only_layers=(0,)),
], ids=lambda c: c.architecture)
def test_save_params_loads_in_transformers(tmp_path, config):
  params = transformer.init_params(config, jax.random.key(0))
  leaves, treedef = jax.tree.flatten(params)
  params = jax.tree.unflatten(treedef, [x + 0.2 * jax.random.normal(jax.random.key(i), x.shape)
                                        for i, x in enumerate(leaves)])
  hf.save_params(params, config, tmp_path, max_shard_bytes=40_000)  # Several shards and an index.
  assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
  model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
  ids = _ids(config.vocab_size)
  ours = _logits(config, params, ids)
  assert_close(_hf_logits(model, ids), ours, model_bound(config, ids.shape[1]))
  config2, params2 = hf.load(tmp_path, scan_layers=config.scan_layers)
  assert config2 == config
  jax.tree.map(np.testing.assert_array_equal, params2, params)


def test_save_params_bf16(tmp_path):
  config = ModelConfig.tiny_llama()
  params = transformer.init_params(config, jax.random.key(0))
  hf.save_params(params, config, tmp_path, dtype="bfloat16")
  assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "bfloat16"
  with safetensors.safe_open(str(tmp_path / "model.safetensors"), "numpy") as f:
    assert f.get_slice("lm_head.weight").get_dtype() == "BF16"
    assert f.metadata() == {"format": "pt"}
  loaded = hf.load_params(tmp_path, config)  # Cast back to the config's float32.
  rounded = jax.tree.map(lambda x: x.astype(jnp.bfloat16).astype(jnp.float32), params)
  jax.tree.map(np.testing.assert_array_equal, loaded, rounded)


@pytest.mark.parametrize("scan", [False, True])
def test_name_mapping_round_trips(scan):
  config = ModelConfig.tiny_qwen3_moe(scan_layers=scan)
  shapes = hf.param_shapes(config)
  keys = [e.key for e in hf.tensor_entries(config, shapes)]
  assert len(keys) == len(set(keys)) == 2 + 1 + 2 * (2 + 6 + 1 + 3 * 4)
  for key in keys:
    path, index = hf.param_path(key, scan)
    assert path in shapes
    named = dict(zip([n for n in ("layers", "experts") if n in path], index))
    assert hf.hf_key(path, named.get("layers"), named.get("experts")) == key
  assert hf.hf_module_name(("model", "layers_0", "self_attn", "q_proj", "kernel")) == "model.layers.0.self_attn.q_proj"
  assert hf.hf_module_name(("model", "layers", "mlp", "experts", "up_proj"), layer=1, expert=3) == (
      "model.layers.1.mlp.experts.3.up_proj")
  assert hf.hf_module_name(("lm_head",)) == "lm_head"
  assert hf.param_path("model.layers.1.self_attn.q_proj.weight", scan_layers=True) == (
      ("model", "layers", "self_attn", "q_proj", "kernel"), (1,))
  with pytest.raises(ValueError, match="pass layer="):
    hf.hf_module_name(("model", "layers", "mlp", "gate_proj"))


# ----------------------------------------------------------------------------------------------------------------
# Bad inputs.


def test_unsupported_architecture(tmp_path):
  (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "vocab_size": 8}))
  with pytest.raises(ValueError, match="GPT2LMHeadModel.*not supported.*LlamaForCausalLM.*Qwen3MoeForCausalLM"):
    hf.load_config(tmp_path)


def test_unsupported_rope_type():
  raw = {**transformers.LlamaConfig(**_COMMON).to_dict(), "architectures": ["LlamaForCausalLM"],
         "rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}}
  with pytest.raises(NotImplementedError, match="yarn"):
    hf.config_from_hf_dict(raw)


@pytest.fixture
def llama_dir(tmp_path):
  _save_hf("llama", tmp_path)
  return tmp_path


def _rewrite(path, edit):
  tensors = safetensors.numpy.load_file(str(path))
  edit(tensors)
  safetensors.numpy.save_file(tensors, str(path), metadata={"format": "pt"})


def test_missing_and_unexpected_tensors(llama_dir):
  config = hf.load_config(llama_dir)
  _rewrite(llama_dir / "model.safetensors", lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
  with pytest.raises(ValueError, match=r"1 missing tensors:\n  model\.layers\.1\.mlp\.up_proj\.weight"):
    hf.load_params(llama_dir, config)
  _rewrite(llama_dir / "model.safetensors", lambda t: t.update({
      "model.layers.1.mlp.up_proj.weight": np.zeros((48, 32), np.float32),
      "model.layers.1.mlp.extra.weight": np.zeros((3,), np.float32),
      "model.layers.1.self_attn.rotary_emb.inv_freq": np.zeros((4,), np.float32)}))  # Ignored (old checkpoints).
  with pytest.raises(ValueError, match=r"1 unexpected tensors:\n  model\.layers\.1\.mlp\.extra\.weight"):
    hf.load_params(llama_dir, config)
  # A checkpoint with more layers than the config is reported, not silently truncated.
  _rewrite(llama_dir / "model.safetensors", lambda t: t.pop("model.layers.1.mlp.extra.weight"))
  with pytest.raises(ValueError, match=r"unexpected tensors:\n  model\.layers\.2\."):
    hf.load_params(llama_dir, config.replace(num_layers=2))


def test_wrong_shape_names_key_and_both_shapes(llama_dir):
  config = hf.load_config(llama_dir).replace(intermediate_size=40)
  with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.down_proj\.weight: checkpoint \(32, 48\) in "
                                       r"model\.safetensors, config expects \(32, 40\)"):
    hf.load_params(llama_dir, config)


def test_corrupt_or_truncated_file_is_named(llama_dir):
  config = hf.load_config(llama_dir)
  file = llama_dir / "model.safetensors"
  data = file.read_bytes()
  file.write_bytes(data[:-100])
  with pytest.raises(ValueError, match=r"model\.safetensors: not a readable safetensors file"):
    hf.load_params(llama_dir, config)
  file.write_bytes(b"not a safetensors file at all")
  with pytest.raises(ValueError, match=r"model\.safetensors: not a readable safetensors file"):
    hf.load_params(llama_dir, config)


def test_missing_files(tmp_path):
  with pytest.raises(FileNotFoundError, match="no such local checkpoint"):
    hf.load_config(tmp_path / "absent")
  (tmp_path / "config.json").write_text("{}")
  with pytest.raises(FileNotFoundError, match="neither model.safetensors"):
    hf.load_params(tmp_path, ModelConfig.tiny_llama())
  (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "model-1.safetensors"}}))
  with pytest.raises(FileNotFoundError, match="model-1.safetensors"):
    hf.load_params(tmp_path, ModelConfig.tiny_llama())


def test_load_casts_to_requested_dtype(llama_dir):
  config = hf.load_config(llama_dir, param_dtype="bfloat16")
  params = hf.load_params(llama_dir, config)
  assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype("bfloat16")}
  flat = flax.traverse_util.flatten_dict(hf.load_params(llama_dir, config, dtype="float32"))
  assert all(x.dtype == jnp.float32 for x in flat.values())
  assert math.isclose(float(jnp.abs(flat[("model", "norm", "scale")]).mean()), 1.0, abs_tol=0.2)


def test_hub_id_resolves_through_snapshot_download(llama_dir, monkeypatch):
  import huggingface_hub
  calls = []

  def fake_snapshot_download(repo_id, revision=None, ignore_patterns=()):
    calls.append((repo_id, revision, tuple(ignore_patterns)))
    return str(llama_dir)

  monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
  config, params = hf.load("meta-llama/Llama-3.2-1B")
  assert calls[0][0] == "meta-llama/Llama-3.2-1B" and "*.bin" in calls[0][2]
  assert config.architecture == "llama" and "lm_head" in params
