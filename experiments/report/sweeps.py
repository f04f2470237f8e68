"""A sweep's files: its points' configs and metrics as ``SweepRun`` s, ``results.csv`` rows, and the conditions (method
x rank x targets x setting) with their LR grids and optima."""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import re
import shlex
import zlib

import numpy as np
from etils import epath

from experiments import analysis, provenance
from lora_jax import metrics


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
    """The LR this run trained at (``experiments.run.make_optim``'s rule)."""
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
