"""``LoraSpec``: what to adapt and how, as plain data (JSON in, JSON out).

It imports no JAX, so configs, sweep runners and launchers that build or check specs start in a fraction of a second;
``lora_jax.lora`` re-exports it and holds the transforms that use it.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

SCALINGS = ("alpha/r", "alpha/sqrt(r)", "none")
INITS_A = ("uniform", "gaussian", "pissa")
INITS_B = ("zeros",)
RANK_POLICIES = ("error", "clip")
DTYPES = ("float32", "bfloat16", "float16", "float64")  # What A and B may be stored in.
VARIANTS = ("lora", "dora")  # dora: weight-decomposed LoRA (a learned magnitude per output column).



@dataclasses.dataclass(frozen=True)
class LoraSpec:
  """What to adapt and how; serialisable to JSON. Full fine-tuning is ``LoraSpec.full()``."""

  rank: int = 16  # Rank r of every adapter unless `rank_pattern` says otherwise.
  alpha: float = 32.0  # LoRA alpha (the study uses 32 throughout).
  scaling: str = "alpha/r"  # "alpha/r" (LoRA), "alpha/sqrt(r)" (rsLoRA) or "none" (s = 1).
  targets: tuple[str, ...] = ("all-linear",)  # Presets, plain module names or regexes (fullmatch on paths).
  exclude: tuple[str, ...] = ()  # Same syntax as `targets`; matches are removed.
  rank_pattern: Mapping[str, int] = dataclasses.field(default_factory=dict)  # pattern -> rank (first match wins).
  alpha_pattern: Mapping[str, float] = dataclasses.field(default_factory=dict)  # pattern -> alpha.
  layers: tuple[int, ...] | None = None  # Only these layer indices (also inside scan-stacked kernels); None = all.
  layer_pattern: str = r"(?:^|/)(?:layers|layer|blocks|block|h)[_/.]?(\d+)(?:/|$)"  # Finds a layer index in a path.
  init_a: str = "uniform"  # "uniform" U(±1/sqrt(d_in)), "gaussian" N(0, 1/r²) as PEFT, "pissa" (top-r SVD of W).
  init_b: str = "zeros"  # B starts at zero, so the adapted model equals the base at step 0.
  dropout: float = 0.0  # Dropout on the adapter input (training only).
  dtype: str = "float32"  # dtype of A and B.
  extra_trainable: tuple[str, ...] = ()  # Base params trained fully: "bias", "norm", "all" or path regexes.
  rank_policy: str = "error"  # A rank above a kernel's min(d_in, d_out): "error", or "clip" it to that (summary).
  # "lora", or "dora" (DoRA, as PEFT's use_dora: output m * (x·W + s·x·A·B) / ||W + s·A·B|| per output column, the
  # norm held constant in the backward pass; m starts at ||W||). Dense kernels only; no adapter dropout in training.
  variant: str = "lora"

  def __post_init__(self):
    for name in ("targets", "exclude", "extra_trainable"):
      value = getattr(self, name)
      if isinstance(value, str):
        raise ValueError(f"LoraSpec.{name} must be a list of patterns, got the string {value!r}")
      object.__setattr__(self, name, tuple(value))
    if self.layers is not None:
      object.__setattr__(self, "layers", tuple(int(i) for i in self.layers))
    object.__setattr__(self, "rank_pattern", dict(self.rank_pattern))
    object.__setattr__(self, "alpha_pattern", dict(self.alpha_pattern))
    _check_choice("scaling", self.scaling, SCALINGS)
    _check_choice("init_a", self.init_a, INITS_A)
    _check_choice("init_b", self.init_b, INITS_B)
    _check_choice("rank_policy", self.rank_policy, RANK_POLICIES)
    _check_choice("variant", self.variant, VARIANTS)
    _check_rank(self.rank, "LoraSpec.rank")
    for pattern, rank in self.rank_pattern.items():
      _check_rank(rank, f"LoraSpec.rank_pattern[{pattern!r}]")
    if not 0.0 <= self.dropout < 1.0:
      raise ValueError(f"LoraSpec.dropout must be in [0, 1), got {self.dropout}")
    _check_choice("dtype", self.dtype, DTYPES)
    for name in ("targets", "exclude", "extra_trainable"):
      for pattern in getattr(self, name):
        _compile(pattern, f"LoraSpec.{name}")
    for pattern in list(self.rank_pattern) + list(self.alpha_pattern):
      _compile(pattern, "LoraSpec.rank_pattern/alpha_pattern")
    _compile(self.layer_pattern, "LoraSpec.layer_pattern")

  @classmethod
  def full(cls) -> LoraSpec:
    """Full fine-tuning as LoRA's degenerate case: no adapters, every base parameter trainable."""
    return cls(targets=(), extra_trainable=("all",))

  @property
  def is_full(self) -> bool:
    """True when this spec trains every base parameter and adds no adapters."""
    return not self.targets and "all" in self.extra_trainable

  def to_dict(self) -> dict[str, Any]:
    """Plain-JSON dict of every field."""
    d = dataclasses.asdict(self)
    for k, v in d.items():
      if isinstance(v, tuple):
        d[k] = list(v)
    return d

  def to_json(self) -> str:
    """JSON text of every field."""
    return json.dumps(self.to_dict(), indent=2, sort_keys=True)

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> LoraSpec:
    """Builds a spec from a dict (e.g. parsed JSON or ``ConfigDict.to_dict()``); unknown keys are an error."""
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - fields)
    if unknown:
      raise ValueError(f"unknown LoraSpec field(s) {unknown}; valid fields: {sorted(fields)}")
    return cls(**dict(d))

  @classmethod
  def from_json(cls, text: str) -> LoraSpec:
    """Inverse of ``to_json``."""
    return cls.from_dict(json.loads(text))


def _check_choice(field: str, value: str, valid: Sequence[str]):
  if value not in valid:
    raise ValueError(f"unknown LoraSpec.{field} {value!r}; valid: {list(valid)}")


def _check_rank(rank, where: str):
  if not isinstance(rank, (int, np.integer)) or isinstance(rank, bool) or rank < 1:
    raise ValueError(f"{where} must be an integer >= 1, got {rank!r}")


def _compile(pattern: str, where: str) -> re.Pattern:
  try:
    return re.compile(pattern)
  except re.error as e:
    raise ValueError(f"{where}: {pattern!r} is not a valid regex: {e}") from e
