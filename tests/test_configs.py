"""Every experiment family builds a valid config at every point of every sweep it declares."""

import importlib
import pathlib

import pytest

from experiments import main as exp_main
from experiments import run as run_lib
from experiments.configs import common

FAMILIES = sorted(p.stem for p in (pathlib.Path(__file__).parents[1] / "experiments" / "configs").glob("*.py")
                  if p.stem not in ("__init__", "common", "finetune"))


@pytest.mark.parametrize("family", FAMILIES)
def test_every_point_of_every_sweep_builds_a_valid_config(family):
  module = importlib.import_module(f"experiments.configs.{family}")
  assert module.__doc__ and "python -m experiments.sweep" in module.__doc__  # says how to run it
  assert {"tiny", "quick"} <= set(module.SWEEPS)
  for variant in module.SWEEPS:
    points = module.get_sweep(variant)
    assert points and len(set(points)) == len(points), variant
    for point in points:
      config = module.get_config(point)
      exp_main.check_config(config)
      assert len(config.methods) == 1, point  # one run per point
      assert run_lib.make_optim(config.methods[0], config).lr == config.optim.lr  # the point's LR is the LR used
      if "lr=" in point:
        assert config.optim.lr == float(point.split("lr=")[1].split(",")[0])
  with pytest.raises(ValueError, match="unknown config argument"):
    module.get_config("tiny,rnk=4")


def test_cookbook_lr_matches_the_studys_numbers():
  assert f"{common.cookbook_lr('llama', 2048, lora=False):.3g}" == "4.91e-05"
  assert f"{common.cookbook_lr('llama', 4096, lora=True):.3g}" == "0.000286"
  assert f"{common.cookbook_lr('qwen3', 4096, lora=True):.3g}" == "0.000473"
  assert common.lr_grid(1e-3, 2.0, 1, 1) == [0.0005, 0.001, 0.002]


def _real_points() -> dict[tuple, tuple[str, str]]:
  """Every real-scale point of every family, one per (model, method, LoRA targets and scaling, batch, sequence):
  other ranks and LRs change no program structure."""
  out = {}
  for family in FAMILIES:
    module = importlib.import_module(f"experiments.configs.{family}")
    for variant in (v for v in module.SWEEPS if not v.startswith(("tiny", "quick"))):  # CPU variants: tiny*
      for point in module.get_sweep(variant):
        c = module.get_config(point)
        method = c.methods[0]
        lora_kind = (tuple(c.lora.targets), c.lora.scaling) if method == "lora" else ()
        out.setdefault((c.model.name, method, lora_kind, c.data.batch_size, c.data.seq_len), (family, point))
  return out


@pytest.mark.slow
def test_real_scale_points_lower_and_compile_from_abstract_shapes():
  """The GPU/TPU points build the real train step from shapes alone (nothing downloaded or allocated): every
  distinct program lowers through experiments.main's own set-up, and one per architecture compiles."""
  import jax

  from lora_jax import sharding, train

  points = _real_points()
  assert {m for m, *_ in points} == set(common.REAL_MODELS)  # every study model is swept somewhere
  compiled = set()
  for (model, method, _, batch, seq), (family, point) in sorted(points.items(), key=str):
    config = importlib.import_module(f"experiments.configs.{family}").get_config(point)
    assert config.model.scan_layers and config.model.dtype == "bfloat16", point
    model_config = common.preset(model, scan_layers=True, remat=config.model.remat,
                                 param_dtype=config.model.param_dtype).replace(dtype=config.model.dtype)
    mesh = sharding.make_mesh(config.mesh.to_dict(), jax.devices()[:1])
    s = run_lib.abstract_setups(config, model_config, mesh)[method]
    lowered = train.lower_steps(s, batch, seq)
    if model_config.architecture not in compiled:  # ~10 s each on 2 cores: one per architecture
      assert lowered.compile().memory_analysis().argument_size_in_bytes > 0, point
      compiled.add(model_config.architecture)
  assert compiled == {"llama", "qwen3"}
