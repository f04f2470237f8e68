"""Generation: KV-cache decoding equals full forwards, batching with padding, EOS, log-probs, adapters, HF parity."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lora_jax import generate, lora
from lora_jax.cli import generate as generate_cli
from lora_jax.models import transformer
from tests import _tolerance
from tests._noise import perturbed

CONFIG = transformer.ModelConfig(architecture="llama", vocab_size=50, hidden_size=32, intermediate_size=64,
                                 num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8)
MODEL = transformer.CausalLM(CONFIG)
PARAMS = transformer.init_params(CONFIG, jax.random.key(0))
CACHE = functools.partial(transformer.init_cache, CONFIG)
MODEL64 = transformer.CausalLM(_tolerance.config64(CONFIG))  # where exactness is claimed (under the x64 fixture)
CACHE64 = functools.partial(transformer.init_cache, _tolerance.config64(CONFIG))


def with_adapters(params=PARAMS, dtype="float32"):
  spec = lora.LoraSpec(rank=4, targets=("all-linear", "unembed"), dtype=dtype)
  _, adapters = lora.create(params, spec, jax.random.key(1))
  return perturbed(adapters, 0.3, seed=2)


def greedy_by_full_forward(params, adapters, prompt, tokens, model=MODEL):
  """Reference without a cache: one full forward over prompt + generated tokens; causal, so its logits at each
  position are those of re-running that prefix alone. Returns the greedy choice after each prefix and its log-prob."""
  logits = lora.apply(model, params, adapters, jnp.asarray([list(prompt) + list(tokens)]))[0, len(prompt) - 1:-1]
  choices = jnp.argmax(logits, axis=-1)
  logps = jnp.take_along_axis(jax.nn.log_softmax(logits), choices[:, None], axis=-1)[:, 0]
  return np.asarray(choices).tolist(), np.asarray(logps)


@pytest.mark.slow
@pytest.mark.parametrize("use_adapters", [False, True], ids=["base", "lora"])
def test_cached_greedy_decoding_equals_full_forwards_and_logprobs(use_adapters, x64):
  params = _tolerance.to64(PARAMS)
  adapters = with_adapters(params, "float64") if use_adapters else {}
  prompt = [3, 14, 15, 9, 2]
  out = generate.generate(MODEL64, params, adapters, [prompt], max_new_tokens=8, eos_id=None, init_cache=CACHE64)
  ref_tokens, ref_logps = greedy_by_full_forward(params, adapters, prompt, out.tokens[0].tolist(), MODEL64)
  assert out.tokens[0].tolist() == ref_tokens
  _tolerance.assert_exact(np.asarray(out.logprobs[0]), ref_logps)
  assert out.lengths.tolist() == [8]


def test_adapters_generate_like_merged_weights():
  adapters = with_adapters()
  merged, _ = lora.merge(PARAMS, adapters)
  prompts = [[1, 2, 3], [7, 8]]
  a = generate.generate(MODEL, PARAMS, adapters, prompts, max_new_tokens=10, eos_id=None, init_cache=CACHE)
  b = generate.generate(MODEL, merged, {}, prompts, max_new_tokens=10, eos_id=None, init_cache=CACHE)
  np.testing.assert_array_equal(a.tokens, b.tokens)
  base = generate.generate(MODEL, PARAMS, {}, prompts, max_new_tokens=10, eos_id=None, init_cache=CACHE)
  assert not np.array_equal(a.tokens, base.tokens)  # the adapters change the output


def run_adapters(rank, seed, params=PARAMS, model=MODEL, dtype="float32"):
  """Adapters of one 'run': its own rank, alpha and random non-zero B (as after training)."""
  spec = lora.LoraSpec(rank=rank, alpha=8.0 * rank ** 0.5, targets=("all-linear", "unembed", "embed"), dtype=dtype)
  layouts = lora.trace_layouts(model, jnp.zeros((1, 4), jnp.int32))
  _, adapters = lora.create(params, spec, jax.random.key(seed), layouts=layouts)
  return perturbed(adapters, 0.3, seed=seed + 100)


@pytest.mark.parametrize("scan", [False, True], ids=["layers", "scanned"])
@pytest.mark.slow
def test_per_row_adapters_equal_one_adapter_at_a_time(scan, x64):
  """Row i under run rows[i] of stacked adapters (ranks 2, 4, 8; embed, attention, MLP and unembedding adapters)
  gives the logits and the generation of that run's adapters alone (in float64: the claim is exactness)."""
  config = _tolerance.config64(CONFIG.replace(scan_layers=scan))
  model = transformer.CausalLM(config)
  params = transformer.init_params(config, jax.random.key(0))
  runs = [run_adapters(r, s, params, model, "float64") for r, s in ((2, 0), (8, 1), (4, 2))]
  stacked = lora.stack_adapters(runs)
  tokens = jax.random.randint(jax.random.key(5), (5, 7), 0, CONFIG.vocab_size)
  rows = np.array([2, 0, 1, 1, 0])
  apply = jax.jit(lambda ad, t, rows=None: lora.apply(model, params, ad, t, rows=rows))  # one compile per program
  got = apply(stacked, tokens, rows)
  for r in range(len(runs)):  # each run alone on its rows (a batch per run: one program per run, not per row)
    want = apply(runs[r], tokens[rows == r])
    _tolerance.assert_exact(got[rows == r], want)
  prompts = [[1, 2, 3], [7, 8], [4, 4, 4, 4], [9], [3, 1]]
  cache = functools.partial(transformer.init_cache, config)
  out = generate.generate(model, params, stacked, prompts, max_new_tokens=6, eos_id=None, init_cache=cache, rows=rows)
  for r in range(len(runs)):
    alone = generate.generate(model, params, runs[r], [p for p, row in zip(prompts, rows) if row == r],
                              max_new_tokens=6, eos_id=None, init_cache=cache)
    np.testing.assert_array_equal(out.tokens[rows == r], alone.tokens)
  with pytest.raises(ValueError, match="pass rows="):
    lora.apply(model, params, stacked, tokens)
  with pytest.raises(ValueError, match="rows= is for adapters of several runs"):
    lora.apply(model, params, runs[0], tokens, rows=rows)
  with pytest.raises(ValueError, match="no single"):
    lora.merge(params, stacked)


def test_batched_left_padded_prompts_match_single_prompts_and_stop_at_eos(x64):
  prompts = [[5, 6, 7, 8, 9, 10], [11, 12], [13]]
  params = _tolerance.to64(PARAMS)
  batch = generate.generate(MODEL64, params, {}, prompts, max_new_tokens=6, eos_id=None, init_cache=CACHE64)
  for i, p in enumerate(prompts):
    single = generate.generate(MODEL64, params, {}, [p], max_new_tokens=6, eos_id=None, init_cache=CACHE64)
    np.testing.assert_array_equal(batch.tokens[i], single.tokens[0])
    _tolerance.assert_exact(np.asarray(batch.logprobs[i]), np.asarray(single.logprobs[0]))
  eos = int(batch.tokens[0, 2])  # pretend the third token of row 0 is EOS
  stopped = generate.generate(MODEL64, params, {}, prompts, max_new_tokens=6, eos_id=eos, init_cache=CACHE64,
                              pad_id=0)
  assert stopped.lengths[0] == 3 and stopped.tokens[0, 3:].tolist() == [0, 0, 0]
  assert np.all(stopped.logprobs[0, 3:] == 0)


def test_sampling_settings():
  prompts = [[1, 2, 3]]
  greedy = generate.generate(MODEL, PARAMS, {}, prompts, max_new_tokens=6, eos_id=None, init_cache=CACHE)
  for sampling in (generate.SamplingConfig(temperature=1.0, top_k=1), generate.SamplingConfig(1.0, top_p=1e-6)):
    out = generate.generate(MODEL, PARAMS, {}, prompts, max_new_tokens=6, eos_id=None, init_cache=CACHE,
                            sampling=sampling, rng=jax.random.key(3))
    np.testing.assert_array_equal(out.tokens, greedy.tokens)
  hot = generate.SamplingConfig(temperature=5.0)
  runs = [generate.generate(MODEL, PARAMS, {}, prompts, max_new_tokens=6, eos_id=None, init_cache=CACHE,
                            sampling=hot, rng=jax.random.key(s)).tokens for s in range(3)]
  assert not all(np.array_equal(runs[0], r) for r in runs[1:])
  with pytest.raises(ValueError, match="invalid sampling settings"):
    generate.SamplingConfig(top_p=0.0)


def test_greedy_generation_matches_transformers_generate(tmp_path):
  torch = pytest.importorskip("torch")
  import transformers

  from lora_jax import hf

  torch.manual_seed(0)
  cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                 tie_word_embeddings=False)
  ref = transformers.LlamaForCausalLM(cfg).eval()
  with torch.no_grad():  # larger weights so greedy choices are not near-ties
    for p in ref.parameters():
      p.mul_(8.0 if p.ndim == 2 else 1.0)
  ref.save_pretrained(tmp_path)
  config, params = hf.load(tmp_path)
  model = transformer.CausalLM(config)
  prompts = [[1, 5, 9, 2, 33], [4, 8]]
  out = generate.generate(model, params, {}, prompts, max_new_tokens=20, eos_id=None,
                          init_cache=functools.partial(transformer.init_cache, config))
  for i, p in enumerate(prompts):
    with torch.no_grad():
      want = ref.generate(torch.tensor([p]), max_new_tokens=20, do_sample=False, min_new_tokens=20,
                          pad_token_id=0)[0, len(p):].tolist()
    assert out.tokens[i].tolist() == want


@pytest.mark.slow
def test_cli_generates_from_a_scanned_run_and_refuses_another_base(tmp_path, capsys):
  """`--adapter RUN` reads the run's recorded base and layout (scan_layers) and only its trained parameters."""
  pytest.importorskip("torch")
  import transformers

  from lora_jax import checkpoint, hf, lora, optim, synthetic, train

  tokenizer = synthetic.char_tokenizer()
  bases = []
  for seed in (0, 1):
    cfg = transformers.LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   tie_word_embeddings=False)
    import torch

    torch.manual_seed(seed)
    transformers.LlamaForCausalLM(cfg).save_pretrained(tmp_path / f"base{seed}")
    tokenizer.save_pretrained(tmp_path / f"base{seed}")
    bases.append(tmp_path / f"base{seed}")
  config, params = hf.load(bases[0], scan_layers=True)
  model = transformer.CausalLM(config)
  spec = lora.LoraSpec(rank=2, targets=("all-linear", "unembed"))
  params, adapters = lora.create(params, spec, jax.random.key(0),
                                 layouts=lora.trace_layouts(model, jnp.zeros((1, 4), jnp.int32)))
  adapters = perturbed(adapters, 0.5, seed=3)
  state = train.init_state(params, adapters, spec, optim.OptimConfig(lr=1.0, grad_clip_norm=1.0), 0)
  ck = checkpoint.Checkpointer(tmp_path / "run" / "checkpoints")
  ck.save(5, state.checkpoint_tree(), {**checkpoint.describe_run(bases[0], config, spec), "data": {}})
  ck.close()

  generate_cli.main(["--adapter", str(tmp_path / "run"), "--prompt", "2+3=", "--max-new-tokens", "4", "--no-chat"])
  want = generate.generate_text(model, params, adapters, tokenizer, ["2+3="], max_new_tokens=4,
                                init_cache=functools.partial(transformer.init_cache, config))
  assert capsys.readouterr().out == f"### 2+3=\n{want[0]}\n"
  # Two runs on one base: every prompt under each run's adapters, in one batch, as each alone.
  other = perturbed(adapters, 0.5, seed=4)
  ck = checkpoint.Checkpointer(tmp_path / "run2" / "checkpoints")
  ck.save(5, state.replace(trainable={**state.trainable, "lora": other}).checkpoint_tree(),
          {**checkpoint.describe_run(bases[0], config, spec), "data": {}})
  ck.close()
  generate_cli.main(["--adapter", str(tmp_path / "run"), "--adapter", str(tmp_path / "run2"), "--prompt", "2+3=",
                 "--prompt", "1+1=", "--max-new-tokens", "4", "--no-chat"])
  expected = ""
  for run, trees in (("run", adapters), ("run2", other)):
    texts = generate.generate_text(model, params, trees, tokenizer, ["2+3=", "1+1="], max_new_tokens=4,
                                   init_cache=functools.partial(transformer.init_cache, config))
    expected += "".join(f"### [{tmp_path / run}] {p}\n{t}\n" for p, t in zip(["2+3=", "1+1="], texts))
  assert capsys.readouterr().out == expected
  with pytest.raises(SystemExit, match="fingerprint"):
    generate_cli.main(["--model", str(bases[1]), "--adapter", str(tmp_path / "run"), "--prompt", "1+1="])
