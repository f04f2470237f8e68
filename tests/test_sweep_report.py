"""The sweep report (``python -m experiments.report SWEEPDIR``) on a fake sweep with a known answer: no training.

Full FT's optimum is 1e-3 and LoRA's 1e-2 at both ranks (ratio 10); rank 16 matches full FT's final NLL and rank 4
stays 0.3 nats behind. Every seed shifts a run's NLL by the same amount at every LR, plus a little noise per run.
"""

import csv
import json
import math
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from experiments import analysis, report
from experiments.configs import finetune

STEPS, EVAL_EVERY, LOG_EVERY, TOKENS = 200, 50, 10, 120  # TOKENS: loss tokens of every step
FULL_LRS = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2)
LORA_LRS = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1)
SEEDS = (0, 1, 2)
TRUTH = {"full": (1e-3, 1.0), 4: (1e-2, 1.3), 16: (1e-2, 1.0)}  # condition -> (optimal LR, NLL there)
CURVATURE, BASE_NLL = 0.5, 3.0


def final_nll(key, lr: float, seed: int) -> float:
  """The known U-curve, a seed offset shared by all LRs, and per-run noise of ~0.002."""
  best_lr, floor = TRUTH[key]
  noise = np.random.default_rng([seed, int(round(-100 * math.log10(lr))), 0 if key == "full" else key]).normal(0, 0.002)
  return floor + CURVATURE * (math.log10(lr) - math.log10(best_lr)) ** 2 + (0.0, 0.01, -0.01)[seed] + noise


def write_run(point_dir, arg: str, seed: int, lr: float, key, last_step: int = STEPS, state: str | None = None,
              batch_size: int = 16):
  """One point's workdir as experiments.main leaves it, with the known curve of ``final_nll``."""
  config = finetune.get_config(arg)
  config.seed = config.data_seed = seed
  config.data.batch_size = batch_size
  config.train.steps, config.train.eval_every, config.train.log_every = STEPS, EVAL_EVERY, LOG_EVERY
  point_dir.mkdir(parents=True)
  (point_dir / "config.json").write_text(config.to_json_best_effort(indent=2, sort_keys=True) + "\n")
  (point_dir / "run_info.json").write_text(json.dumps({"git_commit": "abc123", "git_dirty": False}))
  if state:
    (point_dir / "status.json").write_text(json.dumps({"state": state}))
  final = final_nll(key, lr, seed)
  records = []
  for step in range(0, last_step + 1):
    nll = BASE_NLL + (final - BASE_NLL) * (1 - math.exp(-step / 50)) / (1 - math.exp(-STEPS / 50))
    if step and step % LOG_EVERY == 0:
      records.append({"step": step, "train/loss": nll + 0.05, "train/tokens": TOKENS, "train/lr": lr,
                      "params/trainable": 100})
    if step % EVAL_EVERY == 0:
      records.append({"step": step, "eval/nll": nll, "eval/perplexity": math.exp(nll)})
  method = config.methods[0]
  (point_dir / method).mkdir()
  (point_dir / method / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def make_sweep(root):
  """The fake sweep: 3 conditions x 5 LRs x 3 seeds, one failed point (full FT at 3e-2) and one never started."""
  points = []
  def add(arg, name):
    points.append({"point": arg, "name": name})
    return root / name
  for seed in SEEDS:
    for lr in FULL_LRS:
      arg = f"tiny,method=full,lr={lr:g}"
      write_run(add(f"{arg},seed={seed}", f"full_lr{lr:g}_s{seed}"), arg, seed, lr, "full", state="done")
    for rank in (4, 16):
      for lr in LORA_LRS:
        arg = f"tiny,method=lora,rank={rank},lr={lr:g}"
        write_run(add(f"{arg},seed={seed}", f"lora{rank}_lr{lr:g}_s{seed}"), arg, seed, lr, rank)
  write_run(add("tiny,method=full,lr=0.03,seed=0", "full_lr0.03_s0"), "tiny,method=full,lr=0.03", 0, 3e-2, "full",
            last_step=30, state="failed")
  add("tiny,method=lora,rank=16,lr=0.3,seed=0", "lora16_lr0.3_s0")  # never started: no directory at all
  (root / "sweep.json").write_text(json.dumps({  # as experiments.sweep writes it
      "config": "experiments/configs/lr_sweep.py", "arg": "quick", "overrides": [], "points": points,
      "argv": ["/venv/bin/python3", "-m", "experiments.sweep", "--config", "experiments/configs/lr_sweep.py:quick",
               "--workdir", "runs/x"], "git_commit": "abc123", "git_dirty": True, "started": "2026-11-02T10:00:00"}))
  return root


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
  root = make_sweep(tmp_path_factory.mktemp("sweep"))
  text = report.write_sweep(root)
  return root, text


def _table_rows(text: str, heading: str) -> dict[str, list[str]]:
  """The rows of the Markdown table after ``heading``, by their first cell."""
  block = text[text.index(heading):].split("\n\n")[1]
  return {cells[0]: cells[1:] for cells in
          ([c.strip() for c in line.strip("|").split("|")] for line in block.splitlines()[2:])}


def test_results_csv_has_one_row_per_run_and_eval_step(sweep):
  root, _ = sweep
  with open(root / "results.csv") as f:
    rows = list(csv.DictReader(f))
  assert tuple(rows[0]) == report.CSV_COLUMNS
  finished_runs = len(SEEDS) * (len(FULL_LRS) + 2 * len(LORA_LRS))
  evals = STEPS // EVAL_EVERY + 1
  assert len(rows) == finished_runs * evals + 1 + 1  # + the failed run's step-0 eval + the never-started point
  row = next(r for r in rows if r["point"] == "tiny,method=lora,rank=4,lr=0.01,seed=1" and r["step"] == "100")
  assert row["family"] == "lr_sweep" and row["method"] == "lora" and row["rank"] == "4" and row["lr"] == "0.01"
  assert row["seed"] == row["data_seed"] == "1" and row["batch_size"] == "16" and row["finished"] == "True"
  assert row["targets"] == "all-linear+unembed" and row["scaling"] == "alpha/r"
  assert row["tokens"] == str(100 * TOKENS)  # cumulative loss tokens
  assert float(row["train_loss"]) == pytest.approx(float(row["eval_nll"]) + 0.05)
  last = next(r for r in rows if r["point"] == "tiny,method=full,lr=0.001,seed=2" and r["step"] == str(STEPS))
  assert last["rank"] == last["targets"] == last["scaling"] == "" and last["state"] == "done"
  assert float(last["eval_nll"]) == pytest.approx(final_nll("full", 1e-3, 2))
  failed = [r for r in rows if r["point"] == "tiny,method=full,lr=0.03,seed=0"]
  assert [(r["step"], r["finished"], r["state"]) for r in failed] == [("0", "False", "failed")]
  never = [r for r in rows if r["point"] == "tiny,method=lora,rank=16,lr=0.3,seed=0"]
  assert [(r["method"], r["step"], r["state"]) for r in never] == [("", "", "not started")]


def test_report_recovers_the_known_optima_and_ratio(sweep):
  root, text = sweep
  optima = _table_rows(text, "**Optimal LR")
  for name, truth in (("full", 1e-3), ("lora r=4", 1e-2), ("lora r=16", 1e-2)):
    best, fitted, interval, fit, seeds = optima[name]
    assert float(best) == truth and fit.startswith("interior") and seeds == "3"
    assert float(fitted) == pytest.approx(truth, rel=0.05)
    lo, hi = map(float, interval.strip("[]").split(","))
    assert lo < truth < hi and hi / lo < 1.6
  ratios = _table_rows(text, "**LoRA/full optimal-LR ratio")
  for name in ("lora r=4", "lora r=16"):
    ratio, interval, verdict = ratios[name]
    assert float(ratio) == pytest.approx(10, rel=0.08) and verdict == "agree"
  final = _table_rows(text, "**Final eval NLL")
  assert final["full"][2].startswith(f"{np.mean([final_nll('full', 1e-3, s) for s in SEEDS]):.4f} ± ")
  assert final["full"][5] == "1 failed"  # the LR 3e-2 column: only the failed run
  assert "## Seed noise" in text and "## Figures" in text


def test_report_gives_the_verdicts_with_their_rules(sweep):
  _, text = sweep
  study = text[text.index("## vs the study"):]
  for finding, verdict in ((3, "agree"), (4, "agree"), (1, "agree"), (2, "agree")):
    section = study[study.index(f"### Finding {finding}:"):].split("### Finding")[1]
    assert f"**{verdict}**" in section and "**disagree**" not in section
  for rule in (analysis.RULE_RATIO, analysis.RULE_RANK, analysis.RULE_GAP, analysis.RULE_MATCH,
               analysis.RULE_CAPACITY):
    assert rule in study
  assert "r4 behind" in study and "r16 matches" in study
  assert "Study: ~10 (fit over 14 models: 9.8" in study


def test_figures_tables_and_provenance(sweep):
  root, text = sweep
  for name in ("lr_curves", "learning_curves"):
    assert (root / "figures" / f"{name}.png").stat().st_size > 10_000
    assert (root / "figures" / f"{name}.pdf").read_bytes().startswith(b"%PDF")
    assert f"figures/{name}.png" in text
  for name in ("final_nll", "min_nll", "optimal_lr", "lr_ratio", "seed_noise", "vs_study"):
    tex = (root / "tables" / f"{name}.tex").read_text()
    assert r"\toprule" in tex and r"\bottomrule" in tex and f"tables/{name}.tex" in text or name == "vs_study"
    assert "±" not in tex and "∞" not in tex
  assert r"$\pm$" in (root / "tables" / "final_nll.tex").read_text()
  assert f"python -m experiments.report {root}" in text
  assert ("Sweep: `python -m experiments.sweep --config experiments/configs/lr_sweep.py:quick --workdir runs/x`, "
          "started at commit `abc123` with uncommitted changes on 2026-11-02T10:00:00.") in text
  assert "`abc123`: 46 points; 1 point without run_info.json" in text
  assert "1 failed" in text and "`full_lr0.03_s0/full`" in text and "`lora16_lr0.3_s0`" in text


def test_the_command_line_regenerates_identical_files(sweep):
  root, _ = sweep
  before = {n: (root / n).read_bytes() for n in ("report.md", "results.csv", "figures/lr_curves.pdf",
                                                 "tables/optimal_lr.tex")}
  out = subprocess.run([sys.executable, "-m", "experiments.report", str(root)], capture_output=True, text=True,
                       check=True, cwd=pathlib.Path(__file__).parents[1]).stdout
  assert "## vs the study" in out
  for name, data in before.items():
    assert (root / name).read_bytes() == data, name


def write_points(root, specs, arg="tiny"):
  """A sweep of (method arg, key, LRs, seeds, batch size) specs; returns report.md's text."""
  points = []
  for method, key, lrs, seeds, batch_size in specs:
    for seed in seeds:
      for lr in lrs:
        arg_ = f"tiny,method={method},lr={lr:g}"
        name = f"{method}_{lr:g}_s{seed}_b{batch_size}".replace(",", "_").replace("=", "")
        points.append({"point": f"{arg_},seed={seed},batch_size={batch_size}", "name": name})
        write_run(root / name, arg_, seed, lr, key, batch_size=batch_size)
  return points


def test_edge_minimum_claims_no_optimum_and_is_inconclusive(tmp_path):
  """A LoRA grid that stops at its optimum (the next LR failed): no optimum claimed, finding 3 inconclusive."""
  points = write_points(tmp_path, [("full", "full", FULL_LRS, (0, 1), 16),
                                   ("lora,rank=16", 16, LORA_LRS[:3], (0, 1), 16)])
  write_run(tmp_path / "diverged", "tiny,method=lora,rank=16,lr=0.03", 0, 3e-2, 16, last_step=20, state="failed")
  points.append({"point": "tiny,method=lora,rank=16,lr=0.03,seed=0", "name": "diverged"})
  (tmp_path / "sweep.json").write_text(json.dumps({"config": "experiments/configs/lr_sweep.py", "arg": "tiny",
                                                   "points": points}))
  text = report.write_sweep(tmp_path)
  best, fitted, interval, fit, _ = _table_rows(text, "**Optimal LR")["lora r=16"]
  assert float(best) == 1e-2 and fitted == "— (edge)" and interval == "—"
  assert fit == "edge: highest LR with a result (the LRs past it failed)"
  section = text[text.index("### Finding 3:"):text.index("### Finding 4:")]
  assert "| lora r=16 | — (edge) | **inconclusive** | an optimum is at the grid edge |" in section
  for finding in (1, 2, 4):  # a best LR at the edge: the gap is unknown; one rank: finding 4 untestable
    section = text[text.index(f"### Finding {finding}:"):].split("### Finding")[1]
    assert "**inconclusive**" in section


def test_a_sweep_over_batch_sizes_is_analysed_per_setting(tmp_path):
  points = []
  for batch_size in (8, 32):
    points += write_points(tmp_path, [("full", "full", FULL_LRS[1:4], (0, 1), batch_size),
                                      ("lora,rank=16", 16, LORA_LRS[1:4], (0, 1), batch_size)])
  (tmp_path / "sweep.json").write_text(json.dumps({"config": "experiments/configs/batch_size.py", "arg": "tiny",
                                                   "points": points}))
  text = report.write_sweep(tmp_path)
  assert "Settings (fields that vary over the sweep besides method, LoRA spec, LR and seeds): " \
         "`data.batch_size=8`; `data.batch_size=32`" in text
  assert "| setting | condition | best grid LR |" in text
  for batch_size in (8, 32):
    assert f"| data.batch_size={batch_size} | lora r=16 | 1e-2 | " in text
    finding3 = [l for l in text.splitlines() if l.startswith(f"| data.batch_size={batch_size}, lora r=16 |")]
    assert len(finding3) == 1 and "| **agree** |" in finding3[0]  # finding 3 per setting
  assert r"data.batch\_size=8" in (tmp_path / "tables" / "optimal_lr.tex").read_text()
  with open(tmp_path / "results.csv") as f:
    assert {r["batch_size"] for r in csv.DictReader(f)} == {"8", "32"}
