"""Held-out evaluation of finished runs, a whole sweep at once: every LoRA run's adapters stacked over one base
(``lora.stack_adapters``, ranks zero-padded) and each eval batch repeated once per run, copy r answered by run r
(``stack.make_eval_runs``); full fine-tuning runs (each its own weights) one after another.

    python -m experiments.evaluate --sweep runs/lr_sweep                  # every point of a sweep
    python -m experiments.evaluate runs/a runs/b ... [--out eval.csv] [--runs-per-batch 16]

A run is ``WORKDIR/METHOD`` of an ``experiments.main`` / ``experiments.stacked`` workdir (its ``config.json`` says
the base and the held-out set; its newest checkpoint holds the adapters). Runs are grouped by base and held-out set;
within a group, ``--runs-per-batch`` LoRA runs share one program. Writes a CSV (default ``DIR/heldout_eval.csv``
for a sweep, else ``heldout_eval.csv``): workdir, method, rank, lr, seed, step, eval_nll (computed now), logged_nll
(the eval/nll its metrics.jsonl recorded at that step) and their difference, and prints the table.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
import time
from collections.abc import Sequence

import jax
import ml_collections
import numpy as np
from etils import epath

from experiments import run as run_lib
from experiments import tiny_base
from lora_jax import checkpoint, lora, metrics, model_lora, stack, train
from lora_jax.models import transformer

FIELDS = ("workdir", "method", "rank", "lr", "seed", "step", "eval_nll", "logged_nll", "difference")


def find_runs(paths: Sequence[str], sweep: str | None) -> list[epath.Path]:
  """The run directories (``WORKDIR/METHOD`` holding checkpoints) of the given workdirs, or of a sweep's points."""
  workdirs = [epath.Path(p) for p in paths]
  for w in workdirs:
    if not (w / "config.json").exists():
      raise SystemExit(f"{w}: no config.json (expected a workdir written by experiments.main or experiments.stacked)")
  if sweep:
    root = epath.Path(sweep)
    if not (root / "sweep.json").exists():
      raise SystemExit(f"{root}: no sweep.json (expected a directory written by experiments.sweep)")
    points = [root / p["name"] for p in json.loads((root / "sweep.json").read_text())["points"]]
    started = [w for w in points if (w / "config.json").exists()]
    if len(started) < len(points):
      print(f"{root}: {len(points) - len(started)} of {len(points)} points never started; skipped", flush=True)
    workdirs += started
  runs = []
  for w in workdirs:
    found = sorted(d for d in w.iterdir() if (d / "checkpoints").exists())
    if not found:
      print(f"{w}: no finished run (no METHOD/checkpoints); skipped", flush=True)
    runs += found
  if not runs:
    raise SystemExit("no finished runs to evaluate")
  return runs


def _config(run: epath.Path) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(json.loads((run.parent / "config.json").read_text()))


def _group_key(config: ml_collections.ConfigDict) -> str:
  """What runs evaluated together must share: the base model and the held-out set."""
  return json.dumps({"model": config.model.name, "tiny_base": config.get("tiny_base"), "data": config.data.to_dict(),
                     "eval_seed": config.eval_seed}, sort_keys=True, default=str)


def _logged(run: epath.Path, step: int) -> float:
  nll = [r["eval/nll"] for r in metrics.read_metrics(run) if r.get("step") == step and "eval/nll" in r]
  return nll[-1] if nll else float("nan")


def _row(run: epath.Path, config, record: dict, step: int, nll: float) -> dict:
  spec = record.get("lora_spec") or {}
  logged = _logged(run, step)
  return {"workdir": str(run.parent), "method": run.name, "rank": spec.get("rank", "") if run.name == "lora" else "",
          "lr": config.optim.lr, "seed": config.seed, "step": step, "eval_nll": nll, "logged_nll": logged,
          "difference": nll - logged}


def evaluate_group(runs: list[epath.Path], runs_per_batch: int) -> list[dict]:
  """Rows of one group of runs (one base, one held-out set): LoRA runs ``runs_per_batch`` at a time in one program,
  full fine-tuning runs one by one."""
  config = _config(runs[0])
  model_dir = tiny_base.pretrained(config.tiny_base) if config.model.name == "tiny" else config.model.name
  from transformers import AutoTokenizer

  _, evals = run_lib.load_data(config, AutoTokenizer.from_pretrained(str(model_dir)))
  opened = [checkpoint.open_run(r) for r in runs]
  try:
    record = opened[0].record
    model_config, params = checkpoint.load_run_base(runs[0], record)
    model = transformer.CausalLM(model_config)
    layouts = model_lora.layouts(model_config)
    for run, o in zip(runs, opened):
      if o.record.get("base_fingerprint") != record["base_fingerprint"]:
        raise SystemExit(f"{run} was trained on another base ({o.record.get('base_model')}) than {runs[0]} "
                         f"({record['base_model']}); evaluate them in separate calls")
    trained = [checkpoint.restore_trained(o, params, layouts) for o in opened]
  finally:
    for o in opened:
      o.checkpointer.close()
  rows = [None] * len(runs)
  lora_runs = [i for i, (_, adapters) in enumerate(trained) if lora.adapter_items(adapters)]
  for start in range(0, len(lora_runs), runs_per_batch):
    part = lora_runs[start:start + runs_per_batch]
    t0 = time.perf_counter()
    eval_runs = stack.make_eval_runs(model, len(part))
    stacked = lora.stack_adapters([trained[i][1] for i in part])
    totals, counts = np.zeros(len(part)), np.zeros(len(part))
    for batch in evals:
      t, c = eval_runs(params, stacked, batch)
      totals, counts = totals + np.asarray(t, np.float64), counts + np.asarray(c, np.float64)
    for j, i in enumerate(part):
      rows[i] = _row(runs[i], _config(runs[i]), opened[i].record, opened[i].step, totals[j] / counts[j])
    print(f"{len(part)} LoRA run(s) in one batch: {time.perf_counter() - t0:.1f} s", flush=True)
  eval_step = jax.jit(train.make_eval_step(model))
  for i in (i for i in range(len(runs)) if rows[i] is None):
    full_params, adapters = trained[i]
    trainable, frozen = lora.split(full_params, adapters, lora.LoraSpec.full())
    state = train.TrainState(step=0, trainable=trainable, frozen=frozen, opt_state=None, rng=None)
    nll = train.evaluate(eval_step, state, evals)["eval/nll"]
    rows[i] = _row(runs[i], _config(runs[i]), opened[i].record, opened[i].step, nll)
  return rows


def run(paths: Sequence[str], sweep: str | None = None, out: str | None = None, runs_per_batch: int = 16) -> list:
  """Evaluates the runs (module docstring), writes the CSV and returns its rows."""
  runs = find_runs(paths, sweep)
  groups: dict[str, list[epath.Path]] = {}
  for r in runs:
    groups.setdefault(_group_key(_config(r)), []).append(r)
  rows = [row for group in groups.values() for row in evaluate_group(group, runs_per_batch)]
  path = epath.Path(out or (epath.Path(sweep) / "heldout_eval.csv" if sweep else "heldout_eval.csv"))
  with path.open("w") as f:
    writer = csv.DictWriter(f, fieldnames=FIELDS)
    writer.writeheader()
    writer.writerows(rows)
  print(f"\n| workdir | method | rank | lr | seed | step | eval NLL | logged | difference |\n|{'---|' * 9}")
  for r in rows:
    print(f"| {epath.Path(r['workdir']).name} | {r['method']} | {r['rank']} | {r['lr']:g} | {r['seed']} | {r['step']} "
          f"| {r['eval_nll']:.5f} | {r['logged_nll']:.5f} | {r['difference']:+.2e} |")
  worst = max((abs(r["difference"]) for r in rows if math.isfinite(r["difference"])), default=float("nan"))
  print(f"wrote {path}: {len(rows)} run(s); largest |eval NLL - logged| {worst:.2e}", flush=True)
  return rows


def main(argv: Sequence[str] | None = None) -> int:
  """The command line (module docstring)."""
  p = argparse.ArgumentParser(prog="python -m experiments.evaluate", description=__doc__.splitlines()[0])
  p.add_argument("workdirs", nargs="*", help="workdirs of finished runs")
  p.add_argument("--sweep", help="a sweep directory (experiments.sweep): all its points")
  p.add_argument("--out", help="CSV to write (default DIR/heldout_eval.csv for a sweep, else heldout_eval.csv)")
  p.add_argument("--runs-per-batch", type=int, default=16, help="LoRA runs per program (default 16)")
  args = p.parse_args(argv)
  if not args.workdirs and not args.sweep:
    p.error("give workdirs or --sweep DIR")
  if args.runs_per_batch < 1:
    p.error(f"--runs-per-batch must be >= 1, got {args.runs_per_batch}")
  run(args.workdirs, args.sweep, args.out, args.runs_per_batch)
  return 0


if __name__ == "__main__":
  sys.exit(main())
