"""What the per-family parts share: a ``Part`` (rows, tables, figure) and the helpers that pick conditions across
settings."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

from experiments.report.sweeps import Condition, _condition_order, _natural, _settings, _show
from experiments.report.text import Table, _lr


# -- Findings across settings and LoRA groups --------------------------------------------------------------------------
# Each of these is decided by what varies in the sweep, not by its family's name: settings that differ in a width or
# batch-size field, LoRA groups that differ in targets or scaling, and runs that left lora_diagnostics.jsonl.

@dataclasses.dataclass
class Part:
  """One finding's analysis across settings or groups: verdict rows, its table, descriptive notes, its figure's data."""
  rows: list
  table: Table
  notes: list
  plot: list


def _number(x) -> bool:
  return isinstance(x, (int, float)) and not isinstance(x, bool)


def axis_lines(conds: list[Condition], keys: Sequence[str]) -> tuple[str | None, list[tuple[str, dict]]]:
  """The first of ``keys`` that takes several numeric values among the settings, and the settings along it: a list of
  (rest, {value: setting}), one per value of the other varying fields that the axis value does not fix (e.g.
  ``train.steps`` in a batch sweep at a fixed number of examples is fixed by the batch size), with >= 2 values."""
  fields = {c.setting: c.fields for c in conds}
  key = next((k for k in keys if len({_show(f.get(k)) for f in fields.values()}) > 1
              and all(_number(f.get(k)) for f in fields.values())), None)
  if key is None:
    return None, []
  fixed = {}
  for k in sorted({k for f in fields.values() for k in f} - {key}):
    per_value = {}
    fixed[k] = all(per_value.setdefault(f[key], _show(f.get(k))) == _show(f.get(k)) for f in fields.values())
  lines = {}
  for setting in _settings(conds):
    f = fields[setting]
    rest = ", ".join(f"{k}={_show(f.get(k))}" for k in sorted(fixed) if not fixed[k])
    lines.setdefault(rest, {})[f[key]] = setting
  return key, [(rest, dict(sorted(by.items()))) for rest, by in sorted(lines.items(), key=lambda kv: _natural(kv[0]))
               if len(by) > 1]


def lines_with_full(conds: list[Condition], lines: list[tuple[str, dict]]):
  """Of ``axis_lines``' lines, those with LoRA conditions and a full-FT run: (rest, {value: setting}, the line's
  conditions, {value: its full-FT condition or None}, the LoRA condition names)."""
  for rest, settings in lines:
    in_line = [c for c in conds if c.setting in settings.values()]
    fulls = {v: _pick(conds, s, "full") for v, s in settings.items()}
    names = _lora_names(in_line)
    if names and any(fulls.values()):
      yield rest, settings, in_line, fulls, names


def _prefix(scope: str) -> str:
  return f"{scope}: " if scope else ""


def _optimum(c: Condition | None) -> str:
  if c is None or c.fit is None:
    return "—"
  return _lr(c.fit.lr) if c.fit.interior else "— (edge)"


def _lora_names(conds: list[Condition]) -> list[str]:
  return list(dict.fromkeys(c.name for c in sorted(conds, key=_condition_order) if c.method == "lora"))


def _pick(conds: list[Condition], setting: str, name: str) -> Condition | None:
  return next((c for c in conds if c.setting == setting and c.name == name), None)


def _slope(slope: float, n: int) -> str:
  return f"{slope:+.3f} ({n} widths)" if not math.isnan(slope) else f"— ({n} width{'s' * (n != 1)})"
