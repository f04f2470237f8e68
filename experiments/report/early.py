"""Finding 4's early curves: LoRA groups that differ in scaling, from train loss logged every step."""

from __future__ import annotations

import math

import numpy as np
from etils import epath

from experiments import analysis
from experiments.report.figures import _finish_axes, _pyplot, _save
from experiments.report.findings import FindingRow, _join, _scope
from experiments.report.layers import _groups_differing_in
from experiments.report.parts import Part
from experiments.report.sweeps import Condition, _natural
from experiments.report.text import Table, _lr


EARLY_PLOT_STEPS = 100  # Steps of the loss panel of the early-curves figure.
SCALINGS = ("alpha/r", "alpha/sqrt(r)")  # The two rules finding 4's curves compare (lora.LoraSpec.scaling values).


def _train_curves(c: Condition) -> dict[tuple[float, int], dict[int, float]]:
  """Finished runs' train loss by (LR, data seed) -> {step: loss}, averaged over runs that share both."""
  out = {}
  for r in c.runs:
    if r.finished:
      for step, (loss, _) in r.train.items():
        out.setdefault((r.lr, r.config["data_seed"]), {}).setdefault(step, []).append(loss)
  return {k: {s: float(np.mean(v)) for s, v in sorted(curve.items())} for k, curve in sorted(out.items())}


def _g(x: float, sign: str = "") -> str:
  return "—" if math.isnan(x) else f"{x:{sign}.3g}"


def early_part(conds: list[Condition]) -> Part | None:
  """Finding 4's curves: d(t) between the lowest and highest rank at the same LR and data seed, per scaling."""
  rows, table, notes, plot = [], [], [], []
  early = list(range(1, analysis.EARLY_STEPS + 1))
  lines = sorted(_groups_differing_in(conds, "scaling").items(), key=lambda kv: (_natural(kv[0][0]),
                                                                                  _natural(kv[0][1])))
  for (setting, rest), group in lines:
    per_scaling = {}
    for scaling in SCALINGS:
      ranked = sorted((c for c in group if c.group_fields["scaling"] == scaling), key=lambda c: c.rank)
      if len(ranked) >= 2:
        per_scaling[scaling] = (ranked[0], ranked[-1])
    if len(per_scaling) < 2:
      continue
    scope = _join(setting, rest)
    e = {}
    for scaling, (low, high) in per_scaling.items():
      lows, highs = _train_curves(low), _train_curves(high)
      pairs = {k: analysis.early_gap(lows[k], highs[k]) for k in sorted(set(lows) & set(highs))}
      judged = []
      for (lr, seed), d in pairs.items():
        late = sorted(t for t in d if t > analysis.EARLY_STEPS)[-analysis.EARLY_STEPS:]
        e_pair, e_late = analysis.mean_abs(d, early), analysis.mean_abs(d, late)
        signed = math.nan if math.isnan(e_pair) else float(np.mean([d[t] for t in early]))
        table.append(([_scope(scope)] if len(lines) > 1 else []) + [
            scaling, _lr(lr), str(seed), f"r{low.rank} − r{high.rank}", _g(e_pair), _g(signed, "+"),
            f"{_g(e_late)} (steps {late[0]}-{late[-1]})" if late else "—"])
        if math.isnan(e_pair):
          continue
        judged.append(e_pair)
        if scaling == "alpha/r" and not math.isnan(e_late):
          notes.append(f"{_scope(scope, f'lr {_lr(lr)}, data seed {seed}')}: under alpha/r, mean |d| {_g(e_pair)} "
                       f"over steps 1-{analysis.EARLY_STEPS} and {_g(e_late)} over steps {late[0]}-{late[-1]}: |d| "
                       f"{'grows' if e_late > e_pair else 'does not grow'} with steps (descriptive).")
      e[scaling] = float(np.mean(judged)) if judged else math.nan
      plot.append((scope, scaling, low, high, {k: (lows[k], highs[k], d) for k, d in pairs.items()}))
    v = analysis.verdict_early(e["alpha/r"], e["alpha/sqrt(r)"])
    ours = "; ".join(f"{s}: r{lo.rank} vs r{hi.rank}, E {_g(e[s])}" for s, (lo, hi) in per_scaling.items())
    rows.append(FindingRow("4c", _scope(scope), ours, v.verdict, v.why))
  if not rows:
    return None
  header = (["scope"] if len(lines) > 1 else []) + [
      "scaling", "LR", "data seed", "d = loss of", f"mean |d|, steps 1-{analysis.EARLY_STEPS}",
      f"mean d, steps 1-{analysis.EARLY_STEPS}", f"mean |d|, last {analysis.EARLY_STEPS} steps"]
  return Part(rows, Table("early_curves", "Train-loss difference d(t) between the lowest and highest rank at the same "
                          "LR and data seed", header, table), notes, plot)


def plot_early(stem: epath.Path, part: Part) -> None:
  """Train loss over the first steps per scaling and rank, and d(t) = loss(low rank) − loss(high rank) per scaling."""
  plt = _pyplot()
  fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
  colors = {"alpha/r": "tab:blue", "alpha/sqrt(r)": "tab:red"}
  scopes = len({scope for scope, *_ in part.plot}) > 1
  for scope, scaling, low, high, pairs in part.plot:
    for (lr, seed), (lows, highs, d) in pairs.items():
      tag = (f"{scope}, " if scopes else "") + scaling + (f", lr {_lr(lr)}, seed {seed}" if len(pairs) > 1 else "")
      for curve, c, style in ((lows, low, "--"), (highs, high, "-")):
        steps = [t for t in curve if 0 < t <= EARLY_PLOT_STEPS]
        left.plot(steps, [curve[t] for t in steps], linestyle=style, linewidth=1, color=colors[scaling],
                  label=f"{tag}, r{c.rank}")
      steps = sorted(d)
      right.plot(steps, [d[t] for t in steps], linewidth=1, color=colors[scaling],
                 label=f"{tag}: r{low.rank} − r{high.rank}")
  right.axhline(0.0, color="gray", linewidth=1)
  right.axvline(analysis.EARLY_STEPS, color="gray", linestyle=":", linewidth=1)
  _finish_axes(left, "step", "train loss", f"first {EARLY_PLOT_STEPS} steps (dashed: lowest rank, solid: highest)")
  left.set_xscale("linear")
  _finish_axes(right, "step", "d(t) = train loss(low rank) − train loss(high rank)",
               f"d(t) per scaling (dotted: step {analysis.EARLY_STEPS}, the end of the judged window)")
  _save(fig, stem)
