"""RL sweeps (``experiments/configs/rl.py``): peak reward and the band of good LRs per rank, figures and report."""

from __future__ import annotations

import csv
import dataclasses
import io
import math

import numpy as np
from etils import epath

from experiments import analysis
from experiments.report.figures import _finish_axes, _panels, _save
from experiments.report.findings import FINDING_ORDER, FindingRow, STUDY, _scope
from experiments.report.study import RULE_NAMES, TITLES
from experiments.report.sweeps import SweepRun, _natural, _num, _provenance, _read_records, load_sweep
from experiments.report.tables import _scoped
from experiments.report.text import Table, _lr, _mean_std


# -- RL sweeps (finding 7) ---------------------------------------------------------------------------------------------
# Points of experiments/configs/rl.py: their config has an "rl" section and their metrics.jsonl logs train/reward
# every step and eval/accuracy (greedy, held-out) at each evaluation. Judged by analysis.RULE_RL_PEAK and RULE_RL_BAND.

STUDY_RL = {"7": "rank 1 matches full FT's peak reward (policy gradient learns ~1 bit per episode)",
            "7b": "LoRA has a wider band of good learning rates than full FT"}
TITLES_RL = {"7": "rank-1 LoRA matches full FT's peak reward in RL", "7b": "LoRA's band of good LRs in RL is wider"}
INDEX_ORDER = FINDING_ORDER + tuple(TITLES_RL)  # Every finding a study index lists, supervised first, then RL.
INDEX_TITLES, INDEX_STUDY = {**TITLES, **TITLES_RL}, {**STUDY, **STUDY_RL}
RULES_RL = {"7": analysis.RULE_RL_PEAK, "7b": analysis.RULE_RL_BAND}
RL_CSV_COLUMNS = ("family", "point", "method", "rank", "lr", "seed", "step", "train_reward", "eval_accuracy",
                  "completion_length", "entropy", "kl_sampler", "kl_base", "tokens_per_s", "finished", "state")
RL_CURVE_WINDOW = 10  # Steps of the moving average in the reward-curve figure.


def is_rl_sweep(runs: list[SweepRun]) -> bool:
  """Whether a sweep's runs are RL runs (their config has an ``rl`` section)."""
  return any("rl" in r.config for r in runs)


@dataclasses.dataclass(eq=False)
class RLCondition:
  """One condition (setting x method x LoRA spec) of an RL sweep over its LR grid."""
  setting: str
  name: str
  method: str
  rank: int | None
  lrs: list = dataclasses.field(default_factory=list)  # Every LR the sweep gave it, ascending.
  scores: dict = dataclasses.field(default_factory=dict)  # LR -> final_reward of finished runs (by seed).
  starts: dict = dataclasses.field(default_factory=dict)  # LR -> first-step reward of finished runs.
  accuracy: dict = dataclasses.field(default_factory=dict)  # LR -> last greedy held-out accuracy of finished runs.
  curves: dict = dataclasses.field(default_factory=dict)  # LR -> {step: seed-mean train reward}.
  eval_curves: dict = dataclasses.field(default_factory=dict)  # LR -> {step: seed-mean eval accuracy}.
  last: dict = dataclasses.field(default_factory=dict)  # LR -> the last train record of its first seed.
  unfinished: dict = dataclasses.field(default_factory=dict)  # LR -> runs not finished.

  def mean_score(self, lr: float) -> float:
    """Seed-mean score at an LR (nan without a finished run)."""
    return float(np.mean(self.scores[lr])) if self.scores.get(lr) else math.nan

  @property
  def usable(self) -> list:
    """LRs with a finished run."""
    return [lr for lr in self.lrs if self.scores.get(lr)]

  @property
  def best_lr(self) -> float | None:
    """The LR with the highest seed-mean score."""
    return max(self.usable, key=self.mean_score) if self.usable else None

  @property
  def peak(self) -> float:
    """The highest seed-mean score over LRs."""
    return self.mean_score(self.best_lr) if self.usable else math.nan

  @property
  def start(self) -> float:
    """Mean first-step reward over its finished runs (the initial policy's reward)."""
    values = [v for lr in self.usable for v in self.starts[lr]]
    return float(np.mean(values)) if values else math.nan


def _records(sweep_dir: epath.Path, run: SweepRun) -> list[dict]:
  path = sweep_dir / run.name / run.method / "metrics.jsonl"
  return _read_records(path) if path.exists() else []


def rl_conditions(sweep_dir: epath.Path, runs: list[SweepRun]) -> tuple[list[RLCondition], dict]:
  """The sweep's RL conditions with their scores and curves, and every run's records by id(run)."""
  by, records = {}, {}
  for r in sorted((r for r in runs if r.config), key=lambda r: r.seed_key):
    c = by.setdefault((r.setting, r.condition), RLCondition(r.setting, r.condition, r.method, r.rank))
    rs = _records(sweep_dir, r)
    records[id(r)] = rs
    lr = r.lr
    if lr not in c.lrs:
      c.lrs.append(lr)
    steps = r.config["train"]["steps"]
    train = {x["step"]: x["train/reward"] for x in rs if "train/reward" in x}
    evals = {x["step"]: x["eval/accuracy"] for x in rs if "eval/accuracy" in x}
    if steps not in train or steps not in evals or not all(math.isfinite(v) for v in train.values()):
      c.unfinished[lr] = c.unfinished.get(lr, 0) + 1
      continue
    c.scores.setdefault(lr, []).append(analysis.final_reward(train, steps))
    c.starts.setdefault(lr, []).append(train[min(train)])
    c.accuracy.setdefault(lr, []).append(evals[steps])
    c.last.setdefault(lr, next(x for x in reversed(rs) if "train/reward" in x))
    for store, series in ((c.curves, train), (c.eval_curves, evals)):
      for step, v in series.items():
        store.setdefault(lr, {}).setdefault(step, []).append(v)
  out = sorted(by.values(), key=lambda c: (_natural(c.setting), c.method != "lora", c.rank or 0, c.name))
  for c in out:
    c.lrs.sort()
    for store in (c.curves, c.eval_curves):
      for lr, curve in store.items():
        store[lr] = {s: float(np.mean(v)) for s, v in sorted(curve.items())}
  return out, records


def _rl_cell(c: RLCondition, lr: float, values: dict) -> str:
  text = _mean_std(values[lr]) if values.get(lr) else ""
  if c.unfinished.get(lr):
    text = (text + " " if text else "") + f"[{c.unfinished[lr]} not finished]"
  return text or "—"


def _band(c: RLCondition, threshold: float) -> analysis.Band | None:
  lrs = c.usable
  return analysis.good_band(lrs, [c.mean_score(lr) - c.start for lr in lrs], threshold) if lrs else None


def rl_findings(conds: list[RLCondition]) -> tuple[list[FindingRow], dict]:
  """Finding 7's verdict rows per setting (peak at the lowest LoRA rank; band per rank and overall), and each
  condition's band by id(condition)."""
  rows, bands = [], {}
  for setting in sorted({c.setting for c in conds}, key=_natural):
    here = [c for c in conds if c.setting == setting]
    full = next((c for c in here if c.method == "full"), None)
    loras = sorted((c for c in here if c.method == "lora"), key=lambda c: c.rank)
    gains = [c.mean_score(lr) - c.start for c in here for lr in c.usable]
    best_gain = max(gains) if gains else math.nan
    for c in here:
      bands[id(c)] = _band(c, analysis.BAND_FRACTION * best_gain) if best_gain > 0 else None
    if full is None or not loras:
      continue
    low = loras[0]
    noise = analysis.pooled_noise([c.scores[c.best_lr] for c in here if c.usable])
    peaks = [c.peak - c.start for c in here if c.usable]
    margin = analysis.MATCH_FRACTION * max(peaks) if peaks else math.nan
    interior = all(c.usable and c.best_lr not in (c.lrs[0], c.lrs[-1]) for c in (low, full))
    costs = [[-v for v in c.scores.get(c.best_lr, [])] if c.usable else [] for c in (low, full)]
    v = analysis.verdict_rl_peak(analysis.compare(costs[0], costs[1], noise, margin, interior), best_gain)
    ours = f"r{low.rank} {low.peak:.3f} vs full {full.peak:.3f}" if low.usable and full.usable else "—"
    rows.append(FindingRow("7", _scope(setting, f"rank {low.rank}"), ours, v.verdict, v.why))
    verdicts = []
    for c in loras:
      vb = analysis.verdict_rl_band(bands[id(c)], bands[id(full)])
      verdicts.append(vb)
      b, f = bands[id(c)], bands[id(full)]
      ours = f"r{c.rank} x{b.width:.3g} vs full x{f.width:.3g}" if b and f else "—"
      rows.append(FindingRow("7b", _scope(setting, c.name), ours, vb.verdict, vb.why))
    rows.append(FindingRow("7b", _scope(setting, "overall"), "", analysis.combine(verdicts),
                           f"{len(verdicts)} rank{'s' * (len(verdicts) != 1)} judged"))
  return rows, bands


def rl_tables(conds: list[RLCondition], bands: dict) -> list[Table]:
  """Final reward and greedy accuracy per condition x LR, and per condition its peak, best LR, band, diagnostics."""
  lrs = sorted({lr for c in conds for lr in c.lrs})
  out = []
  for name, caption, attr in (
      ("rl_reward", "Final sampled reward (mean over the last quarter of steps), mean ± std over seeds (n)",
       "scores"),
      ("rl_accuracy", "Greedy accuracy on held-out problems at the last step, mean ± std over seeds (n)",
       "accuracy")):
    header, rows = _scoped(conds, ["condition", *map(_lr, lrs)],
                           lambda c: [c.name] + [_rl_cell(c, lr, getattr(c, attr)) if lr in c.lrs else "" for lr in lrs])
    out.append(Table(name, caption, header, rows))

  def row(c):
    b = bands.get(id(c))
    last = c.last.get(c.best_lr, {})
    band = "—" if b is None else f"{_lr(b.lo)}..{_lr(b.hi)} (x{b.width:.3g}{', open' if not b.closed else ''})"
    fmt = lambda k, f="{:.3f}": f.format(last[k]) if k in last else "—"  # noqa: E731
    return [c.name, f"{c.start:.3f}", f"{c.peak:.3f}", _lr(c.best_lr), band, fmt("train/completion_length", "{:.2f}"),
            fmt("train/entropy"), fmt("train/kl_sampler", "{:.2e}"), fmt("train/kl_base"),
            fmt("train/tokens_per_s", "{:.0f}")]
  header, rows = _scoped(conds, ["condition", "start reward", "peak reward", "best LR", "good-LR band",
                                 "length", "entropy", "KL to sampler", "KL to base", "tokens/s"], row)
  out.append(Table("rl_peak", "Per condition: start and peak reward, best LR, the band of good LRs (RULE_RL_BAND), "
                   "and at the best LR's last step: completion length, entropy, KL to the sampler and to the base, "
                   "tokens/s", header, rows))
  return out


def plot_rl_peak(stem: epath.Path, conds: list[RLCondition], threshold_of: dict) -> None:
  """Final reward against LR per condition (seed mean), the start reward and each setting's good-LR threshold."""
  plt, fig, panels, colors = _panels(conds)
  for ax, setting in panels:
    here = [c for c in conds if c.setting == setting and c.usable]
    for c in here:
      ax.plot(c.usable, [c.mean_score(lr) for lr in c.usable], marker="o", markersize=3, color=colors[c.name],
              label=c.name)
    if here:
      ax.axhline(here[0].start, color="gray", linewidth=1, label="start reward")
      if setting in threshold_of:
        ax.axhline(threshold_of[setting], color="gray", linestyle=":", linewidth=1, label="good-LR threshold")
    _finish_axes(ax, "learning rate", f"mean reward, last {analysis.FINAL_FRACTION:.0%} of steps",
                 setting or "final reward vs LR")
  _save(fig, stem)


def plot_rl_curves(stem: epath.Path, conds: list[RLCondition]) -> None:
  """Train reward (moving average) and greedy held-out accuracy against step at each condition's best LR."""
  plt, fig, panels, colors = _panels(conds)
  for ax, setting in panels:
    for c in (c for c in conds if c.setting == setting and c.usable):
      curve = c.curves[c.best_lr]
      steps = sorted(curve)
      window = min(RL_CURVE_WINDOW, len(steps))
      values = np.convolve([curve[s] for s in steps], np.ones(window) / window, mode="valid")
      ax.plot(steps[window - 1:], values, color=colors[c.name], label=f"{c.name} (lr {_lr(c.best_lr)})")
      ev = c.eval_curves[c.best_lr]
      ax.plot(sorted(ev), [ev[s] for s in sorted(ev)], linestyle="none", marker="o", markersize=3,
              color=colors[c.name])
    _finish_axes(ax, "step", "reward", (f"{setting}: " if setting else "") + f"at the best LR (line: train reward, "
                 f"{RL_CURVE_WINDOW}-step mean; dots: greedy held-out)")
    ax.set_xscale("linear")
  _save(fig, stem)


def _rl_csv(family: str, runs: list[SweepRun], records: dict) -> str:
  out = io.StringIO()
  writer = csv.DictWriter(out, fieldnames=RL_CSV_COLUMNS, lineterminator="\n")
  writer.writeheader()
  for r in runs:
    rs = records.get(id(r), [])
    finished = bool(r.config) and any(x.get("step") == r.config["train"]["steps"] and "eval/accuracy" in x for x in rs)
    base = {"family": family, "point": r.point, "method": r.method, "rank": _num(r.rank), "lr": _num(r.lr),
            "seed": _num(r.config.get("seed")), "finished": str(finished), "state": r.state}
    by_step = {}
    for x in rs:
      by_step.setdefault(x["step"], {}).update(x)
    if not by_step:
      writer.writerow({**base, **{k: "" for k in RL_CSV_COLUMNS if k not in base}})
    for step, x in sorted(by_step.items()):
      writer.writerow({**base, "step": str(step), "train_reward": _num(x.get("train/reward")),
                       "eval_accuracy": _num(x.get("eval/accuracy")),
                       "completion_length": _num(x.get("train/completion_length")),
                       "entropy": _num(x.get("train/entropy")), "kl_sampler": _num(x.get("train/kl_sampler")),
                       "kl_base": _num(x.get("train/kl_base")), "tokens_per_s": _num(x.get("train/tokens_per_s"))})
  return out.getvalue()


def write_rl_sweep(sweep_dir: str | epath.PathLike) -> str:
  """An RL sweep's results.csv, report.md, figures/ and tables/ from its files; returns report.md's text."""
  sweep_dir = epath.Path(sweep_dir)
  meta, runs = load_sweep(sweep_dir)
  family = epath.Path(meta["config"].split(":")[0]).stem
  conds, records = rl_conditions(sweep_dir, runs)
  rows, bands = rl_findings(conds)
  tables = rl_tables(conds, bands)
  study = Table("vs_study", "Finding 7 of the study and this sweep's verdicts", ["finding", "study", "scope", "ours",
                                                                               "verdict"],
                [[r.finding, STUDY_RL[r.finding], r.scope, r.ours or "—", r.verdict] for r in rows])
  (sweep_dir / "results.csv").write_text(_rl_csv(family, runs, records))
  (sweep_dir / "tables").mkdir(exist_ok=True)
  for t in tables + [study]:
    (sweep_dir / "tables" / f"{t.name}.tex").write_text(t.latex())
  (sweep_dir / "figures").mkdir(exist_ok=True)
  thresholds = {}
  for setting in {c.setting for c in conds}:
    here = [c for c in conds if c.setting == setting and c.usable]
    if here:
      start = here[0].start
      best = max(c.peak - c.start for c in here)
      if best > 0:
        thresholds[setting] = start + analysis.BAND_FRACTION * best
  plot_rl_peak(sweep_dir / "figures" / "rl_reward_vs_lr", conds, thresholds)
  plot_rl_curves(sweep_dir / "figures" / "rl_reward_curves", conds)
  finished = sum(bool(c.scores.get(lr)) for c in conds for lr in c.lrs)
  not_done = [f"`{r.name}`" for r in runs if not r.config] + [f"{c.name} at {_lr(lr)}" for c in conds
                                                                for lr, n in c.unfinished.items()]
  by_name = {t.name: t for t in tables}
  c0 = next((r.config for r in runs if r.config), {})
  rl_cfg = c0.get("rl", {})
  out = [f"# RL sweep report: {family} ({meta.get('arg', '')})\n", "\n".join(_provenance(sweep_dir, meta, runs)) + "\n",
         f"Points: {len(meta['points'])} in the sweep; condition x LR cells with a finished run: {finished}."
         + (f" Not finished: {', '.join(not_done)}." if not_done else "") + "\n",
         f"Setting: task `{c0.get('data', {}).get('task')}`, {rl_cfg.get('prompts_per_step')} prompts x "
         f"{rl_cfg.get('group_size')} completions per step (group-mean advantages, importance-weighted policy "
         f"gradient, clip_eps {rl_cfg.get('clip_eps')}, kl_coef {rl_cfg.get('kl_coef')}, "
         f"{rl_cfg.get('steps_per_sample')} optimizer step(s) per sampling round), {c0.get('train', {}).get('steps')} "
         f"steps. A run's score is its mean sampled reward over the last {analysis.FINAL_FRACTION:.0%} of its "
         f"steps.\n", "## Reward over method, rank and LR\n"]
  for name in ("rl_reward", "rl_accuracy", "rl_peak"):
    out += [f"**{by_name[name].caption}** (`tables/{name}.tex`)\n", by_name[name].markdown()]
  out += ["## Figures\n",
          "![reward vs LR](figures/rl_reward_vs_lr.png)\n\nFinal reward against LR per condition (seed means); solid "
          "gray: the start reward; dotted: the good-LR threshold of RULE_RL_BAND (`figures/rl_reward_vs_lr.pdf`).\n",
          "![reward curves](figures/rl_reward_curves.png)\n\nAt each condition's best LR: the train reward "
          f"({RL_CURVE_WINDOW}-step moving average) and, as dots, the greedy accuracy on held-out problems "
          "(`figures/rl_reward_curves.pdf`).\n",
          "## vs the study\n",
          "Each verdict is computed by `experiments.analysis` from the numbers above; the rule printed under each "
          "finding is the code's own text.\n"]
  notes = []  # descriptive, not verdicts
  for setting in sorted({c.setting for c in conds}, key=_natural):
    here = [c for c in conds if c.setting == setting and c.usable]
    full = next((c for c in here if c.method == "full"), None)
    prefix = f"{setting}: " if setting else ""
    if full is not None:
      ratios = ", ".join(f"{c.name} {c.best_lr / full.best_lr:.3g}" for c in here if c.method == "lora")
      if ratios:
        notes.append(f"{prefix}best grid LR of LoRA / full FT: {ratios} (the study: ~10 in SFT and RL).")
    accs = ", ".join(f"{c.name} {max(np.mean(c.accuracy[lr]) for lr in c.usable):.3f} (at "
                     f"{_lr(max(c.usable, key=lambda lr: np.mean(c.accuracy[lr])))})" for c in here)
    if accs:
      notes.append(f"{prefix}greedy held-out accuracy at the last step, best over LRs (not the judged score): {accs}.")
  for finding in ("7", "7b"):
    mine = [r for r in rows if r.finding == finding]
    out.append(f"### Finding {finding}: {TITLES_RL[finding]}\n")
    out.append(f"Study: {STUDY_RL[finding]}.\n")
    out.append(Table("", "", ["scope", "ours", "verdict", "decided by"],
                     [[r.scope, r.ours or "—", f"**{r.verdict}**", r.why] for r in mine]).markdown()
               if mine else "Not tested by this sweep (it needs LoRA and full-FT runs in one setting).\n")
    if finding == "7" and notes:
      out.append("\n".join(f"- {line}" for line in notes) + "\n")
    out.append(f"Rule (`analysis.{RULE_NAMES[RULES_RL[finding]]}`): {RULES_RL[finding]}\n")
  out += ["## Files\n",
          "- `results.csv`: one row per run x logged step (" + ", ".join(RL_CSV_COLUMNS) + ").",
          "- `tables/*.tex`: every table above as a booktabs tabular.",
          "- `figures/*.png`, `figures/*.pdf`: the figures.", ""]
  text = "\n".join(out)
  (sweep_dir / "report.md").write_text(text)
  return text
