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


def make_config(arg: str, seed: int, **fields):
  """``finetune``'s config for ``arg`` with the fake sweep's seed, steps and logging, and ``fields`` set by dotted
  keys with "__" for "." (``data__batch_size=8``)."""
  config = finetune.get_config(arg)
  config.seed = config.data_seed = seed
  config.train.steps, config.train.eval_every, config.train.log_every = STEPS, EVAL_EVERY, LOG_EVERY
  for key, value in fields.items():
    *path, name = key.split("__")
    node = config
    for part in path:
      node = node[part]
    node[name] = value
  return config


def write_config_run(point_dir, config, final: float, last_step: int | None = None, state: str | None = None,
                     loss_at=None, diagnostics=None, trainable: int = 100, rate: float = 4.0):
  """One point's workdir as experiments.main leaves it: eval NLL falling from BASE_NLL to ``final`` at the config's
  last step; train loss ``loss_at(step)`` (default: that NLL + 0.05) every ``log_every`` steps; with
  ``diagnostics(step) -> modules``, a lora_diagnostics.jsonl record at every evaluation."""
  steps, eval_every, log_every = config.train.steps, config.train.eval_every, config.train.log_every
  last_step = steps if last_step is None else last_step  # eval NLL approaches ``final`` as 1 - exp(-rate * t)
  point_dir.mkdir(parents=True)
  (point_dir / "config.json").write_text(config.to_json_best_effort(indent=2, sort_keys=True) + "\n")
  (point_dir / "run_info.json").write_text(json.dumps({"git_commit": "abc123", "git_dirty": False}))
  if state:
    (point_dir / "status.json").write_text(json.dumps({"state": state}))
  records, diag = [], []
  for step in range(0, last_step + 1):
    nll = BASE_NLL + (final - BASE_NLL) * (1 - math.exp(-rate * step / steps)) / (1 - math.exp(-rate))
    if step and (step % log_every == 0 or step == steps):
      records.append({"step": step, "train/loss": loss_at(step) if loss_at else nll + 0.05, "train/tokens": TOKENS,
                      "train/lr": config.optim.lr, "params/trainable": trainable})
    if step % eval_every == 0 or step == steps:
      records.append({"step": step, "eval/nll": nll, "eval/perplexity": math.exp(nll)})
      if diagnostics:
        diag.append({"step": step, "modules": diagnostics(step)})
  method = config.methods[0]
  (point_dir / method).mkdir()
  (point_dir / method / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
  if diag:
    (point_dir / method / "lora_diagnostics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in diag))


def write_run(point_dir, arg: str, seed: int, lr: float, key, last_step: int = STEPS, state: str | None = None,
              batch_size: int = 16):
  """One point's workdir with the known curve of ``final_nll``."""
  config = make_config(arg, seed, data__batch_size=batch_size)
  write_config_run(point_dir, config, final_nll(key, lr, seed), last_step=last_step, state=state)


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
  assert fit == "next to a diverged or failed LR (above)"
  section = text[text.index("### Finding 3:"):text.index("### Finding 4:")]
  assert "| lora r=16 | — (edge) | **inconclusive** | an optimum is at the grid edge |" in section
  for finding in (1, 2, 4):  # a best LR at the edge: the gap is unknown; one rank: finding 4 untestable
    section = text[text.index(f"### Finding {finding}:"):].split("### Finding")[1]
    assert "**inconclusive**" in section


def test_a_verdict_that_changes_over_the_last_steps_is_unstable(tmp_path):
  """LoRA r16 ends level with full FT but learns slowly (0.3 nats behind at half the steps, 0.08 at 75%): finding 1
  is judged at 50%, 75% and 100% of the steps and comes out unstable; the rank-4 gap, behind throughout, does not."""
  points = []
  for key, arg, best, floor, rate in (("full", "tiny,method=full", 1e-3, 1.0, 4.0),
                                      (4, "tiny,method=lora,rank=4", 1e-2, 1.5, 4.0),
                                      (16, "tiny,method=lora,rank=16", 1e-2, 1.0, 0.5)):
    for lr in lr_grid(best, 1):
      for seed in SEEDS:
        name = f"{key}_{lr:g}_s{seed}"
        write_config_run(tmp_path / name, make_config(f"{arg},lr={lr:g}", seed), u_nll(lr, best, floor, seed),
                         rate=rate)
        points.append({"point": f"{arg},lr={lr:g},seed={seed}", "name": name})
  text = finish_sweep(tmp_path, "lr_sweep", points)
  rows = {(r.finding, r.scope): r for r in report.sweep_verdicts(tmp_path)}
  one = rows[("1", "all")]
  assert one.verdict == analysis.UNSTABLE and one.why.endswith("50% disagree, 75% disagree, 100% agree")
  assert rows[("2", "all")].verdict == analysis.UNSTABLE  # both ranks behind until the end: untested, then agree
  assert rows[("3", "lora r=16")].verdict == analysis.AGREE  # the optima do not move
  assert "| all | r16 +0.0000 [" in section(text, "1") and "**unstable**" in section(text, "1")
  assert analysis.RULE_STABLE in text
  unjudged = [r for r in rows.values() if "stability not judged" in r.why]
  assert not unjudged  # every run was evaluated at 50 and 75% (EVAL_EVERY 50 of 200 steps)


def test_a_sweep_over_batch_sizes_is_analysed_per_setting(tmp_path):
  points = []
  for batch_size in (8, 32):
    points += write_points(tmp_path, [("full", "full", FULL_LRS[1:4], SEEDS, batch_size),
                                      ("lora,rank=16", 16, LORA_LRS[1:4], SEEDS, batch_size)])
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
  # Finding 5: r16 matches full FT at both batch sizes: its gap is shown flat (equivalent), against the study.
  rank_row = next(l for l in section(text, "5").splitlines() if l.startswith("| lora r=16 | gap "))
  assert "| **disagree** | growth +0.0000 [" in rank_row and rank_row.endswith(": matches: flat |")
  assert "| overall | — | **disagree** | lora r=16 flat |" in section(text, "5")
  with open(tmp_path / "results.csv") as f:
    assert {r["batch_size"] for r in csv.DictReader(f)} == {"8", "32"}


# -- Findings judged across settings or LoRA groups: fake sweeps whose answer is known ---------------------------------

def u_nll(lr: float, best_lr: float, floor: float, seed: int = 0) -> float:
  """A U-curve in log10(LR) with its minimum ``floor`` at ``best_lr``, shifted by the seed's offset."""
  return floor + CURVATURE * (math.log10(lr) - math.log10(best_lr)) ** 2 + (0.0, 0.01, -0.01)[seed]


def lr_grid(best: float, half: int) -> list[float]:
  return [float(f"{best * 2.0 ** k:.3g}") for k in range(-half, half + 1)]


def finish_sweep(root, family: str, points: list[dict]) -> str:
  (root / "sweep.json").write_text(json.dumps({"config": f"experiments/configs/{family}.py", "arg": "tiny",
                                               "points": points}))
  return report.write_sweep(root)


def section(text: str, finding: str) -> str:
  """The "vs the study" subsection of a finding."""
  study = text[text.index("## vs the study"):]
  return study[study.index(f"### Finding {finding}:"):].split("\n### ")[0]


def assert_outputs(root, text: str, figure: str, table: str) -> None:
  assert (root / "figures" / f"{figure}.png").stat().st_size > 10_000 and f"figures/{figure}.png" in text
  assert (root / "figures" / f"{figure}.pdf").read_bytes().startswith(b"%PDF")
  tex = (root / "tables" / f"{table}.tex").read_text()
  assert r"\toprule" in tex and f"tables/{table}.tex" in text and tex.isascii()
  assert (root / "tables" / "vs_study.tex").read_text().isascii()


def test_a_plain_lr_sweep_does_not_test_the_other_findings(sweep):
  root, text = sweep
  for finding in ("3w", "4c", "5", "6", "9"):
    assert "Not tested by this sweep (it needs " in section(text, finding)
    figure = f"figures/{report.FIGURES[finding][0]}.png"
    assert figure not in text and not (root / figure).exists()
  for heading, _ in report.SECTIONS.values():
    assert f"## {heading}\n" not in text


COOKBOOK = 0.781  # lr* ∝ (1 / width)^this for Llama


def test_width_sweep_with_a_constant_ratio_agrees(tmp_path):
  """Both optima fall as width^-0.781 (the cookbook rule) and LoRA's is 10x full FT's at every width; one seed."""
  points = []
  for width in (64, 128, 256):
    for method, arg, centre in (("full", "tiny,method=full", 1e-3), ("lora", "tiny,method=lora,rank=4", 1e-2)):
      best = centre * (128 / width) ** COOKBOOK
      for lr in lr_grid(best, 2):
        name = f"w{width}_{method}_{lr:g}"
        config = make_config(f"{arg},lr={lr:g}", 0, tiny_base__hidden_size=width,
                             tiny_base__intermediate_size=3 * width)
        write_config_run(tmp_path / name, config, u_nll(lr, best, 1.0))
        points.append({"point": f"{arg},hidden={width},lr={lr:g}", "name": name})
  text = finish_sweep(tmp_path, "lr_width", points)
  rows = _table_rows(text, "**LoRA/full optimal-LR ratio across widths")
  assert set(rows) == {"64", "128", "256"}
  for width, row in rows.items():
    assert row[0] == "lora r=4" and float(row[3]) == pytest.approx(10, rel=1e-3) and row[4] == "—"  # no seeds
    assert float(row[1]) == pytest.approx(1e-3 * (128 / int(width)) ** COOKBOOK, rel=0.01)
  finding = section(text, "3w")
  assert "| lora r=4 | 64: 10, 128: 10, 256: 10 | **agree** | max/min 1 (" in finding
  assert "full -0.781 (3 widths), lora r=4 -0.781 (3 widths); the cookbook rule's: -0.781 (llama)" in finding
  assert analysis.RULE_WIDTH in finding
  assert_outputs(tmp_path, text, "lr_ratio_vs_width", "lr_ratio_width")


def batch_cell(tmp_path, batch, steps, tag, where, conditions):
  """Writes one (batch, steps) cell of a batch sweep: each (name, arg, best LR, floor) condition over lr_grid(best, 1)
  and SEEDS; returns its sweep.json points."""
  points = []
  for method, arg, best, floor in conditions:
    for lr in lr_grid(best, 1):
      for seed in SEEDS:
        name = f"{tag}_{method}_{lr:g}_s{seed}"
        config = make_config(f"{arg},lr={lr:g}", seed, data__batch_size=batch, train__steps=steps)
        write_config_run(tmp_path / name, config, u_nll(lr, best, floor, seed))
        points.append({"point": f"{arg},{where},lr={lr:g},seed={seed}", "name": name})
  return points


BATCHES = {4: 400, 16: 200, 64: 100}  # batch size -> steps (the steps follow the batch, as in a fixed-data sweep)


@pytest.mark.slow
def test_batch_sweep_with_a_growing_gap_agrees_and_regenerates(tmp_path):
  """LoRA r4 and r16 fall further behind full FT as the batch grows; every condition does best at batch 4."""
  gaps = {4: {4: 0.02, 16: 0.01}, 16: {4: 0.12, 16: 0.11}, 64: {4: 0.32, 16: 0.31}}
  points = []
  for batch, steps in BATCHES.items():
    full_floor = 1.0 + 0.01 * math.log2(batch / 4)
    points += batch_cell(tmp_path, batch, steps, f"b{batch}", f"batch={batch}", [
        ("full", "tiny,method=full", 1e-3, full_floor),
        *((f"r{r}", f"tiny,method=lora,rank={r}", 1e-2, full_floor + gaps[batch][r]) for r in (4, 16))])
  text = finish_sweep(tmp_path, "batch_size", points)
  assert "`data.batch_size=4, train.steps=400`" in text
  finding = section(text, "5")
  for name, small, large in (("lora r=4", 0.02, 0.32), ("lora r=16", 0.01, 0.31)):
    row = f"| {name} | gap {small:+.4f} (B=4) → {large:+.4f} (B=64) | **agree** | growth +0.3000 ["
    assert row in finding
  assert "| overall | — | **agree** | lora r=4 grows, lora r=16 grows |" in finding
  assert "full 4 (the smallest), lora r=4 4 (the smallest), lora r=16 4 (the smallest)" in finding
  rows = [line for line in text.splitlines() if line.startswith("| 64 | lora r=16 | 1e-2 | ")]
  assert len(rows) == 1 and "| +0.3100 |" in rows[0]
  assert_outputs(tmp_path, text, "batch_size", "batch_size")
  before = {n: (tmp_path / n).read_bytes() for n in ("report.md", "figures/batch_size.pdf", "figures/batch_size.png",
                                                     "tables/batch_size.tex")}
  report.write_sweep(tmp_path)
  assert all((tmp_path / n).read_bytes() == data for n, data in before.items())


CELLS = {(8, 150): 0.05, (16, 150): 0.05, (32, 150): 0.05, (8, 300): 0.02, (32, 75): 0.32}  # (batch, steps) -> gap


def test_batch_sweep_reads_a_fixed_steps_line_and_a_fixed_rows_line(tmp_path):
  """One sweep, two budgets: at a fixed 150 steps LoRA's gap is flat over batch 8-32 (disagree); at a fixed 2,400 rows
  it grows (agree). Batch 16 at 150 steps sits on both lines; each line gets its own verdict."""
  points = []
  for (batch, steps), gap in CELLS.items():
    points += batch_cell(tmp_path, batch, steps, f"b{batch}_t{steps}", f"batch={batch},steps={steps}", [
        ("full", "tiny,method=full", 1e-3, 1.0), ("r4", "tiny,method=lora,rank=4", 1e-2, 1.0 + gap)])
  text = finish_sweep(tmp_path, "batch_size", points)
  finding = section(text, "5")
  steps_line, rows_line = "fixed 150 steps", "fixed 2400 rows (batch x steps)"
  assert f"| {steps_line}, lora r=4 | gap +0.0500 (B=8) → +0.0500 (B=32) | **disagree** | growth +0.0000 [" in finding
  assert f"| {rows_line}, lora r=4 | gap +0.0200 (B=8) → +0.3200 (B=32) | **agree** | growth +0.3000 [" in finding
  assert f"| {steps_line}, overall | — | **disagree** | lora r=4 flat " in finding
  assert f"| {rows_line}, overall | — | **agree** | lora r=4 grows " in finding
  table = [line for line in text.splitlines() if line.startswith("| fixed ") and "| 16 | lora r=4 | 1e-2 |" in line]
  assert len(table) == 2  # batch 16 at 150 steps: on both lines
  assert_outputs(tmp_path, text, "batch_size", "batch_size")


LAYERS = {  # name -> (targets, final NLL at the best LR, trainable parameters at rank 8)
    "attention": (("attention",), 1.20, 8192), "mlp": (("mlp",), 1.00, 12288),
    "all": (("all-linear", "unembed"), 1.004, 22528), "all-linear": (("all-linear",), 1.006, 20480)}


def test_layer_sweep_with_attention_behind_agrees(tmp_path):
  """Attention-only LoRA 0.1 nats behind MLP-only, which matches all layers (with or without the unembedding)."""
  points = []
  for name, (targets, floor, trainable) in LAYERS.items():
    for lr in lr_grid(1e-2, 1):
      for seed in (0, 1, 2):
        point = f"{name}_{lr:g}_s{seed}"
        config = make_config(f"tiny,method=lora,rank=8,lr={lr:g}", seed, lora__targets=targets)
        write_config_run(tmp_path / point, config, u_nll(lr, 1e-2, floor, seed), trainable=trainable)
        points.append({"point": f"tiny,targets={name},lr={lr:g},seed={seed}", "name": point})
  text = finish_sweep(tmp_path, "layers", points)
  finding = section(text, "6")
  row = next(line for line in finding.splitlines() if line.startswith("| r8 | "))
  assert row.startswith("| r8 | attention − MLP +0.2000 [") and ": behind; MLP − all -0.0060 [" in row
  assert row.endswith(": matches | **agree** | attention-only behind MLP-only; MLP-only matches all |")
  assert "| overall | — | **agree** | 1 comparison judged |" in finding
  assert "r8 all: with the unembedding − without -0.0020 [" in finding and ": matches (descriptive)" in finding
  table = _table_rows(text, "**Which layers are adapted")
  assert table["lora r=8, targets=attention"][:3] == ["attention", "8", "8,192"]
  assert table["lora r=8, targets=all-linear+unembed"][:3] == ["all + unembed", "8", "22,528"]
  assert_outputs(tmp_path, text, "layers", "layers")
  rows = report.sweep_verdicts(tmp_path)  # what a study-level index collects
  assert [(r.scope, r.verdict) for r in rows if r.finding == "6"] == [("r8", "agree"), ("overall", "agree")]
  assert {r.finding for r in rows} == {"4", "6"}  # no full FT: findings 1-3 untested; one rank per group for 4


def test_layer_sweep_parameter_matched_by_rank_is_compared_across_ranks(tmp_path):
  """Attention at rank 16 vs MLP and all layers at rank 8 (the study's 2k vs k): no rank holds both, so the groups
  are compared as swept; here attention-only is ahead of MLP-only, which disagrees."""
  points = []
  for name, (targets, floor, _) in LAYERS.items():
    rank = 16 if name == "attention" else 8
    for lr in lr_grid(1e-2, 1):
      for seed in SEEDS:
        point = f"{name}_{lr:g}_s{seed}"
        config = make_config(f"tiny,method=lora,rank={rank},lr={lr:g}", seed, lora__targets=targets)
        write_config_run(tmp_path / point, config, u_nll(lr, 1e-2, 0.7 if name == "attention" else floor, seed))
        points.append({"point": f"tiny,targets={name},lr={lr:g},seed={seed}", "name": point})
  rows = [r for r in report.sweep_verdicts(finish_sweep(tmp_path, "layers", points) and tmp_path) if r.finding == "6"]
  assert [r.verdict for r in rows] == ["disagree", "disagree"]
  assert rows[0].scope == "attention r16; mlp r8; all r8 (ranks as swept)"
  assert rows[0].why.startswith("attention-only ahead of MLP-only")


def test_early_curves_coinciding_under_alpha_r_and_separating_under_rslora_agree(tmp_path):
  """Train loss logged every step: ranks 4 and 64 differ by 5e-5 * t under alpha/r, by 0.1 (1 - e^{-t/3}) under
  alpha/sqrt(r)."""
  offsets = {"alpha/r": lambda t: 5e-5 * t, "alpha/sqrt(r)": lambda t: 0.1 * (1 - math.exp(-t / 3))}
  points = []
  for scaling, offset in offsets.items():
    for rank in (4, 64):
      def loss_at(t, offset=offset, low=rank == 4):
        return 1.0 + 2.0 * math.exp(-t / 30) + (offset(t) if low else 0.0)
      name = f"{scaling.replace('/', '_')}_r{rank}"
      config = make_config(f"tiny,method=lora,rank={rank},lr=0.003", 0, lora__scaling=scaling, train__steps=100,
                           train__log_every=1)
      write_config_run(tmp_path / name, config, 1.2, loss_at=loss_at)
      points.append({"point": f"tiny,scaling={scaling},rank={rank}", "name": name})
  text = finish_sweep(tmp_path, "early_curves", points)
  finding = section(text, "4c")
  e_r = np.mean([5e-5 * t for t in range(1, analysis.EARLY_STEPS + 1)])
  e_sqrt = np.mean([0.1 * (1 - math.exp(-t / 3)) for t in range(1, analysis.EARLY_STEPS + 1)])
  assert (f"| all | alpha/r: r4 vs r64, E {e_r:.3g}; alpha/sqrt(r): r4 vs r64, E {e_sqrt:.3g} | **agree** | "
          f"E(alpha/r) {e_r:.3g}, E(alpha/sqrt(r)) {e_sqrt:.3g} |") in finding
  late = 5e-5 * np.mean(range(81, 101))
  assert f"under alpha/r, mean |d| {e_r:.3g} over steps 1-20 and {late:.3g} over steps 81-100: |d| grows" in finding
  table = _table_rows(text, "**Train-loss difference d(t)")
  assert table["alpha/sqrt(r)"] == ["3e-3", "0", "r4 − r64", f"{e_sqrt:.3g}", f"+{e_sqrt:.3g}", "0.1 (steps 81-100)"]
  assert_outputs(tmp_path, text, "early_curves", "early_curves")


def test_b_outgrowing_a_in_the_longest_runs_agrees(tmp_path):
  """At the best LR of the 1000-step runs ||B|| grows linearly to 1.5 past ||A|| (0.6 and 0.5 in two modules); the
  other LRs and the shorter 500-step runs keep B below A and are not judged; a sweep of < 1000 steps is not tested."""
  def diagnostics(grows):
    def modules(step):
      b = 1.5 * step / 1000 if grows else 0.2
      return {"layers_0/attn/q_proj": {"rel_update": 0.01, "norm_a": 0.6, "norm_b": b},
              "layers_0/mlp/up_proj": {"rel_update": 0.01, "norm_a": 0.5, "norm_b": b}}
    return modules
  points = []
  for steps in (500, 1000):
    for lr in lr_grid(3e-3, 1):
      name = f"steps{steps}_{lr:g}"
      config = make_config(f"tiny,method=lora,rank=8,lr={lr:g}", 0, train__steps=steps)
      write_config_run(tmp_path / name, config, u_nll(lr, 3e-3, 1.0),
                       diagnostics=diagnostics(steps == 1000 and lr == 3e-3))
      points.append({"point": f"tiny,steps={steps},lr={lr:g}", "name": name})
  text = finish_sweep(tmp_path, "long", points)
  finding = section(text, "9")
  assert ("| train.steps=1000, lora r=8 | 2.75 at step 1000 (first > 1: step 400) | **agree** | "
          "median ‖B‖/‖A‖ 2.75 |") in finding
  assert "train.steps=500" not in finding
  row = _table_rows(text, "**Spectral norms of B and A")["train.steps=1000"]
  assert row == ["lora r=8", "3e-3", "1000", "1", "2.75", "0.55", "1.5", "step 400"]
  assert_outputs(tmp_path, text, "ba_norms", "ba_norms")
  short = tmp_path / "short"
  points = []
  for lr in lr_grid(3e-3, 1):
    config = make_config(f"tiny,method=lora,rank=8,lr={lr:g}", 0, train__steps=500)
    write_config_run(short / f"p{lr:g}", config, u_nll(lr, 3e-3, 1.0), diagnostics=diagnostics(True))
    points.append({"point": f"tiny,lr={lr:g}", "name": f"p{lr:g}"})
  assert "Not tested by this sweep" in section(finish_sweep(short, "short", points), "9")


def test_targets_class():
  assert report.targets_class(["attention"]) == ("attention", False)
  assert report.targets_class(["q_proj", "v_proj"]) == ("attention", False)
  assert report.targets_class(["mlp", "unembed"]) == ("mlp", True)
  assert report.targets_class(["all-linear", "unembed"]) == ("all", True)
  assert report.targets_class(["attention", "mlp"]) == ("all", False)
  assert report.targets_class(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]) == (
      "all", False)
  assert report.targets_class(["q_proj", "up_proj"]) is None and report.targets_class(["unembed"]) is None


@pytest.mark.parametrize("weak_floor, usable", [(1.5, True), (1.05, False)])
def test_calibration_says_whether_a_setting_separates_strong_from_weak(tmp_path, weak_floor, usable):
  """Full FT vs a weak LoRA over 3 LRs and 3 seeds (seed offsets ±0.01): 0.5 nats apart is ~60 noise units at every
  fraction of the steps (usable); 0.05 apart is ~6 (not usable)."""
  from experiments import calibrate

  points = []
  for key, arg, best, floor in (("full", "tiny,method=full", 1e-3, 1.0),
                                ("weak", "tiny,method=lora,rank=1", 1e-2, weak_floor)):
    for lr in lr_grid(best, 1):
      for seed in SEEDS:
        name = f"{key}_{lr:g}_s{seed}"
        write_config_run(tmp_path / name, make_config(f"{arg},lr={lr:g}", seed), u_nll(lr, best, floor, seed))
        points.append({"point": f"{arg},lr={lr:g},seed={seed}", "name": name})
  (tmp_path / "sweep.json").write_text(json.dumps({"config": "experiments/configs/calibration.py", "arg": "tiny",
                                                   "points": points}))
  rows, ok = calibrate.calibration(tmp_path)
  assert ok is usable and [r[0] for r in rows] == ["50%", "75%", "100%"]
  assert calibrate.main([str(tmp_path)]) == (0 if usable else 1)
  text = (tmp_path / "calibration.md").read_text()
  assert ("**Usable**" if usable else "**Not usable**") in text and calibrate.RULE_CALIBRATION in text
  assert "## The base model" in text
