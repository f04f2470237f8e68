"""Is a CPU setting able to carry the study's verdicts? Reads a calibration sweep (``configs/calibration.py``: full FT
and a deliberately weak LoRA, each over an LR grid and >= 3 seeds) and writes DIR/calibration.md.

    python -m experiments.sweep --config experiments/configs/calibration.py:tiny --workdir runs/calibration
    python -m experiments.calibrate runs/calibration

At 50%, 75% and 100% of the steps (``analysis.JUDGED_AT``) it gives each method's best grid LR and mean NLL there, the
seed noise pooled over those cells, the separation (weak - strong) in units of that noise, and the gap rule's class of
the weak method against full FT. The setting is usable (``RULE_CALIBRATION``) when the separation is at least
``MIN_SEPARATION`` noise units at every fraction and the weak method is behind by the gap rule at every fraction.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence

import numpy as np
from etils import epath

from experiments import analysis, report

MIN_SEPARATION = 10.0  # Seed standard deviations between the weak method and full FT that a usable setting shows.
RULE_CALIBRATION = (
    f"A setting is usable when, at each of {', '.join(f'{f:.0%}' for f in analysis.JUDGED_AT)} of the steps, the weak "
    f"method's best-LR mean NLL is at least {MIN_SEPARATION:g} pooled seed standard deviations above full FT's and "
    f"the gap rule (analysis.RULE_GAP) classes it behind full FT; otherwise it cannot separate a strong method from a "
    f"weak one reliably enough to test the study's findings.")


def calibration(sweep_dir: epath.Path) -> tuple[list[list[str]], bool]:
  """Per judged fraction: [fraction, strong best LR and NLL, weak best LR and NLL, pooled noise, separation, class],
  and whether the setting is usable by ``RULE_CALIBRATION``."""
  _, runs = report.load_sweep(sweep_dir)
  rows, usable = [], True
  fractions = report.judgeable_fractions(runs)
  if len(fractions) < len(analysis.JUDGED_AT):
    usable = False  # stability cannot be shown without evaluations at 50% and 75%
  for f in fractions:
    conds = report.conditions(runs, f)
    strong = next((c for c in conds if c.method == "full" and c.fit), None)
    weak = next((c for c in conds if c.method == "lora" and c.fit), None)
    if strong is None or weak is None:
      raise SystemExit(f"{sweep_dir}: a calibration needs finished full-FT and LoRA runs")
    s, w = np.mean(strong.best_values), np.mean(weak.best_values)
    separation = (w - s) / strong.noise.sd if strong.noise.sd > 0 else math.nan
    gap = analysis.compare(weak.best_values, strong.best_values, strong.noise, strong.margin,
                           strong.fit.interior and weak.fit.interior)
    usable &= bool(separation >= MIN_SEPARATION and gap.kind == analysis.BEHIND)
    rows.append([f"{f:.0%}", f"{report._lr(strong.best_lr)}: {s:.4f}" + ("" if strong.fit.interior else " (edge)"),
                 f"{report._lr(weak.best_lr)}: {w:.4f}" + ("" if weak.fit.interior else " (edge)"),
                 f"{strong.noise.sd:.4f} (df {strong.noise.df})", f"{separation:.1f}", gap.text()])
  return rows, usable


def write(sweep_dir: str | epath.PathLike) -> str:
  """Writes sweep_dir/calibration.md (and the sweep's own report); returns the calibration's text."""
  sweep_dir = epath.Path(sweep_dir)
  report.write_sweep(sweep_dir)
  a = report.analyse_sweep(sweep_dir)
  rows, usable = calibration(sweep_dir)
  table = report.Table("calibration", "", ["steps", "full FT (best LR: NLL)", "weak method (best LR: NLL)",
                                           "pooled seed noise", "separation (noise units)",
                                           "weak - full by the gap rule"], rows)
  base = next(t for t in a.tables if t.name == "base")
  _, runs = report.load_sweep(sweep_dir)
  screen = all(len({r.lr for r in runs if r.method == m}) == 1 for m in {r.method for r in runs})
  verdict = ("**A screen, not a calibration**: one LR per method, so no optimum and no verdict; the separation below "
             "says whether a calibration of this setting (each method over an LR grid) is worth its compute."
             if screen else f"**{'Usable' if usable else 'Not usable'}** by the rule below.")
  text = "\n".join([
      f"# Calibration: {sweep_dir.name}\n",
      f"Made by `python -m experiments.calibrate {sweep_dir}` from the sweep's files ([its report](report.md)).\n",
      verdict + "\n", "## The base model\n", base.markdown(),
      "## Strong vs weak\n", table.markdown(), f"Rule (`calibrate.RULE_CALIBRATION`): {RULE_CALIBRATION}\n"])
  (sweep_dir / "calibration.md").write_text(text)
  return text


def main(argv: Sequence[str] | None = None) -> int:
  """python -m experiments.calibrate SWEEP_DIR: writes SWEEP_DIR/calibration.md; exit 0 if usable, else 1."""
  p = argparse.ArgumentParser(prog="python -m experiments.calibrate", description=__doc__.splitlines()[0])
  p.add_argument("sweep_dir", help="a finished calibration sweep (experiments/configs/calibration.py)")
  args = p.parse_args(argv)
  if not (epath.Path(args.sweep_dir) / report.SWEEP_FILE).exists():
    p.error(f"{args.sweep_dir}: no {report.SWEEP_FILE} (not a sweep directory)")
  text = write(args.sweep_dir)
  print(text)
  return 0 if "**Usable**" in text else 1


if __name__ == "__main__":
  sys.exit(main())
