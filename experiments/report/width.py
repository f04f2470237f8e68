"""Finding 3 across widths (the LoRA/full-FT LR ratio vs hidden size): settings that differ in a width field."""

from __future__ import annotations

import math

import numpy as np
from etils import epath

from experiments import analysis
from experiments.configs import common
from experiments.report.figures import _finish_axes, _pyplot, _save, _value_ticks
from experiments.report.findings import FindingRow, _scope, ratio_of
from experiments.report.parts import Part, _optimum, _pick, _prefix, _slope, axis_lines, lines_with_full
from experiments.report.sweeps import Condition
from experiments.report.text import Table, _interval, _ratio


WIDTH_KEYS = ("model.hidden_size", "tiny_base.hidden_size")  # The first that varies between settings is the width.
COOKBOOK_EXPONENTS = {arch: -common.COOKBOOK_LR_EXPONENT[arch] for arch in ("llama", "qwen3")}  # lr* ∝ hidden^this


def width_part(conds: list[Condition]) -> Part | None:
  """Finding 3 across widths: per width the optima and their ratio, the verdict on the ratio's spread over widths,
  and each method's power-law exponent of lr* against width."""
  key, lines = axis_lines(conds, WIDTH_KEYS)
  rows, table, notes, plot = [], [], [], []
  for rest, settings, in_line, fulls, names in lines_with_full(conds, lines):
    optima = {}  # condition -> {width: lr*} at widths with an interior optimum
    for name in ["full", *names]:
      optima[name] = {w: c.fit.lr for w, s in settings.items()
                      if (c := _pick(conds, s, name)) is not None and c.fit is not None and c.fit.interior}
    ratios = {}
    for name in names:
      ratios[name] = {}
      for w, s in settings.items():
        lora_c, full_c = _pick(conds, s, name), fulls[w]
        if lora_c is None or full_c is None:
          continue
        ratio, lo, hi, interior = ratio_of(lora_c, full_c)
        ratios[name][w] = (ratio, lo, hi, interior)
        table.append(([rest] if len(lines) > 1 else []) + [
            f"{w:g}", name, _optimum(full_c), _optimum(lora_c), _ratio(ratio) if interior else "— (edge)",
            _interval(lo, hi, _ratio) if interior else "—"])
      judged = {w: r for w, (r, _, _, interior) in ratios[name].items() if interior}
      v = analysis.verdict_width(judged)
      ours = ", ".join(f"{w:g}: {_ratio(r)}" for w, r in judged.items()) or "—"
      rows.append(FindingRow("3w", _scope(rest, name), ours, v.verdict, v.why))
    slopes = {name: analysis.power_law_slope(list(o), list(o.values())) for name, o in optima.items()}
    cookbook = ", ".join(f"{v:g} ({arch})" for arch, v in COOKBOOK_EXPONENTS.items())
    notes.append(f"{_prefix(rest)}Power-law exponent of lr* against {key} fitted over the widths with an interior "
                 f"optimum: " + ", ".join(f"{n} {_slope(slopes[n], len(optima[n]))}" for n in optima)
                 + f"; the cookbook rule's: {cookbook}"
                 + (" (the tiny base is Llama-architecture)." if key == "tiny_base.hidden_size" else "."))
    plot.append((rest, key, ratios, optima, slopes))
  if not rows:
    return None
  several = len(lines) > 1
  header = (["other fields"] if several else []) + [key, "LoRA", "lr*(full)", "lr*(LoRA)", "lr*(LoRA)/lr*(full)",
                                              f"{analysis.LEVEL:.0%} interval"]
  return Part(rows, Table("lr_ratio_width", "LoRA/full optimal-LR ratio across widths (fitted optima)", header, table),
              notes, plot)


def plot_width(stem: epath.Path, part: Part) -> None:
  """The LoRA/full optimal-LR ratio against width (log-log), and each method's lr* against width with its fitted
  power-law exponent beside the cookbook rule's."""
  plt = _pyplot()
  fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
  cmap = plt.get_cmap("viridis")
  several = len(part.plot) > 1
  key = part.plot[0][1]
  for i, (rest, _, ratios, optima, slopes) in enumerate(part.plot):
    prefix = f"{rest}: " if several else ""
    for j, (name, by_width) in enumerate(ratios.items()):
      color = cmap(j / max(1, len(ratios) - 1) * 0.9)
      shown = [(w, r, lo, hi) for w, (r, lo, hi, interior) in by_width.items() if interior]
      if not shown:
        continue
      w, r, lo, hi = map(np.asarray, zip(*shown))
      yerr = np.maximum([np.where(np.isfinite(lo), r - lo, 0.0), np.where(np.isfinite(hi), hi - r, 0.0)], 0.0)
      left.errorbar(w, r, yerr=yerr, marker="o", capsize=2, color=color, label=prefix + name)
    for j, (name, by_width) in enumerate(optima.items()):
      if not by_width:
        continue
      color = "black" if name == "full" else cmap((j - 1) / max(1, len(optima) - 2) * 0.9)
      w, lr = np.asarray(list(by_width)), np.asarray(list(by_width.values()))
      label = f"{prefix}{name} (fitted exponent {_slope(slopes[name], len(w))})"
      right.plot(w, lr, marker="o", linestyle="none", color=color, label=label)
      if not math.isnan(slopes[name]):
        x = np.geomspace(w.min(), w.max(), 20)
        right.plot(x, np.exp(np.polyval(np.polyfit(np.log(w), np.log(lr), 1), np.log(x))), linewidth=1,
                   color=color)
  left.axhline(analysis.RATIO_STUDY, color="gray", linestyle=":", label=f"the study's {analysis.RATIO_STUDY:g}")
  left.axhline(1.0, color="gray", linewidth=1)
  shown = [v for _, _, ratios, _, _ in part.plot for by_width in ratios.values()
           for r, lo, hi, interior in by_width.values() if interior for v in (r, lo, hi) if 0 < v < math.inf]
  left.set_yscale("log")
  left.set_ylim(min(shown + [1.0]) / 2, max(shown + [analysis.RATIO_STUDY]) * 2)  # never a degenerate range
  _finish_axes(left, key, "lr*(LoRA) / lr*(full)", "optimal-LR ratio vs width (interior optima)")
  right.set_yscale("log")
  cookbook = ", ".join(f"{v:g} ({arch})" for arch, v in COOKBOOK_EXPONENTS.items())
  _finish_axes(right, key, "fitted optimal LR", f"optimal LR vs width (cookbook exponent: {cookbook})")
  widths = sorted({w for _, _, ratios, optima, _ in part.plot for by_width in (*ratios.values(), *optima.values())
                   for w in by_width})
  for ax in (left, right):
    _value_ticks(ax, widths)
  _save(fig, stem)
