"""Numbers as text, and tables that print as Markdown and LaTeX (booktabs)."""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from experiments.report.sweeps import Condition


# -- Numbers as text ---------------------------------------------------------------------------------------------------

def _lr(x: float | None) -> str:
  if x is None or math.isnan(x):
    return "—"
  if math.isinf(x):
    return "∞"
  if x == 0:
    return "0"
  mantissa, exponent = f"{x:.2e}".split("e")
  return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"


def _ratio(x: float) -> str:
  return "—" if math.isnan(x) else "∞" if x == math.inf else f"{x:.3g}"


def _interval(lo: float, hi: float, fmt=_lr) -> str:
  return "—" if math.isnan(lo) or math.isnan(hi) else f"[{fmt(lo)}, {fmt(hi)}]"


def _mean_std(values: list[float]) -> str:
  if len(values) == 1:
    return f"{values[0]:.4f} (n=1)"
  return f"{np.mean(values):.4f} ± {np.std(values, ddof=1):.4f} (n={len(values)})"


def _cell(c: Condition, lr: float, values: dict) -> str:
  text = _mean_std(values[lr]) if values.get(lr) else ""
  notes = [f"{n} failed" for n in [c.failed.get(lr, 0)] if n] + [f"{n} not done" for n in [c.missing.get(lr, 0)] if n]
  if notes:
    text = f"{text} [{', '.join(notes)}]" if text else ", ".join(notes)
  return text or "—"


@dataclasses.dataclass
class Table:
  """A table rendered both as Markdown (report.md) and as a booktabs tabular (tables/NAME.tex)."""
  name: str
  caption: str
  header: list
  rows: list

  def markdown(self) -> str:
    """The table as Markdown."""
    def row(cells):
      return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"
    return "\n".join([row(self.header), "|" + "---|" * len(self.header), *map(row, self.rows)]) + "\n"

  def latex(self) -> str:
    """The table as a booktabs tabular, ready to \\input inside a table environment."""
    def row(cells):  # "{}" first: a line starting with "[" would be read as the previous \\'s optional argument
      return "{}" * cells[0].startswith("[") + " & ".join(_tex(c) for c in cells) + r" \\"
    return "\n".join([f"% {_tex(self.caption)} (experiments.report; needs \\usepackage{{booktabs}})",
                      r"\begin{tabular}{" + "l" * len(self.header) + "}", r"\toprule", row(self.header), r"\midrule",
                      *(row(r) for r in self.rows), r"\bottomrule", r"\end{tabular}", ""])


_TEX = {"\\": r"\textbackslash{}", "_": r"\_", "%": r"\%", "&": r"\&", "#": r"\#", "$": r"\$", "{": r"\{",
        "}": r"\}", "^": r"\^{}", "~": r"\textasciitilde{}", "±": r"$\pm$", "—": "--", "∞": r"$\infty$",
        "≥": r"$\geq$", "≤": r"$\leq$", "×": r"$\times$", "<": r"$<$", ">": r"$>$", "≈": r"$\approx$",
        "−": "$-$", "→": r"$\rightarrow$", "‖": r"$\|$", "₂": r"$_2$"}


def _tex(text: str) -> str:
  return "".join(_TEX.get(ch, ch) for ch in text)
