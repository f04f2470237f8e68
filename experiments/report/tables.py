"""The tables every sweep report has: NLL over method, rank and LR; optimal LRs; seed noise."""

from __future__ import annotations

import math

import numpy as np

from experiments import analysis
from experiments.report.sweeps import Condition
from experiments.report.text import Table, _cell, _interval, _lr


# -- Tables ------------------------------------------------------------------------------------------------------------

def _scoped(conds: list[Condition], header: list, row) -> tuple[list, list]:
  """Header and rows with a leading setting column when the sweep has several settings."""
  several = len({c.setting for c in conds}) > 1
  rows = [([c.setting] if several else []) + row(c) for c in conds]
  return (["setting"] if several else []) + header, rows


def nll_tables(conds: list[Condition]) -> list[Table]:
  """Final and best-over-steps eval NLL: condition x LR, mean ± std over seeds (n)."""
  lrs = sorted({lr for c in conds for lr in c.lrs})
  out = []
  for name, caption, attr in (
      ("final_nll", "Final eval NLL (at the last step), mean ± std over seeds (n)", "final"),
      ("min_nll", "Best eval NLL over steps > 0, mean ± std over seeds (n)", "best")):
    header, rows = _scoped(conds, ["condition", *map(_lr, lrs)],
                           lambda c: [c.name] + [_cell(c, lr, getattr(c, attr)) if lr in c.lrs else "" for lr in lrs])
    out.append(Table(name, caption, header, rows))
  return out


def optimum_table(conds: list[Condition]) -> Table:
  """Per condition: the grid's best LR, the fitted optimum, its bootstrap interval, where it stands, seeds."""
  def row(c):
    lo, hi = c.log_interval
    fitted = _lr(c.fit.lr) if c.fit and c.fit.interior else "— (edge)" if c.fit else "—"
    seeds = min((len(c.final[lr]) for lr in c.usable), default=0)
    return [c.name, _lr(c.best_lr), fitted, _interval(10.0 ** lo, 10.0 ** hi) if c.fit and c.fit.interior else "—",
            c.edge_note(), str(seeds)]
  header, rows = _scoped(conds, ["condition", "best grid LR", "fitted optimal LR", f"{analysis.LEVEL:.0%} interval",
                                 "fit", "seeds (min over LRs)"], row)
  return Table("optimal_lr", "Optimal LR: quadratic fit of final eval NLL in log10(LR), seed-bootstrap interval",
               header, rows)


def noise_table(conds: list[Condition]) -> Table:
  """Per condition: final NLL at its best grid LR, the std across seeds there, and the setting's pooled noise."""
  def row(c):
    values = c.best_values
    noise = analysis.seed_noise(values)
    return [c.name, _lr(c.best_lr), f"{np.mean(values):.4f}" if values else "—",
            "—" if math.isnan(noise) else f"{noise:.4f}", str(len(values)),
            "—" if math.isnan(c.noise.sd) else f"{c.noise.sd:.4f} (df {c.noise.df})",
            "—" if math.isnan(c.margin) else f"{c.margin:.4f}"]
  header, rows = _scoped(conds, ["condition", "best grid LR", "final NLL (mean)", "seed std", "n",
                                 "pooled noise (setting)", "match margin (setting)"], row)
  return Table("seed_noise", "Seed noise: std of the final eval NLL across seeds at each condition's best grid LR; "
               "the std pooled over the setting's best-LR cells and the margin the gap rule tests against", header,
               rows)
