"""Finding 9: the growth of B and A (``lora_diagnostics.jsonl``)."""

from __future__ import annotations

import numpy as np
from etils import epath

from experiments import analysis
from experiments.report.figures import _finish_axes, _pyplot, _save
from experiments.report.findings import FindingRow, _scope
from experiments.report.parts import Part
from experiments.report.sweeps import Condition, SweepRun
from experiments.report.text import Table, _lr


def _ba_series(run: SweepRun) -> dict[int, tuple[float, float, float]]:
  """step -> (median over modules of ||B||/||A||, mean ||A||, mean ||B||) from a run's diagnostics."""
  out = {}
  for step, modules in sorted(run.diagnostics.items()):
    if modules:
      out[step] = (analysis.median_ba_ratio(modules), float(np.mean([m["norm_a"] for m in modules.values()])),
                   float(np.mean([m["norm_b"] for m in modules.values()])))
  return out


def ba_part(conds: list[Condition]) -> Part | None:
  """Finding 9: ||B|| against ||A|| at the end of the sweep's longest LoRA runs (at each condition's best grid LR)."""
  def judged(r):
    return r.method == "lora" and r.finished and bool(r.diagnostics)
  steps = [r.config["train"]["steps"] for c in conds for r in c.runs if judged(r)]
  if not steps:
    return None
  longest = max(steps)
  if longest < analysis.BA_MIN_STEPS:
    return None
  rows, table, plot, verdicts = [], [], [], []
  several = len({c.setting for c in conds}) > 1
  for c in conds:
    runs = [r for r in c.runs if judged(r) and r.lr == c.best_lr and r.config["train"]["steps"] == longest]
    if not runs:
      continue
    series = [_ba_series(r) for r in runs]
    ends = [s[max(s)] for s in series]
    end = float(np.median([e[0] for e in ends]))
    crossings = [analysis.first_above_one({t: v[0] for t, v in s.items()}) for s in series]
    crossed = [x for x in crossings if x is not None]
    when = (f"step {np.median(crossed):g}" + (f" (median of {len(crossed)} runs)" if len(crossed) > 1 else "")
            if crossed else "never")
    if crossed and len(crossed) < len(crossings):
      when += f"; never in {len(crossings) - len(crossed)} of {len(crossings)} runs"
    v = analysis.verdict_ba(end)
    verdicts.append(v)
    rows.append(FindingRow("9", _scope(c.setting, c.name), f"{end:.3g} at step {longest} (first > 1: {when})",
                           v.verdict, v.why))
    table.append(([c.setting] if several else []) + [
        c.name, _lr(c.best_lr), str(longest), str(len(runs)), f"{end:.3g}",
        f"{np.mean([e[1] for e in ends]):.4g}", f"{np.mean([e[2] for e in ends]):.4g}", when])
    common_steps = sorted(set.intersection(*(set(s) for s in series)))
    plot.append((_scope(c.setting, c.name), {t: tuple(np.mean([s[t][i] for s in series]) for i in (1, 2))
                                             for t in common_steps}))
  if not rows:
    return None
  if len(verdicts) > 1:
    rows.append(FindingRow("9", "overall", "", analysis.combine(verdicts),
                           f"{len(verdicts)} conditions judged at step {longest}"))
  header = (["setting"] if several else []) + [
      "condition", "best grid LR", "steps", "runs (seeds)", "median ‖B‖/‖A‖ at the end", "mean ‖A‖",
      "mean ‖B‖", "first step with median ‖B‖/‖A‖ > 1"]
  return Part(rows, Table("ba_norms", "Spectral norms of B and A at the end of the longest LoRA runs (best grid LR)",
                          header, table), [], plot)


def plot_ba(stem: epath.Path, part: Part) -> None:
  """Mean spectral norms of A (dashed) and B (solid) over modules against step, for the judged LoRA runs."""
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(6.5, 4.2))
  cmap = plt.get_cmap("viridis")
  for i, (scope, norms) in enumerate(part.plot):
    color = cmap(i / max(1, len(part.plot) - 1) * 0.9)
    steps = sorted(norms)
    ax.plot(steps, [norms[t][0] for t in steps], linestyle="--", color=color, label=f"{scope}: ‖A‖")
    ax.plot(steps, [norms[t][1] for t in steps], linestyle="-", color=color, label=f"{scope}: ‖B‖")
  _finish_axes(ax, "step", "spectral norm, mean over adapted modules", "‖A‖ and ‖B‖ of the longest LoRA runs")
  ax.set_xscale("linear")
  _save(fig, stem)
