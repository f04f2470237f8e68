"""Bounds for comparisons of two computations that are equal in exact arithmetic, valid on any x86 CPU.

float32 results differ between x86 CPUs: XLA (and PyTorch) pick reduction orders and kernels by vector width (AVX2 vs
AVX-512), so a bound set just above what one machine measured fails on another (a bound of 1e-5, 14x above this
project's runner, was exceeded 1.8x and 9.7x on an AMD EPYC host). Two rules, neither taken from a measurement:

- **A claim of exactness** (two programs of ours: scan vs unrolled, KV cache vs full forward, per-row vs one adapter,
  stacked vs separate runs) is checked in float64 (the ``x64`` fixture in ``conftest.py``) against ``EXACT``.
- **A comparison that must stay float32** (ours vs transformers/PEFT in PyTorch: both keep float32 RMSNorm
  statistics, RoPE and softmax, so float64 agrees no better) is bounded by float32 error growth through the model's
  depth and size: ``model_bound``.
"""

import jax
import jax.numpy as jnp
import numpy as np

U32 = 2.0 ** -24  # Unit roundoff of float32 (round to nearest).
U64 = 2.0 ** -53  # Unit roundoff of float64.
# float64 exactness, relative to the largest |value|: float64's unit roundoff times a budget of 10^6 for the depth of
# the computation and cancellation. float32 rounding alone (6e-8 per operation) fails it by ~600x, so a program that
# silently computes in float32, or differs by any real change (a 1e-6 change of a scale), cannot pass.
EXACT = 1e-10


def gamma(n: int, unit: float = U32) -> float:
  """gamma_n = n*u / (1 - n*u): the worst-case relative error of a length-n sum or dot product (Higham, Lemma 3.1)."""
  if n * unit >= 1:
    raise ValueError(f"gamma_n is unbounded for n={n}, u={unit}")
  return n * unit / (1 - n * unit)


def reduction_length(config, seq_len: int, rank: int = 0) -> int:
  """n: the summed lengths of the reductions along the longest path from the embeddings to one logit of a decoder.

  Per layer: the RMSNorm statistic (D), a q/k/v projection (D), a score (K), the softmax's normaliser and the
  probabilities times values (2 T), the output projection (H K), the second RMSNorm (D), gate/up (D) and down (F, or
  the router's D plus k experts' F_moe mixed); a LoRA adapter on a projection adds its rank twice (x A, then (x A) B)
  per matmul on the path (5). Then the final norm (D) and the head (D).
  """
  d = config.hidden_size
  mlp = config.intermediate_size
  if config.num_experts:
    mlp = max(mlp, d + config.num_experts_per_tok * config.moe_intermediate_size)
  per_layer = 4 * d + config.head_dim + 2 * seq_len + config.num_heads * config.head_dim + mlp + 5 * 2 * rank
  return config.num_layers * per_layer + 2 * d + 2 * rank


def model_bound(config, seq_len: int, rank: int = 0, unit: float = U32) -> float:
  """Bound on |a - b| / max|b| for two float32 computations of a model's logits: each within gamma_n of exact.

  gamma_n bounds the error relative to the sum of |terms| of each reduction; with weights and activations kept at unit
  scale by the model's norms, that sum is of the order of the largest output, so 2 gamma_n is the bound used (about
  20x above what this project's runner measures against PyTorch: 3.4e-6 of 8.2e-5 for the test_hf models).
  """
  return 2 * gamma(reduction_length(config, seq_len, rank), unit)


def assert_close(actual, desired, rel):
  """|actual - desired| <= rel * max|desired| elementwise: a bound that scales with the magnitudes."""
  desired = np.asarray(desired, np.float64)
  np.testing.assert_allclose(np.asarray(actual, np.float64), desired, rtol=0, atol=rel * np.abs(desired).max())


def assert_exact(actual, desired):
  """Equality up to float64 rounding (``EXACT``); refuses inputs that are not float64 (the claim needs x64)."""
  for name, x in (("actual", actual), ("desired", desired)):
    dtype = np.asarray(x).dtype
    if np.issubdtype(dtype, np.floating) and dtype != np.float64:
      raise AssertionError(f"assert_exact checks float64 results; {name} is {dtype} (use the x64 fixture)")
  assert_close(actual, desired, EXACT)


def to64(tree):
  """Every floating leaf of a pytree as float64 (call under the x64 fixture)."""
  return jax.tree.map(lambda x: x.astype(jnp.float64) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


def config64(config):
  """A ModelConfig computing and storing parameters in float64 (softmax and norm statistics follow: 'at least fp32')."""
  return config.replace(dtype="float64", param_dtype="float64")
