"""experiments.overrides: the one parser of --config.KEY=VALUE for every command, typed by the field."""

import pytest

from experiments import overrides
from experiments.configs import finetune


def test_values_take_the_fields_declared_types_placeholders_included():
  config = finetune.get_config("tiny")
  got = overrides.apply(config, ["--config.optim.grad_clip_norm=1", "--config.lora.layers=0",
                                 "--config.methods=lora", "--config.lora.rank_pattern.k_proj=8",
                                 "--config.model.scan_layers=t", "--config.data.packing=0"])
  assert got.optim.grad_clip_norm == 1.0 and isinstance(got.optim.grad_clip_norm, float)  # a placeholder(float)
  assert got.lora.layers == (0,) and got.methods == ("lora",) and got.lora.rank_pattern.k_proj == 8
  assert got.model.scan_layers is True and got.data.packing is False
  assert overrides.apply(config, ["--config.lora.layers=[0,1]"]).lora.layers == (0, 1)
  assert overrides.apply(config, {"train.steps": 7}).train.steps == 7  # a mapping of Python values
  text = overrides.apply(config, ["--config.wandb.project=2024", "--config.model.name=None"])
  assert text.wandb.project == "2024" and text.model.name == "None"  # a text field keeps the text
  assert config.optim.grad_clip_norm is None and config.train.steps != 7  # the input is left as it was


@pytest.mark.parametrize("bad, message", [
    ("--config.optim.grad_clip_norm=abc", "grad_clip_norm"),
    ("--config.lora.kproj=1", "has no field 'lora.kproj'"),
    ("--config.model.scan_layers=maybe", "expected a bool"),
    ("--config.train.stepz=3", "has no field 'train.stepz'"),
    ("--train.steps=3", "expected --config.KEY=VALUE"),
])
def test_a_bad_override_is_an_error_naming_it(bad, message):
  with pytest.raises(ValueError, match=message):
    overrides.apply(finetune.get_config("tiny"), [bad])


def test_bad_syntax_lists_what_is_not_an_override():
  assert overrides.bad_syntax(["--config.a=1", "--workdir", "x", "--config.b"]) == ["--workdir", "x", "--config.b"]
