"""Figures shared by the sweep reports: LR curves, learning curves and matplotlib helpers."""

from __future__ import annotations

import math

import numpy as np
from etils import epath

from experiments import analysis
from experiments.report.sweeps import Condition, _settings


# -- Figures -----------------------------------------------------------------------------------------------------------

def _pyplot():
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  return plt


def _colors(conds: list[Condition]) -> dict:
  plt = _pyplot()
  loras = [c.name for c in conds if c.method != "full"]
  names = sorted(set(loras), key=loras.index)
  cmap = plt.get_cmap("viridis")
  colors = {n: cmap(i / max(1, len(names) - 1) * 0.9) for i, n in enumerate(names)}
  return {c.name: "black" if c.method == "full" else colors[c.name] for c in conds}


def _save(fig, stem: epath.Path) -> None:
  """Lays ``fig`` out, writes it as stem.png and stem.pdf (the same bytes every time) and closes it."""
  fig.tight_layout()
  with (stem.parent / f"{stem.name}.png").open("wb") as f:
    fig.savefig(f, format="png", dpi=120)
  with (stem.parent / f"{stem.name}.pdf").open("wb") as f:
    fig.savefig(f, format="pdf", metadata={"CreationDate": None})  # no timestamp: regenerating gives the same bytes
  _pyplot().close(fig)


def _panels(conds: list[Condition]):
  """``(pyplot, figure, [(axes, setting)], colors)``: one panel per setting of the sweep."""
  plt = _pyplot()
  settings = _settings(conds) or [""]
  fig, axes = plt.subplots(1, len(settings), figsize=(5.5 * len(settings), 4.2), squeeze=False)
  return plt, fig, list(zip(axes[0], settings)), _colors(conds)


def plot_lr_curves(stem: epath.Path, conds: list[Condition]) -> None:
  """Final eval NLL against LR per condition (seed mean, std error bars), the fitted parabola and optimum."""
  plt, fig, panels, colors = _panels(conds)
  for ax, setting in panels:
    for c in (c for c in conds if c.setting == setting and c.usable):
      std = [analysis.seed_noise(c.final[lr]) for lr in c.usable]
      ax.errorbar(c.usable, c.means(), yerr=[0.0 if math.isnan(s) else s for s in std], marker="o", markersize=3,
                  capsize=2, color=colors[c.name], label=c.name)
      if c.fit.interior and c.fit.coef[0] > 0:
        a, b, k = c.fit.coef
        x = np.linspace(math.log10(c.lrs[c.fit.used[0]]), math.log10(c.lrs[c.fit.used[-1]]), 50)
        ax.plot(10.0 ** x, a * x * x + b * x + k, linestyle="--", linewidth=1, color=colors[c.name])
        ax.plot([c.fit.lr], [a * c.fit.log_lr ** 2 + b * c.fit.log_lr + k], marker="v", color=colors[c.name])
    _finish_axes(ax, "learning rate", "final eval NLL per loss token",
                 setting or "loss vs LR (dashed: quadratic fit, ▼ optimum)")
  _save(fig, stem)


def _finish_axes(ax, xlabel: str, ylabel: str, title: str) -> None:
  """Log x axis, labels, title, grid and (when there are lines) a legend."""
  from matplotlib import ticker

  ax.set_xscale("log")
  ax.xaxis.set_minor_formatter(ticker.NullFormatter())  # labelled minor ticks overlap on a short log axis
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)
  ax.set_title(title, fontsize=9)
  ax.grid(alpha=0.3)
  if ax.get_legend_handles_labels()[0]:
    ax.legend(fontsize=7)


def plot_learning_curves(stem: epath.Path, conds: list[Condition]) -> None:
  """Per condition, the pointwise minimum over LRs of the seed-mean eval NLL against log step (the study's plot)."""
  plt, fig, panels, colors = _panels(conds)
  for ax, setting in panels:
    for c in (c for c in conds if c.setting == setting and c.curves):
      curve = [(s, v) for s, v, _ in analysis.pointwise_min(c.curves) if s > 0]
      if curve:
        steps, values = zip(*curve)
        ax.plot(steps, values, marker="o", markersize=3, color=colors[c.name], label=c.name)
    _finish_axes(ax, "step", "eval NLL, min over LRs of the seed mean",
                 setting or "learning curves (pointwise min over LRs)")
  _save(fig, stem)


def _value_ticks(ax, values: list) -> None:
  """Ticks on a log x axis at exactly the swept values, labelled plainly (8, 32, 128)."""
  ax.set_xticks(values, [f"{v:g}" for v in values])
  ax.set_xticks([], minor=True)
