"""Tests for lora_jax.lora: exactness, cost-free structure, training invariances and clear errors."""

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util

from _tolerance import EXACT, to64
from lora_jax import lora

# ----------------------------------------------------------------------------------------------------------------------
# Small models written without this library in mind.


class Block(nn.Module):
  """A pre-norm transformer block with HF-style names."""

  dim: int = 16
  heads: int = 2

  @nn.compact
  def __call__(self, x, _=None):
    h = nn.RMSNorm(name="input_layernorm")(x)
    q = nn.Dense(self.dim, use_bias=False, name="q_proj")(h)
    k = nn.Dense(self.dim, use_bias=False, name="k_proj")(h)
    v = nn.Dense(self.dim, use_bias=False, name="v_proj")(h)
    att = jax.nn.softmax(jnp.einsum("btd,bsd->bts", q, k) / self.dim**0.5, axis=-1)  # weak type: float64-clean
    x = x + nn.Dense(self.dim, use_bias=False, name="o_proj")(jnp.einsum("bts,bsd->btd", att, v))
    h = nn.RMSNorm(name="post_attention_layernorm")(x)
    g = nn.Dense(2 * self.dim, use_bias=False, name="gate_proj")(h)
    u = nn.Dense(2 * self.dim, use_bias=False, name="up_proj")(h)
    x = x + nn.Dense(self.dim, use_bias=False, name="down_proj")(nn.silu(g) * u)
    return x, None


class TinyLM(nn.Module):
  """Embedding, attention/MLP blocks (optionally scanned and rematerialised), unembedding."""

  vocab: int = 32
  dim: int = 16
  layers: int = 2
  scan: bool = False
  remat: bool = False
  tied: bool = False

  @nn.compact
  def __call__(self, tokens):
    embed = nn.Embed(self.vocab, self.dim, name="embed_tokens")
    x = embed(tokens)
    block = nn.remat(Block) if self.remat else Block
    if self.scan:
      x, _ = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True},
                     length=self.layers)(self.dim, name="layers")(x, None)
    else:
      for i in range(self.layers):
        x, _ = block(self.dim, name=f"layers_{i}")(x)
    x = nn.RMSNorm(name="norm")(x)
    if self.tied:
      return embed.attend(x)
    return nn.Dense(self.vocab, use_bias=False, name="lm_head")(x)


class GPT2Style(nn.Module):
  """A third-party GPT-2-style model: fused c_attn, biases, LayerNorm, tied embedding."""

  @nn.compact
  def __call__(self, tokens):
    wte = nn.Embed(40, 12, name="wte")
    x = wte(tokens) + self.param("wpe", nn.initializers.normal(0.02), (16, 12))[: tokens.shape[1]]
    for i in range(2):
      h = nn.LayerNorm(name=f"h_{i}_ln_1")(x)
      qkv = nn.Dense(36, name=f"h_{i}_c_attn")(h)
      q, k, v = jnp.split(qkv, 3, axis=-1)
      att = jax.nn.softmax(jnp.einsum("btd,bsd->bts", q, k), axis=-1)
      x = x + nn.Dense(12, name=f"h_{i}_c_proj")(jnp.einsum("bts,bsd->btd", att, v))
      h = nn.LayerNorm(name=f"h_{i}_ln_2")(x)
      x = x + nn.Dense(12, name=f"h_{i}_mlp_c_proj")(nn.gelu(nn.Dense(48, name=f"h_{i}_mlp_c_fc")(h)))
    return wte.attend(nn.LayerNorm(name="ln_f")(x))


class MultiHead(nn.Module):
  """Per-head kernels: flax's own attention (DenseGeneral, multi-axis in/out) and an Einsum with a shared axis."""

  @nn.compact
  def __call__(self, x):
    x = x + nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=8, out_features=12, name="attn")(x)
    # A per-expert style einsum: axis 'e' is in the input, the kernel and the output.
    return nn.Einsum((3, 12, 5), "etd,edf->etf", name="experts")(x)  # x: [experts=3, tokens, 12]


TOKENS = jax.random.randint(jax.random.key(7), (2, 6), 0, 32)


def init(model, *inputs):
  return model.init(jax.random.key(0), *inputs)["params"]


def perturb_b(adapters, key=jax.random.key(5), std=0.5):
  """Random B (and A) so that adapters have a real effect."""
  leaves, treedef = jax.tree.flatten(adapters)
  keys = jax.random.split(key, len(leaves))
  return jax.tree.unflatten(treedef, [l + std * jax.random.normal(k, l.shape, l.dtype) for l, k in zip(leaves, keys)])


def rel_err(a, b):
  return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


def merged_apply(model, params, adapters, *args):
  merged, _ = lora.merge(params, adapters)
  return model.apply({"params": merged}, *args)


def exact_merge(params, adapters, scale_factor=1.0):
  """W + s·A·B in the arrays' own dtype, written out here: the float64 reference (lora.merge computes in float32)."""
  flat = dict(traverse_util.flatten_dict(params))
  for path, ad in lora.adapter_items(adapters):
    axes = "abcdefgh"[: len(ad.layout.roles)]  # the kernel's axes, stack axes excluded
    pick = lambda role: "".join(c for c, r in zip(axes, ad.layout.roles) if r == role)  # noqa: E731
    stack = "UVW"[: ad.n_stack]
    d = jnp.einsum(f"{stack}{pick('shared')}{pick('in')}R,{stack}{pick('shared')}R{pick('out')}->{stack}{axes}",
                   ad.a, ad.b)
    s = scale_factor * jnp.asarray(ad.scale_array(), d.dtype)  # the scale lora.apply uses
    flat[path + (ad.param,)] = flat[path + (ad.param,)] + s.reshape(s.shape + (1,) * (d.ndim - s.ndim)) * d
  return traverse_util.unflatten_dict(flat)


# ----------------------------------------------------------------------------------------------------------------------
# Exactness.


@pytest.mark.parametrize("kind", ["plain", "scan", "remat", "scan+remat", "tied"])
def test_identity_at_init_and_factored_equals_merged(kind, x64):
  model = TinyLM(scan="scan" in kind, remat="remat" in kind, tied=kind == "tied")
  params = to64(init(model, TOKENS))
  layouts = lora.trace_layouts(model, TOKENS)
  spec = lora.LoraSpec(rank=4, targets=("all-linear", "unembed", "embed"), dtype="float64")
  params2, adapters = lora.create(params, spec, jax.random.key(1), layouts=layouts)
  base = model.apply({"params": params}, TOKENS)
  assert params2 is not params and jax.tree.all(jax.tree.map(jnp.array_equal, params2, params))
  np.testing.assert_array_equal(lora.apply(model, params, adapters, TOKENS), base)  # B = 0: identical
  adapters = perturb_b(adapters)
  factored = lora.apply(model, params, adapters, TOKENS)
  assert rel_err(factored, base) > 1e-2  # the adapters do something
  if kind == "tied":  # the unembed adapter is on the output side only: merged into an untied copy of the model
    params, adapters = lora.untie(params, adapters, ("embed_tokens",), ("lm_head",))
    model = TinyLM(tied=False)
  merged = exact_merge(params, adapters)
  assert rel_err(factored, model.apply({"params": merged}, TOKENS)) <= EXACT
  # The bound sees a 1e-6 change of the scales (the float32 bound of 1e-5 did not).
  assert rel_err(factored, model.apply({"params": exact_merge(params, adapters, 1 + 1e-6)}, TOKENS)) > 100 * EXACT
  # lora.merge computes W + s·A·B in float32: equal to float32 rounding (a few ulp of 6e-8 each) on any CPU.
  for a, b in zip(jax.tree.leaves(lora.merge(params, adapters)[0]), jax.tree.leaves(merged)):
    assert rel_err(a, b) <= 1e-6


def test_adapter_gradients_equal_gradients_through_merged_weights(x64):
  model = TinyLM(scan=True)
  params = to64(init(model, TOKENS))
  spec = lora.LoraSpec(rank=3, targets=("all-linear", "unembed", "embed"), dtype="float64")
  _, adapters = lora.create(params, spec, jax.random.key(1), layouts=lora.trace_layouts(model, TOKENS))
  adapters = perturb_b(adapters)

  def loss(out):
    return jnp.mean(jax.nn.log_softmax(out)[..., 3] ** 2)

  # jitted: one compile instead of one per operation (the same float64 arithmetic either way)
  g_factored = jax.jit(jax.grad(lambda ad: loss(lora.apply(model, params, ad, TOKENS))))(adapters)
  g_merged = jax.jit(jax.grad(lambda ad: loss(model.apply({"params": exact_merge(params, ad)}, TOKENS))))(adapters)
  for gf, gm in zip(jax.tree.leaves(g_factored), jax.tree.leaves(g_merged)):
    assert gf.dtype == jnp.float64 and rel_err(gf, gm) <= EXACT


def test_no_full_size_weight_gradient_in_the_backward_pass():
  """The jaxpr of the adapter gradient never produces an array the size of an adapted kernel (beyond W itself)."""
  model = TinyLM(dim=64, vocab=100)
  tokens = jnp.zeros((2, 4), jnp.int32)
  params = init(model, tokens)
  _, adapters = lora.create(params, lora.LoraSpec(rank=2, targets=("mlp",)), jax.random.key(1))
  jaxpr = jax.make_jaxpr(jax.grad(lambda ad: jnp.sum(lora.apply(model, params, ad, tokens))))(adapters)
  kernel_shapes = {(64, 128), (128, 64)}
  produced = {tuple(v.aval.shape) for eqn in jaxpr.jaxpr.eqns for v in eqn.outvars}
  assert not produced & kernel_shapes, produced & kernel_shapes
  # The naive merged form does produce them: the check above would catch a densifying implementation.
  jaxpr = jax.make_jaxpr(jax.grad(lambda ad: jnp.sum(merged_apply(model, params, ad, tokens))))(adapters)
  produced = {tuple(v.aval.shape) for eqn in jaxpr.jaxpr.eqns for v in eqn.outvars}
  assert produced & kernel_shapes


@pytest.mark.slow
def test_multihead_densegeneral_and_einsum_with_shared_axis(x64):
  model = MultiHead()
  x = jax.random.normal(jax.random.key(3), (3, 4, 12), jnp.float64)
  params = to64(init(model, x))
  layouts = lora.trace_layouts(model, x)
  assert layouts["attn/query"].roles == ("in", "out", "out")  # (embed, heads, head_dim)
  assert layouts["attn/out"].roles == ("in", "in", "out")  # (heads, head_dim, embed)
  assert layouts["experts"].roles == ("shared", "in", "out")
  spec = lora.LoraSpec(rank=2, targets=(r"attn/.*", "experts"), dtype="float64")
  _, adapters = lora.create(params, spec, jax.random.key(1), layouts=layouts)
  assert adapters["attn"]["query"].a.shape == (12, 2) and adapters["attn"]["query"].b.shape == (2, 2, 4)
  assert adapters["attn"]["out"].a.shape == (2, 4, 2) and adapters["attn"]["out"].b.shape == (2, 12)
  assert adapters["experts"].a.shape == (3, 12, 2) and adapters["experts"].b.shape == (3, 2, 5)
  np.testing.assert_array_equal(lora.apply(model, params, adapters, x), model.apply({"params": params}, x))
  adapters = perturb_b(adapters)
  factored = lora.apply(model, params, adapters, x)
  assert rel_err(factored, model.apply({"params": exact_merge(params, adapters)}, x)) <= EXACT
  g1 = jax.jit(jax.grad(lambda ad: jnp.sum(lora.apply(model, params, ad, x) ** 2)))(adapters)
  g2 = jax.jit(jax.grad(lambda ad: jnp.sum(model.apply({"params": exact_merge(params, ad)}, x) ** 2)))(adapters)
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
    assert rel_err(a, b) <= EXACT
  # Counting: r * (d_in + d_out) per expert for the shared-axis einsum.
  assert lora.count({"experts": adapters["experts"]}) == 3 * 2 * (12 + 5)


def test_nn_vmap_stacked_kernels_and_jax_vmap(x64):
  class Ensemble(nn.Module):
    @nn.compact
    def __call__(self, x):
      dense = nn.vmap(nn.Dense, variable_axes={"params": 0}, split_rngs={"params": True}, in_axes=0, out_axes=0)
      return dense(6, name="members")(x)

  model = Ensemble()
  x = jax.random.normal(jax.random.key(0), (4, 3, 5), jnp.float64)
  params = to64(init(model, x))
  assert params["members"]["kernel"].shape == (4, 5, 6)
  _, adapters = lora.create(params, lora.LoraSpec(rank=2, targets=("members",), dtype="float64"), jax.random.key(1),
                            layouts=lora.trace_layouts(model, x))
  adapters = perturb_b(adapters)
  assert adapters["members"].a.shape == (4, 5, 2)
  factored = lora.apply(model, params, adapters, x)
  assert rel_err(factored, model.apply({"params": exact_merge(params, adapters)}, x)) <= EXACT
  batched = jax.vmap(lambda xi: lora.apply(model, params, adapters, xi))(jnp.stack([x, 2 * x]))
  assert rel_err(batched[1], lora.apply(model, params, adapters, 2 * x)) <= EXACT


def test_jit_and_eager_agree(x64):
  model = TinyLM(scan=True)
  params = to64(init(model, TOKENS))
  _, adapters = lora.create(params, lora.LoraSpec(rank=2, dtype="float64"), jax.random.key(1),
                            layouts=lora.trace_layouts(model, TOKENS))
  adapters = perturb_b(adapters)
  eager = lora.apply(model, params, adapters, TOKENS)
  jitted = jax.jit(lambda p, a, t: lora.apply(model, p, a, t))(params, adapters, TOKENS)
  assert eager.dtype == jnp.float64 and rel_err(jitted, eager) <= EXACT


def test_third_party_model_with_presets(x64):
  model = GPT2Style()
  tokens = TOKENS % 40
  params = to64(init(model, tokens))
  spec = lora.LoraSpec(rank=2, targets=("all-linear",), extra_trainable=("bias", "norm"), dtype="float64")
  _, adapters = lora.create(params, spec, jax.random.key(1))
  names = {"/".join(p) for p, _ in lora.adapter_items(adapters)}
  assert names == {f"h_{i}_{n}" for i in range(2) for n in ("c_attn", "c_proj", "mlp_c_proj", "mlp_c_fc")}
  adapters = perturb_b(adapters)
  factored = lora.apply(model, params, adapters, tokens)
  assert rel_err(factored, model.apply({"params": exact_merge(params, adapters)}, tokens)) <= EXACT
  trainable, frozen = lora.split(params, adapters, spec)
  extra = {"/".join(p) for p in traverse_util.flatten_dict(trainable["params"])}
  assert "h_0_c_attn/bias" in extra and "h_1_ln_2/scale" in extra and "ln_f/bias" in extra
  assert "h_0_c_attn/kernel" not in extra and "wte/embedding" not in extra
  assert "h_0_c_attn/bias" not in {"/".join(p) for p in traverse_util.flatten_dict(frozen)}


def test_presets_on_conventional_names():
  model = TinyLM()
  params = init(model, TOKENS)

  def adapted(*targets):
    _, ad = lora.create(params, lora.LoraSpec(rank=2, targets=targets), jax.random.key(0))
    return {"/".join(p) for p, _ in lora.adapter_items(ad)}

  attn = {f"layers_{i}/{n}" for i in range(2) for n in ("q_proj", "k_proj", "v_proj", "o_proj")}
  mlp = {f"layers_{i}/{n}" for i in range(2) for n in ("gate_proj", "up_proj", "down_proj")}
  assert adapted("attention") == attn
  assert adapted("mlp") == mlp
  assert adapted("all-linear") == attn | mlp
  assert adapted("unembed") == {"lm_head"}
  assert adapted("embed") == {"embed_tokens"}
  assert adapted("q_proj", r"layers_1/.*_proj") == {"layers_0/q_proj"} | {p for p in attn | mlp if "layers_1" in p}
  assert adapted("layers_0/down_proj/kernel") == {"layers_0/down_proj"}


def test_exclude_and_layer_selection_unstacked():
  model = TinyLM(layers=3)
  params = init(model, TOKENS)
  spec = lora.LoraSpec(rank=2, targets=("all-linear",), exclude=("o_proj",), layers=(0, 2))
  _, adapters = lora.create(params, spec, jax.random.key(0))
  names = {"/".join(p) for p, _ in lora.adapter_items(adapters)}
  assert all(not n.endswith("o_proj") for n in names)
  assert {n.split("/")[0] for n in names} == {"layers_0", "layers_2"}


def test_layer_selection_inside_scan_stacked_kernels():
  model = TinyLM(scan=True, layers=3)
  params = init(model, TOKENS)
  spec = lora.LoraSpec(rank=2, targets=("q_proj",), layers=(1,))
  _, adapters = lora.create(params, spec, jax.random.key(0), layouts=lora.trace_layouts(model, TOKENS))
  ad = adapters["layers"]["q_proj"]
  assert ad.a.shape == (3, 16, 2) and ad.scale == (0.0, 16.0, 0.0)
  assert float(jnp.abs(ad.a[0]).max()) == 0.0 and float(jnp.abs(ad.a[1]).max()) > 0.0
  assert lora.count(adapters) == 2 * (16 + 16)  # one layer's worth
  grads = jax.grad(lambda a: jnp.sum(lora.apply(model, params, a, TOKENS) ** 2))(perturb_b(adapters))
  g = grads["layers"]["q_proj"]
  assert float(jnp.abs(g.a[0]).max()) == 0.0 and float(jnp.abs(g.b[2]).max()) == 0.0
  assert float(jnp.abs(g.b[1]).max()) > 0.0


# ----------------------------------------------------------------------------------------------------------------------
# Counts, scales and initialisation.


def test_trainable_count_is_rank_times_sum_of_dims():
  model = TinyLM()
  params = init(model, TOKENS)
  spec = lora.LoraSpec(rank=4, targets=("all-linear", "unembed"))
  _, adapters = lora.create(params, spec, jax.random.key(0))
  expected = 0
  for path, kernel in traverse_util.flatten_dict(params).items():
    if path[-1] == "kernel":
      expected += 4 * (kernel.shape[0] + kernel.shape[1])
  assert lora.count(adapters) == expected
  trainable, _ = lora.split(params, adapters, spec)
  assert sum(x.size for x in jax.tree.leaves(trainable)) == expected
  text = lora.summary(params, adapters, spec)
  assert "layers_0/q_proj/kernel" in text and f"{expected:,}" in text and "%" in text


def test_scales_alpha_over_r_rslora_and_patterns():
  model = TinyLM()
  params = init(model, TOKENS)

  def scales(**kw):
    _, ad = lora.create(params, lora.LoraSpec(**kw), jax.random.key(0))
    return {"/".join(p): (a.rank, a.scale) for p, a in lora.adapter_items(ad)}

  assert scales(rank=4, alpha=32, targets=("q_proj",))["layers_0/q_proj"] == (4, 8.0)
  assert scales(rank=4, alpha=32, scaling="alpha/sqrt(r)", targets=("q_proj",))["layers_0/q_proj"] == (4, 16.0)
  assert scales(rank=4, alpha=32, scaling="none", targets=("q_proj",))["layers_0/q_proj"] == (4, 1.0)
  s = scales(rank=4, alpha=32, targets=("attention",), rank_pattern={r"layers_1/.*": 8, "v_proj": 2},
             alpha_pattern={"o_proj": 4.0})
  assert s["layers_1/q_proj"] == (8, 4.0)
  assert s["layers_0/v_proj"] == (2, 16.0)
  assert s["layers_0/o_proj"] == (4, 1.0)
  assert s["layers_1/o_proj"] == (8, 0.5)
  assert s["layers_0/q_proj"] == (4, 8.0)


def test_uniform_init_is_rank_independent_and_gaussian_follows_peft():
  params = {"lin": {"kernel": jnp.zeros((400, 300))}}
  for rank in (1, 64):
    _, ad = lora.create(params, lora.LoraSpec(rank=rank, targets=("lin",)), jax.random.key(0))
    a = ad["lin"].a
    assert float(jnp.abs(a).max()) <= 1 / np.sqrt(400) and float(jnp.abs(a).max()) > 0.9 / np.sqrt(400)
    assert float(jnp.abs(ad["lin"].b).max()) == 0.0
  _, ad = lora.create(params, lora.LoraSpec(rank=8, targets=("lin",), init_a="gaussian"), jax.random.key(0))
  assert abs(float(jnp.std(ad["lin"].a)) - 1 / 8) < 0.01
  _, ad = lora.create(params, lora.LoraSpec(rank=8, targets=("lin",), dtype="bfloat16"), jax.random.key(0))
  assert ad["lin"].a.dtype == jnp.bfloat16


def test_pissa_leaves_output_unchanged_and_takes_top_singular_part(x64):
  model = TinyLM(scan=True)
  params = to64(init(model, TOKENS))
  spec = lora.LoraSpec(rank=4, targets=("all-linear",), init_a="pissa", dtype="float64")
  residual, adapters = lora.create(params, spec, jax.random.key(0), layouts=lora.trace_layouts(model, TOKENS))
  base = model.apply({"params": params}, TOKENS)
  # The forward passes are float64; lora.create splits W = W_res + s·A·B in float32 (SVD and subtraction), whose
  # rounding is the whole error: ~1e-7 measured, a few float32 ulp on any CPU.
  assert rel_err(lora.apply(model, residual, adapters, TOKENS), base) <= 1e-6
  w = params["layers"]["up_proj"]["kernel"][1]
  w_res = residual["layers"]["up_proj"]["kernel"][1]
  s_full = np.linalg.svd(np.asarray(w), compute_uv=False)
  s_res = np.linalg.svd(np.asarray(w_res), compute_uv=False)
  np.testing.assert_allclose(s_res[: len(s_full) - 4], s_full[4:], rtol=1e-4, atol=1e-5)


def test_dropout_only_in_training():
  model = TinyLM()
  params = init(model, TOKENS)
  _, adapters = lora.create(params, lora.LoraSpec(rank=4, dropout=0.5), jax.random.key(0))
  adapters = perturb_b(adapters)
  _, no_drop = lora.create(params, lora.LoraSpec(rank=4, dropout=0.0), jax.random.key(0))
  no_drop = perturb_b(no_drop)
  evald = lora.apply(model, params, adapters, TOKENS)
  np.testing.assert_array_equal(evald, lora.apply(model, params, no_drop, TOKENS))
  t1 = lora.apply(model, params, adapters, TOKENS, train=True, rngs={"dropout": jax.random.key(1)})
  t2 = lora.apply(model, params, adapters, TOKENS, train=True, rngs={"dropout": jax.random.key(2)})
  assert rel_err(t1, evald) > 1e-3 and rel_err(t1, t2) > 1e-3
  with pytest.raises(ValueError, match="rngs=\\{'dropout'"):
    lora.apply(model, params, adapters, TOKENS, train=True)


# ----------------------------------------------------------------------------------------------------------------------
# Training: frozen base, optimizer, LoRA+, Adam invariance, full fine-tuning.


def make_step(model, tx, tokens):
  def loss_fn(trainable, frozen):
    params, adapters = lora.combine(trainable, frozen)
    logits = lora.apply(model, params, adapters, tokens[:, :-1])
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[:, 1:, None], -1))

  @jax.jit
  def step(trainable, frozen, opt_state):
    loss, grads = jax.value_and_grad(loss_fn)(trainable, frozen)
    updates, opt_state = tx.update(grads, opt_state, trainable)
    return optax.apply_updates(trainable, updates), opt_state, loss

  return step


def train(model, params, adapters, spec, tx, steps=5):
  trainable, frozen = lora.split(params, adapters, spec)
  opt_state = tx.init(trainable)
  step = make_step(model, tx, TOKENS)
  losses = []
  for _ in range(steps):
    trainable, opt_state, loss = step(trainable, frozen, opt_state)
    losses.append(float(loss))
  return trainable, frozen, opt_state, losses


def test_frozen_weights_bit_identical_and_optimizer_state_covers_only_adapters():
  model = TinyLM()
  params = init(model, TOKENS)
  spec = lora.LoraSpec(rank=2, targets=("all-linear",), extra_trainable=("norm",))
  _, adapters = lora.create(params, spec, jax.random.key(1))
  trainable, frozen, opt_state, losses = train(model, params, adapters, spec, lora.optimizer(optax.adam(1e-2)))
  assert losses[-1] < losses[0]
  new_params, new_adapters = lora.combine(trainable, frozen)
  flat_old, flat_new = traverse_util.flatten_dict(params), traverse_util.flatten_dict(new_params)
  for path, value in flat_old.items():
    if "layernorm" in path[-2] or path[-2] == "norm":
      assert not np.array_equal(value, flat_new[path]), path  # extras train
    else:
      np.testing.assert_array_equal(value, flat_new[path])  # frozen: bit-identical
  n_trainable = sum(x.size for x in jax.tree.leaves(trainable))
  n_state = sum(x.size for x in jax.tree.leaves(opt_state) if x.ndim > 0)
  assert n_state == 2 * n_trainable  # Adam's mu and nu, nothing for the frozen base


def test_lora_plus_gives_b_its_own_learning_rate():
  params = {"lin": {"kernel": jax.random.normal(jax.random.key(0), (8, 8))}}
  spec = lora.LoraSpec(rank=2, targets=("lin",))
  _, adapters = lora.create(params, spec, jax.random.key(1))
  trainable, _ = lora.split(params, adapters, spec)
  tx = lora.optimizer(optax.sgd(1.0), tx_b=optax.sgd(16.0))
  grads = jax.tree.map(jnp.ones_like, trainable)
  updates, _ = tx.update(grads, tx.init(trainable), trainable)
  assert float(updates["lora"]["lin"].a[0, 0]) == -1.0 and float(updates["lora"]["lin"].b[0, 0]) == -16.0


def test_adam_invariance_of_the_study():
  """alpha -> alpha/(p q), A0 -> p A0, lr_A -> p lr_A, lr_B -> q lr_B, eps_A -> eps/p, eps_B -> eps/q: same ΔW."""
  model = TinyLM()
  params = init(model, TOKENS)
  # p and q are powers of two, so the two float32 runs agree to the last bit on any CPU (measured: 0); the bounds
  # below only leave room for XLA compiling the two runs' constants differently.
  p, q, lr, eps = 4.0, 0.5, 3e-3, 1e-8

  def run(alpha, a_mult, lr_a, lr_b, eps_a, eps_b):
    spec = lora.LoraSpec(rank=4, alpha=alpha, targets=("all-linear",))
    _, adapters = lora.create(params, spec, jax.random.key(1))
    adapters = jax.tree.map(lambda ad: ad.replace(a=ad.a * a_mult), adapters, is_leaf=lambda x: hasattr(x, "layout"))
    tx = lora.optimizer(optax.adam(lr), tx_a=optax.adam(lr_a, eps=eps_a), tx_b=optax.adam(lr_b, eps=eps_b))
    trainable, frozen, _, losses = train(model, params, adapters, spec, tx, steps=6)
    return {"/".join(k): lora.delta(ad) for k, ad in lora.adapter_items(trainable["lora"])}, losses

  ref, losses = run(32.0, 1.0, lr, lr, eps, eps)
  new, losses2 = run(32.0 / (p * q), p, p * lr, q * lr, eps / p, eps / q)
  assert losses[-1] < losses[0]
  np.testing.assert_allclose(losses, losses2, rtol=1e-4)
  for k in ref:
    assert rel_err(new[k], ref[k]) <= 1e-3, k
  # And it is not trivially true: changing only alpha changes the result.
  other, _ = run(32.0 * p, 1.0, lr, lr, eps, eps)
  assert max(rel_err(other[k], ref[k]) for k in ref) > 1e-2


def test_full_finetuning_is_the_degenerate_case():
  model = TinyLM()
  params = init(model, TOKENS)
  spec = lora.LoraSpec.full()
  params2, adapters = lora.create(params, spec, jax.random.key(0))
  assert adapters == {} and spec.is_full
  trainable, frozen, _, losses = train(model, params2, adapters, spec, lora.optimizer(optax.adam(1e-2)))
  assert frozen == {} and losses[-1] < losses[0]
  assert sum(x.size for x in jax.tree.leaves(trainable)) == sum(x.size for x in jax.tree.leaves(params))


# ----------------------------------------------------------------------------------------------------------------------
# Merge, spec serialisation, shardings.


def test_merge_unmerge_round_trip_and_reported_error():
  model = TinyLM()
  params = init(model, TOKENS)
  _, adapters = lora.create(params, lora.LoraSpec(rank=4), jax.random.key(0))
  adapters = perturb_b(adapters)
  merged, err = lora.merge(params, adapters)
  assert all(float(e) == 0.0 for e in err.values())
  restored, _ = lora.unmerge(merged, adapters)
  for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(params)):
    np.testing.assert_allclose(a, b, atol=1e-5)
  bf16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
  merged16, err16 = lora.merge(bf16, adapters)
  assert merged16["layers_0"]["q_proj"]["kernel"].dtype == jnp.bfloat16
  assert max(float(e) for e in err16.values()) > 0.0  # bf16 rounding of the merged weight is reported


def test_spec_json_round_trip():
  spec = lora.LoraSpec(rank=8, alpha=16, scaling="alpha/sqrt(r)", targets=("attention", "unembed"),
                       rank_pattern={"q_proj": 4}, layers=(0, 1), extra_trainable=("bias",), dtype="bfloat16")
  again = lora.LoraSpec.from_json(spec.to_json())
  assert again == spec
  assert json.loads(spec.to_json())["targets"] == ["attention", "unembed"]
  with pytest.raises(ValueError, match="unknown LoraSpec field.*'rnak'"):
    lora.LoraSpec.from_dict({"rnak": 4})


def test_adapter_shardings_follow_kernel_axes():
  from jax.sharding import NamedSharding, PartitionSpec as P

  model = MultiHead()
  x = jnp.ones((3, 4, 12))
  params = init(model, x)
  _, adapters = lora.create(params, lora.LoraSpec(rank=2, targets=(r"attn/(query|out)", "experts")), jax.random.key(0),
                            layouts=lora.trace_layouts(model, x))
  specs = jax.tree.map(lambda _: P(), params)
  specs["attn"]["query"]["kernel"] = P("fsdp", "tensor", None)
  specs["attn"]["out"]["kernel"] = P("tensor", None, "fsdp")
  specs["experts"]["kernel"] = P("expert", "fsdp", "tensor")
  out = lora.adapter_partition_specs(adapters, specs)
  assert out["attn"]["query"].a == P("fsdp", None) and out["attn"]["query"].b == P(None, "tensor", None)
  assert out["attn"]["out"].a == P("tensor", None, None) and out["attn"]["out"].b == P(None, "fsdp")
  assert out["experts"].a == P("expert", "fsdp", None) and out["experts"].b == P("expert", None, "tensor")
  # Stacked (scan) kernels keep their layer axis on both.
  lm = TinyLM(scan=True)
  lp = init(lm, TOKENS)
  _, lad = lora.create(lp, lora.LoraSpec(rank=2, targets=("q_proj",)), jax.random.key(0),
                       layouts=lora.trace_layouts(lm, TOKENS))
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("fsdp", "tensor"))
  lspecs = jax.tree.map(lambda _: NamedSharding(mesh, P()), lp)
  lspecs["layers"]["q_proj"]["kernel"] = NamedSharding(mesh, P(None, "fsdp", "tensor"))
  sh = lora.adapter_partition_specs(lad, lspecs)["layers"]["q_proj"]
  assert sh.a == NamedSharding(mesh, P(None, "fsdp", None)) and sh.b == NamedSharding(mesh, P(None, None, "tensor"))
  placed = jax.device_put(lad, lora.adapter_partition_specs(lad, lspecs))
  assert placed["layers"]["q_proj"].a.sharding == sh.a


# ----------------------------------------------------------------------------------------------------------------------
# Bad input gets a clear error.


def test_target_matching_nothing_lists_closest_paths():
  params = init(TinyLM(), TOKENS)
  with pytest.raises(ValueError, match=r"matches no kernel.*\n  layers_0/q_proj/kernel"):
    lora.create(params, lora.LoraSpec(targets=("layers_0/q_prj",)), jax.random.key(0))


def test_target_hitting_a_non_matrix_is_named():
  params = init(TinyLM(), TOKENS)
  with pytest.raises(ValueError, match="hits parameter 'layers_0/input_layernorm/scale'"):
    lora.create(params, lora.LoraSpec(targets=("layers_0/input_layernorm/scale",)), jax.random.key(0))
  with pytest.raises(ValueError, match="hits module 'norm'.*no kernel.*\\['scale'\\]"):
    lora.create(params, lora.LoraSpec(targets=("norm",)), jax.random.key(0))


@pytest.mark.parametrize("kwargs, message", [
    ({"rank": 0}, "rank must be an integer >= 1"),
    ({"rank": 17, "targets": ("q_proj",)}, "rank 17 for 'layers_0/q_proj/kernel' exceeds min\\(d_in, d_out\\)"),
    ({"rank_pattern": {"q_proj": -1}}, "rank_pattern\\['q_proj'\\] must be an integer >= 1"),
    ({"scaling": "alpha"}, "unknown LoraSpec.scaling 'alpha'; valid: \\['alpha/r', 'alpha/sqrt\\(r\\)', 'none'\\]"),
    ({"init_a": "kaiming"}, "unknown LoraSpec.init_a 'kaiming'; valid: \\['uniform', 'gaussian', 'pissa'\\]"),
    ({"init_b": "normal"}, "unknown LoraSpec.init_b 'normal'; valid: \\['zeros'\\]"),
    ({"dropout": 1.0}, "dropout must be in \\[0, 1\\)"),
    ({"targets": "q_proj"}, "must be a list of patterns"),
    ({"targets": ("q_proj(",)}, "not a valid regex"),
])
def test_bad_spec_values(kwargs, message):
  params = init(TinyLM(), TOKENS)
  with pytest.raises(ValueError, match=message):
    lora.create(params, lora.LoraSpec(**kwargs), jax.random.key(0))


def test_adapters_that_no_longer_fit_name_paths_and_shapes():
  model = TinyLM()
  params = init(model, TOKENS)
  _, adapters = lora.create(params, lora.LoraSpec(rank=2, targets=("q_proj",)), jax.random.key(0))
  other = init(TinyLM(dim=8), TOKENS)
  with pytest.raises(ValueError, match=r"'layers_0/q_proj/kernel' has shape \(8, 8\) but the adapter has A \(16, 2\)"):
    lora.apply(TinyLM(dim=8), other, adapters, TOKENS)
  with pytest.raises(ValueError, match="'layers_5/q_proj/kernel': no such parameter"):
    lora.merge(params, {"layers_5": adapters["layers_0"]})


def test_ambiguous_kernel_without_layouts_and_raw_dot_kernel_are_errors():
  model = TinyLM(scan=True)
  params = init(model, TOKENS)
  with pytest.raises(ValueError, match="'layers/q_proj/kernel' has shape \\(2, 16, 16\\).*trace_layouts"):
    lora.create(params, lora.LoraSpec(rank=2, targets=("q_proj",)), jax.random.key(0))

  class RawDot(nn.Module):
    @nn.compact
    def __call__(self, x):
      return x @ self.param("kernel", nn.initializers.normal(), (4, 4))

  raw = RawDot()
  x = jnp.ones((2, 4))
  rp = init(raw, x)
  _, adapters = lora.create(rp, lora.LoraSpec(rank=2, targets=(".*",)), jax.random.key(0))
  with pytest.raises(ValueError, match="never applied.*raw jnp.dot"):
    lora.apply(raw, rp, adapters, x)


# ----------------------------------------------------------------------------------------------------------------------
# Tied embeddings, rank policy and the errors a user meets first (issue 12).


def test_unembed_on_a_tied_model_adapts_the_output_side_only():
  model = TinyLM(tied=True)
  params = init(model, TOKENS)
  layouts = lora.trace_layouts(model, TOKENS)
  assert layouts["embed_tokens"].tied and layouts["embed_tokens@attend"] == lora.Layout("attend", ("out", "in"), True)
  spec = lora.LoraSpec(rank=4, targets=("unembed",))
  _, adapters = lora.create(params, spec, jax.random.key(1), layouts=layouts)
  head = adapters["embed_tokens@attend"]
  assert list(adapters) == ["embed_tokens@attend"] and head.a.shape == (16, 4) and head.b.shape == (4, 32)
  head = perturb_b(head)

  # Closed form: logits = h·E^T + s·(h·A)·B, while the lookup (and so every hidden state) is the base model's.
  factored = lora.apply(model, params, {"embed_tokens@attend": head}, TOKENS)
  base = model.apply({"params": params}, TOKENS)
  h = base @ jnp.linalg.pinv(params["embed_tokens"]["embedding"].T)  # recover h from h·E^T (E has full column rank)
  np.testing.assert_allclose(factored - base, head.scale * (h @ head.a) @ head.b, rtol=2e-3,
                             atol=2e-3 * float(jnp.max(jnp.abs(factored - base))))
  # The input side is a separate adapter: `embed` adapts the lookup only, so a tied model takes both.
  _, both = lora.create(params, lora.LoraSpec(rank=4, targets=("embed", "unembed")), jax.random.key(1),
                        layouts=layouts)
  assert set(both) == {"embed_tokens", "embed_tokens@attend"}
  assert both["embed_tokens"].layout.kind == "embed" and both["embed_tokens"].layout.tied
  assert "embed_tokens/embedding (output side)" in lora.summary(params, both)


def test_tied_adapters_refuse_to_merge_and_unembed_without_layouts_says_why():
  model = TinyLM(tied=True)
  params = init(model, TOKENS)
  with pytest.raises(ValueError, match="layouts=lora.trace_layouts"):
    lora.create(params, lora.LoraSpec(targets=("unembed",)), jax.random.key(1))
  _, adapters = lora.create(params, lora.LoraSpec(rank=2, targets=("unembed",)), jax.random.key(1),
                            layouts=lora.trace_layouts(model, TOKENS))
  with pytest.raises(ValueError, match="tied embedding.*Untie"):
    lora.merge(params, adapters)


def test_rank_policy_clip_clips_to_the_kernel_and_says_so():
  model = TinyLM()
  params = init(model, TOKENS)
  with pytest.raises(ValueError, match="rank_policy='clip'"):
    lora.create(params, lora.LoraSpec(rank=64, targets=("q_proj",)), jax.random.key(1))
  spec = lora.LoraSpec(rank=64, targets=("q_proj", "lm_head"), rank_policy="clip")
  _, adapters = lora.create(params, spec, jax.random.key(1))
  q = adapters["layers_0"]["q_proj"]
  assert q.rank == 16 and q.scale == 32.0 / 16  # clipped to min(16, 16); alpha/r of the rank it has
  assert adapters["lm_head"].rank == 16
  table = lora.summary(params, adapters, spec)
  assert table.count("16 (clipped from 64)") == 3, table
  with pytest.raises(ValueError, match="rank_policy"):
    lora.LoraSpec(rank_policy="shrink")


def test_create_accepts_boxed_params_fresh_from_init():
  from lora_jax.models import transformer

  config = transformer.ModelConfig.tiny_llama()
  boxed = transformer.CausalLM(config).init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
  assert any(isinstance(x, nn.LogicallyPartitioned)
             for x in jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned)))
  params, adapters = lora.create(boxed, lora.LoraSpec(rank=2), jax.random.key(1))
  assert lora.count(adapters) > 0 and not isinstance(params["lm_head"]["kernel"], nn.LogicallyPartitioned)
  trainable, frozen = lora.split(boxed, adapters, lora.LoraSpec(rank=2))
  assert "lm_head" in frozen


class ConvNet(nn.Module):
  """A conv stem then a Dense head: LoRA's presets must skip the conv kernel."""

  @nn.compact
  def __call__(self, x):
    x = nn.Conv(8, (3,), name="conv")(x)
    return nn.Dense(4, name="fc")(x)


def test_presets_skip_a_conv_kernel_and_naming_it_explains():
  model, x = ConvNet(), jnp.ones((2, 5, 3))
  params = init(model, x)
  layouts = lora.trace_layouts(model, x)
  _, adapters = lora.create(params, lora.LoraSpec(rank=2), jax.random.key(1), layouts=layouts)
  assert list(adapters) == ["fc"]
  with pytest.raises(ValueError, match="'conv/kernel'.*nn.Conv.*exclude"):
    lora.create(params, lora.LoraSpec(rank=2, targets=("conv",)), jax.random.key(1), layouts=layouts)


class ScanNoDropoutRng(nn.Module):
  """A user nn.scan that splits only the params RNG."""

  @nn.compact
  def __call__(self, x):
    x, _ = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True}, length=2)(16, name="layers")(
        x, None)
    return x


def test_dropout_inside_a_scan_without_the_dropout_rng_says_what_to_add():
  model, x = ScanNoDropoutRng(), jax.random.normal(jax.random.key(0), (2, 3, 16))
  params = init(model, x)
  spec = lora.LoraSpec(rank=2, targets=("mlp",), dropout=0.1)
  _, adapters = lora.create(params, spec, jax.random.key(1), layouts=lora.trace_layouts(model, x))
  with pytest.raises(ValueError, match=r"split_rngs=\{'params': True, 'dropout': True\}"):
    lora.apply(model, params, adapters, x, train=True, rngs={"dropout": jax.random.key(2)})
