"""Tests for PEFT adapters in and out (lora_jax.peft_io.save_peft / load_peft) and the lora_jax.cli.export CLI.

Reference models are tiny random HF models built with torch; PyTorch PEFT loads what we write and writes what we
read, and the logits of both sides are compared.
"""

import functools
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from _tolerance import assert_close, model_bound  # noqa: E402
from lora_jax import export, hf, lora, optim, peft_io, synthetic, train  # noqa: E402
from lora_jax.cli import export as export_cli  # noqa: E402
from lora_jax import checkpoint as ckpt_lib  # noqa: E402
from lora_jax.models.transformer import CausalLM, ModelConfig  # noqa: E402

_COMMON = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, head_dim=8, rms_norm_eps=1e-5)
HF_MODELS = {
    "llama": ("LlamaForCausalLM", {}),
    "qwen3": ("Qwen3ForCausalLM", dict(head_dim=16, tie_word_embeddings=True)),
    "qwen3_moe": ("Qwen3MoeForCausalLM", dict(moe_intermediate_size=16, num_experts=4, num_experts_per_tok=2,
                                              norm_topk_prob=True)),
    "qwen3_moe_dense1": ("Qwen3MoeForCausalLM", dict(moe_intermediate_size=16, num_experts=4, num_experts_per_tok=2,
                                                     mlp_only_layers=[1])),
    "llama_wide": ("LlamaForCausalLM", dict(hidden_size=48)),  # "another base model"
}
IDS = np.random.RandomState(0).randint(0, 64, (2, 9))
# ours vs PyTorch in float32, bounded by error growth through the largest of these bases (llama_wide's width, qwen3's
# head_dim, the MoE layers' router and experts) with the largest rank used here.
TORCH = model_bound(ModelConfig(architecture="qwen3_moe", vocab_size=64, hidden_size=48, intermediate_size=48,
                                num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, num_experts=4,
                                num_experts_per_tok=2, moe_intermediate_size=16), seq_len=IDS.shape[1], rank=8)


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
  """name -> directory of a saved random HF model (built once per module)."""
  out = {}
  for name, (cls_name, kwargs) in HF_MODELS.items():
    cls = getattr(transformers, cls_name)
    torch.manual_seed(0)
    model = cls(cls.config_class(**{**_COMMON, **kwargs})).eval()
    with torch.no_grad():
      for pname, p in model.named_parameters():
        p.copy_(1 + 0.2 * torch.randn_like(p) if "norm" in pname else 0.2 * torch.randn_like(p))
    out[name] = tmp_path_factory.mktemp(name)
    model.save_pretrained(out[name])
  return out


def _torch_base(path):
  return transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager").eval()


def _torch_logits(model):
  with torch.no_grad():
    return model(torch.as_tensor(IDS)).logits.float().numpy()


def _flax(path, scan=False):
  config, params = hf.load(path, scan_layers=scan)
  model = CausalLM(config)
  return config, params, model, lora.trace_layouts(model, jnp.zeros((1, 4), jnp.int32))


def _logits(model, params, adapters):
  return np.asarray(jax.jit(functools.partial(lora.apply, model))(params, adapters, jnp.asarray(IDS)))


def _random_b(adapters, seed=1):
  """Adapters whose B is random, so every adapter changes the logits."""
  items = lora.adapter_items(adapters)
  keys = jax.random.split(jax.random.key(seed), len(items))
  return jax.tree.unflatten(jax.tree.structure(adapters, is_leaf=lambda x: isinstance(x, lora.Adapter)), [
      ad.replace(b=0.25 * jax.random.normal(k, ad.b.shape, ad.b.dtype)) for k, (_, ad) in zip(keys, items)])


def _trained(path, spec, scan=False):
  """(config, params, model, layouts, adapters) of the base at `path` with random adapters for `spec`."""
  config, params, model, layouts = _flax(path, scan)
  params, adapters = lora.create(params, spec, jax.random.key(0), layouts=layouts)
  return config, params, model, layouts, _random_b(adapters)


def _peft_logits(base_path, adapter_dir):
  model = peft.PeftModel.from_pretrained(_torch_base(base_path), str(adapter_dir))
  return _torch_logits(model)


def _adapter_config(path):
  return json.loads((path / peft_io.PEFT_CONFIG_FILE).read_text())


def _tensors(path):
  return safetensors.numpy.load_file(str(path / peft_io.PEFT_WEIGHTS_FILE))


EXPORT_CASES = {
    "default": ("llama", False, dict(rank=4, alpha=8.0)),
    "rslora": ("llama", False, dict(rank=4, alpha=8.0, scaling="alpha/sqrt(r)")),
    "no_scaling": ("llama", False, dict(rank=4, scaling="none", rank_pattern={"v_proj": 2})),
    "patterns": ("llama", False, dict(rank=4, alpha=8.0,
                                      rank_pattern={"v_proj": 2, "model/layers_1/self_attn/q_proj": 3},
                                      alpha_pattern={"down_proj": 4.0, "model/layers_0/self_attn/o_proj": 2.5})),
    "scan_patterns": ("llama", True, dict(rank=4, alpha=8.0, rank_pattern={"v_proj": 2}, alpha_pattern={"up_proj": 3.0},
                                          scaling="alpha/sqrt(r)")),
    "layers": ("llama", False, dict(rank=4, layers=(1,))),
    "scan_layers": ("llama", True, dict(rank=4, layers=(1,), targets=("attention",))),
    "embed_unembed": ("llama", False, dict(rank=4, targets=("all-linear", "embed", "unembed"),
                                           rank_pattern={"embed_tokens": 2})),
    "tied_embed": ("qwen3", False, dict(rank=4, targets=("attention", "embed", "unembed"),
                                        alpha_pattern={"embed_tokens": 5.0})),
    "tied_unembed": ("qwen3", False, dict(rank=4, targets=("all-linear", "unembed"))),  # the study's default spec
    "tied_embed_scan": ("qwen3", True, dict(rank=4, targets=("embed", "mlp"), scaling="alpha/sqrt(r)")),
    "moe_experts": ("qwen3_moe", False, dict(rank=4, alpha=8.0, rank_pattern={"q_proj": 2})),
    "moe_experts_scan": ("qwen3_moe", True, dict(rank=4, alpha=8.0, targets=("mlp",))),  # experts only
}


@pytest.mark.parametrize("case", EXPORT_CASES)
def test_save_peft_loads_in_peft_with_the_same_logits(bases, tmp_path, case):
  arch, scan, kwargs = EXPORT_CASES[case]
  spec = lora.LoraSpec(**kwargs)
  config, params, model, _, adapters = _trained(bases[arch], spec, scan)
  peft_io.save_peft(config, adapters, spec, tmp_path, str(bases[arch]))
  ours = _logits(model, params, adapters)
  base = _torch_logits(_torch_base(bases[arch]))
  assert np.abs(ours - base).max() > 1e-2  # the adapters matter
  assert_close(_peft_logits(bases[arch], tmp_path), ours, TORCH)

  c = _adapter_config(tmp_path)
  assert (c["peft_type"], c["task_type"], c["bias"], c["use_dora"], c["modules_to_save"]) == (
      "LORA", "CAUSAL_LM", "none", False, None)
  assert c["use_rslora"] == (spec.scaling == "alpha/sqrt(r)")
  assert c["r"] == spec.rank and c["lora_alpha"] == (spec.rank if spec.scaling == "none" else spec.alpha)
  keys = list(_tensors(tmp_path))
  assert all(k.startswith("base_model.model.") for k in keys)
  if spec.layers is not None:  # layers left out (also inside a scan-stacked kernel) are not written
    assert not any(".layers.0." in k for k in keys) and c["layers_to_transform"] == list(spec.layers)


def test_save_peft_key_names_shapes_and_patterns(bases, tmp_path):
  arch, scan, kwargs = EXPORT_CASES["patterns"]
  spec = lora.LoraSpec(**kwargs)
  config, _, _, _, adapters = _trained(bases[arch], spec, scan)
  peft_io.save_peft(config, adapters, spec, tmp_path, "meta-llama/base")
  tensors = _tensors(tmp_path)
  q = adapters["model"]["layers_0"]["self_attn"]["q_proj"]
  np.testing.assert_array_equal(tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"], q.a.T)
  np.testing.assert_array_equal(tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"], q.b.T)
  assert tensors["base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight"].shape == (3, 32)
  assert tensors["base_model.model.model.layers.0.mlp.down_proj.lora_B.weight"].shape == (32, 4)
  c = _adapter_config(tmp_path)
  assert c["rank_pattern"] == {"model.layers.1.self_attn.q_proj": 3, "v_proj": 2}
  assert c["alpha_pattern"] == {"down_proj": 4, "model.layers.0.self_attn.o_proj": 2.5}
  assert sorted(c["target_modules"]) == sorted(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                "down_proj"])
  assert c["base_model_name_or_path"] == "meta-llama/base"
  with safetensors.safe_open(str(tmp_path / peft_io.PEFT_WEIGHTS_FILE), "numpy") as f:
    assert f.metadata() == {"format": "pt"}


def test_tied_model_sides_are_written_as_embed_tokens_and_lm_head(bases, tmp_path):
  arch, scan, kwargs = EXPORT_CASES["tied_embed"]
  spec = lora.LoraSpec(**kwargs)
  config, _, _, _, adapters = _trained(bases[arch], spec, scan)
  peft_io.save_peft(config, adapters, spec, tmp_path, "base")
  t, c = _tensors(tmp_path), _adapter_config(tmp_path)
  emb, head = adapters["model"]["embed_tokens"], adapters["model"]["embed_tokens@attend"]
  np.testing.assert_array_equal(t["base_model.model.model.embed_tokens.lora_embedding_A"], emb.a.T)  # [r, V]
  np.testing.assert_array_equal(t["base_model.model.model.embed_tokens.lora_embedding_B"], emb.b.T)  # [D, r]
  np.testing.assert_array_equal(t["base_model.model.lm_head.lora_A.weight"], head.a.T)  # [r, D]
  np.testing.assert_array_equal(t["base_model.model.lm_head.lora_B.weight"], head.b.T)  # [V, r]
  assert not c["ensure_weight_tying"] and {"embed_tokens", "lm_head"} <= set(c["target_modules"])
  assert c["alpha_pattern"] == {"embed_tokens": 5}
  # And back: PEFT's lm_head on a tied model is our output-side adapter again.
  config, params, _, layouts = _flax(bases[arch])
  loaded, loaded_spec = peft_io.load_peft(tmp_path, params, config, layouts)
  np.testing.assert_array_equal(loaded["model"]["embed_tokens@attend"].b, head.b)
  assert set(loaded["model"]) >= {"embed_tokens", "embed_tokens@attend"}


SERVING_CASES = ("patterns", "scan_patterns", "scan_layers", "tied_embed", "no_scaling")


@pytest.mark.parametrize("case", SERVING_CASES + ("moe_serving",))
def test_for_serving_folds_scales_and_pads_ranks(bases, tmp_path, case):
  if case == "moe_serving":  # rsLoRA and per-module ranks on experts: refused by the normal export, folded here
    arch, scan, kwargs = "qwen3_moe", False, dict(rank=3, scaling="alpha/sqrt(r)", rank_pattern={"down_proj": 2})
  else:
    arch, scan, kwargs = EXPORT_CASES[case]
  spec = lora.LoraSpec(**kwargs)
  config, params, model, _, adapters = _trained(bases[arch], spec, scan)
  peft_io.save_peft(config, adapters, spec, tmp_path, str(bases[arch]), for_serving=True)
  assert_close(_peft_logits(bases[arch], tmp_path), _logits(model, params, adapters), TORCH)
  c = _adapter_config(tmp_path)
  assert c["r"] == c["lora_alpha"] == 8 and c["r"] in peft_io.VLLM_RANKS
  assert not c["rank_pattern"] and not c["alpha_pattern"] and not c["use_rslora"]
  for key, value in _tensors(tmp_path).items():  # every module padded to r = 8 with zeros
    rank_axis = 0 if key.endswith(("lora_A.weight", "lora_embedding_A")) else 1
    assert value.shape[rank_axis] == 8, key
  assert export.check_adapter(tmp_path, config.architecture) == []


def test_serving_rank():
  assert [peft_io.serving_rank(r) for r in (1, 2, 8, 9, 300, 320, 321, 512)] == [1, 8, 8, 16, 320, 320, 512, 512]
  with pytest.raises(ValueError, match="above 512"):
    peft_io.serving_rank(513)


ROUND_TRIP_CASES = {
    "patterns": ("llama", False, dict(r=4, lora_alpha=8,
                                      target_modules=["q_proj", "v_proj", "down_proj", "lm_head", "embed_tokens"],
                                      rank_pattern={"v_proj": 2},
                                      alpha_pattern={"model.layers.1.self_attn.q_proj": 3})),
    "rslora_layers_scan": ("llama", True, dict(r=4, lora_alpha=16, target_modules=["q_proj", "k_proj", "gate_proj"],
                                               use_rslora=True, layers_to_transform=[1], lora_dropout=0.05)),
    "tied": ("qwen3", False, dict(r=2, lora_alpha=4, target_modules=["embed_tokens", "o_proj"],
                                  ensure_weight_tying=True)),
    "tied_sides": ("qwen3", False, dict(r=2, lora_alpha=4, target_modules=["embed_tokens", "lm_head", "q_proj"])),
    "one_module": ("llama", False, dict(r=4, lora_alpha=4, target_modules=["model.layers.1.mlp.up_proj"])),
    # DoRA (its lora_magnitude_vector too), on scanned layers with per-module ranks and dropout (ignored at inference)
    "dora_scan": ("llama", True, dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj", "lm_head"],
                                      use_dora=True, lora_dropout=0.05)),
    "dora_patterns": ("qwen3", False, dict(r=4, lora_alpha=8, target_modules=["k_proj", "o_proj", "up_proj"],
                                           rank_pattern={"o_proj": 2}, use_dora=True)),
}


def _peft_adapter(base_path, out, seed=0, **kwargs):
  """A PEFT LoRA made in torch with random A and B, saved to `out`; returns the PEFT model."""
  model = peft.get_peft_model(_torch_base(base_path), peft.LoraConfig(task_type="CAUSAL_LM", **kwargs))
  torch.manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "lora_" in name:
        p.copy_(0.3 * torch.randn_like(p))
  model.eval().save_pretrained(out)
  return model


@pytest.mark.parametrize("case", ROUND_TRIP_CASES)
def test_peft_round_trip(bases, tmp_path, case):
  arch, scan, kwargs = ROUND_TRIP_CASES[case]
  peft_model = _peft_adapter(bases[arch], tmp_path / "peft", **kwargs)
  config, params, model, layouts = _flax(bases[arch], scan)
  adapters, spec = peft_io.load_peft(tmp_path / "peft", params, config, layouts)
  assert_close(_logits(model, params, adapters), _torch_logits(peft_model), TORCH)
  assert spec.rank == kwargs["r"] and spec.alpha == kwargs["lora_alpha"]
  assert spec.scaling == ("alpha/sqrt(r)" if kwargs.get("use_rslora") else "alpha/r")

  peft_io.save_peft(config, adapters, spec, tmp_path / "ours", str(bases[arch]))
  theirs = {k: v for k, v in _tensors(tmp_path / "peft").items() if ".base_layer." not in k}
  ours = _tensors(tmp_path / "ours")
  assert sorted(ours) == sorted(theirs)
  for k in theirs:
    np.testing.assert_array_equal(ours[k], theirs[k], err_msg=k)
  a, b = _adapter_config(tmp_path / "peft"), _adapter_config(tmp_path / "ours")
  tied = a.get("ensure_weight_tying")  # PEFT's tied lm_head LoRA is written back as the two sides it computes
  for field in ("peft_type", "r", "lora_alpha", "use_rslora", "rank_pattern", "alpha_pattern", "layers_to_transform",
                "layers_pattern", "lora_dropout", "bias", "use_dora", "modules_to_save", "fan_in_fan_out",
                "init_lora_weights", "task_type") + (() if tied else ("ensure_weight_tying",)):
    assert a[field] == b[field], field
  assert {t.rsplit(".", 1)[-1] for t in a["target_modules"]} | ({"lm_head"} if tied else set()) == \
      set(b["target_modules"])
  if tied:
    assert not b["ensure_weight_tying"]
    assert_close(_peft_logits(bases[arch], tmp_path / "ours"), _torch_logits(peft_model), TORCH)


def _write_run(run, base, spec, scan=False, optim_config=optim.OptimConfig(lr=1.0), record_base=None):
  """A run directory as experiments.main leaves it: a checkpoint whose record describes the run; returns
  (model, params, adapters) of the trained state."""
  config, params, model, layouts = _flax(base, scan)
  params, adapters = lora.create(params, spec, jax.random.key(0), layouts=layouts)
  adapters = _random_b(adapters)
  state = train.init_state(params, adapters, spec, optim_config, 0)
  checkpointer = ckpt_lib.Checkpointer(run / "checkpoints")
  checkpointer.save(3, state.checkpoint_tree(), {**ckpt_lib.describe_run(record_base or base, config, spec),
                                                 "data": {}})
  checkpointer.close()
  return model, params, adapters


def _tokenized_base(bases, tmp_path, name="llama"):
  base = tmp_path / f"base_{name}"
  shutil.copytree(bases[name], base)
  synthetic.char_tokenizer().save_pretrained(base)
  return base


def test_merged_and_peft_export_of_a_run(bases, tmp_path, capsys):
  base = _tokenized_base(bases, tmp_path)
  run = tmp_path / "work" / "lora"
  # Gradient clipping chains another optimizer state: reading trained parameters must not depend on it.
  model, params, adapters = _write_run(run, base, lora.LoraSpec(rank=4, alpha=8.0, rank_pattern={"v_proj": 2}),
                                       optim_config=optim.OptimConfig(lr=1.0, grad_clip_norm=1.0))
  ours = _logits(model, params, adapters)

  assert export_cli.main(["--run", str(run), "--out", str(tmp_path / "merged"), "--merged"]) == 0  # base: recorded
  merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged", attn_implementation="eager")
  assert_close(_torch_logits(merged.eval()), ours, TORCH)
  assert transformers.AutoTokenizer.from_pretrained(tmp_path / "merged").get_vocab() == \
      transformers.AutoTokenizer.from_pretrained(base).get_vocab()

  assert export_cli.main(["--run", str(run), "--base", str(base), "--out", str(tmp_path / "serve"), "--peft",
                      "--for-serving"]) == 0
  assert_close(_peft_logits(base, tmp_path / "serve"), ours, TORCH)
  assert export_cli.main(["--check", str(tmp_path / "serve")]) == 0
  assert "OK for vLLM (llama)" in capsys.readouterr().out


def test_a_tied_scanned_run_with_the_default_spec_exports_merged_and_peft(bases, tmp_path):
  """The study's spec (all-linear + unembed) on a tied model, trained with scanned layers."""
  base = _tokenized_base(bases, tmp_path, "qwen3")
  run = tmp_path / "run"
  spec = lora.LoraSpec(rank=4, targets=("all-linear", "unembed"))
  model, params, adapters = _write_run(run, base, spec, scan=True)
  assert "embed_tokens@attend" in adapters["model"]
  ours = _logits(model, params, adapters)
  assert export_cli.main(["--run", str(run), "--out", str(tmp_path / "merged"), "--merged"]) == 0
  merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged", attn_implementation="eager")
  assert not merged.config.tie_word_embeddings  # the output head has its own weights now
  assert_close(_torch_logits(merged.eval()), ours, TORCH)
  assert export_cli.main(["--run", str(run), "--out", str(tmp_path / "peft"), "--peft"]) == 0
  assert_close(_peft_logits(base, tmp_path / "peft"), ours, TORCH)


def test_a_run_refuses_another_base_unless_forced(bases, tmp_path, capsys, monkeypatch):
  base = _tokenized_base(bases, tmp_path)
  run = tmp_path / "run"
  _write_run(run, base, lora.LoraSpec(rank=2))
  other = tmp_path / "other"  # same shapes, other weights
  shutil.copytree(base, other)
  config, params = hf.load(other)
  hf.save_params(jax.tree.map(lambda x: x * 1.01, params), config, other)
  out = tmp_path / "out"
  assert export_cli.main(["--run", str(run), "--base", str(other), "--out", str(out), "--merged"]) == 2
  err = capsys.readouterr().err
  assert "fingerprint" in err and str(base) in err and "--force" in err and not out.exists()
  assert export_cli.main(["--run", str(run), "--base", str(other), "--out", str(out), "--merged", "--force"]) == 0
  # A base of other shapes: one clear line, even when forced.
  assert export_cli.main(["--run", str(run), "--base", str(bases["llama_wide"]), "--out", str(tmp_path / "w"),
                      "--merged", "--force"]) == 2
  err = capsys.readouterr().err
  assert "hidden_size 32 -> 48" in err and len(err.strip().splitlines()) == 1
  # The base is recorded as an absolute path: the run exports from any working directory.
  monkeypatch.chdir(tmp_path / "run")
  assert export_cli.main(["--run", ".", "--out", str(tmp_path / "elsewhere"), "--peft"]) == 0
  assert json.loads((tmp_path / "elsewhere" / peft_io.PEFT_CONFIG_FILE).read_text())["base_model_name_or_path"] \
      == str(base.resolve())


def test_describe_run_records_an_absolute_base_path(bases, tmp_path, monkeypatch):
  monkeypatch.chdir(bases["llama"].parent)
  record = ckpt_lib.describe_run(bases["llama"].name, hf.load_config(bases["llama"]), lora.LoraSpec())
  assert record["base_model"] == str(bases["llama"].resolve())
  assert record["base_fingerprint"] == hf.fingerprint(bases["llama"]) != hf.fingerprint(bases["llama_wide"])


def _clean_adapter(bases, path):
  spec = lora.LoraSpec(rank=8, targets=("attention",))
  config, _, _, _, adapters = _trained(bases["llama"], spec)
  peft_io.save_peft(config, adapters, spec, path, str(bases["llama"]), for_serving=True)
  return path


def _edit(path, out, config_changes=None, tensors=None):
  shutil.copytree(path, out)
  c = {**_adapter_config(path), **(config_changes or {})}
  (out / peft_io.PEFT_CONFIG_FILE).write_text(json.dumps(c))
  if tensors is not None:
    safetensors.numpy.save_file(tensors, str(out / peft_io.PEFT_WEIGHTS_FILE), metadata={"format": "pt"})
  return out


def test_check_flags_each_vllm_problem(bases, tmp_path, capsys):
  clean = _clean_adapter(bases, tmp_path / "clean")
  assert export.check_adapter(clean, "llama") == []
  assert export_cli.main(["--check", str(clean)]) == 0
  t = _tensors(clean)
  foo = {**t, "base_model.model.model.layers.0.self_attn.foo_proj.lora_A.weight": np.zeros((8, 32), np.float32),
         "base_model.model.model.layers.0.self_attn.foo_proj.lora_B.weight": np.zeros((32, 8), np.float32)}
  rank4 = {k: (v[:4] if "lora_A" in k else v[:, :4]) for k, v in t.items()}
  bad = {
      "rank 12": ({"r": 12}, None, "r=12 is not a rank vLLM accepts"),
            "dora": ({"use_dora": True}, None, "DoRA"),
      "modules_to_save": ({"modules_to_save": ["lm_head"]}, None, "modules_to_save"),
      "rank_pattern": ({"rank_pattern": {"q_proj": 4}}, None, "rank_pattern"),
      "alpha_pattern": ({"alpha_pattern": {"q_proj": 4}}, None, "alpha_pattern"),
      "bias": ({"bias": "all"}, None, "bias='all'"),
      "unknown target": ({"target_modules": ["q_proj", "foo_proj"]}, None, "target_modules ['foo_proj']"),
      "unknown module": (None, foo, "layers.0.self_attn.foo_proj"),
      "tensor rank": (None, rank4, "another rank than r=8"),
  }
  for name, (changes, tensors, message) in bad.items():
    path = _edit(clean, tmp_path / name.replace(" ", "_"), changes, tensors)
    problems = export.check_adapter(path, "llama")
    assert any(message in p for p in problems), (name, problems)
    assert len(problems) == (2 if name == "rank 12" else 1), problems  # r=12 also differs from the tensors' 8
    assert export_cli.main(["--check", str(path), "--base", str(bases["llama"])]) == 1
  everything = _edit(clean, tmp_path / "all", {"r": 12, "use_dora": True, "bias": "all",
                                               "rank_pattern": {"q_proj": 4}}, foo)
  assert len(export.check_adapter(everything, "llama")) == 6  # each problem reported, not just the first
  assert "PROBLEM" in capsys.readouterr().out


def test_load_peft_refuses_an_adapter_for_another_base(bases, tmp_path):
  spec = lora.LoraSpec(rank=4, targets=("q_proj", "down_proj"))
  config, _, _, _, adapters = _trained(bases["llama_wide"], spec)
  peft_io.save_peft(config, adapters, spec, tmp_path / "wide", "wide")
  config, params, _, layouts = _flax(bases["llama"])
  with pytest.raises(ValueError) as err:
    peft_io.load_peft(tmp_path / "wide", params, config, layouts)
  assert "model.layers.0.self_attn.q_proj: A (4, 48), B (32, 4) do not fit its weight (32, 32)" in str(err.value)
  assert "model.layers.1.mlp.down_proj" in str(err.value)  # every problem, not only the first

  clean = _clean_adapter(bases, tmp_path / "clean")
  t = _tensors(clean)
  moved = {k.replace("layers.1.self_attn.q_proj", "layers.7.self_attn.q_proj").replace(
      "layers.1.self_attn.k_proj", "layers.1.self_attn.kk_proj"): v for k, v in t.items()}
  with pytest.raises(ValueError) as err:
    peft_io.load_peft(_edit(clean, tmp_path / "moved", tensors=moved), params, config, layouts)
  assert "model.layers.7.self_attn.q_proj: no such module" in str(err.value)
  assert "model.layers.1.self_attn.kk_proj: no such module" in str(err.value)
  half = {k: v for k, v in t.items() if k != "base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight"}
  with pytest.raises(ValueError, match="layers.0.self_attn.v_proj: has lora_A but not lora_B"):
    peft_io.load_peft(_edit(clean, tmp_path / "half", tensors=half), params, config, layouts)
  with pytest.raises(ValueError, match="self_attn.q_proj: no lora_magnitude_vector, but use_dora is true"):
    peft_io.load_peft(_edit(clean, tmp_path / "dora", {"use_dora": True}), params, config, layouts)
  magnitude = {**t, "base_model.model.model.layers.0.self_attn.v_proj.lora_magnitude_vector": np.ones(5, np.float32)}
  with pytest.raises(ValueError) as err:
    peft_io.load_peft(_edit(clean, tmp_path / "dora_bad", {"use_dora": True}, tensors=magnitude), params, config,
                      layouts)
  assert "layers.0.self_attn.v_proj: lora_magnitude_vector (5,) does not fit its weight (16, 32)" in str(err.value)
  with pytest.raises(ValueError, match="v_proj: a lora_magnitude_vector, but use_dora is not true"):
    peft_io.load_peft(_edit(clean, tmp_path / "dora_off", tensors=magnitude), params, config, layouts)


@pytest.mark.parametrize("side", ["embed_tokens", "lm_head"])
def test_peft_adapter_on_one_side_of_a_tied_model_loads_with_peft_logits(bases, tmp_path, side):
  """PEFT adapts a tied model's lookup (embed_tokens) and output head (lm_head) apart; so do we."""
  config, params, model, layouts = _flax(bases["qwen3"])
  peft_model = _peft_adapter(bases["qwen3"], tmp_path / side, r=2, target_modules=[side])
  adapters, _ = peft_io.load_peft(tmp_path / side, params, config, layouts)
  assert list(adapters["model"]) == ["embed_tokens" if side == "embed_tokens" else "embed_tokens@attend"]
  assert_close(_logits(model, params, adapters), _torch_logits(peft_model), TORCH)


@pytest.mark.parametrize("scan", [False, True])
def test_dora_export_loads_in_peft_with_the_same_logits(bases, tmp_path, scan):
  """Our DoRA adapters (trained magnitudes, random B) as PEFT use_dora: PeftModel computes our logits."""
  spec = lora.LoraSpec(rank=4, alpha=8.0, variant="dora", targets=("all-linear", "unembed"), rank_pattern={"k_proj": 2})
  config, params, model, _, adapters = _trained(bases["llama"], spec, scan)
  adapters = jax.tree.map(lambda ad: ad.replace(m=ad.m * (1.0 + 0.2 * jnp.cos(jnp.arange(ad.m.size).reshape(
      ad.m.shape)))), adapters, is_leaf=lambda x: isinstance(x, lora.Adapter))
  peft_io.save_peft(config, adapters, spec, tmp_path, str(bases["llama"]))
  ours = _logits(model, params, adapters)
  assert np.abs(ours - _torch_logits(_torch_base(bases["llama"]))).max() > 1e-2
  assert_close(_peft_logits(bases["llama"], tmp_path), ours, TORCH)
  assert _adapter_config(tmp_path)["use_dora"] is True
  q = _tensors(tmp_path)["base_model.model.model.layers.1.self_attn.q_proj.lora_magnitude_vector"]
  want = (adapters["model"]["layers"]["self_attn"]["q_proj"].m[1] if scan
          else adapters["model"]["layers_1"]["self_attn"]["q_proj"].m)
  np.testing.assert_array_equal(q, np.asarray(want))
  with pytest.raises(ValueError, match="vLLM and SGLang serve LoRA, not DoRA"):
    peft_io.save_peft(config, adapters, spec, tmp_path / "serve", "x", for_serving=True)


def test_load_peft_refuses_what_the_flax_model_cannot_represent(bases, tmp_path):
  config, params, _, layouts = _flax(bases["llama"], scan=True)
  _peft_adapter(bases["llama"], tmp_path / "per_layer", r=2, target_modules=["q_proj"],
                alpha_pattern={"model.layers.1.self_attn.q_proj": 3})
  with pytest.raises(ValueError, match="load with scan_layers=False"):
    peft_io.load_peft(tmp_path / "per_layer", params, config, layouts)


def test_save_peft_refuses_what_peft_would_load_differently(bases, tmp_path):
  config, _, _, _, adapters = _trained(bases["qwen3_moe"], lora.LoraSpec(rank=4, scaling="alpha/sqrt(r)"))
  with pytest.raises(ValueError, match="expert adapters with rsLoRA"):
    peft_io.save_peft(config, adapters, lora.LoraSpec(rank=4, scaling="alpha/sqrt(r)"), tmp_path, "moe")
  spec = lora.LoraSpec(rank=4, targets=("model/layers_0/mlp/experts/gate_proj",))
  config, _, _, _, adapters = _trained(bases["qwen3_moe"], spec)
  with pytest.raises(ValueError, match="only one of gate_proj/up_proj"):
    peft_io.save_peft(config, adapters, spec, tmp_path, "moe")
  spec = lora.LoraSpec(rank=4, targets=("mlp",))
  config, _, _, _, adapters = _trained(bases["qwen3_moe_dense1"], spec)
  with pytest.raises(ValueError, match="dense MLP of layers without experts"):
    peft_io.save_peft(config, adapters, spec, tmp_path, "moe")
  spec = lora.LoraSpec(rank=4, extra_trainable=("norm",))
  config, _, _, _, adapters = _trained(bases["llama"], spec)
  with pytest.raises(ValueError, match="also trains base parameters"):
    peft_io.save_peft(config, adapters, spec, tmp_path, "llama")
  assert not (tmp_path / peft_io.PEFT_WEIGHTS_FILE).exists()  # nothing written by a refused export
