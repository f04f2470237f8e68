"""The study's findings as this package judges them: order, titles, rules, what a sweep needs, and the table of
verdicts."""

from __future__ import annotations

from experiments import analysis
from experiments.report.ba import ba_part, plot_ba
from experiments.report.batch import BATCH_KEYS, batch_part, plot_batch
from experiments.report.early import SCALINGS, early_part, plot_early
from experiments.report.findings import FINDING_ORDER, FindingRow, STUDY
from experiments.report.layers import layers_part, plot_layers
from experiments.report.text import Table
from experiments.report.width import WIDTH_KEYS, plot_width, width_part
from lora_jax import metrics


PARTS = {"3w": width_part, "5": batch_part, "6": layers_part, "4c": early_part, "9": ba_part}
RULES = {"1": (analysis.RULE_GAP, analysis.RULE_MATCH), "2": (analysis.RULE_GAP, analysis.RULE_CAPACITY),
         "3": (analysis.RULE_RATIO,), "3w": (analysis.RULE_WIDTH,), "4": (analysis.RULE_RANK,),
         "4c": (analysis.RULE_EARLY,), "5": (analysis.RULE_BATCH,), "6": (analysis.RULE_LAYERS,),
         "9": (analysis.RULE_BA,)}
TITLES = {"1": "LoRA at its best LR matches full FT", "2": "low ranks fall behind when out of capacity",
          "3": "optimal LR ratio LoRA/full", "3w": "the LoRA/full optimal-LR ratio across model widths",
          "4": "optimal LR nearly rank-independent under alpha/r",
          "4c": "early learning curves of two ranks under alpha/r vs alpha/sqrt(r)",
          "5": "LoRA's penalty vs full FT grows with the batch size", "6": "which layers to adapt",
          "9": "B outgrows A"}
NEEDS = {  # What a sweep needs for a finding to be tested (said when it is not).
    "1": "LoRA and full-FT runs in one setting", "2": "LoRA and full-FT runs in one setting",
    "3": "LoRA and full-FT runs in one setting",
    "3w": f"settings that differ in a width field ({' or '.join(WIDTH_KEYS)}), with LoRA and full FT at each",
    "4": "LoRA runs", "4c": f"LoRA groups that differ in lora.scaling ({' and '.join(SCALINGS)}), each with two ranks",
    "5": f"settings that differ in {' or '.join(BATCH_KEYS)}, with LoRA and full FT at each",
    "6": "LoRA groups that differ in lora.targets (attention-only, MLP-only, all layers)",
    "9": f"finished LoRA runs of >= {analysis.BA_MIN_STEPS} steps with {metrics.DIAGNOSTICS_FILE}"}
RULE_NAMES = {text: name for name, text in vars(analysis).items() if name.startswith("RULE_")}


def study_markdown(rows: list[FindingRow], notes: dict[str, list[str]] | None = None) -> str:
  """The "vs the study" section: per finding, the study's claim, ours, the verdict and the rule that decided it,
  and descriptive ``notes`` (finding -> lines, not verdicts)."""
  out = ["## vs the study\n",
         "Each verdict is computed by `experiments.analysis` from the numbers above; the rule printed under each "
         "finding is the code's own text.\n",
         f"Stability (`analysis.RULE_STABLE`): {analysis.RULE_STABLE}\n"]
  for finding in FINDING_ORDER:
    mine = [r for r in rows if r.finding == finding]
    out.append(f"### Finding {finding}: {TITLES[finding]}\n")
    out.append(f"Study: {STUDY[finding]}.\n")
    if not mine:
      out.append(f"Not tested by this sweep (it needs {NEEDS[finding]}).\n")
    else:
      out.append(Table("", "", ["scope", "ours", "verdict", "decided by"],
                       [[r.scope, r.ours or "—", f"**{r.verdict}**", r.why] for r in mine]).markdown())
    if (notes or {}).get(finding):
      out.append("\n".join(f"- {line}" for line in notes[finding]) + "\n")
    for rule in RULES[finding]:
      out.append(f"Rule (`analysis.{RULE_NAMES[rule]}`): {rule}\n")
  return "\n".join(out)


def study_table(rows: list[FindingRow]) -> Table:
  """Every verdict line as one table (the study's claim on each finding's first line)."""
  first = {r.finding: i for i, r in reversed(list(enumerate(rows)))}
  return Table("vs_study", "Findings of the study and this sweep's verdicts", ["finding", "study", "scope", "ours",
                                                                                "verdict"],
               [[r.finding, STUDY[r.finding] if first[r.finding] == i else "", r.scope, r.ours or "—", r.verdict]
                for i, r in enumerate(rows)])


FIGURES = {"3w": ("lr_ratio_vs_width", plot_width), "5": ("batch_size", plot_batch), "6": ("layers", plot_layers),
           "4c": ("early_curves", plot_early), "9": ("ba_norms", plot_ba)}
