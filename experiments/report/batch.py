"""Finding 5: batch size, from settings that differ in the batch size."""

from __future__ import annotations

import math

import numpy as np
from etils import epath

from experiments import analysis
from experiments.report.figures import _finish_axes, _pyplot, _save, _value_ticks
from experiments.report.findings import FindingRow, _gap, _scope
from experiments.report.parts import Part, _pick, _prefix, axis_lines, lines_with_full
from experiments.report.sweeps import Condition, _show
from experiments.report.text import Table, _lr, _mean_std


BATCH_KEYS = ("data.batch_size",)
STEPS_KEY = "train.steps"
FOLLOW_STEPS = (STEPS_KEY, "train.eval_every", "train.log_every")  # Fields a batch sweep may set from its steps.


def batch_lines(conds: list[Condition]) -> tuple[str | None, list[tuple[str, dict]]]:
  """``axis_lines`` along the batch size, and when the sweep trains one batch size for several step counts, two
  kinds of line: the settings at one ``train.steps`` (a fixed number of steps) and those at one batch x steps (a fixed
  number of rows), per value of the other varying fields; a setting may be on one line of each kind."""
  key, lines = axis_lines(conds, BATCH_KEYS)
  fields = {c.setting: c.fields for c in conds}
  steps_per_batch = {}
  for f in fields.values():
    steps_per_batch.setdefault(f.get(key), set()).add(f.get(STEPS_KEY))
  if key is None or all(len(v) == 1 for v in steps_per_batch.values()):
    return key, lines  # the step count follows the batch size (or does not vary): axis_lines' lines
  by = {}
  for setting, f in fields.items():
    rest = ", ".join(f"{k}={_show(v)}" for k, v in sorted(f.items()) if k != key and k not in FOLLOW_STEPS)
    batch, steps = f[key], f[STEPS_KEY]
    for kind, value in (("steps", steps), ("rows", batch * steps)):
      by.setdefault((rest, kind, value), {})[batch] = setting
  out = []
  for (rest, kind, value), settings in sorted(by.items(), key=lambda kv: (kv[0][0], kv[0][1] == "rows", kv[0][2])):
    if len(settings) > 1:
      label = f"fixed {value:g} steps" if kind == "steps" else f"fixed {value:g} rows (batch x steps)"
      out.append((f"{rest}, {label}" if rest else label, dict(sorted(settings.items()))))
  return key, out


def batch_part(conds: list[Condition]) -> Part | None:
  """Finding 5: per LoRA condition the best-LR gap to full FT at each batch size, how it changes from the smallest
  to the largest batch (the verdict), and which batch size each condition does best at."""
  key, lines = batch_lines(conds)
  rows, table, notes, plot = [], [], [], []
  for rest, settings, in_line, fulls, names in lines_with_full(conds, lines):
    classes, gaps = {}, {}
    for b, s in settings.items():
      for name in ["full", *names]:
        c = _pick(conds, s, name)
        if c is None:
          continue
        gap = _gap(c, fulls[b]).value if name != "full" and fulls[b] is not None else math.nan
        values = c.best_values
        table.append(([rest] if len(lines) > 1 else []) + [
            f"{b:g}", name, _lr(c.best_lr), _mean_std(values) if values else "—",
            "" if name == "full" else "—" if math.isnan(gap) else f"{gap:+.4f}", c.edge_note()])
    for name in names:
      pairs = {b: (_pick(conds, s, name), fulls[b]) for b, s in settings.items()}
      pairs = {b: (lc, fc) for b, (lc, fc) in pairs.items() if lc and fc and lc.fit and fc.fit}
      gaps[name] = {b: _gap(lc, fc).value for b, (lc, fc) in pairs.items()}
      if len(pairs) < 2:
        classes[name] = analysis.UNKNOWN
        rows.append(FindingRow("5", _scope(rest, name), "—", analysis.INCONCLUSIVE,
                               "fewer than two batch sizes with LoRA and full FT"))
        continue
      small, large = min(pairs), max(pairs)
      here = [c for c in in_line if c.setting in (settings[small], settings[large]) and c.fit is not None]
      noise = analysis.pooled_noise([c.best_values for c in here])
      margins = [m for m in (pairs[small][1].margin, pairs[large][1].margin) if not math.isnan(m)]
      margin = min(margins) if len(margins) == 2 else math.nan  # both settings need a base NLL
      (ls, fs), (ll, fl) = pairs[small], pairs[large]
      interior = all(c.fit.interior for c in (ls, fs, ll, fl))
      growth = analysis.contrast([(ll.best_values, 1.0), (fl.best_values, -1.0), (ls.best_values, -1.0),
                                  (fs.best_values, 1.0)], noise, margin, interior)
      classes[name] = analysis.growth_class(growth)
      ours = f"gap {gaps[name][small]:+.4f} (B={small:g}) → {gaps[name][large]:+.4f} (B={large:g})"
      why = f"growth {growth.text()}: {classes[name]}"
      verdict = {analysis.GROWS: analysis.AGREE, analysis.SHRINKS: analysis.DISAGREE,
                 analysis.FLAT: analysis.DISAGREE}.get(classes[name], analysis.INCONCLUSIVE)
      rows.append(FindingRow("5", _scope(rest, name), ours, verdict, why))
    v = analysis.verdict_batch(classes)
    rows.append(FindingRow("5", _scope(rest, "overall"), "", v.verdict, v.why))
    best = {}
    for name in ["full", *names]:
      means = {b: float(np.mean(c.final[c.best_lr])) for b, s in settings.items()
               if (c := _pick(conds, s, name)) is not None and c.fit is not None}
      if means:
        best[name] = min(means, key=means.get)
        plot.append((rest, name, means, gaps.get(name, {})))
    smallest = min(settings)
    shown = ", ".join(f"{n} {b:g} ({'the smallest' if b == smallest else 'not the smallest'})" for n, b in best.items())
    notes.append(f"{_prefix(rest)}Best {key} per condition (by the best-LR final NLL; the study: both do best at "
                 f"small batches): {shown}.")
  if not rows:
    return None
  header = (["other fields"] if len(lines) > 1 else []) + [key, "condition", "best grid LR", "final NLL there",
                                                   "gap to full FT", "fit"]
  return Part(rows, Table("batch_size", "Best-LR final eval NLL and LoRA's gap to full FT per batch size", header,
                          table), notes, plot)


def plot_batch(stem: epath.Path, part: Part) -> None:
  """Best-LR final NLL against batch size per condition, and LoRA's gap to full FT against batch size."""
  plt = _pyplot()
  fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
  cmap = plt.get_cmap("viridis")
  names = list(dict.fromkeys(name for _, name, _, _ in part.plot if name != "full"))
  several = len({rest for rest, *_ in part.plot}) > 1
  for rest, name, means, gaps in part.plot:
    color = "black" if name == "full" else cmap(names.index(name) / max(1, len(names) - 1) * 0.9)
    label = f"{rest}: {name}" if several else name
    left.plot(list(means), list(means.values()), marker="o", color=color, label=label)
    if gaps:
      right.plot(list(gaps), list(gaps.values()), marker="o", color=color, label=label)
  right.axhline(0.0, color="gray", linewidth=1)
  _finish_axes(left, "batch size", "final eval NLL at the best grid LR", "loss vs batch size (seed means)")
  _finish_axes(right, "batch size", "LoRA − full FT", "gap to full FT vs batch size")
  batches = sorted({b for _, _, means, _ in part.plot for b in means})
  for ax in (left, right):
    _value_ticks(ax, batches)
  _save(fig, stem)
