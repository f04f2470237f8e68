"""Every experiment family builds a valid config at every point of every sweep it declares."""

import importlib
import pathlib

import pytest

from experiments import main as exp_main
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
      assert exp_main.make_optim(config.methods[0], config).lr == config.optim.lr  # the point's LR is the LR used
      if "lr=" in point:
        assert config.optim.lr == float(point.split("lr=")[1].split(",")[0])
  with pytest.raises(ValueError, match="unknown config argument"):
    module.get_config("tiny,rnk=4")


def test_cookbook_lr_matches_the_studys_numbers():
  assert f"{common.cookbook_lr('llama', 2048, lora=False):.3g}" == "4.91e-05"
  assert f"{common.cookbook_lr('llama', 4096, lora=True):.3g}" == "0.000286"
  assert f"{common.cookbook_lr('qwen3', 4096, lora=True):.3g}" == "0.000473"
  assert common.lr_grid(1e-3, 2.0, 1, 1) == [0.0005, 0.001, 0.002]
