"""DoRA (LoraSpec.variant="dora"): closed-form identities in float64, merge/unmerge, layer selection, shardings and
clear errors. Parity with PEFT's use_dora is in test_export.py."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from _tolerance import EXACT, to64
from lora_jax import lora
from test_lora import TOKENS, GPT2Style, MultiHead, TinyLM, exact_merge, init, perturb_b, rel_err


def dora_merge(params, adapters):
  """m / ||W + s·A·B|| ⊙ (W + s·A·B) per output column, written out directly (the norm by jnp.linalg.norm over the
  kernel's input axes, held constant for gradients as PEFT does): the reference for the factored forward."""
  plain = exact_merge(params, adapters)
  flat = dict(traverse_util.flatten_dict(plain))
  for path, ad in lora.adapter_items(adapters):
    v = flat[path + (ad.param,)]
    ins = tuple(ad.n_stack + i for i, r in enumerate(ad.layout.roles) if r == "in")
    norm = jax.lax.stop_gradient(jnp.sqrt(jnp.sum(v * v, axis=ins, keepdims=True)))
    m = lora.to_kernel_axes(ad.m, ad.layout, ad.n_stack)
    s = ad.scale_array().reshape(ad.scale_array().shape + (1,) * (v.ndim - ad.scale_array().ndim))
    flat[path + (ad.param,)] = jnp.where(s != 0, m / norm * v, v)
  return traverse_util.unflatten_dict(flat)


def with_random_magnitude(adapters, key=jax.random.key(9)):
  """Adapters whose magnitudes are moved off ||W|| (a trained DoRA adapter), B perturbed too."""
  adapters = perturb_b(adapters)
  items = lora.adapter_items(adapters)
  keys = jax.random.split(key, len(items))
  out = {path: ad.replace(m=jnp.abs(ad.m) * (1 + 0.3 * jax.random.normal(k, ad.m.shape, ad.m.dtype)))
         for k, (path, ad) in zip(keys, items)}
  return traverse_util.unflatten_dict(out) if () not in out else out[()]


CASES = {  # name -> (model, inputs, spec keyword arguments)
    "dense": (TinyLM(), TOKENS, dict(targets=("all-linear", "unembed"))),
    "scan": (TinyLM(scan=True), TOKENS, dict(targets=("all-linear", "unembed"))),
    "scan_layers": (TinyLM(scan=True), TOKENS, dict(targets=("attention", "mlp"), layers=(1,))),
    "biases": (GPT2Style(), TOKENS[:, :5] % 40, dict(targets=("all-linear",))),
    "multihead_einsum": (MultiHead(), jax.random.normal(jax.random.key(3), (3, 4, 12)),
                         dict(targets=(r"attn/.*", "experts"))),
}


def _setup(case):
  model, x, kwargs = CASES[case]
  x = x.astype(jnp.float64) if jnp.issubdtype(x.dtype, jnp.floating) else x
  params = to64(init(model, x))
  spec = lora.LoraSpec(rank=2, dtype="float64", variant="dora", **kwargs)
  _, adapters = lora.create(params, spec, jax.random.key(1), layouts=lora.trace_layouts(model, x))
  return model, x, params, adapters


@pytest.mark.parametrize("case", CASES)
def test_dora_starts_as_the_base_and_its_factored_forward_equals_the_merged_weights(case, x64):
  model, x, params, adapters = _setup(case)
  for path, ad in lora.adapter_items(adapters):  # m starts at ||W|| per output column (B = 0), as PEFT
    w = traverse_util.flatten_dict(params)[lora.kernel_path(path, ad)]
    ins = tuple(ad.n_stack + i for i, r in enumerate(ad.layout.roles) if r == "in")
    want = jnp.sqrt(jnp.sum(w * w, axis=ins))
    assert ad.m.shape == want.shape and rel_err(ad.m, want) <= EXACT
  run = jax.jit(lambda p: model.apply({"params": p}, x))
  run_lora = jax.jit(lambda p, ad: lora.apply(model, p, ad, x))
  base = run(params)
  assert rel_err(run_lora(params, adapters), base) <= EXACT
  adapters = with_random_magnitude(adapters)
  factored = run_lora(params, adapters)
  assert rel_err(factored, base) > 1e-2  # the adapters matter
  assert rel_err(factored, run(dora_merge(params, adapters))) <= EXACT
  merged, _ = lora.merge(params, adapters)
  assert rel_err(factored, run(merged)) <= EXACT


@pytest.mark.parametrize("case", ["dense", "scan_layers", "biases", "multihead_einsum"])
def test_dora_gradients_equal_gradients_through_the_merged_weights(case, x64):
  model, x, params, adapters = _setup(case)
  adapters = with_random_magnitude(adapters)
  g1 = jax.jit(jax.grad(lambda ad: jnp.sum(lora.apply(model, params, ad, x) ** 2)))(adapters)
  g2 = jax.jit(jax.grad(lambda ad: jnp.sum(model.apply({"params": dora_merge(params, ad)}, x) ** 2)))(adapters)
  for (path, a), (_, b) in zip(lora.adapter_items(g1), lora.adapter_items(g2)):
    for name in ("a", "b", "m"):
      u, v = getattr(a, name), getattr(b, name)
      assert float(jnp.max(jnp.abs(u - v))) <= EXACT * max(1.0, float(jnp.max(jnp.abs(v)))), (path, name)
  if case == "scan_layers":  # layer 0 is not selected: its magnitude gets no gradient and its output is the base's
    for _, ad in lora.adapter_items(g1):
      assert float(jnp.max(jnp.abs(ad.m[0]))) == 0.0 and float(jnp.max(jnp.abs(ad.m[1]))) > 0.0


def test_column_norm_is_factored_and_exact(x64):
  """||W + s·A·B|| per column from the factored form equals the norm of the formed matrix, for every layout here."""
  for case in ("scan", "multihead_einsum"):
    _, _, params, adapters = _setup(case)
    adapters = with_random_magnitude(adapters)
    flat = traverse_util.flatten_dict(exact_merge(params, adapters))
    norms = lora.dora_norms(params, adapters)
    for path, ad in lora.adapter_items(adapters):
      v = flat[lora.kernel_path(path, ad)]
      ins = tuple(ad.n_stack + i for i, r in enumerate(ad.layout.roles) if r == "in")
      assert rel_err(norms[path], jnp.sqrt(jnp.sum(v * v, axis=ins))) <= EXACT


def test_dora_merge_unmerge_round_trip_needs_the_norms(x64):
  model, x, params, adapters = _setup("scan")
  adapters = with_random_magnitude(adapters)
  merged, errors = lora.merge(params, adapters)
  assert all(float(e) == 0.0 for e in errors.values())
  with pytest.raises(ValueError, match="needs norms=dora_norms"):
    lora.unmerge(merged, adapters)
  back, _ = lora.unmerge(merged, adapters, lora.dora_norms(params, adapters))
  for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(params)):
    assert float(jnp.max(jnp.abs(a - b))) <= EXACT * max(1.0, float(jnp.max(jnp.abs(b))))
  assert lora.count(adapters) == sum(ad.a.size + ad.b.size + ad.m.size for _, ad in lora.adapter_items(adapters))


def test_dora_magnitude_is_sharded_like_the_kernels_output_axes():
  from jax.sharding import PartitionSpec as P

  model = MultiHead()
  x = jnp.ones((3, 4, 12))
  params = init(model, x)
  _, adapters = lora.create(params, lora.LoraSpec(rank=2, targets=(r"attn/(query|out)", "experts"), variant="dora"),
                            jax.random.key(0), layouts=lora.trace_layouts(model, x))
  specs = jax.tree.map(lambda _: P(), params)
  specs["attn"]["query"]["kernel"] = P("fsdp", "tensor", None)
  specs["attn"]["out"]["kernel"] = P("tensor", None, "fsdp")
  specs["experts"]["kernel"] = P("expert", "fsdp", "tensor")
  out = lora.adapter_partition_specs(adapters, specs)
  assert out["attn"]["query"].m == P("tensor", None) and out["attn"]["out"].m == P("fsdp")
  assert out["experts"].m == P("expert", "tensor") and out["experts"].b == P("expert", None, "tensor")


def test_dora_errors_name_what_is_unsupported():
  lm = TinyLM()
  params = init(lm, TOKENS)
  with pytest.raises(ValueError, match="variant='dora' on 'embed_tokens/embedding'.*exclude it"):
    lora.create(params, lora.LoraSpec(rank=2, targets=("embed",), variant="dora"), jax.random.key(0))
  with pytest.raises(ValueError, match="valid"):
    lora.LoraSpec(variant="vera")
  _, adapters = lora.create(params, lora.LoraSpec(rank=2, targets=("q_proj",), variant="dora"), jax.random.key(0))
  with pytest.raises(ValueError, match="per-row inference of DoRA adapters is not supported"):
    lora.stack_adapters([adapters, adapters])
  _, dropped = lora.create(params, lora.LoraSpec(rank=2, targets=("q_proj",), variant="dora", dropout=0.1),
                           jax.random.key(0))
  lora.apply(lm, params, dropped, TOKENS)  # inference ignores dropout
  with pytest.raises(ValueError, match="DoRA adapters .* with adapter dropout in training"):
    lora.apply(lm, params, dropped, TOKENS, train=True, rngs={"dropout": jax.random.key(1)})
  bad = jax.tree.map(lambda ad: ad.replace(m=ad.m[:3]), adapters, is_leaf=lambda z: isinstance(z, lora.Adapter))
  with pytest.raises(ValueError, match="DoRA magnitude has shape"):
    lora.apply(lm, params, bad, TOKENS)


def test_dora_trains_only_its_adapters_and_magnitudes(x64):
  import optax

  lm = TinyLM()
  params = to64(init(lm, TOKENS))
  spec = lora.LoraSpec(rank=2, targets=("all-linear",), variant="dora", dtype="float64")
  params, adapters = lora.create(params, spec, jax.random.key(0))
  trainable, frozen = lora.split(params, adapters, spec)
  tx = lora.optimizer(optax.adam(1e-2))
  state = tx.init(trainable)

  def loss(t):
    p, ad = lora.combine(t, frozen)
    logits = lora.apply(lm, p, ad, TOKENS[:, :-1])
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), TOKENS[:, 1:, None], -1))

  @jax.jit
  def step(trainable, state):
    value, grads = jax.value_and_grad(loss)(trainable)
    updates, state = tx.update(grads, state, trainable)
    return optax.apply_updates(trainable, updates), state, value

  first = float(loss(trainable))
  for _ in range(30):
    trainable, state, _ = step(trainable, state)
  assert float(loss(trainable)) < first - 0.1
  moved = [ad for _, ad in lora.adapter_items(trainable["lora"])]
  assert all(float(jnp.max(jnp.abs(ad.m - a0.m))) > 0 for ad, (_, a0) in zip(moved, lora.adapter_items(adapters)))
  assert not jax.tree.leaves(trainable["params"])  # the base is frozen: no gradient, no optimizer state
  np.testing.assert_array_equal(jax.tree.leaves(frozen)[0], jax.tree.leaves(params)[0])
