"""Runs the trainer on a device mesh, for tests/test_sharding.py (run as a script in a subprocess).

    python tests/_distributed_run.py meshes OUT.json                # 8 fake CPU devices, every mesh vs one device
    python tests/_distributed_run.py host PID N PORT WORKDIR OUT [CKPT_DIR OUT2]  # one of N processes with 2 devices
                                                                    # each (then restores CKPT_DIR, as restore does)
    python tests/_distributed_run.py restore PID N PORT CKPT_DIR OUT  # restore a checkpoint on N processes

It is not a test module (pytest collects test_*.py only); the functions are also imported for single-device
references.
"""

from __future__ import annotations

import json
import os
import pathlib
import sys

STEPS = 3
GLOBAL_BATCH = 8
SEQ = 8


def configs():
  """The two model families the equality must hold for."""
  from lora_jax.models import transformer

  return {"llama": transformer.ModelConfig.tiny_llama(), "qwen3_moe": transformer.ModelConfig.tiny_qwen3_moe()}


class Batches:
  """Deterministic global batches; each process takes its own rows (as data.BatchIterator does)."""

  def __init__(self, vocab, process_index=0, process_count=1):
    self.index, self.vocab = 0, vocab
    self.pi, self.pc = process_index, process_count

  def __next__(self):
    import numpy as np

    rng = np.random.default_rng(self.index)
    seq = rng.integers(0, self.vocab, size=(GLOBAL_BATCH, SEQ + 1)).astype(np.int32)
    self.index += 1
    rows = slice(self.pi * GLOBAL_BATCH // self.pc, (self.pi + 1) * GLOBAL_BATCH // self.pc)
    return {"inputs": seq[rows, :-1], "targets": seq[rows, 1:],
            "loss_mask": np.ones((GLOBAL_BATCH, SEQ), np.float32)[rows]}

  def state(self):
    return {"index": self.index}

  def restore(self, state):
    self.index = state["index"]


def set_up(config, method, mesh_shape=None):
  """The run's ``train.setup`` (on a mesh if ``mesh_shape``) and its optimizer config."""
  import jax

  from lora_jax import lora, optim, train
  from lora_jax.models import transformer

  spec = {"lora": lora.LoraSpec(rank=4, targets=("all-linear", "unembed")), "full": lora.LoraSpec.full(),
          "dora": lora.LoraSpec(rank=4, targets=("all-linear", "unembed"), variant="dora")}[method]
  optim_config = optim.OptimConfig(lr=1e-3)
  init = lambda shardings: transformer.init_params(config, jax.random.key(0))  # noqa: E731
  return train.setup(config, spec, optim_config, init, mesh=mesh_shape, seed=1), optim_config


def run(config, method, mesh_shape, workdir, process_index=0, process_count=1, steps=STEPS):
  """Trains ``steps`` steps (on a mesh if ``mesh_shape``); returns (final loss, trainable params as numpy)."""
  import jax
  import numpy as np
  from jax.experimental import multihost_utils

  from lora_jax import train

  s, optim = set_up(config, method, mesh_shape)
  loop = train.LoopConfig(steps=steps, log_every=1, eval_every=10**6, checkpoint_every=steps)
  held_out = Batches(config.vocab_size, process_index, process_count)
  held_out.index = 1000
  evals = [next(held_out)]
  state, last = train.fit(s.model, s.state, optim, loop, Batches(config.vocab_size, process_index, process_count),
                          lambda: evals, workdir, progress=False, setup=s)
  trainable = multihost_utils.process_allgather(state.trainable, tiled=True) if process_count > 1 else \
      jax.device_get(state.trainable)
  return last["train/loss"], [np.asarray(x) for x in jax.tree.leaves(trainable)]


def main_meshes(out):
  """Every mesh, both methods, both models: max |difference| to the one-device run; plus the indivisible error."""
  import tempfile

  import numpy as np

  from lora_jax import sharding
  from lora_jax.models import transformer

  config = transformer.ModelConfig.tiny_llama(vocab_size=130)
  try:
    sharding.param_shardings(transformer.abstract_params(config), transformer.logical_axes(config),
                             sharding.make_mesh({"fsdp": 2, "tensor": 4}))
    indivisible = "no error"
  except ValueError as e:
    indivisible = str(e)

  results = []
  for name, config in configs().items():
    for method in ("lora", "full") + (("dora",) if name == "llama" else ()):  # DoRA's m sharded like B's outputs
      with tempfile.TemporaryDirectory() as tmp:
        ref_loss, ref = run(config, method, None, f"{tmp}/ref")
        # Every mesh kind on one model and method; the mixed mesh (all three axes at once) on every combination.
        meshes = ({"fsdp": 8}, {"tensor": 8}) if (name, method) == ("llama", "lora") else ()
        for mesh_shape in meshes + ({"data": 2, "fsdp": 2, "tensor": 2},):
          label = ",".join(f"{k}={v}" for k, v in mesh_shape.items())
          loss, got = run(config, method, mesh_shape, f"{tmp}/{label}")
          results.append({"model": name, "method": method, "mesh": label, "loss_diff": abs(loss - ref_loss),
                          "param_diff": max(float(np.max(np.abs(a - b))) for a, b in zip(got, ref)),
                          "n_leaves": len(got)})
  pathlib.Path(out).write_text(json.dumps({"results": results, "indivisible": indivisible,
                                           "sharded_load": sharded_load()}, indent=1))


def sharded_load():
  """An HF checkpoint loaded straight into fsdp x tensor shardings equals the plain load; regions read are partial."""
  import tempfile

  import jax
  import numpy as np

  from lora_jax import hf, sharding
  from lora_jax.models import transformer

  config = transformer.ModelConfig.tiny_qwen3_moe(scan_layers=True)
  params = transformer.init_params(config, jax.random.key(0))
  mesh = sharding.make_mesh({"fsdp": 4, "tensor": 2})
  shardings = sharding.param_shardings(transformer.abstract_params(config), transformer.logical_axes(config), mesh)
  regions = []
  real = hf._read_region

  def spy(handles, available, entries, shape, region, dtype):
    block = real(handles, available, entries, shape, region, dtype)
    regions.append(block.size / np.prod(shape))
    return block

  hf._read_region = spy
  with tempfile.TemporaryDirectory() as tmp:
    hf.save_params(params, config, tmp)
    plain = hf.load_params(tmp, config)
    placed = hf.load_params(tmp, config, shardings=shardings)
  hf._read_region = real
  same = all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(jax.tree.leaves(plain),
                                                                           jax.tree.leaves(placed)))
  right_place = all(a.sharding == s for a, s in zip(jax.tree.leaves(placed), jax.tree.leaves(shardings)))
  return {"equal": same, "placed": right_place, "smallest_region_fraction": float(min(regions[-200:]))}


def main_host(pid, n, port, workdir, out, ckpt_dir=None, restore_out=None):
  """One process of a multi-process LoRA run on a fsdp x tensor mesh over all processes' devices; then, with
  ``ckpt_dir``, restores that checkpoint in the same processes (one launch of N processes for both checks)."""
  import numpy as np

  from lora_jax import distributed

  distributed.initialize(f"127.0.0.1:{port}", num_processes=n, process_id=pid, timeout_s=60)
  import jax

  assert jax.process_count() == n and len(jax.devices()) == 2 * n
  loss, params = run(configs()["llama"], "lora", {"fsdp": n, "tensor": 2}, workdir, pid, n)
  if pid == 0:
    np.savez(out, loss=loss, *params)
  if ckpt_dir is not None:
    restore(pid, n, ckpt_dir, restore_out)


def main_restore(pid, n, port, ckpt_dir, out):
  """Restores the newest checkpoint of a LoRA run onto a mesh over N processes and saves the values (process 0)."""
  from lora_jax import distributed

  if n > 1:
    distributed.initialize(f"127.0.0.1:{port}", num_processes=n, process_id=pid, timeout_s=60)
  restore(pid, n, ckpt_dir, out)


def restore(pid, n, ckpt_dir, out):
  """The restore of main_restore in an initialized process."""
  import jax
  import numpy as np
  from jax.experimental import multihost_utils

  from lora_jax import checkpoint

  s, _ = set_up(configs()["llama"], "lora", {"fsdp": -1, "tensor": 2} if len(jax.devices()) > 1 else {"fsdp": 1})
  ck = checkpoint.Checkpointer(ckpt_dir)
  restored, _ = ck.restore(ck.latest_step(), s.state.checkpoint_tree())
  values = multihost_utils.process_allgather(restored["trainable"], tiled=True) if n > 1 else restored["trainable"]
  if pid == 0:
    np.savez(out, *[np.asarray(x) for x in jax.tree.leaves(values)])


if __name__ == "__main__":
  mode, args = sys.argv[1], sys.argv[2:]
  devices = 8 if mode == "meshes" else 2
  flags = os.environ.get("XLA_FLAGS", "")
  os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={devices}".strip()
  sys.path.insert(0, str(pathlib.Path(__file__).parents[1]))
  if mode == "meshes":
    main_meshes(args[0])
  elif mode == "host":
    main_host(int(args[0]), int(args[1]), int(args[2]), *args[3:])
  elif mode == "restore":
    main_restore(int(args[0]), int(args[1]), int(args[2]), args[3], args[4])
  else:
    raise SystemExit(f"unknown mode {mode}")
