"""Reports from workdirs alone: one experiment's table and learning curves, or a whole sweep's analysis.

    python -m experiments.report runs/tiny [runs/other ...]
    python -m experiments.report runs/lr_sweep          # a directory holding sweep.json: the sweep report

One experiment (``experiments.main``'s workdir): reads only what runs leave behind (``config.json`` and each
``<method>/metrics.jsonl``) and writes ``report.md`` and ``report.png`` (train loss and held-out NLL against steps, one
line per method) into the workdir. ``experiments.main`` calls it at the end of an experiment, and when a preemption
stops one: a run that has not reached the config's steps is marked unfinished, a method with no records yet as not
started.

A sweep (``experiments.sweep``'s directory: ``sweep.json`` and one experiment workdir per point): writes
``results.csv`` (one row per point x eval step), ``report.md`` (NLL tables over method x rank x LR, the optimal LR of
each condition by a quadratic fit in log LR with a seed-bootstrap interval, the LoRA/full optimal-LR ratio, seed noise,
figures, and "vs the study": a verdict per finding by the rules in ``experiments.analysis``, printed next to it),
``figures/*.png|pdf`` and ``tables/*.tex`` (booktabs). Deterministic: the same files give byte-identical outputs.

Which findings a sweep speaks to follows from what varies in it, not from its family's name: settings that differ in a
width field (the LoRA/full ratio across widths) or in the batch size (finding 5), LoRA groups that differ in targets
(finding 6) or in scaling (finding 4's early curves, from train loss logged every step), and runs that left
``lora_diagnostics.jsonl`` (finding 9); each gets its section, table and figure only when the sweep has what it needs.
``analyse_sweep`` computes everything without writing; ``sweep_verdicts`` gives just the verdict rows (for an index
over several sweeps).
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import io
import json
import math
import re
import shlex
import sys
import zlib
from collections.abc import Sequence

import numpy as np
from etils import epath

from experiments import analysis, provenance
from experiments.configs import common
from lora_jax import metrics, synthetic


def summarize(workdir: str | epath.PathLike) -> dict:
  """Per method with train and eval records: LR, trainable params, steps (done and planned), whether it finished,
  base and last eval NLL (and its step), perplexity, accuracy; from the files."""
  workdir = epath.Path(workdir)
  config = json.loads((workdir / "config.json").read_text())
  runs = {}
  for method in config["methods"]:
    records = metrics.read_metrics(workdir / method) if (workdir / method / "metrics.jsonl").exists() else []
    train = [r for r in records if "train/loss" in r]
    evals = [r for r in records if "eval/nll" in r]
    if not train or not evals:
      continue  # not started (or stopped before its first logged step): see ``not_started``
    steps = max(r["step"] for r in records)
    runs[method] = {
        "lr": train[-1]["train/lr"], "trainable": train[-1]["params/trainable"], "steps": steps,
        "planned_steps": config["train"]["steps"], "finished": steps >= config["train"]["steps"],
        "base_nll": evals[0]["eval/nll"] if evals[0]["step"] == 0 else None, "eval_nll": evals[-1]["eval/nll"],
        "eval_step": evals[-1]["step"], "perplexity": evals[-1]["eval/perplexity"],
        "accuracy": evals[-1].get("eval/accuracy"),
        "curve": {"train": [(r["step"], r["train/loss"]) for r in train],
                  "eval": [(r["step"], r["eval/nll"]) for r in evals]},
    }
  return runs


def not_started(workdir: str | epath.PathLike, runs: dict) -> list[str]:
  """The config's methods with no results in ``runs`` (``summarize``)."""
  config = json.loads((epath.Path(workdir) / "config.json").read_text())
  return [m for m in config["methods"] if m not in runs]


def markdown(workdir: epath.Path, runs: dict) -> str:
  """The results table (the base model's NLL is the first run's step-0 evaluation); unfinished runs say so."""
  base = next((r["base_nll"] for r in runs.values() if r["base_nll"] is not None), None)
  lines = ["| method | LR | trainable params | eval NLL | perplexity | accuracy | steps |",
           "|---|---|---|---|---|---|---|"]
  if base is not None:
    lines.append(f"| base model | - | - | {base:.4f} | - | - | 0 |")
  for method, r in runs.items():
    accuracy = "-" if r["accuracy"] is None else f"{r['accuracy']:.3f}"
    steps = str(r["steps"])
    if not r["finished"]:
      steps = f"{r['steps']} of {r['planned_steps']} (unfinished; eval NLL at step {r['eval_step']})"
    lines.append(f"| {method} | {r['lr']:g} | {r['trainable']:,} | {r['eval_nll']:.4f} | {r['perplexity']:.3f} | "
                 f"{accuracy} | {steps} |")
  for method in not_started(workdir, runs):
    lines.append(f"| {method} | - | - | - | - | - | not started |")
  return "\n".join(lines) + "\n"


def plot(path: epath.Path, runs: dict, title: str) -> None:
  """Train loss and eval NLL against steps, one line per method."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
  for method, r in runs.items():
    for ax, key in zip(axes, ("train", "eval")):
      steps, values = zip(*r["curve"][key])
      ax.plot(steps, values, marker="o" if key == "eval" else None, markersize=3, label=method)
  for ax, label in zip(axes, ("train loss (NLL per loss token)", "held-out NLL per loss token")):
    ax.set_xlabel("step")
    ax.set_ylabel(label)
    ax.grid(alpha=0.3)
    ax.legend()
  fig.suptitle(title)
  fig.tight_layout()
  with path.open("wb") as f:
    fig.savefig(f, format="png", dpi=120)
  plt.close(fig)


def write(workdir: str | epath.PathLike) -> tuple[str, dict]:
  """Writes report.md and report.png into the workdir; returns the Markdown table and the summary it came from
  (an RL experiment: ``write_rl``)."""
  workdir = epath.Path(workdir)
  if "rl" in json.loads((workdir / "config.json").read_text()):
    return write_rl(workdir)
  runs = summarize(workdir)
  table = markdown(workdir, runs)
  plot(workdir / "report.png", runs, str(workdir))
  unfinished = [m for m, r in runs.items() if not r["finished"]] + not_started(workdir, runs)
  warning = (f"**Unfinished: {', '.join(unfinished)}.** The experiment stopped early (e.g. preempted); its runs are "
             "not comparable yet. Rerun the same command to resume.\n\n") if unfinished else ""
  (workdir / "report.md").write_text(f"# Results: {workdir}\n\n{warning}{table}\n![learning curves](report.png)\n\n"
                                     + "\n".join(f"- {m}: `{workdir / m}`" for m in runs) + "\n")
  return table, runs


def write_rl(workdir: str | epath.PathLike) -> tuple[str, dict]:
  """report.md of an RL experiment (configs/rl.py): per method, greedy held-out accuracy at step 0 and at the end,
  the first round's sampled reward and the mean over the last quarter of steps; returns the table and, per method,
  those numbers."""
  workdir = epath.Path(workdir)
  config = json.loads((workdir / "config.json").read_text())
  lines = ["| method | LR | trainable params | greedy accuracy (step 0 → last) | sampled reward (first step → "
           "mean of the last quarter) | steps |", "|---|---|---|---|---|---|"]
  runs = {}
  for method in config["methods"]:
    path = workdir / method / "metrics.jsonl"
    records = _read_records(path) if path.exists() else []
    evals = [r for r in records if "eval/accuracy" in r]
    trains = {r["step"]: r for r in records if "train/reward" in r}
    if not evals or not trains:
      lines.append(f"| {method} | - | - | - | - | not started |")
      continue
    last = trains[max(trains)]
    score = analysis.final_reward({t: r["train/reward"] for t, r in trains.items()}, max(trains))
    runs[method] = {"lr": last["train/lr"], "start_accuracy": evals[0]["eval/accuracy"],
                    "accuracy": evals[-1]["eval/accuracy"], "start_reward": trains[min(trains)]["train/reward"],
                    "final_reward": score, "steps": max(trains)}
    done = "" if max(trains) >= config["train"]["steps"] else f" of {config['train']['steps']} (unfinished)"
    lines.append(f"| {method} | {last['train/lr']:g} | {last['params/trainable']:,} | "
                 f"{evals[0]['eval/accuracy']:.3f} → {evals[-1]['eval/accuracy']:.3f} | "
                 f"{runs[method]['start_reward']:.3f} → {score:.3f} | {max(trains)}{done} |")
  table = "\n".join(lines) + "\n"
  (workdir / "report.md").write_text(f"# RL results: {workdir}\n\nTask `{config['data']['task']}`, group size "
                                     f"{config['rl']['group_size']}, {config['rl']['prompts_per_step']} prompts per "
                                     f"round.\n\n{table}\n"
                                     + "\n".join(f"- {m}: `{workdir / m}`" for m in config["methods"]) + "\n")
  return table, runs


# ----------------------------------------------------------------------------------------------------------------------
# Sweeps: a directory with sweep.json ({"config", "arg", "points": [{"point", "name"}, ...]}) and, per point, an
# experiments.main workdir (config.json, <method>/metrics.jsonl, maybe status.json and run_info.json).

SWEEP_FILE = "sweep.json"
CSV_COLUMNS = ("family", "point", "method", "rank", "lr", "seed", "data_seed", "batch_size", "targets", "scaling",
               "step", "tokens", "train_loss", "eval_nll", "finished", "state")
REPLICATE_KEYS = ("seed", "data_seed")  # Runs that differ only in these are seeds of one condition.
NOT_A_SETTING = ("methods", "optim.lr", "optim.full_lr_ratio")  # Fields of the condition and LR (lora.* too).


def _not_a_setting(key: str) -> bool:
  """Fields that never make runs incomparable: seeds, method, LR, the LoRA spec (the condition), cache paths."""
  return key in REPLICATE_KEYS + NOT_A_SETTING or key.startswith("lora.") or key.endswith("cache_dir")


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


@dataclasses.dataclass
class SweepRun:
  """One method's run at one sweep point, as its files describe it."""
  point: str  # The sweep point's arg string.
  name: str  # Its directory under the sweep.
  state: str  # status.json's state, else "done" / "unfinished" / "not started" from the metrics.
  method: str = ""  # "lora" | "full"; "" for a point with no config.json (never started).
  config: dict = dataclasses.field(default_factory=dict)
  evals: dict = dataclasses.field(default_factory=dict)  # step -> eval/nll
  train: dict = dataclasses.field(default_factory=dict)  # step -> (train/loss, train/tokens)
  setting: str = ""  # The sweep's other varying fields (not method, LoRA spec, LR, seeds) as "key=value, ...".
  condition: str = ""  # "full" or "lora r=R" (+ the LoRA fields besides rank that vary over the sweep).
  group: str = ""  # A LoRA condition less its rank: one group's conditions differ only in rank.
  fields: dict = dataclasses.field(default_factory=dict)  # The setting's fields: dotted key -> value.
  group_fields: dict = dataclasses.field(default_factory=dict)  # The group's LoRA fields: key (no "lora.") -> value.
  trainable: int | None = None  # params/trainable as the metrics logged it.
  diagnostics: dict = dataclasses.field(default_factory=dict)  # step -> lora_diagnostics.jsonl's per-module norms.

  @property
  def lr(self) -> float | None:
    """The LR this run trained at (``experiments.main.make_optim``'s rule)."""
    if not self.config:
      return None
    o = self.config["optim"]
    both = self.method == "full" and "lora" in self.config["methods"]
    return float(f"{o['lr'] * (o.get('full_lr_ratio', 1.0) if both else 1.0):.12g}")  # 3e-3 * 0.3 == 9e-4

  @property
  def rank(self) -> int | None:
    """LoRA rank; None for full FT."""
    return self.config["lora"]["rank"] if self.method == "lora" else None

  @property
  def finished(self) -> bool:
    """Evaluated, with a finite NLL, at the config's last step."""
    return bool(self.config) and math.isfinite(self.evals.get(self.config["train"]["steps"], math.nan))

  @property
  def failed(self) -> bool:
    """Stopped for good before the end (status "failed": e.g. a NaN loss at too high an LR)."""
    return not self.finished and self.state == "failed"

  @property
  def seed_key(self) -> tuple:
    """The replicate fields' values: what orders a condition's seeds."""
    return tuple(self.config[k] for k in REPLICATE_KEYS)


def _read_json(path: epath.Path) -> dict | None:
  return json.loads(path.read_text()) if path.exists() else None


def _read_records(path: epath.Path) -> list[dict]:
  """A metrics.jsonl's records; a torn last line (a run killed mid-write) is dropped."""
  lines = [l for l in path.read_text().splitlines() if l.strip()]
  out = []
  for i, line in enumerate(lines):
    try:
      out.append(json.loads(line))
    except json.JSONDecodeError:
      if i < len(lines) - 1:
        raise ValueError(f"{path}: line {i + 1} is not JSON") from None
  return out


def flatten(d: dict, prefix: str = "") -> dict:
  """A nested dict's leaves under dotted keys (``{"a": {"b": 1}}`` -> ``{"a.b": 1}``)."""
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(flatten(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def _show(value) -> str:
  return "+".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)


def load_sweep(sweep_dir: str | epath.PathLike) -> tuple[dict, list[SweepRun]]:
  """sweep.json and every point's runs (one per method; a placeholder for a point with no config.json), labelled."""
  sweep_dir = epath.Path(sweep_dir)
  meta = json.loads((sweep_dir / SWEEP_FILE).read_text())
  runs = []
  for p in meta["points"]:
    d = sweep_dir / p["name"]
    state = (_read_json(d / "status.json") or {}).get("state")
    config = _read_json(d / "config.json")
    if config is None:
      runs.append(SweepRun(p["point"], p["name"], state or "not started"))
      continue
    for method in config["methods"]:
      path = d / method / "metrics.jsonl"
      records = _read_records(path) if path.exists() else []
      run = SweepRun(p["point"], p["name"], state or "", method, config)
      for r in records:  # by step, later records win (a resumed run rewrote what followed its checkpoint)
        if "eval/nll" in r:
          run.evals[r["step"]] = float(r["eval/nll"])
        if "train/loss" in r:
          run.train[r["step"]] = (float(r["train/loss"]), float(r.get("train/tokens", math.nan)))
        if "params/trainable" in r:
          run.trainable = int(r["params/trainable"])
      path = d / method / metrics.DIAGNOSTICS_FILE
      for r in _read_records(path) if path.exists() else []:
        run.diagnostics[r["step"]] = r["modules"]
      run.state = run.state or ("done" if run.finished else "unfinished" if records else "not started")
      runs.append(run)
  _label(runs)
  return meta, runs


def _varying(runs: list[SweepRun], flat: dict, keep) -> list[str]:
  keys = sorted({k for r in runs for k in flat[id(r)] if keep(k)})
  return [k for k in keys if len({_show(flat[id(r)].get(k)) for r in runs}) > 1]


def method_tied_fields(runs: list[SweepRun]) -> dict[str, dict[str, str]]:
  """Fields (outside the LoRA spec, LR and seeds) constant within each method but different between methods."""
  started = [r for r in runs if r.config]
  flat = {id(r): flatten(r.config) for r in started}
  out = {}
  for k in _varying(started, flat, lambda k: not _not_a_setting(k)):
    methods = sorted({r.method for r in started})
    per_method = {m: {_show(flat[id(r)].get(k)) for r in started if r.method == m} for m in methods}
    if all(len(v) == 1 for v in per_method.values()):
      out[k] = {m: v.pop() for m, v in per_method.items()}
  return out


def _label(runs: list[SweepRun]) -> None:
  """Sets each run's setting, condition and group from the config fields that vary over the sweep."""
  started = [r for r in runs if r.config]
  flat = {id(r): flatten(r.config) for r in started}
  tied = method_tied_fields(runs)  # e.g. a field the config sets per method: not a setting, or no pair would meet
  setting_keys = _varying(started, flat, lambda k: not _not_a_setting(k) and k not in tied)
  lora_runs = [r for r in started if r.method == "lora"]
  group_keys = _varying(lora_runs, flat, lambda k: k.startswith("lora.") and k != "lora.rank")
  for r in started:
    f = flat[id(r)]
    r.setting = ", ".join(f"{k}={_show(f.get(k))}" for k in setting_keys)
    r.fields = {k: f.get(k) for k in setting_keys}
    if r.method == "lora":
      r.group = ", ".join(f"{k[len('lora.'):]}={_show(f.get(k))}" for k in group_keys)
      r.group_fields = {k[len("lora."):]: f.get(k) for k in group_keys}
      r.condition = f"lora r={r.rank}" + (f", {r.group}" if r.group else "")
    else:
      r.condition = r.method


def _cumulative_tokens(train: dict, step: int) -> float | None:
  """Loss tokens up to ``step``: each logged train/tokens (one step's count) stands for the steps since the previous
  log, and the last one for any steps after it; None when nothing was logged yet past step 0."""
  if step == 0:
    return 0.0
  if not train:
    return None
  total, prev = 0.0, 0
  for t in sorted(train):
    total += train[t][1] * (min(t, step) - prev)
    prev = min(t, step)
    if t >= step:
      return total
  return total + train[max(train)][1] * (step - prev)


def _num(x) -> str:
  if x is None or (isinstance(x, float) and not math.isfinite(x)):
    return ""
  if isinstance(x, float) and x.is_integer() and abs(x) < 1e15:
    return str(int(x))
  return repr(x) if isinstance(x, float) else str(x)


def results_rows(family: str, runs: list[SweepRun]) -> list[dict]:
  """The rows of results.csv: one per run x eval step (one with empty step for a run with no evaluation)."""
  rows = []
  for r in runs:
    c = r.config
    lora_run = r.method == "lora"
    base = {"family": family, "point": r.point, "method": r.method, "rank": _num(r.rank), "lr": _num(r.lr),
            "seed": _num(c.get("seed")), "data_seed": _num(c.get("data_seed")),
            "batch_size": _num(c["data"]["batch_size"]) if c else "",
            "targets": _show(c["lora"]["targets"]) if lora_run else "",
            "scaling": c["lora"]["scaling"] if lora_run else "", "finished": str(r.finished), "state": r.state}
    if not r.evals:
      rows.append({**base, "step": "", "tokens": "", "train_loss": "", "eval_nll": ""})
    for step in sorted(r.evals):
      logged = [t for t in r.train if t <= step]
      rows.append({**base, "step": str(step), "tokens": _num(_cumulative_tokens(r.train, step)),
                   "train_loss": _num(r.train[max(logged)][0]) if logged else "", "eval_nll": _num(r.evals[step])})
  return rows


def _csv(rows: list[dict]) -> str:
  out = io.StringIO()
  writer = csv.DictWriter(out, fieldnames=CSV_COLUMNS, lineterminator="\n")
  writer.writeheader()
  writer.writerows(rows)
  return out.getvalue()


@dataclasses.dataclass(eq=False)
class Condition:
  """One condition of one setting over the LR grid: its seeds' results, the fitted optimum and its bootstrap."""
  setting: str
  name: str
  method: str
  rank: int | None
  group: str
  lrs: list = dataclasses.field(default_factory=list)  # Every LR the sweep gave it, ascending.
  final: dict = dataclasses.field(default_factory=dict)  # LR -> final eval NLLs of finished runs (by seed).
  best: dict = dataclasses.field(default_factory=dict)  # LR -> min eval NLL over steps > 0 of finished runs.
  failed: dict = dataclasses.field(default_factory=dict)  # LR -> failed runs.
  missing: dict = dataclasses.field(default_factory=dict)  # LR -> runs neither finished nor failed.
  curves: dict = dataclasses.field(default_factory=dict)  # LR -> {step: seed-mean eval NLL of finished runs}.
  usable: list = dataclasses.field(default_factory=list)  # LRs with a finished run and no failed one.
  fit: analysis.Fit | None = None  # On the seed means over ``lrs`` (nan where not usable); None when none is usable.
  draws: np.ndarray | None = None  # Bootstrap log10 optima; None with < 2 seeds at some usable LR.
  fields: dict = dataclasses.field(default_factory=dict)  # The setting's fields (``SweepRun.fields``).
  group_fields: dict = dataclasses.field(default_factory=dict)  # The LoRA group's fields (``SweepRun.group_fields``).
  runs: list = dataclasses.field(default_factory=list)  # Its runs (every LR and seed), by seed.
  step0: list = dataclasses.field(default_factory=list)  # Its runs' step-0 eval NLLs (the base model).
  noise: analysis.Noise = analysis.Noise(math.nan, 0)  # Seed noise pooled over the setting's best-LR cells.
  margin: float = math.nan  # The setting's match margin (analysis.match_margin).

  def means(self) -> list[float]:
    """Seed-mean final NLL at each usable LR."""
    return [float(np.mean(self.final[lr])) for lr in self.usable]

  def grid_means(self) -> list[float]:
    """Seed-mean final NLL at every LR of the grid; nan where an LR failed or has no finished run (diverged)."""
    return [float(np.mean(self.final[lr])) if lr in self.usable else math.nan for lr in self.lrs]

  @property
  def log_interval(self) -> tuple[float, float]:
    """The bootstrap interval of log10 lr* (nan without a bootstrap)."""
    return analysis.interval(self.draws) if self.draws is not None else (math.nan, math.nan)

  @property
  def best_lr(self) -> float | None:
    """The grid LR with the lowest seed-mean final NLL."""
    return self.lrs[self.fit.grid_index] if self.fit else None

  @property
  def best_values(self) -> list[float]:
    """The final NLLs of the seeds at the best grid LR."""
    return self.final[self.best_lr] if self.fit else []

  def edge_note(self) -> str:
    """Where the fit stands: interior (3-point fit) or why no optimum is claimed."""
    if self.fit is None:
      return "no finished run"
    if self.fit.interior:
      return "interior (3-point fit)"
    if self.fit.edge in ("low", "high"):
      return f"edge: {'lowest' if self.fit.edge == 'low' else 'highest'} LR of the grid"
    return f"next to a diverged or failed LR ({self.fit.edge.split()[-1]})"


def _natural(text: str) -> tuple:
  """A sort key that orders the numbers inside labels by value ("batch_size=8" before "batch_size=32")."""
  return tuple((0, float(part), "") if i % 2 else (1, 0.0, part)
               for i, part in enumerate(re.split(r"(\d+(?:\.\d+)?(?:e-?\d+)?)", text)))


def _settings(conds: list[Condition]) -> list[str]:
  return sorted({c.setting for c in conds}, key=_natural)


def _condition_order(c: Condition) -> tuple:
  return (_natural(c.setting), c.method != "full", _natural(c.group), c.rank or 0, c.name)


def judged_step(run: SweepRun, fraction: float) -> int | None:
  """The run's last step with a finite eval NLL at or before ``fraction`` of its steps (> 0); None if none."""
  limit = fraction * run.config["train"]["steps"]
  steps = [s for s, v in run.evals.items() if 0 < s <= limit + 1e-9 and math.isfinite(v)]
  return max(steps) if steps else None


def conditions(runs: list[SweepRun], fraction: float = 1.0) -> list[Condition]:
  """The sweep's conditions (setting x method x LoRA spec) with their LR grids, results, fits, bootstraps and the
  setting's pooled noise and margin; "final" means the evaluation at ``fraction`` of the steps (``judged_step``)."""
  by = {}
  for r in sorted((r for r in runs if r.config), key=lambda r: r.seed_key):
    c = by.setdefault((r.setting, r.condition), Condition(r.setting, r.condition, r.method, r.rank, r.group,
                                                          fields=r.fields, group_fields=r.group_fields))
    c.runs.append(r)
    lr = r.lr
    if lr not in c.lrs:
      c.lrs.append(lr)
    if math.isfinite(r.evals.get(0, math.nan)):
      c.step0.append(r.evals[0])
    if r.finished:
      evals = {s: v for s, v in r.evals.items() if math.isfinite(v)}
      c.final.setdefault(lr, []).append(evals[judged_step(r, fraction) or r.config["train"]["steps"]])
      c.best.setdefault(lr, []).append(min(v for s, v in evals.items() if s > 0))
      for step, value in evals.items():
        c.curves.setdefault(lr, {}).setdefault(step, []).append(value)
    elif r.failed:
      c.failed[lr] = c.failed.get(lr, 0) + 1
    else:
      c.missing[lr] = c.missing.get(lr, 0) + 1
  out = sorted(by.values(), key=_condition_order)
  for c in out:
    c.lrs.sort()
    c.curves = {lr: {s: float(np.mean(v)) for s, v in sorted(curve.items())} for lr, curve in c.curves.items()}
    c.usable = [lr for lr in c.lrs if c.final.get(lr) and not c.failed.get(lr)]
    if c.usable:
      c.fit = analysis.fit_optimum(c.lrs, c.grid_means())
      if min(len(c.final[lr]) for lr in c.usable) >= 2:
        stream = zlib.crc32(f"{c.setting}|{c.name}".encode())
        c.draws = analysis.bootstrap_log_optimum(c.lrs, [c.final[lr] if lr in c.usable else [] for lr in c.lrs],
                                                 seed=[analysis.BOOT_SEED, stream])
  for setting in {c.setting for c in out}:
    here = [c for c in out if c.setting == setting and c.fit is not None]
    noise = analysis.pooled_noise([c.best_values for c in here])
    base = [v for c in here for v in c.step0]
    best = min((float(np.mean(c.best_values)) for c in here), default=math.nan)
    margin = analysis.match_margin(float(np.mean(base)), best) if base else math.nan
    for c in here:
      c.noise, c.margin = noise, margin
  return out


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


# -- Findings across settings and LoRA groups --------------------------------------------------------------------------
# Each of these is decided by what varies in the sweep, not by its family's name: settings that differ in a width or
# batch-size field, LoRA groups that differ in targets or scaling, and runs that left lora_diagnostics.jsonl.

@dataclasses.dataclass
class Part:
  """One finding's analysis across settings or groups: verdict rows, its table, descriptive notes, its figure's data."""
  rows: list
  table: Table
  notes: list
  plot: list


WIDTH_KEYS = ("model.hidden_size", "tiny_base.hidden_size")  # The first that varies between settings is the width.
BATCH_KEYS = ("data.batch_size",)
COOKBOOK_EXPONENTS = {arch: -common.COOKBOOK_LR_EXPONENT[arch] for arch in ("llama", "qwen3")}  # lr* ∝ hidden^this


def _number(x) -> bool:
  return isinstance(x, (int, float)) and not isinstance(x, bool)


def axis_lines(conds: list[Condition], keys: Sequence[str]) -> tuple[str | None, list[tuple[str, dict]]]:
  """The first of ``keys`` that takes several numeric values among the settings, and the settings along it: a list of
  (rest, {value: setting}), one per value of the other varying fields that the axis value does not fix (e.g.
  ``train.steps`` in a batch sweep at a fixed number of examples is fixed by the batch size), with >= 2 values."""
  fields = {c.setting: c.fields for c in conds}
  key = next((k for k in keys if len({_show(f.get(k)) for f in fields.values()}) > 1
              and all(_number(f.get(k)) for f in fields.values())), None)
  if key is None:
    return None, []
  fixed = {}
  for k in sorted({k for f in fields.values() for k in f} - {key}):
    per_value = {}
    fixed[k] = all(per_value.setdefault(f[key], _show(f.get(k))) == _show(f.get(k)) for f in fields.values())
  lines = {}
  for setting in _settings(conds):
    f = fields[setting]
    rest = ", ".join(f"{k}={_show(f.get(k))}" for k in sorted(fixed) if not fixed[k])
    lines.setdefault(rest, {})[f[key]] = setting
  return key, [(rest, dict(sorted(by.items()))) for rest, by in sorted(lines.items(), key=lambda kv: _natural(kv[0]))
               if len(by) > 1]


def _prefix(scope: str) -> str:
  return f"{scope}: " if scope else ""


def _optimum(c: Condition | None) -> str:
  if c is None or c.fit is None:
    return "—"
  return _lr(c.fit.lr) if c.fit.interior else "— (edge)"


def _lora_names(conds: list[Condition]) -> list[str]:
  return list(dict.fromkeys(c.name for c in sorted(conds, key=_condition_order) if c.method == "lora"))


def _pick(conds: list[Condition], setting: str, name: str) -> Condition | None:
  return next((c for c in conds if c.setting == setting and c.name == name), None)


def width_part(conds: list[Condition]) -> Part | None:
  """Finding 3 across widths: per width the optima and their ratio, the verdict on the ratio's spread over widths,
  and each method's power-law exponent of lr* against width."""
  key, lines = axis_lines(conds, WIDTH_KEYS)
  rows, table, notes, plot = [], [], [], []
  for rest, settings in lines:
    in_line = [c for c in conds if c.setting in settings.values()]
    fulls = {w: _pick(conds, s, "full") for w, s in settings.items()}
    names = _lora_names(in_line)
    if not names or not any(fulls.values()):
      continue
    optima = {}  # condition -> {width: lr*} at widths with an interior optimum
    for name in ["full", *names]:
      optima[name] = {w: c.fit.lr for w, s in settings.items()
                      if (c := _pick(conds, s, name)) is not None and c.fit is not None and c.fit.interior}
    ratios = {}
    for name in names:
      ratios[name] = {}
      for w, s in settings.items():
        lora_c, full_c = _pick(conds, s, name), fulls[w]
        if lora_c is None or full_c is None:
          continue
        ratio, lo, hi, interior = ratio_of(lora_c, full_c)
        ratios[name][w] = (ratio, lo, hi, interior)
        table.append(([rest] if len(lines) > 1 else []) + [
            f"{w:g}", name, _optimum(full_c), _optimum(lora_c), _ratio(ratio) if interior else "— (edge)",
            _interval(lo, hi, _ratio) if interior else "—"])
      judged = {w: r for w, (r, _, _, interior) in ratios[name].items() if interior}
      v = analysis.verdict_width(judged)
      ours = ", ".join(f"{w:g}: {_ratio(r)}" for w, r in judged.items()) or "—"
      rows.append(FindingRow("3w", _scope(rest, name), ours, v.verdict, v.why))
    slopes = {name: analysis.power_law_slope(list(o), list(o.values())) for name, o in optima.items()}
    cookbook = ", ".join(f"{v:g} ({arch})" for arch, v in COOKBOOK_EXPONENTS.items())
    notes.append(f"{_prefix(rest)}Power-law exponent of lr* against {key} fitted over the widths with an interior "
                 f"optimum: " + ", ".join(f"{n} {_slope(slopes[n], len(optima[n]))}" for n in optima)
                 + f"; the cookbook rule's: {cookbook}"
                 + (" (the tiny base is Llama-architecture)." if key == "tiny_base.hidden_size" else "."))
    plot.append((rest, key, ratios, optima, slopes))
  if not rows:
    return None
  several = len(lines) > 1
  header = (["other fields"] if several else []) + [key, "LoRA", "lr*(full)", "lr*(LoRA)", "lr*(LoRA)/lr*(full)",
                                              f"{analysis.LEVEL:.0%} interval"]
  return Part(rows, Table("lr_ratio_width", "LoRA/full optimal-LR ratio across widths (fitted optima)", header, table),
              notes, plot)


def _slope(slope: float, n: int) -> str:
  return f"{slope:+.3f} ({n} widths)" if not math.isnan(slope) else f"— ({n} width{'s' * (n != 1)})"


def batch_part(conds: list[Condition]) -> Part | None:
  """Finding 5: per LoRA condition the best-LR gap to full FT at each batch size, how it changes from the smallest
  to the largest batch (the verdict), and which batch size each condition does best at."""
  key, lines = axis_lines(conds, BATCH_KEYS)
  rows, table, notes, plot = [], [], [], []
  for rest, settings in lines:
    in_line = [c for c in conds if c.setting in settings.values()]
    fulls = {b: _pick(conds, s, "full") for b, s in settings.items()}
    names = _lora_names(in_line)
    if not names or not any(fulls.values()):
      continue
    classes, gaps = {}, {}
    for b, s in settings.items():
      for name in ["full", *names]:
        c = _pick(conds, s, name)
        if c is None:
          continue
        gap = _gap(c, fulls[b]).value if name != "full" and fulls[b] is not None else math.nan
        values = c.best_values
        table.append(([rest] if len(lines) > 1 else []) + [
            f"{b:g}", name, _lr(c.best_lr), _mean_std(values) if values else "—",
            "" if name == "full" else "—" if math.isnan(gap) else f"{gap:+.4f}", c.edge_note()])
    for name in names:
      pairs = {b: (_pick(conds, s, name), fulls[b]) for b, s in settings.items()}
      pairs = {b: (lc, fc) for b, (lc, fc) in pairs.items() if lc and fc and lc.fit and fc.fit}
      gaps[name] = {b: _gap(lc, fc).value for b, (lc, fc) in pairs.items()}
      if len(pairs) < 2:
        classes[name] = analysis.UNKNOWN
        rows.append(FindingRow("5", _scope(rest, name), "—", analysis.INCONCLUSIVE,
                               "fewer than two batch sizes with LoRA and full FT"))
        continue
      small, large = min(pairs), max(pairs)
      here = [c for c in in_line if c.setting in (settings[small], settings[large]) and c.fit is not None]
      noise = analysis.pooled_noise([c.best_values for c in here])
      margins = [m for m in (pairs[small][1].margin, pairs[large][1].margin) if not math.isnan(m)]
      margin = min(margins) if len(margins) == 2 else math.nan  # both settings need a base NLL
      (ls, fs), (ll, fl) = pairs[small], pairs[large]
      interior = all(c.fit.interior for c in (ls, fs, ll, fl))
      growth = analysis.contrast([(ll.best_values, 1.0), (fl.best_values, -1.0), (ls.best_values, -1.0),
                                  (fs.best_values, 1.0)], noise, margin, interior)
      classes[name] = analysis.growth_class(growth)
      ours = f"gap {gaps[name][small]:+.4f} (B={small:g}) → {gaps[name][large]:+.4f} (B={large:g})"
      why = f"growth {growth.text()}: {classes[name]}"
      verdict = {analysis.GROWS: analysis.AGREE, analysis.SHRINKS: analysis.DISAGREE,
                 analysis.FLAT: analysis.DISAGREE}.get(classes[name], analysis.INCONCLUSIVE)
      rows.append(FindingRow("5", _scope(rest, name), ours, verdict, why))
    v = analysis.verdict_batch(classes)
    rows.append(FindingRow("5", _scope(rest, "overall"), "", v.verdict, v.why))
    best = {}
    for name in ["full", *names]:
      means = {b: float(np.mean(c.final[c.best_lr])) for b, s in settings.items()
               if (c := _pick(conds, s, name)) is not None and c.fit is not None}
      if means:
        best[name] = min(means, key=means.get)
        plot.append((rest, name, means, gaps.get(name, {})))
    smallest = min(settings)
    shown = ", ".join(f"{n} {b:g} ({'the smallest' if b == smallest else 'not the smallest'})" for n, b in best.items())
    notes.append(f"{_prefix(rest)}Best {key} per condition (by the best-LR final NLL; the study: both do best at "
                 f"small batches): {shown}.")
  if not rows:
    return None
  header = (["other fields"] if len(lines) > 1 else []) + [key, "condition", "best grid LR", "final NLL there",
                                                   "gap to full FT", "fit"]
  return Part(rows, Table("batch_size", "Best-LR final eval NLL and LoRA's gap to full FT per batch size", header,
                          table), notes, plot)


LAYER_ORDER = ("attention", "mlp", "all")  # targets_class's kinds, as tables list them.
ATTENTION_TARGETS = frozenset({"attention", "q_proj", "k_proj", "v_proj", "o_proj"})
MLP_TARGETS = frozenset({"mlp", "gate_proj", "up_proj", "down_proj"})
ALL_MODULES = (ATTENTION_TARGETS | MLP_TARGETS) - {"attention", "mlp"}


def targets_class(targets: Sequence[str]) -> tuple[str, bool] | None:
  """("attention" | "mlp" | "all", adapts the unembedding) for a LoRA targets list; None for other target sets."""
  names = set(targets) - {"unembed"}
  unembed = "unembed" in targets
  if names in ({"all-linear"}, {"attention", "mlp"}, ALL_MODULES):
    return "all", unembed
  if names and names <= ATTENTION_TARGETS:
    return "attention", unembed
  if names and names <= MLP_TARGETS:
    return "mlp", unembed
  return None


def _base_targets(c: Condition) -> set:
  return set(c.runs[0].config["lora"]["targets"]) - {"unembed"}


def _groups_differing_in(conds: list[Condition], field: str) -> dict[tuple[str, str], list[Condition]]:
  """LoRA conditions by (setting, their group's other fields), where ``field`` varies among the LoRA groups."""
  out = {}
  for c in conds:
    if c.method == "lora" and field in c.group_fields:
      rest = ", ".join(f"{k}={_show(v)}" for k, v in c.group_fields.items() if k != field)
      out.setdefault((c.setting, rest), []).append(c)
  return out


def _compare(a: Condition | None, b: Condition | None) -> tuple[str, str]:
  """The gap class of ``a`` against ``b`` (RULE_GAP's) and the gap as text."""
  if a is None or b is None or a.fit is None or b.fit is None:
    return analysis.UNKNOWN, "—"
  g = _gap(a, b)
  return g.kind, g.text()


def targets_label(c: Condition) -> str:
  """A condition's targets class as text: "attention", "mlp + unembed", ..."""
  kind, unembed = targets_class(c.runs[0].config["lora"]["targets"])
  return kind + (" + unembed" if unembed else "")


def layers_part(conds: list[Condition]) -> Part | None:
  """Finding 6: attention-only vs MLP-only vs all at each rank, trainable parameters, and unembedding on vs off."""
  rows, table, notes, plot = [], [], [], []
  lines = _groups_differing_in(conds, "targets")
  for (setting, rest), group in sorted(lines.items(), key=lambda kv: (_natural(kv[0][0]), _natural(kv[0][1]))):
    by = {}
    for c in group:
      kind = targets_class(c.runs[0].config["lora"]["targets"])
      if kind is not None:
        by[(*kind, c.rank)] = c
    if len({k[0] for k in by}) < 2 and not any((k, not u, r) in by for k, u, r in by):
      continue
    scope = _join(setting, rest)
    verdicts = []
    # A sweep that gives each targets class its own rank (attention r=2k vs MLP r=k: parameter-matched, as the
    # study) is compared across those ranks; otherwise rank by rank.
    kinds = [(k, u) for k, u, _ in by]
    matched = len(set(kinds)) == len(kinds) and not any(("mlp", u, r) in by for k, u, r in by if k == "attention")
    compared = {(k, u, 0): c for (k, u, _), c in by.items()} if matched else by
    for rank in sorted({r for _, _, r in compared}):
      unembeds = sorted({u for k, u, r in compared if r == rank and k != "all"})
      for u in unembeds:
        attention, mlp = compared.get(("attention", u, rank)), compared.get(("mlp", u, rank))
        everything = compared.get(("all", u, rank)) or compared.get(("all", not u, rank))
        a_vs_m, a_text = _compare(attention, mlp)
        m_vs_all, m_text = _compare(mlp, everything)
        v = analysis.verdict_layers(a_vs_m, m_vs_all)
        verdicts.append(v)
        shown = [c for c in (attention, mlp, everything) if c is not None]
        label = ("; ".join(f"{targets_label(c)} r{c.rank}" for c in shown) + " (ranks as swept)" if matched
                 else f"r{rank}")
        label += (", with unembed" if u else ", no unembed") if len(unembeds) > 1 else ""
        rows.append(FindingRow("6", _scope(scope, label), f"attention − MLP {a_text}; MLP − all {m_text}",
                               v.verdict, v.why))
    if verdicts:
      rows.append(FindingRow("6", _scope(scope, "overall"), "", analysis.combine(verdicts),
                             f"{len(verdicts)} comparison{'s' * (len(verdicts) != 1)} judged"))
    for (kind, u, rank), c in sorted(by.items(), key=lambda kv: _condition_order(kv[1])):
      twin = by.get((kind, True, rank)) if not u else None
      if twin is not None and _base_targets(twin) == _base_targets(c):  # the two differ only in "unembed"
        notes.append(f"{_scope(scope, f'r{rank} {kind}')}: with the unembedding − without "
                     f"{_compare(twin, c)[1]} (descriptive).")
    for (kind, u, _), c in sorted(by.items(), key=lambda kv: (LAYER_ORDER.index(kv[0][0]), kv[0][1], kv[0][2])):
      values = c.final[c.best_lr] if c.fit else []
      trainable = next((r.trainable for r in c.runs if r.trainable is not None), None)
      table.append(([setting] if len({s for s, _ in lines}) > 1 else []) + [
          c.name, kind + (" + unembed" if u else ""), str(c.rank), "—" if trainable is None else f"{trainable:,}",
          _lr(c.best_lr), _mean_std(values) if values else "—", c.edge_note()])
    plot.append((scope, by))
  if not plot:
    return None
  if not any(r.trainable is not None for c in conds for r in c.runs):
    notes.append("Trainable parameters: the runs' metrics hold no params/trainable, so the table cannot show them.")
  header = (["setting"] if len({s for s, _ in lines}) > 1 else []) + [
      "condition", "targets", "rank", "trainable params", "best grid LR", "final NLL there", "fit"]
  return Part(rows, Table("layers", "Which layers are adapted: best-LR final eval NLL and trainable parameters",
                          header, table), notes, plot)


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


PARTS = {"3w": width_part, "5": batch_part, "6": layers_part, "4c": early_part, "9": ba_part}


FINDING_ORDER = ("3", "3w", "4", "4c", "1", "2", "5", "6", "9")  # The LR findings first: every LR sweep speaks to them.
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
  with (stem.parent / f"{stem.name}.png").open("wb") as f:
    fig.savefig(f, format="png", dpi=120)
  with (stem.parent / f"{stem.name}.pdf").open("wb") as f:
    fig.savefig(f, format="pdf", metadata={"CreationDate": None})  # no timestamp: regenerating gives the same bytes


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
  fig.tight_layout()
  _save(fig, stem)
  plt.close(fig)


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
  fig.tight_layout()
  _save(fig, stem)
  plt.close(fig)


def _value_ticks(ax, values: list) -> None:
  """Ticks on a log x axis at exactly the swept values, labelled plainly (8, 32, 128)."""
  ax.set_xticks(values, [f"{v:g}" for v in values])
  ax.set_xticks([], minor=True)


def plot_width(stem: epath.Path, part: Part) -> None:
  """The LoRA/full optimal-LR ratio against width (log-log), and each method's lr* against width with its fitted
  power-law exponent beside the cookbook rule's."""
  plt = _pyplot()
  fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
  cmap = plt.get_cmap("viridis")
  several = len(part.plot) > 1
  key = part.plot[0][1]
  for i, (rest, _, ratios, optima, slopes) in enumerate(part.plot):
    prefix = f"{rest}: " if several else ""
    for j, (name, by_width) in enumerate(ratios.items()):
      color = cmap(j / max(1, len(ratios) - 1) * 0.9)
      shown = [(w, r, lo, hi) for w, (r, lo, hi, interior) in by_width.items() if interior]
      if not shown:
        continue
      w, r, lo, hi = map(np.asarray, zip(*shown))
      yerr = np.maximum([np.where(np.isfinite(lo), r - lo, 0.0), np.where(np.isfinite(hi), hi - r, 0.0)], 0.0)
      left.errorbar(w, r, yerr=yerr, marker="o", capsize=2, color=color, label=prefix + name)
    for j, (name, by_width) in enumerate(optima.items()):
      if not by_width:
        continue
      color = "black" if name == "full" else cmap((j - 1) / max(1, len(optima) - 2) * 0.9)
      w, lr = np.asarray(list(by_width)), np.asarray(list(by_width.values()))
      label = f"{prefix}{name} (fitted exponent {_slope(slopes[name], len(w))})"
      right.plot(w, lr, marker="o", linestyle="none", color=color, label=label)
      if not math.isnan(slopes[name]):
        x = np.geomspace(w.min(), w.max(), 20)
        right.plot(x, np.exp(np.polyval(np.polyfit(np.log(w), np.log(lr), 1), np.log(x))), linewidth=1,
                   color=color)
  left.axhline(analysis.RATIO_STUDY, color="gray", linestyle=":", label=f"the study's {analysis.RATIO_STUDY:g}")
  left.axhline(1.0, color="gray", linewidth=1)
  shown = [v for _, _, ratios, _, _ in part.plot for by_width in ratios.values()
           for r, lo, hi, interior in by_width.values() if interior for v in (r, lo, hi) if 0 < v < math.inf]
  left.set_yscale("log")
  left.set_ylim(min(shown + [1.0]) / 2, max(shown + [analysis.RATIO_STUDY]) * 2)  # never a degenerate range
  _finish_axes(left, key, "lr*(LoRA) / lr*(full)", "optimal-LR ratio vs width (interior optima)")
  right.set_yscale("log")
  cookbook = ", ".join(f"{v:g} ({arch})" for arch, v in COOKBOOK_EXPONENTS.items())
  _finish_axes(right, key, "fitted optimal LR", f"optimal LR vs width (cookbook exponent: {cookbook})")
  widths = sorted({w for _, _, ratios, optima, _ in part.plot for by_width in (*ratios.values(), *optima.values())
                   for w in by_width})
  for ax in (left, right):
    _value_ticks(ax, widths)
  fig.tight_layout()
  _save(fig, stem)
  plt.close(fig)


def plot_batch(stem: epath.Path, part: Part) -> None:
  """Best-LR final NLL against batch size per condition, and LoRA's gap to full FT against batch size."""
  plt = _pyplot()
  fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
  cmap = plt.get_cmap("viridis")
  names = list(dict.fromkeys(name for _, name, _, _ in part.plot if name != "full"))
  several = len({rest for rest, *_ in part.plot}) > 1
  for rest, name, means, gaps in part.plot:
    color = "black" if name == "full" else cmap(names.index(name) / max(1, len(names) - 1) * 0.9)
    label = f"{rest}: {name}" if several else name
    left.plot(list(means), list(means.values()), marker="o", color=color, label=label)
    if gaps:
      right.plot(list(gaps), list(gaps.values()), marker="o", color=color, label=label)
  right.axhline(0.0, color="gray", linewidth=1)
  _finish_axes(left, "batch size", "final eval NLL at the best grid LR", "loss vs batch size (seed means)")
  _finish_axes(right, "batch size", "LoRA − full FT", "gap to full FT vs batch size")
  batches = sorted({b for _, _, means, _ in part.plot for b in means})
  for ax in (left, right):
    _value_ticks(ax, batches)
  fig.tight_layout()
  _save(fig, stem)
  plt.close(fig)


LAYER_COLORS = {"attention": "tab:orange", "mlp": "tab:blue", "all": "tab:green"}


def plot_layers(stem: epath.Path, part: Part) -> None:
  """Final eval NLL against LR (seed means) per condition, coloured by the adapted layers; one panel per setting."""
  plt = _pyplot()
  fig, axes = plt.subplots(1, len(part.plot), figsize=(5.5 * len(part.plot), 4.2), squeeze=False)
  for ax, (scope, by) in zip(axes[0], part.plot):
    ranks = sorted({r for _, _, r in by})
    for (kind, unembed, rank), c in sorted(by.items(), key=lambda kv: _condition_order(kv[1])):
      if c.usable:
        ax.plot(c.usable, c.means(), marker="s" if unembed else "o", markersize=3, color=LAYER_COLORS[kind],
                linestyle=("-", "--", ":", "-.")[ranks.index(rank) % 4], label=c.name)
    _finish_axes(ax, "learning rate", "final eval NLL per loss token",
                 _prefix(scope) + "loss vs LR by adapted layers")
  fig.tight_layout()
  _save(fig, stem)
  plt.close(fig)


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
  fig.tight_layout()
  _save(fig, stem)
  plt.close(fig)


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
  fig.tight_layout()
  _save(fig, stem)
  plt.close(fig)


FIGURES = {"3w": ("lr_ratio_vs_width", plot_width), "5": ("batch_size", plot_batch), "6": ("layers", plot_layers),
           "4c": ("early_curves", plot_early), "9": ("ba_norms", plot_ba)}


# -- The report --------------------------------------------------------------------------------------------------------

def _provenance(sweep_dir: epath.Path, meta: dict, runs: list[SweepRun]) -> list[str]:
  """How the report and the sweep were made, and the code the runs ran."""
  argv = meta.get("argv")  # experiments.sweep records its command line; sys.executable shown as "python"
  if argv:
    argv = ["python", *argv[1:]] if epath.Path(argv[0]).name.startswith("python") else argv
    sweep = f"`{shlex.join(argv)}`"
  else:
    sweep = (f"`python -m experiments.sweep --config {meta['config']}:{meta['arg']} --workdir {sweep_dir}` "
             "(reconstructed from sweep.json)")
  if meta.get("git_commit"):
    sweep += f", started at commit `{meta['git_commit']}`" + (" with uncommitted changes" if meta.get("git_dirty")
                                                              else "")
  if meta.get("started"):
    sweep += f" on {meta['started']}"
  commits, unknown = {}, 0
  for name in dict.fromkeys(p["name"] for p in meta["points"]):
    info = _read_json(sweep_dir / name / "run_info.json")
    if info is None:
      unknown += 1
      continue
    key = provenance.describe(info, quote="`")
    commits[key] = commits.get(key, 0) + 1
  code = "; ".join(f"{k}: {n} point{'s' * (n != 1)}" for k, n in sorted(commits.items()))
  if unknown:
    code += ("; " if code else "") + f"{unknown} point{'s' * (unknown != 1)} without run_info.json"
  return [f"Made by `python -m experiments.report {sweep_dir}` from the sweep's files alone (rerun it to regenerate: "
          "the same files give the same bytes).", f"Sweep: {sweep}.", f"Code of the runs: {code}."]


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
  fig.tight_layout()
  _save(fig, stem)
  plt.close(fig)


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
  fig.tight_layout()
  _save(fig, stem)
  plt.close(fig)


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


def main(argv: list[str]) -> None:
  if not argv:
    raise SystemExit("usage: python -m experiments.report WORKDIR|SWEEPDIR [...]")
  for workdir in argv:
    if (epath.Path(workdir) / SWEEP_FILE).exists():
      text = write_sweep(workdir)
      print(text[text.index("## vs the study"):] if "## vs the study" in text else text)
      print(f"wrote {epath.Path(workdir) / 'report.md'}, results.csv, figures/ and tables/")
    else:
      print(write(workdir)[0])
      print(f"wrote {epath.Path(workdir) / 'report.md'} and report.png")


if __name__ == "__main__":
  main(sys.argv[1:])
