"""Findings 1-4 from a sweep's LR grid: LoRA vs full FT at their best LRs, capacity, the LR ratio."""

from __future__ import annotations

import dataclasses
import math

from experiments import analysis
from experiments.report.sweeps import Condition, _natural, _settings
from experiments.report.text import Table, _interval, _lr, _ratio


# The study's findings (../shared/reference/blog.md) by id: its number, with a letter for a second check of the same
# finding ("3w": finding 3 across widths; "4c": finding 4's learning curves). STUDY quotes the study's claim.
STUDY = {
    "1": "high-rank LoRA reaches full FT's test NLL",
    "2": "low ranks fall behind full FT once out of capacity (lower efficiency); high ranks do not",
    "3": "~10 (fit over 14 models: 9.8; runs < ~100 steps: ~15)",
    "3w": "its LR rule scales LoRA and full FT by the same (2000/hidden)^p (p = 0.781 for Llama, 0.0775 for Qwen), so "
          "the LoRA/full optimal-LR ratio does not depend on width",
    "4": "optimal LR moves < 2x between ranks 4 and 512 (rank 1 prefers a lower LR)",
    "4c": "at the same LR, learning curves of different ranks coincide at the start under alpha/r (loss(r=16) - "
          "loss(r=256) is tiny at first and grows with steps); under rsLoRA (alpha/sqrt(r)) they separate at once",
    "5": "LoRA pays a growing loss penalty vs full FT as the batch grows, and a higher rank does not fix it; both do "
         "best at small batches",
    "6": "attention-only LoRA < MLP-only ≈ all layers, even parameter-matched",
    "9": "at the end of long runs ‖B‖₂ > ‖A‖₂",
}


# -- Findings ----------------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class FindingRow:
  """One verdict line of "vs the study"."""
  finding: str  # A key of STUDY.
  scope: str  # Setting / LoRA group / rank the line is about.
  ours: str
  verdict: str
  why: str


def _join(*parts: str) -> str:
  return ", ".join(p for p in parts if p)


def _scope(*parts: str) -> str:
  return _join(*parts) or "all"


def ratio_of(lora_c: Condition, full_c: Condition) -> tuple[float, float, float, bool]:
  """lr*(LoRA)/lr*(full): point estimate, bootstrap interval (nan without one), whether both optima are interior."""
  if lora_c.fit is None or full_c.fit is None:
    return math.nan, math.nan, math.nan, False
  ratio = 10.0 ** (lora_c.fit.log_lr - full_c.fit.log_lr)
  lo = hi = math.nan
  if lora_c.draws is not None and full_c.draws is not None:
    lo, hi = (10.0 ** v for v in analysis.interval(analysis.log_ratio_draws(lora_c.draws, full_c.draws)))
  return ratio, lo, hi, lora_c.fit.interior and full_c.fit.interior


def _gap(a: Condition, b: Condition) -> analysis.Comparison:
  """a's final NLL minus b's at their best grid LRs, tested by the gap rule (the setting's pooled noise and margin)."""
  if a.fit is None or b.fit is None:
    return analysis.Comparison(math.nan, math.nan, math.nan, a.margin, analysis.UNKNOWN, "no finished run")
  return analysis.compare(a.best_values, b.best_values, a.noise, a.margin, a.fit.interior and b.fit.interior)


def _finding3(setting: str, group: str, loras: list[Condition], full: Condition,
              several: bool) -> tuple[list[FindingRow], list[list[str]]]:
  """Finding 3 per LoRA rank and overall, and the ratio table's rows."""
  rows, table, verdicts = [], [], []
  for c in loras:
    ratio, lo, hi, interior = ratio_of(c, full)
    v = analysis.verdict_ratio(ratio, lo, hi, interior)
    judged = c.rank >= analysis.RANK_FLOOR
    shown = v.verdict if judged else f"not judged (rank < {analysis.RANK_FLOOR})"
    if judged:
      verdicts.append(v)
    table.append(([setting] if several else []) + [c.name, _ratio(ratio) if interior else "— (edge)",
                                                   _interval(lo, hi, _ratio) if interior else "—", shown])
    ours = f"{_ratio(ratio)} {_interval(lo, hi, _ratio)}" if not math.isnan(lo) else _ratio(ratio)
    rows.append(FindingRow("3", _scope(setting, c.name), ours if interior else "— (edge)", shown, v.why))
  rows.append(FindingRow("3", _scope(setting, group, f"overall, ranks ≥ {analysis.RANK_FLOOR}"), "",
                         analysis.combine(verdicts), f"{len(verdicts)} rank{'s' * (len(verdicts) != 1)} judged"))
  return rows, table


def _findings12(setting: str, group: str, loras: list[Condition], full: Condition) -> list[FindingRow]:
  """Findings 1 and 2 from each rank's best-LR gap to full FT (the gap rule)."""
  classes, gaps = {}, {}
  for c in loras:
    g = _gap(c, full)
    classes[c.rank] = g.kind
    gaps[c.rank] = f"r{c.rank} {g.text()}"
  v1, v2 = analysis.verdict_match(classes), analysis.verdict_capacity(classes)
  return [FindingRow("1", _scope(setting, group), gaps[max(gaps)], v1.verdict, v1.why),
          FindingRow("2", _scope(setting, group), "; ".join(gaps[r] for r in sorted(gaps)), v2.verdict, v2.why)]


def _finding4(setting: str, group: str, loras: list[Condition]) -> FindingRow:
  """Finding 4 from the optimal-LR ratios between every pair of ranks >= RANK_FLOOR."""
  judged = [c for c in loras if c.rank >= analysis.RANK_FLOOR]
  pairs = {}
  for i, a in enumerate(judged):
    for b in judged[i + 1:]:
      if a.fit is None or b.fit is None:
        continue
      lo = hi = math.nan
      if a.draws is not None and b.draws is not None:
        lo, hi = (10.0 ** v for v in analysis.interval(analysis.log_ratio_draws(b.draws, a.draws)))
      pairs[f"r{b.rank}/r{a.rank}"] = (10.0 ** (b.fit.log_lr - a.fit.log_lr), lo, hi)
  interior = all(c.fit is not None and c.fit.interior for c in judged)
  v = analysis.verdict_rank_invariance(pairs if len(judged) >= 2 else {}, interior)
  ours = ", ".join(f"r{c.rank} {_lr(c.fit.lr) if c.fit and c.fit.interior else 'edge'}" for c in judged)
  return FindingRow("4", _scope(setting, group), ours or "—", v.verdict, v.why)


def findings(conds: list[Condition]) -> tuple[list[FindingRow], list[Table]]:
  """Verdicts on findings 1-4 per setting and LoRA group, and the ratio table (finding 3's numbers)."""
  rows, ratio_rows = [], []
  several = len({c.setting for c in conds}) > 1
  for setting in _settings(conds):
    in_setting = [c for c in conds if c.setting == setting]
    full = next((c for c in in_setting if c.method == "full"), None)
    for group in sorted({c.group for c in in_setting if c.method == "lora"}, key=_natural):
      loras = [c for c in in_setting if c.method == "lora" and c.group == group]
      if full is not None:
        more, table = _finding3(setting, group, loras, full, several)
        rows += more + _findings12(setting, group, loras, full)
        ratio_rows += table
      rows.append(_finding4(setting, group, loras))
  ratio_header = (["setting"] if several else []) + ["LoRA", "lr*(LoRA)/lr*(full)", f"{analysis.LEVEL:.0%} interval",
                                                     "finding 3"]
  tables = [Table("lr_ratio", "LoRA/full optimal-LR ratio per rank, seed-bootstrap interval", ratio_header,
                  ratio_rows)] if ratio_rows else []
  return sorted(rows, key=lambda r: FINDING_ORDER.index(r.finding)), tables


FINDING_ORDER = ("3", "3w", "4", "4c", "1", "2", "5", "6", "9")  # The LR findings first: every LR sweep speaks to them.
