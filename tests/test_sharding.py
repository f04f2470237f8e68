"""Sharded training equals one device: 8 fake CPU devices (several meshes) and 2 local processes x 2 devices."""

import json
import pathlib
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from lora_jax import distributed, lora, optim, sharding, train
from lora_jax.models import transformer

HERE = pathlib.Path(__file__).parent
sys.path.insert(0, str(HERE))
import _base  # noqa: E402
import _devices  # noqa: E402
import _distributed_run  # noqa: E402

# float32 sharded and one-device runs differ by reduction order (which also differs between CPUs). Measured after 3
# steps: loss <= 4.8e-7 (1 ulp of ~4.8) and parameters <= 2.2e-6 (full FT, where Adam normalises small gradient
# differences; ~18 ulp of the unit norm scales), so the old 1e-5 left only 4.6x for parameters. These bounds leave
# > 20x and stay far below an Adam step (lr 1e-3), which a sharding bug would get wrong.
LOSS_TOL = 1e-5
PARAM_TOL = 5e-5


def test_make_mesh_fills_and_checks_the_device_count():
  assert sharding.make_mesh({"fsdp": -1}).shape == {"data": 1, "fsdp": 1, "tensor": 1}
  with pytest.raises(ValueError, match="has 4 devices but there are 1"):
    sharding.make_mesh({"fsdp": 2, "tensor": 2})
  with pytest.raises(ValueError, match="unknown mesh axes \\['model'\\]"):
    sharding.make_mesh({"model": 1})
  with pytest.raises(ValueError, match="only one mesh axis may be -1"):
    sharding.make_mesh({"fsdp": -1, "tensor": -1})
  with pytest.raises(ValueError, match="1 devices are not divisible by the fixed axes' product 2"):
    sharding.make_mesh({"data": 2, "fsdp": -1})


def test_rules_and_indivisible_dimensions_name_the_parameter_and_axis():
  assert sharding.logical_to_spec(("embed", "mlp"), sharding.DEFAULT_RULES) == P("fsdp", "tensor")
  assert sharding.logical_to_spec(("layers", "embed", "heads"), sharding.DEFAULT_RULES) == P(None, "fsdp", "tensor")
  with pytest.raises(ValueError, match="no sharding rule for logical axis 'rows'"):
    sharding.logical_to_spec(("rows",), sharding.DEFAULT_RULES)
  config = transformer.ModelConfig.tiny_llama(vocab_size=130)
  mesh = sharding.make_mesh({"tensor": 1})
  shardings = sharding.param_shardings(transformer.abstract_params(config), transformer.logical_axes(config), mesh)
  assert shardings["model"]["layers_0"]["mlp"]["up_proj"]["kernel"].spec == P("fsdp", "tensor")
  # One device cannot show an indivisible split; the 8-device subprocess test below checks the real error.
  with pytest.raises(ValueError, match="sharding rule 'vocab' maps to mesh axis 'tensr', which is not one of the "
                                       "mesh's axes \\['data', 'fsdp', 'tensor'\\]; use one of them or None"):
    sharding.param_shardings(transformer.abstract_params(config), transformer.logical_axes(config), mesh,
                             {**sharding.DEFAULT_RULES, "vocab": "tensr"})


def test_setup_from_real_or_abstract_params_gives_the_same_state_shapes_and_shardings():
  config = transformer.ModelConfig.tiny_llama()
  spec = lora.LoraSpec(rank=4, targets=("all-linear", "unembed"))
  optim_config = optim.OptimConfig(lr=1e-3)
  given = []

  def init(shardings):
    given.append(shardings)
    return transformer.init_params(config, jax.random.key(0))

  real = train.setup(config, spec, optim_config, init, mesh={"fsdp": -1}, seed=3)
  abstract = train.setup(config, spec, optim_config, transformer.abstract_params(config), mesh=real.mesh, seed=3)
  assert given == [real.param_shardings]  # the loader reads straight into the shardings
  real_leaves, abstract_leaves = jax.tree.leaves(real.state), jax.tree.leaves(abstract.state)
  assert len(real_leaves) == len(abstract_leaves) and lora.count(real.state.trainable["lora"]) > 0
  for r, a in zip(real_leaves, abstract_leaves):
    assert isinstance(a, jax.ShapeDtypeStruct) and (r.shape, r.dtype, r.sharding) == (a.shape, a.dtype, a.sharding)
  assert int(real.state.step) == 0 and np.array_equal(jax.random.key_data(jax.random.key(3)), real.state.rng)
  batch = {"inputs": np.zeros((2, 8), np.int32), "targets": np.ones((2, 8), np.int32),
           "loss_mask": np.ones((2, 8), np.float32)}
  state, metrics = real.train_step(real.state.frozen, real.state.replace(frozen=None), batch)
  assert int(state.step) == 1 and np.isfinite(float(metrics["train/loss"]))
  abstract_batch = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=abstract.batch_sharding),
                                batch)
  abstract.train_step.lower(abstract.state.frozen, abstract.state.replace(frozen=None), abstract_batch).compile()


def test_adapters_shard_like_their_kernels():
  config = transformer.ModelConfig.tiny_llama()
  mesh = sharding.make_mesh({"fsdp": 1})
  params = transformer.init_params(config, jax.random.key(0))
  _, adapters = lora.create(params, lora.LoraSpec(rank=2, targets=("q_proj", "down_proj")), jax.random.key(0))
  ps = sharding.param_shardings(transformer.abstract_params(config), transformer.logical_axes(config), mesh)
  ad = sharding.adapter_shardings(adapters, ps, mesh)["model"]["layers_0"]
  assert ad["self_attn"]["q_proj"].a.spec == P("fsdp", None) and ad["self_attn"]["q_proj"].b.spec == P(None, "tensor")
  assert ad["mlp"]["down_proj"].a.spec == P("tensor", None) and ad["mlp"]["down_proj"].b.spec == P(None, "fsdp")


def test_unreachable_coordinator_fails_in_bounded_time_with_its_address():
  port = _free_port()
  t0 = time.monotonic()
  with pytest.raises(ConnectionError, match=f"JAX coordinator 127.0.0.1:{port} not reachable within 1 s"):
    distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=1, timeout_s=1.0)
  assert time.monotonic() - t0 < 10
  with pytest.raises(ValueError, match="process_id 2 is outside \\[0, 2\\)"):
    distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=2)
  assert distributed.initialize() is False  # a plain single-process run


def test_a_lone_process_0_fails_in_bounded_time_naming_the_coordinator_and_process_count():
  port = _free_port()
  code = ("from lora_jax import distributed; "
          f"distributed.initialize('127.0.0.1:{port}', num_processes=2, process_id=0, timeout_s=2)")
  t0 = time.monotonic()
  out = subprocess.run([sys.executable, "-c", code], cwd=HERE.parent, capture_output=True, text=True, timeout=300)
  assert time.monotonic() - t0 < 60
  assert out.returncode == 1, out.stderr[-2000:]  # a Python error, not JAX's SIGABRT
  assert f"ConnectionError: process 0 of 2: waited 2 s at coordinator 127.0.0.1:{port}, but process(es) [1] never " \
      "connected" in out.stderr


@pytest.mark.slow
def test_every_mesh_equals_one_device_for_lora_and_full_on_llama_and_moe(tmp_path):
  out = tmp_path / "meshes.json"
  run = subprocess.run([sys.executable, str(HERE / "_distributed_run.py"), "meshes", str(out)], capture_output=True,
                       text=True, timeout=900)
  assert run.returncode == 0, run.stderr[-3000:]
  report = json.loads(out.read_text())
  results = report["results"]
  assert "parameter 'lm_head/kernel' dimension 1 has size 130, not divisible by mesh axis 'tensor' of size 4" in \
      report["indivisible"]
  assert {(r["model"], r["method"]) for r in results} == {(m, k) for m in ("llama", "qwen3_moe")
                                                          for k in ("lora", "full")} | {("llama", "dora")}
  assert report["sharded_load"]["equal"] and report["sharded_load"]["placed"]
  assert report["sharded_load"]["smallest_region_fraction"] <= 1 / 8  # a device reads 1/8 of an fsdp x tensor kernel
  assert {(r["model"], r["method"], r["mesh"]) for r in results} == {
      ("llama", "lora", "fsdp=8"), ("llama", "lora", "tensor=8")} | {
      (m, k, "data=2,fsdp=2,tensor=2") for m in ("llama", "qwen3_moe") for k in ("lora", "full")} | {
      ("llama", "dora", "data=2,fsdp=2,tensor=2")}
  for r in results:
    assert r["loss_diff"] <= LOSS_TOL and r["param_diff"] <= PARAM_TOL, r


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _processes(mode, n, *args):
  port = _free_port()
  procs = [subprocess.Popen([sys.executable, str(HERE / "_distributed_run.py"), mode, str(i), str(n), str(port),
                             *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for i in range(n)]
  logs = [p.communicate(timeout=600)[0] for p in procs]
  for p, log in zip(procs, logs):
    assert p.returncode == 0, log[-3000:]


@pytest.mark.slow
def test_two_processes_equal_one_device_and_checkpoints_move_between_process_counts(tmp_path):
  config = _distributed_run.configs()["llama"]
  ref_loss, ref = _distributed_run.run(config, "lora", None, tmp_path / "ref")

  # One launch of 2 processes x 2 devices: trains on a 2 x 2 mesh, then restores the checkpoint saved by 1 process
  # (the reference run) on that mesh.
  _processes("host", 2, tmp_path / "multi", tmp_path / "multi.npz", tmp_path / "ref" / "checkpoints",
             tmp_path / "two.npz")
  got = np.load(tmp_path / "multi.npz")
  assert abs(float(got["loss"]) - ref_loss) <= LOSS_TOL
  values = [got[f"arr_{i}"] for i in range(len(ref))]
  for a, b in zip(values, ref):
    assert np.max(np.abs(a - b)) <= PARAM_TOL

  # Saved by 2 processes, restored by 1 (with 2 devices): the same values.
  subprocess.run([sys.executable, str(HERE / "_distributed_run.py"), "restore", "0", "1", "0",
                  str(tmp_path / "multi" / "checkpoints"), str(tmp_path / "one.npz")], check=True,
                 capture_output=True, timeout=600)
  one = np.load(tmp_path / "one.npz")
  for i, v in enumerate(values):
    np.testing.assert_array_equal(one[f"arr_{i}"], v)

  # Saved by 1 process (the reference run), restored by 2 processes on a 2 x 2 mesh (in the launch above).
  two = np.load(tmp_path / "two.npz")
  for i, v in enumerate(ref):
    np.testing.assert_array_equal(two[f"arr_{i}"], v)


@pytest.mark.slow
def test_the_cli_runs_on_two_processes_and_only_process_0_writes(tmp_path):
  port = _free_port()
  env = _devices.env_with_devices(2)
  cmd = [sys.executable, "-m", "experiments.main", "--config", "experiments/configs/finetune.py:tiny",
         "--workdir", str(tmp_path / "run"), "--config.methods=('lora',)", "--config.train.steps=6",
         "--config.train.eval_every=3", "--config.train.checkpoint_every=3", "--config.train.log_every=1",
         *_base.overrides(),
         f"--config.data.cache_dir={tmp_path / 'tok'}", "--config.data.synthetic_examples=300",
         "--config.eval.arithmetic_examples=4", "--coordinator_address", f"127.0.0.1:{port}", "--num_processes", "2"]
  procs = [subprocess.Popen(cmd + ["--process_id", str(i)], cwd=HERE.parent, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True) for i in range(2)]
  logs = [p.communicate(timeout=600)[0] for p in procs]
  assert [p.returncode for p in procs] == [0, 0], logs[0][-2000:] + logs[1][-2000:]
  assert "report:" in logs[0] and "report:" not in logs[1]
  steps = [json.loads(l)["step"] for l in (tmp_path / "run" / "lora" / "metrics.jsonl").read_text().splitlines()
           if "train/loss" in l]
  assert steps == list(range(1, 7))  # one writer: no duplicated records
  assert (tmp_path / "run" / "lora" / "checkpoints" / "6").exists()
  assert "| lora |" in (tmp_path / "run" / "report.md").read_text()
