"""Random perturbations of parameter trees for tests, drawn in NumPy: eager ``jax.random.normal`` compiles a program
for every distinct leaf shape, which took most of some tests' time on a 2-core CPU."""

import jax
import jax.numpy as jnp
import numpy as np


def perturbed(tree, scale, seed):
  """``tree`` with ``scale`` * N(0, 1) noise added to every leaf (independent draws, same dtypes)."""
  rng = np.random.default_rng(seed)

  def add(x):
    x = np.asarray(x)
    return jnp.asarray(x + (scale * rng.standard_normal(x.shape)).astype(x.dtype))

  return jax.tree.map(add, tree)
