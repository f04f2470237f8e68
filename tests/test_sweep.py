"""Tests for experiments.sweep: a fake config and a fake point command drive the runner (failures, reruns, signals,
shards, filters, dry runs, refusals); one real tiny point goes through experiments.main."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from experiments import sweep
from experiments.configs import common
from tests import _base

ROOT = Path(__file__).resolve().parent.parent

# get_sweep("ok+fail+slow") gives one point per word: odd ones as dicts, to check that they become arg strings.
CONFIG = """
import ml_collections

def get_config(arg):
  return ml_collections.ConfigDict({"arg": arg, "train": {"steps": 1}})

def get_sweep(arg):
  return [{"mode": m, "i": i} if i % 2 else f"mode={m},i={i}" for i, m in enumerate(arg.split("+"))]
"""

# The fake experiment: records each call in WORKDIR/calls.txt; `fail` exits 3 until ROOT/fixed exists; `slow` waits
# for SIGTERM on its first call (saving and exiting 143, as experiments.main does) and succeeds on the next.
POINT = """
import os, signal, sys, time
point, workdir, extra = sys.argv[1], sys.argv[2], sys.argv[3:]
os.makedirs(workdir, exist_ok=True)
with open(os.path.join(workdir, "calls.txt"), "a") as f:
  f.write(" ".join([point, *extra]) + "\\n")
calls = len(open(os.path.join(workdir, "calls.txt")).read().splitlines())
mode = dict(kv.split("=") for kv in point.split(","))["mode"]
print("running", point)
if mode == "fail" and not os.path.exists(os.path.join(os.path.dirname(workdir), "..", "fixed")):
  print("something broke", file=sys.stderr)
  sys.exit(3)
if mode == "slow" and calls == 1:
  signal.signal(signal.SIGTERM, lambda *_: (print("saved a checkpoint"), sys.exit(143)))
  open(os.path.join(workdir, "started"), "w").close()
  time.sleep(60)
  sys.exit(9)
"""


@pytest.fixture
def fake(tmp_path):
  """(config file, point command) of the fake sweep; sweeps go to tmp_path/<dir>, ROOT/fixed is tmp_path/fixed."""
  config = tmp_path / "fake_config.py"
  config.write_text(CONFIG)
  script = tmp_path / "point.py"
  script.write_text(POINT)
  return str(config), lambda config_file, point, workdir, extra: [sys.executable, str(script), point, workdir,
                                                                  *extra]


def calls(workdir: Path) -> list[str]:
  path = workdir / "calls.txt"
  return path.read_text().splitlines() if path.exists() else []


def status(workdir: Path) -> dict:
  return json.loads((workdir / "status.json").read_text())


def test_failed_point_is_recorded_others_continue_and_a_rerun_retries_it(fake, tmp_path, capsys):
  config, command = fake
  d = tmp_path / "s"
  argv = ["--config", f"{config}:ok+fail+ok", "--workdir", str(d)]
  assert sweep.main(argv, command=command) == sweep.EXIT_FAILED
  names = ["mode=ok_i=0", "mode=fail_i=1", "mode=ok_i=2"]
  assert sorted(p.name for p in d.iterdir()) == sorted(["sweep.json", *names])
  ok0, failed, ok2 = (d / n for n in names)
  assert calls(ok0) == ["mode=ok,i=0"] and calls(ok2) == ["mode=ok,i=2"] and calls(failed) == ["mode=fail,i=1"]
  assert status(ok0)["state"] == "done" and status(ok0)["returncode"] == 0
  s = status(failed)
  assert s["state"] == "failed" and s["returncode"] == 3 and s["last_lines"][-1] == "something broke"
  assert "running mode=fail,i=1" in (failed / "log.txt").read_text()
  err = capsys.readouterr().err
  assert "FAILED [1] mode=fail_i=1 (exit status 3)" in err and "3/3 done" not in err
  assert f"FAILED [1] mode=fail,i=1 (exit status 3): {failed / 'log.txt'}" in err  # the end summary
  assert "2/3 done, 0 running, 1 failed, 0 to go" in err
  record = json.loads((d / "sweep.json").read_text())
  assert record["arg"] == "ok+fail+ok" and record["overrides"] == [] and record["git_commit"]
  assert [(p["point"], p["name"]) for p in record["points"]] == [
      ("mode=ok,i=0", names[0]), ("mode=fail,i=1", names[1]), ("mode=ok,i=2", names[2])]

  (tmp_path / "fixed").touch()
  assert sweep.main(argv, command=command) == 0
  assert len(calls(ok0)) == 1 and len(calls(ok2)) == 1 and len(calls(failed)) == 2  # only the failed one reran
  assert status(failed)["state"] == "done" and status(failed)["attempt"] == 2
  assert (failed / "log.txt").read_text().count("=== sweep attempt") == 2
  assert "3/3 done" in capsys.readouterr().err


def test_signal_interrupts_running_points_and_a_rerun_resumes_them(fake, tmp_path):
  config, command = fake
  driver = tmp_path / "driver.py"
  driver.write_text(f"import sys\nsys.path.insert(0, {str(ROOT)!r})\nfrom experiments import sweep\n"
                    f"script = {str(tmp_path / 'point.py')!r}\n"
                    "sys.exit(sweep.main(sys.argv[1:], command=lambda c, p, w, e: [sys.executable, script, p, w]))\n")
  d = tmp_path / "s"
  argv = ["--config", f"{config}:ok+slow", "--workdir", str(d), "--parallel", "2"]
  proc = subprocess.Popen([sys.executable, str(driver), *argv], stderr=subprocess.PIPE, text=True)
  slow = d / "mode=slow_i=1"
  deadline = time.monotonic() + 30
  while not ((slow / "started").exists() and (d / "mode=ok_i=0" / "status.json").exists()
             and status(d / "mode=ok_i=0")["state"] == "done"):
    assert time.monotonic() < deadline and proc.poll() is None, proc.communicate()[1]
    time.sleep(0.05)
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=30)
  assert proc.returncode == sweep.EXIT_INTERRUPTED, err
  s = status(slow)
  assert s["state"] == "interrupted" and s["returncode"] == 143 and "last_lines" not in s
  assert "saved a checkpoint" in (slow / "log.txt").read_text()
  assert "interrupted [1] mode=slow_i=1" in err and "rerun the same command to resume" in err

  assert sweep.main(argv, command=command) == 0
  assert len(calls(d / "mode=ok_i=0")) == 1 and len(calls(slow)) == 2
  assert status(slow)["state"] == "done"


def test_point_killed_without_a_done_status_is_rerun(fake, tmp_path):
  config, command = fake
  d = tmp_path / "s"
  argv = ["--config", f"{config}:ok+ok", "--workdir", str(d)]
  assert sweep.main(argv, command=command) == 0
  point = d / "mode=ok_i=1"  # as a runner killed with SIGKILL mid-point leaves it
  (point / "status.json").write_text(json.dumps({**status(point), "state": "running"}))
  assert sweep.main(argv, command=command) == 0
  assert len(calls(d / "mode=ok_i=0")) == 1 and len(calls(point)) == 2


def test_shard_only_and_overrides_select_and_reach_the_points(fake, tmp_path):
  config, command = fake
  d = tmp_path / "s"
  base = ["--config", f"{config}:ok+ok+ok+ok+ok", "--workdir", str(d)]
  assert sweep.main([*base, "--shard", "1/2", "--", "--config.train.steps=2"], command=command) == 0
  assert [p.name for p in sorted(d.iterdir()) if calls(p)] == ["mode=ok_i=1", "mode=ok_i=3"]
  assert calls(d / "mode=ok_i=1") == ["mode=ok,i=1 --config.train.steps=2"]
  assert sweep.main([*base, "--only", "i=[04]", "--", "--config.train.steps=2"], command=command) == 0
  assert [p.name for p in sorted(d.iterdir()) if calls(p)] == [f"mode=ok_i={i}" for i in (0, 1, 3, 4)]


def test_dry_run_prints_points_names_and_commands_and_runs_nothing(fake, tmp_path, capsys):
  config, command = fake
  d = tmp_path / "s"
  argv = ["--config", f"{config}:ok+fail+ok", "--workdir", str(d), "--dry-run", "--shard", "0/2"]
  assert sweep.main(argv, command=command) == 0
  assert not d.exists()
  out = capsys.readouterr().out.splitlines()
  assert out[0] == f"# {config}:ok+fail+ok -> {d}: 2 of 3 point(s) (shard 0/2)"
  assert out[1] == "[0] mode=ok,i=0 -> mode=ok_i=0 (not started)"
  assert out[2].split()[-2:] == ["mode=ok,i=0", str(d / "mode=ok_i=0")]
  assert out[3] == "[2] mode=ok,i=2 -> mode=ok_i=2 (not started)" and len(out) == 5
  # the default command: experiments.main on the point, overrides last
  sweep.main(["--config", f"{config}:ok", "--workdir", str(d), "--dry-run", "--", "--config.train.steps=2"])
  assert capsys.readouterr().out.splitlines()[2].split() == [
      sys.executable, "-m", "experiments.main", f"--config={config}:mode=ok,i=0", f"--workdir={d}/mode=ok_i=0",
      "--config.train.steps=2"]


def test_another_sweep_in_the_workdir_is_refused_unless_overwrite(fake, tmp_path, capsys):
  config, command = fake
  d = tmp_path / "s"
  assert sweep.main(["--config", f"{config}:ok", "--workdir", str(d)], command=command) == 0
  for other in ([f"{config}:ok+ok"], [f"{config}:ok", "--", "--config.train.steps=2"]):
    with pytest.raises(SystemExit) as e:
      sweep.main(["--workdir", str(d), "--config", *other], command=command)
    assert e.value.code == 2 and "holds another sweep" in capsys.readouterr().err
  assert calls(d / "mode=ok_i=0") == ["mode=ok,i=0"]
  assert sweep.main(["--config", f"{config}:ok+ok", "--workdir", str(d), "--overwrite"], command=command) == 0
  assert calls(d / "mode=ok_i=0") == ["mode=ok,i=0 --overwrite"]  # the old point dir was deleted, then rerun
  (tmp_path / "junk").mkdir()
  (tmp_path / "junk" / "x").touch()
  with pytest.raises(SystemExit):
    sweep.main(["--config", f"{config}:ok", "--workdir", str(tmp_path / "junk")], command=command)
  assert "holds no sweep.json" in capsys.readouterr().err


def test_logs_elsewhere_are_copied_next_to_the_results(fake, tmp_path):
  config, command = fake
  d = tmp_path / "s"
  argv = ["--config", f"{config}:ok", "--workdir", str(d), "--log-dir", str(tmp_path / "logs")]
  assert sweep.main(argv, command=command) == 0
  log = (tmp_path / "logs" / "mode=ok_i=0.txt").read_text()
  assert "running mode=ok,i=0" in log and not (d / "mode=ok_i=0" / "log.txt").exists()
  (copy,) = (d / "mode=ok_i=0").glob("log-*.txt")
  assert copy.read_text() == log and status(d / "mode=ok_i=0")["log"] == str(copy)


@pytest.mark.parametrize("argv, message", [
    (["--shard", "2/2"], "invalid shard '2/2'"),
    (["--only", "zzz"], "no point selected"),
    (["--only", "("], "missing ), unterminated subpattern"),
    (["--", "--train.steps=2"], "give config overrides --config.KEY=VALUE"),
    (["--", "--config.train.stepz=2"], "has no field 'train.stepz'"),
    (["--parallel", "0"], "--parallel 0: give at least 1"),
])
def test_argument_errors(argv, message, fake, tmp_path, capsys):
  config, command = fake
  with pytest.raises(SystemExit) as e:
    sweep.main(["--config", f"{config}:ok", "--workdir", str(tmp_path / "s"), "--dry-run", *argv], command=command)
  assert e.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("body, message", [
    ("def get_config(a): pass\n", "does not define get_sweep()"),
    ("def get_config(a): pass\ndef get_sweep(): return []\n", "must return a non-empty list"),
    ("def get_config(a): pass\ndef get_sweep(): return ['a b', 'a/b']\n", "directory name(s) ['a-b'] more than once"),
    ("def get_config(a): pass\ndef get_sweep(): return ['a=1', {'a': 1}]\n", "point(s) ['a=1'] more than once"),
    ("def get_config(a): raise ValueError('bad rank')\ndef get_sweep(): return ['r=0']\n",
     "point [0] 'r=0': get_config raised ValueError: bad rank"),
])
def test_config_errors(body, message, tmp_path, capsys):
  path = tmp_path / "c.py"
  path.write_text(body)
  with pytest.raises(SystemExit):
    sweep.main(["--config", str(path), "--workdir", str(tmp_path / "s"), "--dry-run"])
  assert message in capsys.readouterr().err


@pytest.mark.parametrize("point, name", [
    ("method=lora,rank=16,lr=3e-4", "method=lora_rank=16_lr=3e-4"), ("tiny,method=full", "tiny_method=full"),
    ("model=meta-llama/Llama-3.2-1B,rank=4", "model=meta-llama-Llama-3.2-1B_rank=4"), ("", "default"),
    (",", "default")])
def test_point_name(point, name):
  assert sweep.point_name(point) == name


def test_long_point_names_are_cut_and_stay_distinct():
  a, b = "x=" + "1" * 200, "x=" + "1" * 199 + "2"
  assert len(sweep.point_name(a)) == sweep.MAX_NAME and sweep.point_name(a) != sweep.point_name(b)


def test_point_arg():
  assert common.point_arg("tiny,rank=4") == "tiny,rank=4"
  point = {"tiny": True, "packing": False, "method": "lora", "rank": 4, "lr": 3e-4}
  assert common.point_arg(point) == "tiny,packing=false,method=lora,rank=4,lr=0.0003"
  parsed = common.parse_arg(common.point_arg(point), tiny=False, packing=True, method="", rank=0, lr=0.0)
  assert parsed.to_dict() == point
  with pytest.raises(ValueError, match="holds ',' or '='"):
    common.point_arg({"model": "a,b"})
  with pytest.raises(ValueError, match="is a tuple"):
    common.point_arg({"ranks": (1, 2)})


def test_finetune_sweep_variants():
  from experiments.configs import finetune
  tiny, real = finetune.get_sweep("tiny"), finetune.get_sweep("real")
  assert finetune.get_sweep() == tiny + real and all(p.startswith("tiny,") for p in tiny)
  with pytest.raises(ValueError, match="unknown sweep variant 'x'"):
    finetune.get_sweep("x")


@pytest.mark.slow
def test_real_point_runs_through_experiments_main(tmp_path):
  d = tmp_path / "s"
  tiny = ["--config.train.steps=4", "--config.train.eval_every=2", *_base.overrides(),
          "--config.data.synthetic_examples=100", "--config.data.eval_size=16", "--config.eval.arithmetic_examples=0",
          f"--config.data.cache_dir={tmp_path / 'data'}"]
  argv = [sys.executable, "-m", "experiments.sweep", "--config", "experiments/configs/finetune.py:tiny",
          "--workdir", str(d), "--only", "rank=4$", "--", *tiny]
  result = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})
  point = d / "tiny_method=lora_rank=4"
  assert result.returncode == 0, result.stderr + (point / "log.txt").read_text()
  assert status(point)["state"] == "done" and "1/1 done" in result.stderr
  assert (point / "report.md").exists() and (point / "lora" / "metrics.jsonl").exists()
  assert "== lora: lr 0.003" in (point / "log.txt").read_text()
  assert len(json.loads((d / "sweep.json").read_text())["points"]) == 4
  again = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=60)
  assert again.returncode == 0 and "1 done earlier" in again.stderr
  assert (point / "log.txt").read_text().count("=== sweep attempt") == 1
