"""Config files and ``--config.KEY=VALUE`` overrides: the one loader and parser every command uses.

``experiments.main``, ``stacked``, ``sweep``, ``tpu.run`` / ``tpu.sweep`` and the tests all go through ``apply`` /
``load_config_module``: a value is parsed as a Python literal when it is one and converted to the field's type (``1``
for a float field is 1.0, ``true`` for a bool, a list or a single string for a tuple); a key that names no field, or
a value of the wrong type, is an error naming the override.
"""

from __future__ import annotations

import ast
import copy
import importlib.util
import os
import pathlib
import re
from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections

PATTERN = re.compile(r"--config\.([\w.]+)=(.*)", flags=re.S)


def bad_syntax(items: Sequence[str]) -> list[str]:
  """The items that are not of the form ``--config.KEY=VALUE``."""
  return [i for i in items if not PATTERN.fullmatch(i)]


TRUE, FALSE = ("1", "true", "t", "yes", "y"), ("0", "false", "f", "no", "n")  # what a bool field accepts


def _parse(text: str, kind: type | None) -> Any:
  if kind is str:  # text stays text, even when it reads as a number or None
    return text
  if kind is bool:
    if text.lower() not in TRUE + FALSE:
      raise ValueError(f"expected a bool ({'/'.join(TRUE)} or {'/'.join(FALSE)}), got {text!r}")
    return text.lower() in TRUE
  try:
    value = ast.literal_eval(text)
  except (ValueError, SyntaxError):
    value = text
  if kind is float and isinstance(value, int) and not isinstance(value, bool):
    return float(value)
  if kind is tuple and not isinstance(value, tuple):
    return tuple(value) if isinstance(value, list) else (value,)
  return value


def _node(config: ml_collections.ConfigDict, key: str, what: str) -> tuple[ml_collections.ConfigDict, str]:
  *parents, name = key.split(".")
  node = config
  for part in parents:
    if not isinstance(node, ml_collections.ConfigDict) or part not in node:
      raise ValueError(f"{what}: the config has no field {key!r}")
    node = node[part]
  if not isinstance(node, ml_collections.ConfigDict) or name not in node:
    raise ValueError(f"{what}: the config has no field {key!r}")
  return node, name


def apply(config: ml_collections.ConfigDict, overrides: Sequence[str] | Mapping[str, Any]) -> ml_collections.ConfigDict:
  """A type-safe copy of ``config`` with the overrides set: ``--config.KEY=VALUE`` strings (values parsed as the
  field's type), or a ``{dotted key: value}`` mapping of Python values. Raises ValueError naming a bad override."""
  config = copy.deepcopy(config)  # keeps every field's declared type, placeholders' too
  items = overrides.items() if isinstance(overrides, Mapping) else overrides
  for item in items:
    if isinstance(item, str):
      m = PATTERN.fullmatch(item)
      if not m:
        raise ValueError(f"override {item!r}: expected --config.KEY=VALUE")
      node, name = _node(config, m[1], f"override {item!r}")
      try:
        value = _parse(m[2], node.get_type(name))
      except ValueError as e:
        raise ValueError(f"override {item!r}: {e}") from e
    else:
      key, value = item
      node, name = _node(config, key, f"override {key}={value!r}")
    try:
      node[name] = value
    except TypeError as e:
      raise ValueError(f"override {item!r}: {e}") from e
  return config


def load_config_module(path: str | os.PathLike, needs: Sequence[str] = ("get_config",)):
  """Imports a config file by path; raises ValueError when it is missing or lacks one of the functions ``needs``
  names."""
  path = str(path)
  if not os.path.isfile(path):
    raise ValueError(f"config file {path!r} not found")
  spec = importlib.util.spec_from_file_location(f"_config_{pathlib.Path(path).stem}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  for fn in needs:
    if not callable(getattr(module, fn, None)):
      raise ValueError(f"config file {path!r} does not define {fn}()")
  return module
