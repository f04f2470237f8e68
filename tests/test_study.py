"""The study harness end to end: a micro sweep through the runner (one point interrupted and resumed, one failing),
its report (CSV columns, the fitted optimum on synthetic metrics with a known answer, the sections), the study's index
and publishing; experiments.main's files are imitated by a fake point so the test takes seconds."""

import csv
import json
import math
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from experiments import report, study, sweep

ROOT = Path(__file__).resolve().parent.parent
OPTIMA = {"full": 1.5e-3, "lora": 5e-3}  # The synthetic NLL's minimum in LR, per method.

# The micro family: lr_sweep's real configs, full FT at 3 LRs (+ 1e-1, which fails) and LoRA r4 at 3, 2 seeds each.
CONFIG = f"""
import sys
sys.path.insert(0, {str(ROOT)!r})
from experiments.configs import lr_sweep

SWEEPS = ("micro",)
get_config = lr_sweep.get_config

def get_sweep(arg):
  full = [f"tiny,method=full,lr={{lr}},seed={{s}}" for lr in (0.001, 0.002, 0.004) for s in (0, 1)]
  lora = [f"tiny,method=lora,rank=4,lr={{lr}},seed={{s}}" for lr in (0.002, 0.004, 0.008) for s in (0, 1)]
  return full + lora + ["tiny,method=full,lr=0.1,seed=0"]
"""

# A fake experiments.main: writes config.json and <method>/metrics.jsonl whose final NLL is a parabola in log10(LR)
# (known vertex, seed offset 0.01 * seed). lr=0.1 fails with a NaN loss (exit 1); full FT at lr=0.002 seed 1 stops
# at a SIGTERM after step 150 on its first call (exit 143) and writes steps 200-300 when resumed.
POINT = f"""
import json, math, os, signal, sys, time
sys.path.insert(0, {str(ROOT)!r})
from experiments import overrides
config_file, point, workdir = sys.argv[1:4]
config = overrides.load_config_module(config_file).get_config(point)
method, lr, seed = config.methods[0], config.optim.lr, config.seed
os.makedirs(os.path.join(workdir, method), exist_ok=True)
open(os.path.join(workdir, "config.json"), "w").write(config.to_json_best_effort(indent=2, sort_keys=True))
metrics = os.path.join(workdir, method, "metrics.jsonl")
optimum = {json.dumps(OPTIMA)}[method]
final = 1.0 + 0.5 * (math.log10(lr) - math.log10(optimum)) ** 2 + 0.01 * seed
def write(steps):
  with open(metrics, "a") as f:
    for step in steps:
      nll = final + 2.0 * (1 - step / 300)
      f.write(json.dumps({{"step": step, "train/loss": nll, "train/tokens": 100}}) + "\\n")
      f.write(json.dumps({{"step": step, "eval/nll": nll}}) + "\\n")
if lr == 0.1:
  with open(metrics, "a") as f:
    f.write(json.dumps({{"step": 50, "train/loss": float("nan")}}) + "\\n")
  print("non-finite loss at step 50", file=sys.stderr)
  sys.exit(1)
if method == "full" and lr == 0.002 and seed == 1 and not os.path.exists(os.path.join(workdir, "resumed")):
  open(os.path.join(workdir, "resumed"), "w").close()
  write(range(0, 151, 50))
  signal.signal(signal.SIGTERM, lambda *_: (print("saved a checkpoint at step 150"), sys.exit(143)))
  open(os.path.join(workdir, "started"), "w").close()
  time.sleep(60)
  sys.exit(9)
done = [json.loads(l)["step"] for l in open(metrics)] if os.path.exists(metrics) else []
write([s for s in range(0, 301, 50) if s > max(done, default=-1)])
"""

SLOW = "tiny_method=full_lr=0.002_seed=1"


@pytest.fixture(scope="module")
def micro(tmp_path_factory):
  """A finished micro sweep under DIR/lr_sweep (run, interrupted, resumed), and the stderr of both runs."""
  tmp = tmp_path_factory.mktemp("study")
  (tmp / "micro.py").write_text(CONFIG)
  (tmp / "point.py").write_text(POINT)
  driver = tmp / "driver.py"
  driver.write_text(f"import sys\nsys.path.insert(0, {str(ROOT)!r})\nfrom experiments import sweep\n"
                    f"cmd = lambda c, p, w, e: [sys.executable, {str(tmp / 'point.py')!r}, c, p, w]\n"
                    "sys.exit(sweep.main(sys.argv[1:], command=cmd))\n")
  d = tmp / "study" / "lr_sweep"
  argv = [sys.executable, str(driver), "--config", f"{tmp / 'micro.py'}:micro", "--workdir", str(d), "--parallel", "2"]
  proc = subprocess.Popen(argv, stderr=subprocess.PIPE, text=True)
  deadline = time.monotonic() + 60
  while not (d / SLOW / "started").exists():
    assert time.monotonic() < deadline and proc.poll() is None, proc.communicate()[1]
    time.sleep(0.05)
  proc.send_signal(signal.SIGTERM)
  _, first = proc.communicate(timeout=60)
  assert proc.returncode == sweep.EXIT_INTERRUPTED, first
  assert json.loads((d / SLOW / "status.json").read_text())["state"] == "interrupted"
  again = subprocess.run(argv, stderr=subprocess.PIPE, text=True, timeout=120)
  assert again.returncode == sweep.EXIT_FAILED, again.stderr  # the lr=0.1 point fails on every attempt
  return tmp / "study", first, again.stderr


@pytest.mark.slow
def test_the_runner_resumes_the_interrupted_point_and_records_the_failing_one(micro):
  workdir, first, second = micro
  d = workdir / "lr_sweep"
  assert "interrupted [" in first and "rerun the same command to resume" in first
  states = {p.name: json.loads((p / "status.json").read_text())["state"] for p in d.iterdir() if p.is_dir()}
  assert len(states) == 13 and list(states.values()).count("done") == 12
  assert states["tiny_method=full_lr=0.1_seed=0"] == "failed"
  assert json.loads((d / SLOW / "status.json").read_text())["attempt"] == 2
  steps = [json.loads(l)["step"] for l in (d / SLOW / "full" / "metrics.jsonl").read_text().splitlines()]
  assert steps == sorted(steps) and steps[-1] == 300 and steps.count(150) == 2  # resumed, not restarted
  assert "1 failed" in second and "non-finite loss at step 50" in (d / "tiny_method=full_lr=0.1_seed=0" /
                                                                  "log.txt").read_text()


def test_the_report_has_the_csv_columns_the_known_optima_and_its_sections(micro):
  workdir, _, _ = micro
  d = workdir / "lr_sweep"
  text = report.write_sweep(d)
  with (d / "results.csv").open() as f:
    rows = list(csv.DictReader(f))
  assert tuple(rows[0]) == report.CSV_COLUMNS
  assert len([r for r in rows if r["step"]]) == 12 * 7  # 7 evaluations of each finished run
  failed = [r for r in rows if r["lr"] == "0.1"]
  assert failed and all(r["state"] == "failed" and r["finished"] == "False" for r in failed)
  conds = {c.name: c for c in report.conditions(report.load_sweep(d)[1])}
  for name, method in (("full", "full"), ("lora r=4", "lora")):
    c = conds[name]
    assert c.fit.interior and math.isclose(c.fit.lr, OPTIMA[method], rel_tol=1e-6), (name, c.fit)
    assert 0.1 not in c.usable  # the failed LR is left out of the fit
  assert "1.5e-3" in text and "5e-3" in text and "3.33" in text  # optima and their ratio in the report
  for section in ("## Eval NLL over method, rank and LR", "## Optimal LR", "## LoRA/full optimal-LR ratio",
                  "## Seed noise", "## Figures", "## vs the study", "### Finding 3", "Rule (`analysis.RULE_RATIO`)"):
    assert section in text, section
  assert "- failed: `tiny_method=full_lr=0.1_seed=0/full`" in text
  for name in ("lr_curves", "learning_curves"):
    assert (d / "figures" / f"{name}.png").stat().st_size > 1000 and (d / "figures" / f"{name}.pdf").exists()
  assert (d / "tables" / "optimal_lr.tex").read_text().startswith("% ")


def test_the_study_index_collects_the_verdicts_and_publishes_what_regenerates_it(micro, tmp_path):
  workdir, _, _ = micro
  text = study.index(workdir, "quick", ("lr_sweep", "capacity"))
  assert "**lr_sweep** ([report](lr_sweep/report.md))" in text and "not run yet: capacity" in text
  assert "### Finding 3" in text and "| lr_sweep |" in text
  summary = text.split("## Summary")[1].split("## vs the study")[0]
  assert "| 3: optimal LR ratio LoRA/full | ~10" in summary and "| lr_sweep | **" in summary
  verdicts = list(csv.DictReader((workdir / "verdicts.csv").open()))
  assert verdicts and {v["family"] for v in verdicts} == {"lr_sweep"}
  assert {v["verdict"] for v in verdicts} <= {"agree", "disagree", "inconclusive", "unstable"}
  # The fake points write no run_info.json: the index says at the top that the runs' code is unknown.
  assert text.split("\n")[2].startswith("**Provenance warning: these runs did not all come from one clean commit**")
  assert "## Provenance\n" in text and "- `unknown (no run_info.json)`: 13 runs" in text
  assert "## Checked on another machine" in text
  assert (workdir / "vs_study.tex").read_text().count(r"\\") == len(verdicts) + 1
  dest = tmp_path / "published"
  study.publish(workdir, dest, ["lr_sweep"])
  assert not list(dest.rglob("log.txt")) and (dest / "lr_sweep" / SLOW / "full" / "metrics.jsonl").exists()
  assert study.index(dest, "quick", ["lr_sweep"]).split("## vs the study")[1] == text.split("## vs the study")[1]
  assert (dest / "lr_sweep" / "results.csv").read_text() == (workdir / "lr_sweep" / "results.csv").read_text()


def test_study_command_line_errors(capsys):
  with pytest.raises(SystemExit):
    study.main(["--variant", "quick", "--workdir", "x", "--families", "layers"])
  assert "not in the quick study's families" in capsys.readouterr().err


def test_the_readmes_results_table_is_generated_from_the_published_verdicts():
  """The README's results table is exactly `study.readme_table` of the published study (every family's verdict on
  each finding, from its verdicts.csv): regenerate it with --readme-table, never edit it by hand."""
  readme = (ROOT / "README.md").read_text()
  starts = [i for i in range(len(readme)) if readme.startswith("<!-- results table: generated from ", i)]
  assert len(starts) == 2  # the study on the calibrated setting, and the old base's
  for start in starts:
    block = readme[start:readme.index(study.README_END, start) + len(study.README_END)]
    path = block.split("generated from ")[1].split(" by ")[0]
    assert block == study.readme_table(ROOT / path).replace(str(ROOT / path), path)
    rows = study.verdict_rows(ROOT / path)
    assert all((ROOT / study.config_arg(f, "x").split(":")[0]).exists() for f, _ in rows)  # every family has a config
    assert block.count("| `") == len(study.summary_rows(rows))
