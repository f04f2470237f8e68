"""Meshes, logical-axis rules and shardings for parameters, adapters, optimizer state and batches.

JAX's own SPMD runtime does the distribution: arrays carry ``NamedSharding``s over a ``Mesh`` with axes
``("data", "fsdp", "tensor")``, the train step is jitted with explicit in/out shardings, and XLA inserts the
collectives. Models name their parameter axes logically ('embed', 'mlp', 'heads', ...); ``rules`` map each logical
name to a mesh axis (or None = replicated). Adapters are placed by ``lora.adapter_partition_specs``: A follows the
kernel's input axes, B its output axes, the rank axis is replicated — so they shard exactly like their base.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import jax
import numpy as np
from flax import traverse_util
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from lora_jax import lora

from lora_jax.rules import BATCH_AXES, DEFAULT_RULES, MESH_AXES  # noqa: F401 (sharding.DEFAULT_RULES etc.)


def make_mesh(shape: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A mesh over ``devices`` (default: all) with axes data, fsdp, tensor; one size may be -1 (fills the rest)."""
  devices = list(jax.devices() if devices is None else devices)
  unknown = sorted(set(shape) - set(MESH_AXES))
  if unknown:
    raise ValueError(f"unknown mesh axes {unknown}; valid: {list(MESH_AXES)}")
  sizes = {axis: int(shape.get(axis, 1)) for axis in MESH_AXES}
  fill = [a for a, s in sizes.items() if s == -1]
  if len(fill) > 1:
    raise ValueError(f"only one mesh axis may be -1, got {fill}")
  known = math.prod(s for s in sizes.values() if s != -1)
  if any(s == 0 or s < -1 for s in sizes.values()):
    raise ValueError(f"mesh sizes must be positive or -1, got {sizes}")
  if fill:
    if len(devices) % known:
      raise ValueError(f"mesh {sizes}: {len(devices)} devices are not divisible by the fixed axes' product {known}")
    sizes[fill[0]] = len(devices) // known
  if math.prod(sizes.values()) != len(devices):
    raise ValueError(f"mesh {sizes} has {math.prod(sizes.values())} devices but there are {len(devices)}; "
                     "make the product match or use -1 for one axis")
  grid = np.asarray(devices, dtype=object).reshape(tuple(sizes[a] for a in MESH_AXES))
  return Mesh(grid, MESH_AXES)


def logical_to_spec(names: Sequence[str | None], rules: Mapping[str, str | None]) -> P:
  """PartitionSpec of one array from its logical axis names; a mesh axis is used at most once."""
  used, out = set(), []
  for name in names:
    if name is not None and name not in rules:
      raise ValueError(f"no sharding rule for logical axis {name!r}; rules cover {sorted(rules)}")
    axis = rules.get(name) if name is not None else None
    if axis is not None and axis in used:
      axis = None
    used.add(axis)
    out.append(axis)
  return P(*out)


def check_rules(rules: Mapping[str, str | Sequence[str] | None], axis_names: Sequence[str] = MESH_AXES) -> None:
  """Raises ValueError naming a rule whose mesh axis does not exist (and the valid axes)."""
  for name, axis in rules.items():
    for a in () if axis is None else (axis,) if isinstance(axis, str) else tuple(axis):
      if a not in axis_names:
        raise ValueError(f"sharding rule {name!r} maps to mesh axis {a!r}, which is not one of the mesh's axes "
                         f"{list(axis_names)}; use one of them or None (replicated)")


def param_shardings(abstract_params, logical_axes, mesh: Mesh, rules: Mapping[str, str | None] = DEFAULT_RULES):
  """NamedShardings for a parameter tree from its logical axes; a rule naming no mesh axis, or a dimension not
  divisible by its mesh axis, is an error naming the rule or the parameter and the axis."""
  check_rules(rules, mesh.axis_names)
  flat_axes = traverse_util.flatten_dict(logical_axes, is_leaf=lambda _, x: isinstance(x, tuple))
  flat_params = traverse_util.flatten_dict(abstract_params)
  missing = sorted("/".join(p) for p in flat_params if p not in flat_axes)
  if missing:
    raise ValueError(f"no logical axes for parameters {missing[:5]}")
  out = {}
  for path, leaf in flat_params.items():
    spec = logical_to_spec(flat_axes[path], rules)
    _check_divisible("/".join(path), leaf.shape, spec, mesh)
    out[path] = NamedSharding(mesh, spec)
  return traverse_util.unflatten_dict(out)


def _check_divisible(name: str, shape: Sequence[int], spec: P, mesh: Mesh) -> None:
  for dim, (size, axis) in enumerate(zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec)))):
    if axis is None:
      continue
    n = math.prod(mesh.shape[a] for a in (axis if isinstance(axis, tuple) else (axis,)))
    if size % n:
      raise ValueError(f"parameter '{name}' dimension {dim} has size {size}, not divisible by mesh axis "
                       f"{axis!r} of size {n}; change the mesh or the sharding rules")


def adapter_shardings(adapters, params_shardings, mesh: Mesh):
  """NamedShardings for an adapter tree from its kernels' (checked for divisibility like the base)."""
  out = lora.adapter_partition_specs(adapters, params_shardings)
  for (path, real), (_, ad) in zip(lora.adapter_items(adapters), lora.adapter_items(out)):
    _check_divisible("/".join(path) + "/lora_a", real.a.shape, ad.a.spec, mesh)
    _check_divisible("/".join(path) + "/lora_b", real.b.shape, ad.b.spec, mesh)
    if real.m is not None:
      _check_divisible("/".join(path) + "/lora_magnitude", real.m.shape, ad.m.spec, mesh)
  return out


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Rows of a [B, T] batch split over the data and fsdp axes."""
  return NamedSharding(mesh, P(BATCH_AXES, None))


def replicated(mesh: Mesh) -> NamedSharding:
  """Fully replicated placement (scalars, RNG, step counters)."""
  return NamedSharding(mesh, P())


def global_batch(local_batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """The global batch array from this host's rows (each host passes only its slice; process order = row order)."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in local_batch.items()}
