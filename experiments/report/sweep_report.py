"""A sweep's report: ``analyse_sweep`` (everything computed, nothing written), ``write_sweep`` (report.md, results.csv,
figures, tables)."""

from __future__ import annotations

import dataclasses
import functools
import math

import numpy as np
from etils import epath

from experiments import analysis
from experiments.report.early import EARLY_PLOT_STEPS
from experiments.report.figures import plot_learning_curves, plot_lr_curves
from experiments.report.findings import FINDING_ORDER, FindingRow, findings
from experiments.report.parts import Part
from experiments.report.rl import is_rl_sweep, rl_conditions, rl_findings, write_rl_sweep
from experiments.report.study import FIGURES, PARTS, study_markdown, study_table
from experiments.report.sweeps import (CSV_COLUMNS, Condition, SweepRun, _csv, _provenance, _read_json, _settings,
                                       conditions, judged_step, load_sweep, method_tied_fields, results_rows)
from experiments.report.tables import nll_tables, noise_table, optimum_table
from experiments.report.text import Table
from lora_jax import metrics, synthetic


@functools.cache
def _tiny_vocab() -> int:
  return len(synthetic.char_tokenizer())


def base_table(sweep_dir: epath.Path, conds: list[Condition]) -> Table:
  """Per setting, the base model its runs fine-tuned (from their run_info.json: fingerprint and card) and the held-out
  NLL at step 0 on the setting's own fine-tuning data, next to ln(vocab) (what a base that never saw the tokens
  would score at best)."""
  rows = []
  for setting in _settings(conds):
    infos = [_read_json(sweep_dir / r.name / "run_info.json") or {} for c in conds if c.setting == setting
             for r in c.runs]
    step0 = [v for c in conds if c.setting == setting for v in c.step0]
    for fp in sorted({i.get("base_fingerprint", "—") for i in infos}):
      card = next((i.get("base_card") or {} for i in infos if i.get("base_fingerprint", "—") == fp), {})
      # Runs from before base cards: the tiny base's vocabulary is the character tokenizer's.
      tiny = any(r.config.get("model", {}).get("name") == "tiny" for c in conds if c.setting == setting for r in c.runs)
      vocab = card.get("vocab_size") or (_tiny_vocab() if tiny else None)
      curve = card.get("pretrain_eval_nll_change_last_quarter")
      rows.append(([setting] if len(_settings(conds)) > 1 else []) + [
          f"`{fp}`", f"{card['parameters']:,}" if "parameters" in card else "—",
          f"{card['pretrain_steps']:,} ({card['pretrain_loss_tokens']:,} tokens)" if "pretrain_steps" in card else "—",
          f"{card['pretrain_eval_nll']:.4f}" if "pretrain_eval_nll" in card else "—",
          f"{curve:+.4f}" if curve is not None else "—",
          f"{np.mean(step0):.4f} (n={len(step0)})" if step0 else "—",
          f"{math.log(vocab):.4f}" if vocab else "—"])
  header = (["setting"] if len(_settings(conds)) > 1 else []) + [
      "base fingerprint", "parameters", "pretraining steps", "pretraining held-out NLL",
      "its change over the last quarter", "step-0 held-out NLL on this data", "ln(vocab)"]
  return Table("base", "The base model: its pretraining and its held-out NLL on this family's data before "
               "fine-tuning (step 0)", header, rows)


def _points_summary(meta: dict, runs: list[SweepRun]) -> list[str]:
  states = {}
  for r in runs:
    kind = "finished" if r.finished else "failed" if r.failed else "not started" if not r.evals else "unfinished"
    states.setdefault(kind, []).append(r.name + (f"/{r.method}" if r.method else ""))
  kinds = ("finished", "failed", "unfinished", "not started")
  counts = ", ".join(f"{len(states[k])} {k}" for k in kinds if k in states)
  lines = [f"Points: {len(meta['points'])} in the sweep; runs: {counts}."]
  for kind in ("failed", "unfinished", "not started"):
    if kind in states:
      lines.append(f"- {kind}: " + ", ".join(f"`{n}`" for n in states[kind]))
  seen = {}
  for r in runs:
    if r.config:
      seen.setdefault((r.setting, r.condition, r.lr, r.seed_key), []).append(r.name)
  repeats = [names for names in seen.values() if len(names) > 1]
  if repeats:
    lines.append("- same condition, LR and seeds at several points (each counts as one more seed): "
                 + "; ".join(", ".join(f"`{n}`" for n in names) for names in repeats))
  return lines


SECTIONS = {  # Per finding judged across settings or groups: its report.md section's heading and how to read it.
    "3w": ("LoRA/full optimal-LR ratio across widths",
           "Settings that differ in the model's width, side by side: each method's fitted optimum (as above) and "
           "their ratio per width. Finding 3w's verdict compares the ratio's point estimates across widths."),
    "5": ("Batch size",
          "Settings that differ in the batch size, side by side: each condition's best grid LR, the final NLL there "
          "(mean ± std over seeds) and LoRA's gap to full FT (seed means, each at its best grid LR)."),
    "6": ("Layers",
          "LoRA conditions that differ in which layers they adapt: the final NLL at each one's best grid LR and its "
          "trainable parameters (`params/trainable` in the metrics)."),
    "4c": ("Early learning curves: alpha/r vs alpha/sqrt(r)",
           "Per scaling, the lowest and highest rank trained at the same LR and data seed: d(t) = train loss of the "
           "lowest rank minus that of the highest at step t (train loss as logged; every step when `log_every` is "
           "1)."),
    "9": ("‖B‖ vs ‖A‖",
          f"From `<method>/{metrics.DIAGNOSTICS_FILE}`: the spectral norms of each adapted module's A and B at each "
          "evaluation, for the sweep's longest finished LoRA runs at each condition's best grid LR."),
}
FIGURE_CAPTIONS = {
    "3w": "Left: lr*(LoRA)/lr*(full) against width (log-log; bars: the bootstrap interval when there are seeds; "
          "dotted: the study's 10). Right: each method's fitted optimum against width with its fitted power law; the "
          "legend gives the exponent, the title the cookbook rule's.",
    "5": "Left: final NLL at the best grid LR against batch size (seed means). Right: LoRA minus full FT against "
         "batch size.",
    "6": "Final NLL against LR (seed means) per condition; colour: the layers adapted (orange attention, blue MLP, "
         "green all); line style: rank; squares: with the unembedding.",
    "4c": f"Left: train loss over the first {EARLY_PLOT_STEPS} steps (dashed: lowest rank, solid: highest; blue "
          f"alpha/r, red alpha/sqrt(r)). Right: d(t) over the whole run (log step).",
    "9": "Mean over adapted modules of ‖A‖₂ (dashed) and ‖B‖₂ (solid) against step (seed means).",
}


def sweep_markdown(sweep_dir: epath.Path, meta: dict, runs: list[SweepRun], conds: list[Condition],
                   tables: list[Table], rows: list[FindingRow], parts: dict[str, Part] | None = None) -> str:
  """report.md of a sweep (``parts``: the findings judged across settings or groups that the sweep can test)."""
  family = epath.Path(meta["config"].split(":")[0]).stem
  by_name = {t.name: t for t in tables}
  parts = parts or {}
  out = [f"# Sweep report: {family} ({meta.get('arg', '')})\n", "\n".join(_provenance(sweep_dir, meta, runs)) + "\n",
         "\n".join(_points_summary(meta, runs)) + "\n", "## The base model\n",
         f"**{by_name['base'].caption}** (`tables/base.tex`)\n", by_name["base"].markdown()]
  settings = _settings(conds)
  if len(settings) > 1:
    out.append("Settings (fields that vary over the sweep besides method, LoRA spec, LR and seeds): "
               + "; ".join(f"`{s}`" for s in settings) + ". Each is analysed on its own.\n")
  tied = method_tied_fields(runs)
  if tied:
    out.append("Fields that differ between methods (fixed within each): "
               + "; ".join(f"`{k}` (" + ", ".join(f"{m}: {v}" for m, v in per.items()) + ")"
                           for k, per in tied.items()) + ".\n")
  out.append("## Eval NLL over method, rank and LR\n")
  on_train = any(r.config and r.config["data"].get("eval_split") == "train" for r in runs)
  out.append(("Eval NLL per loss token on the training examples themselves (`data.eval_split = train`: memorisation, "
              "not generalisation)" if on_train else "Held-out NLL per loss token")
             + " of finished runs (evaluated at the config's last step), mean ± std over "
             "seeds (n). Failed runs (e.g. NaN at too high an LR) and runs not done are counted in brackets, not "
             "averaged; an LR with a failed run counts as diverged in the fits below.\n")
  for name in ("final_nll", "min_nll"):
    out += [f"**{by_name[name].caption}** (`tables/{name}.tex`)\n", by_name[name].markdown()]
  out.append("## Optimal LR\n")
  out.append(f"The optimum of each condition is the vertex of the quadratic in log10(LR) through the seed-mean final "
             f"NLL at the grid minimum and its two neighbours (`analysis.fit_optimum`, the one estimator of every "
             f"family). A grid minimum at either end of the grid, or next to an LR where a run diverged or failed, "
             f"claims no optimum (**edge**): the fit never spans a diverged point. Interval: "
             f"{analysis.LEVEL:.0%} percentile interval over {analysis.N_BOOT} bootstrap resamples (the seeds at "
             f"each LR resampled with replacement, independently per LR and condition; RNG seed "
             f"{analysis.BOOT_SEED}), each refitted the same way; an open end (0 or ∞) means more than "
             f"{(1 - analysis.LEVEL) / 2:.0%} of resamples put the minimum at that end of the grid. It needs >= 2 "
             f"seeds at every LR. With few seeds a percentile bootstrap is somewhat too narrow: in a simulation with "
             f"4 seeds per LR (`tests/test_analysis.py`), the nominal 90% interval covered the true optimum in about "
             f"80-85% of datasets.\n")
  out += [f"**{by_name['optimal_lr'].caption}** (`tables/optimal_lr.tex`)\n", by_name["optimal_lr"].markdown()]
  if "lr_ratio" in by_name:
    out += ["## LoRA/full optimal-LR ratio\n",
            "The ratio of the fitted optima; its interval is that of the ratio of the b-th bootstrap resample of "
            "LoRA's optimum to the b-th of full FT's, over all b (the two bootstraps are independent).\n",
            f"**{by_name['lr_ratio'].caption}** (`tables/lr_ratio.tex`)\n", by_name["lr_ratio"].markdown()]
  out += ["## Seed noise\n", f"**{by_name['seed_noise'].caption}** (`tables/seed_noise.tex`)\n",
          by_name["seed_noise"].markdown()]
  for finding in FINDING_ORDER:
    if finding in parts:
      heading, intro = SECTIONS[finding]
      t, stem = parts[finding].table, FIGURES[finding][0]
      out += [f"## {heading}\n", intro + "\n", f"**{t.caption}** (`tables/{t.name}.tex`)\n", t.markdown(),
              f"![{heading}](figures/{stem}.png)\n\n{FIGURE_CAPTIONS[finding]} (`figures/{stem}.pdf`)\n"]
  out += ["## Figures\n",
          "![loss vs LR](figures/lr_curves.png)\n\nLoss vs LR per condition: final eval NLL, seed mean with std error "
          "bars; dashed, the quadratic fit; ▼, the fitted optimum (`figures/lr_curves.pdf`).\n",
          "![learning curves](figures/learning_curves.png)\n\nLearning curves vs log step: per condition, the "
          "pointwise minimum over LRs of the seed-mean eval NLL at each step, the study's plot "
          "(`figures/learning_curves.pdf`).\n"]
  out.append(study_markdown(rows, {f: p.notes for f, p in parts.items()}))
  out += ["## Files\n",
          "- `results.csv`: one row per run x eval step (" + ", ".join(CSV_COLUMNS) + "). `tokens` is cumulative loss "
          "tokens, estimated from `train/tokens` logged every `log_every` steps (each logged step's count stands for "
          "the steps since the previous log; exact when `log_every` is 1); `train_loss` is the last one logged at or "
          "before the step; a run never evaluated has one row with an empty step.",
          "- `tables/*.tex`: every table above as a booktabs tabular (`\\input` it inside a table environment).",
          "- `figures/*.png`, `figures/*.pdf`: the figures.", ""]
  return "\n".join(out)


@dataclasses.dataclass
class SweepAnalysis:
  """A sweep's files turned into what its report shows (``analyse_sweep``)."""
  meta: dict  # sweep.json
  runs: list[SweepRun]
  conds: list[Condition]
  rows: list[FindingRow]  # Every verdict line of "vs the study", in FINDING_ORDER.
  tables: list[Table]
  parts: dict[str, Part]  # The findings judged across settings or groups that this sweep can test.

  @property
  def family(self) -> str:
    """The config family's name (its file's stem)."""
    return epath.Path(self.meta["config"].split(":")[0]).stem


def _judge(conds: list[Condition]) -> tuple[list[FindingRow], list[Table], dict[str, Part]]:
  """Every verdict row, finding 3's ratio tables and the cross-setting parts of one set of conditions."""
  rows, ratio_tables = findings(conds)
  parts = {f: part for f, make in PARTS.items() if (part := make(conds)) is not None}
  rows = sorted(rows + [r for p in parts.values() for r in p.rows], key=lambda r: FINDING_ORDER.index(r.finding))
  return rows, ratio_tables, parts


def judgeable_fractions(runs: list[SweepRun]) -> list[float]:
  """The fractions of JUDGED_AT at which every finished run has an evaluation of its own (before its last step for
  a fraction < 1): the ones ``RULE_STABLE`` can judge at."""
  done = [r for r in runs if r.finished]
  return [f for f in analysis.JUDGED_AT
          if f == 1.0 or (done and all((s := judged_step(r, f)) is not None and s < r.config["train"]["steps"]
                                       for r in done))]


def stable_rows(by_fraction: dict[float, list[FindingRow]]) -> list[FindingRow]:
  """The last fraction's rows with each verdict replaced by ``analysis.stable`` over the fractions (``RULE_STABLE``)."""
  fractions = sorted(by_fraction)
  verdicts = {f: {(r.finding, r.scope): r.verdict for r in rows} for f, rows in by_fraction.items()}
  out = []
  for r in by_fraction[fractions[-1]]:
    seen = {f: verdicts[f].get((r.finding, r.scope), "—") for f in fractions}
    verdict = analysis.stable(seen)
    why = r.why
    if len(fractions) < len(analysis.JUDGED_AT):
      why += f" (stability not judged at {', '.join(f'{f:.0%}' for f in analysis.JUDGED_AT if f not in seen)}: " \
             "no evaluation there)"
    if verdict == analysis.UNSTABLE:
      why += "; by step fraction: " + ", ".join(f"{f:.0%} {v}" for f, v in seen.items())
    out.append(dataclasses.replace(r, verdict=verdict, why=why))
  return out


def analyse_sweep(sweep_dir: str | epath.PathLike) -> SweepAnalysis:
  """Reads a sweep's files and computes every table and verdict (each judged at JUDGED_AT's fractions of the steps:
  ``RULE_STABLE``), writing and plotting nothing."""
  meta, runs = load_sweep(sweep_dir)
  judged = {f: _judge(conditions(runs, f)) for f in judgeable_fractions(runs) if f != 1.0}
  conds = conditions(runs)
  rows, ratio_tables, parts = _judge(conds)
  rows = stable_rows({**{f: j[0] for f, j in judged.items()}, 1.0: rows})
  tables = [base_table(epath.Path(sweep_dir), conds), *nll_tables(conds), optimum_table(conds), *ratio_tables,
            noise_table(conds), *(parts[f].table for f in FINDING_ORDER if f in parts), study_table(rows)]
  return SweepAnalysis(meta, runs, conds, rows, tables, parts)


def sweep_verdicts(sweep_dir: str | epath.PathLike) -> list[FindingRow]:
  """Every verdict line of a sweep's "vs the study" (INDEX_STUDY[row.finding] is the study's claim), from its files;
  an RL sweep's are finding 7's."""
  meta, runs = load_sweep(sweep_dir)
  if is_rl_sweep(runs):
    return rl_findings(rl_conditions(epath.Path(sweep_dir), runs)[0])[0]
  return analyse_sweep(sweep_dir).rows


def write_sweep(sweep_dir: str | epath.PathLike) -> str:
  """Writes a sweep's results.csv, report.md, figures/ and tables/ from its files (an RL sweep: ``write_rl_sweep``);
  returns report.md's text."""
  sweep_dir = epath.Path(sweep_dir)
  if is_rl_sweep(load_sweep(sweep_dir)[1]):  # RL points (configs/rl.py): rewards, not NLL; finding 7
    return write_rl_sweep(sweep_dir)
  a = analyse_sweep(sweep_dir)
  (sweep_dir / "results.csv").write_text(_csv(results_rows(a.family, a.runs)))
  (sweep_dir / "tables").mkdir(exist_ok=True)
  for t in a.tables:
    (sweep_dir / "tables" / f"{t.name}.tex").write_text(t.latex())
  figures = sweep_dir / "figures"
  figures.mkdir(exist_ok=True)
  plot_lr_curves(figures / "lr_curves", a.conds)
  plot_learning_curves(figures / "learning_curves", a.conds)
  for finding, part in a.parts.items():
    stem, draw = FIGURES[finding]
    draw(figures / stem, part)
  text = sweep_markdown(sweep_dir, a.meta, a.runs, a.conds, a.tables, a.rows, a.parts)
  (sweep_dir / "report.md").write_text(text)
  return text
