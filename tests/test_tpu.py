"""Tests for the tpu/ launchers: the exact commands of every --dry-run, validation errors, and real execution
against a fake `gcloud` on PATH (no Google Cloud access needed)."""

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from experiments import sweep as experiments_sweep
from tpu import common, copy, create, delete, gpu_launch, logs, run, setup, sweep

ROOT = Path(__file__).resolve().parent.parent
NODE = ["--name", "lora-v5e-16", "--zone", "us-west4-a"]
TPU = ["gcloud", "compute", "tpus"]
ZONE = "--zone=us-west4-a"
CONFIG = "def get_config(arg=''):\n    return arg\n"
SWEEP = CONFIG + "def get_sweep():\n    return ['method=lora,rank=16,lr=3e-4', 'method=full,lr=1e-5', 'tiny']\n"


def dry(module, argv, capsys):
  """Run a command's main with --dry-run and return the printed commands (comment lines dropped), split."""
  module.main([*argv, "--dry-run"])
  out = capsys.readouterr().out
  return [shlex.split(line) for line in out.splitlines() if not line.startswith("#")]


def dry_lines(module, argv, capsys) -> list[str]:
  """Run a command's main with --dry-run and return its printed lines, comments included."""
  module.main([*argv, "--dry-run"])
  return capsys.readouterr().out.splitlines()


def error(module, argv, capsys) -> str:
  """Run a command's main expecting an argparse error; return its stderr."""
  with pytest.raises(SystemExit) as e:
    module.main([*argv, "--dry-run"])
  assert e.value.code == 2
  return capsys.readouterr().err


def remote(cmd: list[str]) -> str:
  """The shell string an ssh command runs on the workers, checked to be valid bash."""
  assert cmd[:7] == [*TPU, "tpu-vm", "ssh", "lora-v5e-16", "--worker=all"] and ZONE in cmd
  assert cmd[-2] == "--command"
  subprocess.run(["bash", "-n", "-c", cmd[-1]], check=True)
  return cmd[-1]


def pinned_jax() -> str:
  (version,) = re.findall(r"^jax==(\S+)", (ROOT / "requirements.txt").read_text(), flags=re.M)
  return version


@pytest.fixture(autouse=True)
def local_tempdir(tmp_path, monkeypatch):
  """Keep the files the commands write locally (setup archives) inside the test's directory."""
  monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))


@pytest.fixture
def config_file(tmp_path):
  path = tmp_path / "lr_sweep.py"
  path.write_text(SWEEP)
  return path


@pytest.fixture
def fake_gcloud(tmp_path, monkeypatch):
  """A `gcloud` on PATH that records its argv (one JSON list a line) and reports queued resources ACTIVE."""
  log = tmp_path / "gcloud_calls.jsonl"
  script = tmp_path / "bin" / "gcloud"
  script.parent.mkdir()
  script.write_text(f"#!{sys.executable}\nimport json, sys\n"
                    f"open({str(log)!r}, 'a').write(json.dumps(sys.argv[1:]) + '\\n')\n"
                    "if 'describe' in sys.argv: print('ACTIVE')\n")
  script.chmod(0o755)
  monkeypatch.setenv("PATH", f"{script.parent}{os.pathsep}{os.environ['PATH']}")
  return lambda: [["gcloud", *json.loads(line)] for line in log.read_text().splitlines()]


# ----------------------------------------------------------------------------------------------- create / delete
def test_create_tpu_vm(capsys):
  cmds = dry(create, [*NODE, "--accelerator", "v5litepod-16", "--version", "tpu-ubuntu2204-base", "--spot",
                      "--project", "my-proj"], capsys)
  assert cmds == [[*TPU, "tpu-vm", "create", "lora-v5e-16", "--accelerator-type=v5litepod-16",
                   "--version=tpu-ubuntu2204-base", "--spot", ZONE, "--project=my-proj"]]


@pytest.mark.parametrize("accelerator, version", [("v5litepod-16", "v2-alpha-tpuv5-lite"), ("v5p-32", "v2-alpha-tpuv5"),
                                                  ("v6e-8", "v2-alpha-tpuv6e"), ("v4-8", "tpu-ubuntu2204-base")])
def test_create_default_version(accelerator, version, capsys):
  (cmd,) = dry(create, [*NODE, "--accelerator", accelerator], capsys)
  assert f"--version={version}" in cmd and "--spot" not in cmd


def test_create_queued_then_waits(capsys):
  cmds = dry(create, [*NODE, "--accelerator", "v5litepod-16", "--queued", "--spot"], capsys)
  assert cmds == [[*TPU, "queued-resources", "create", "lora-v5e-16", "--node-id=lora-v5e-16",
                   "--accelerator-type=v5litepod-16", "--runtime-version=v2-alpha-tpuv5-lite", "--spot", ZONE],
                  [*TPU, "queued-resources", "describe", "lora-v5e-16", "--format=value(state.state)", ZONE]]


def test_create_queued_runs_with_gcloud(fake_gcloud):
  create.main([*NODE, "--accelerator", "v4-8", "--queued", "--poll-interval", "0"])
  calls = fake_gcloud()
  assert [c[4] for c in calls] == ["create", "describe"]


class FakeGcloud:
  """Stands in for subprocess.run in create: answers describe with the given states, one per call."""

  def __init__(self, states):
    self.states, self.calls = list(states), 0

  def __call__(self, cmd, **kwargs):
    self.calls += 1
    assert cmd[3:5] == ["queued-resources", "describe"]
    return subprocess.CompletedProcess(cmd, 0, stdout=self.states.pop(0) + "\n", stderr="")


def queued_args():
  return argparse.Namespace(name="lora-v5e-16", zone="us-west4-a", project=None, dry_run=False)


def test_wait_active_polls_until_active(monkeypatch):
  fake = FakeGcloud(["WAITING_FOR_RESOURCES", "PROVISIONING", "ACTIVE"])
  monkeypatch.setattr(create.subprocess, "run", fake)
  sleeps = []
  create.wait_active(queued_args(), timeout_s=100, interval_s=5, sleep=sleeps.append)
  assert fake.calls == 3 and sleeps == [5, 5]


def test_wait_active_fails_on_failed_state(monkeypatch):
  monkeypatch.setattr(create.subprocess, "run", FakeGcloud(["WAITING_FOR_RESOURCES", "FAILED"]))
  with pytest.raises(SystemExit, match="is FAILED; delete it with `python -m tpu.delete .* --queued`"):
    create.wait_active(queued_args(), timeout_s=100, interval_s=1, sleep=lambda s: None)


def test_wait_active_times_out(monkeypatch):
  monkeypatch.setattr(create.subprocess, "run", FakeGcloud(["WAITING_FOR_RESOURCES"] * 10))
  clock = iter(range(0, 1000, 30)).__next__  # 30 s per tick
  with pytest.raises(SystemExit, match="still WAITING_FOR_RESOURCES after 100s"):
    create.wait_active(queued_args(), timeout_s=100, interval_s=30, sleep=lambda s: None, clock=clock)


def test_delete(capsys):
  assert dry(delete, NODE, capsys) == [[*TPU, "tpu-vm", "delete", "lora-v5e-16", "--quiet", ZONE]]
  assert dry(delete, [*NODE, "--queued"], capsys) == [
      [*TPU, "queued-resources", "delete", "lora-v5e-16", "--force", "--quiet", ZONE]]


# ----------------------------------------------------------------------------------------------- setup
def test_setup_clone(capsys):
  cmds = dry(setup, [*NODE, "--repo", "https://github.com/me/lora_jax.git", "--ref", "v1.0"], capsys)
  steps = [remote(cmd) for cmd in cmds]
  assert steps[0] == ("rm -rf ~/lora_jax && git clone --quiet https://github.com/me/lora_jax.git ~/lora_jax"
                      " && git -C ~/lora_jax checkout --quiet v1.0")
  assert all(s.startswith("cd ~/lora_jax && ") for s in steps[1:])
  assert "uv venv --seed --python 3.11 .venv" in steps[1]
  assert steps[2:5] == ["cd ~/lora_jax && .venv/bin/pip install -r requirements.txt -r requirements-cloud.txt",
                        f"cd ~/lora_jax && .venv/bin/pip install 'jax[tpu]=={pinned_jax()}'",
                        "cd ~/lora_jax && .venv/bin/pip install --no-deps -e ."]
  assert "jax.default_backend() == \"tpu\"" in steps[5]


def test_setup_upload(capsys):
  cmds = dry(setup, [*NODE, "--upload"], capsys)
  archive = cmds[0][cmds[0].index("archive") + 2].removeprefix("--output=")
  assert cmds[0] == ["git", "-C", str(ROOT), "archive", "--format=tar.gz", f"--output={archive}", "HEAD"]
  assert cmds[1] == [*TPU, "tpu-vm", "scp", archive, "lora-v5e-16:lora_jax.tar.gz", "--worker=all", ZONE]
  assert "tar -xzf ~/lora_jax.tar.gz -C ~/lora_jax" in remote(cmds[2])
  assert cmds[3:] == dry(setup, [*NODE, "--repo", "u"], capsys)[1:]  # same install steps either way


def test_setup_needs_a_source(capsys):
  assert "one of the arguments --repo --upload is required" in error(setup, NODE, capsys)


def test_jax_version_is_read_from_requirements(tmp_path):
  assert common.jax_version() == pinned_jax()
  req = tmp_path / "requirements.txt"
  req.write_text("jaxlib==9.9\njax == 1.2.3  # comment\n")
  assert common.jax_version(req) == "1.2.3"
  req.write_text("jaxlib==9.9\n")
  with pytest.raises(ValueError, match="no 'jax==VERSION' pin"):
    common.jax_version(req)


# ----------------------------------------------------------------------------------------------- run / sweep
def test_run(config_file, capsys):
  (cmd,) = dry(run, [*NODE, "--config", f"{config_file}:method=lora,rank=16", "--workdir", "gs://b/runs/r1",
                     "--config.optim.lr=1e-3"], capsys)
  assert remote(cmd) == (
      f"cd ~/lora_jax && nohup .venv/bin/python -m experiments.main --config={config_file}:method=lora,rank=16"
      " --workdir=gs://b/runs/r1 --config.optim.lr=1e-3 > ~/lora_jax_run.log 2>&1 < /dev/null &")


def test_run_rejects_unknown_flags(config_file, capsys):
  err = error(run, [*NODE, "--config", f"{config_file}:x", "--workdir", "gs://b/r", "--config.lr", "1"], capsys)
  assert "unrecognized arguments: --config.lr 1 (config overrides take the form --config.KEY=VALUE)" in err


def test_run_executes_with_gcloud(config_file, fake_gcloud, capsys):
  argv = [*NODE, "--config", f"{config_file}:tiny", "--workdir", "gs://b/r"]
  expected = dry(run, argv, capsys)
  run.main(argv)
  assert fake_gcloud() == expected


def test_config_path_made_repo_relative(tmp_path, monkeypatch):
  monkeypatch.setattr(common, "ROOT", tmp_path)
  (tmp_path / "experiments").mkdir()
  (tmp_path / "experiments" / "c.py").write_text(CONFIG)
  assert common.config_arg(f"{tmp_path}/experiments/c.py:a=1,b=2") == "experiments/c.py:a=1,b=2"


def test_sweep(config_file, capsys):
  out = dry_lines(sweep, [*NODE, "--config", str(config_file), "--workdir-root", "gs://b/sweep/", "--config.seed=1"],
                  capsys)
  assert out[:4] == ["# 3 point(s), each into gs://b/sweep/NAME:",
                     "#   [0] method=lora_rank=16_lr=3e-4: method=lora,rank=16,lr=3e-4",
                     "#   [1] method=full_lr=1e-5: method=full,lr=1e-5", "#   [2] tiny: tiny"]
  (ssh,) = [shlex.split(line) for line in out if not line.startswith("#")]
  assert remote(ssh) == (
      f"cd ~/lora_jax && nohup .venv/bin/python -m experiments.sweep --config={config_file} "
      "--workdir=gs://b/sweep -- --config.seed=1 > ~/lora_jax_run.log 2>&1 < /dev/null &")


def test_sweep_arg_only_and_shard(config_file, tmp_path, capsys):
  path = tmp_path / "c.py"
  path.write_text(CONFIG + "def get_sweep(arg=''):\n    return [f'{arg},rank={r}' for r in (1, 4, 16, 64)]\n")
  out = dry_lines(sweep, [*NODE, "--config", f"{path}:tiny", "--workdir", "gs://b/s", "--only", "rank=(1|4)$",
                          "--shard", "0/2"], capsys)
  assert out[:2] == ["# 1 point(s), each into gs://b/s/NAME:", "#   [0] tiny_rank=1: tiny,rank=1"]
  assert shlex.split(remote(shlex.split(out[-1])))[6:13] == [
      "experiments.sweep", f"--config={path}:tiny", "--workdir=gs://b/s", "--only=rank=(1|4)$", "--shard=0/2",
      ">", "~/lora_jax_run.log"]
  assert "get_sweep('x') raised TypeError" in error(sweep, [*NODE, "--config", f"{config_file}:x", "--workdir",
                                                             "gs://b/s"], capsys)


def test_sweep_command_runs_experiments_sweep(tmp_path):
  """The remote command, run here with a fake venv python, reaches experiments.sweep with the same arguments."""
  command = sweep.sweep_command("c.py:a", "gs://b/s", "x y", (1, 3), ["--config.seed=2"])
  venv = tmp_path / ".venv" / "bin"
  venv.mkdir(parents=True)
  (venv / "python").write_text("#!/bin/sh\nfor a in \"$@\"; do echo \"$a\"; done > args.txt\n")
  (venv / "python").chmod(0o755)
  subprocess.run(["bash", "-c", command], cwd=tmp_path, check=True)
  args = (tmp_path / "args.txt").read_text().splitlines()
  assert args == ["-m", "experiments.sweep", "--config=c.py:a", "--workdir=gs://b/s", "--only=x y", "--shard=1/3",
                  "--", "--config.seed=2"]
  parsed = experiments_sweep._parser().parse_args(args[2:])
  assert (parsed.config, parsed.only, parsed.shard, parsed.overrides) == ("c.py:a", "x y", (1, 3), ["--config.seed=2"])


@pytest.mark.parametrize("body, message", [
    (CONFIG, "does not define get_sweep()"),
    (CONFIG + "def get_sweep():\n    return []\n", "must return a non-empty list of arg strings"),
    (CONFIG + "def get_sweep():\n    return ['a b', 'a/b']\n", "directory name(s) ['a-b'] more than once"),
])
def test_sweep_errors(body, message, tmp_path, capsys):
  path = tmp_path / "c.py"
  path.write_text(body)
  assert message in error(sweep, [*NODE, "--config", str(path), "--workdir-root", "gs://b/s"], capsys)


def test_sweep_argument_errors(config_file, capsys):
  base = [*NODE, "--workdir", "gs://b/s", "--config", str(config_file)]
  assert "no point selected" in error(sweep, [*base, "--only", "nothing"], capsys)
  assert "invalid shard '3/3'" in error(sweep, [*base, "--shard", "3/3"], capsys)
  assert "unterminated" in error(sweep, [*base, "--only", "("], capsys)


# ----------------------------------------------------------------------------------------------- logs / copy
def test_logs(capsys):
  assert dry(logs, NODE, capsys) == [[*TPU, "tpu-vm", "ssh", "lora-v5e-16", "--worker=0", ZONE, "--command",
                                      "tail -n 100 ~/lora_jax_run.log"]]
  (cmd,) = dry(logs, [*NODE, "--worker", "all", "--follow", "--lines", "20"], capsys)
  assert remote(cmd) == "tail -n 20 -F ~/lora_jax_run.log"
  assert "invalid worker 'x'" in error(logs, [*NODE, "--worker", "x"], capsys)


def test_copy(capsys):
  assert dry(copy, ["--from", "gs://b/sweep", "--to", "runs/sweep"], capsys) == [
      ["gcloud", "storage", "rsync", "--recursive", "gs://b/sweep", "runs/sweep"]]
  assert dry(copy, ["--from", "runs/x", "--to", "gs://b/x", "--gsutil"], capsys) == [
      ["gsutil", "-m", "rsync", "-r", "runs/x", "gs://b/x"]]
  assert "neither --from 'a' nor --to 'b' is a gs:// path" in error(copy, ["--from", "a", "--to", "b"], capsys)


# ----------------------------------------------------------------------------------------------- gpu_launch
def test_gpu_launch_sets_environment_and_execs():
  code = ("import os; print(*(os.environ[k] for k in ('JAX_COORDINATOR_ADDRESS', 'JAX_NUM_PROCESSES', "
          "'JAX_PROCESS_ID', 'CUDA_VISIBLE_DEVICES')))")
  result = subprocess.run([sys.executable, "-m", "tpu.gpu_launch", "--nodes", "4", "--node-rank", "2",
                           "--coordinator", "10.0.0.2:1234", "--gpus-per-node", "8", "--",
                           sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
  assert result.stdout.split() == ["10.0.0.2:1234", "4", "2", "0,1,2,3,4,5,6,7"]


def test_gpu_launch_dry_run(capsys):
  gpu_launch.main(["--nodes", "2", "--node-rank", "0", "--coordinator", "node0:1234", "--dry-run", "--",
                   "python", "-m", "experiments.main", "--config=c.py:x"])
  assert shlex.split(capsys.readouterr().out) == [
      "env", "JAX_COORDINATOR_ADDRESS=node0:1234", "JAX_NUM_PROCESSES=2", "JAX_PROCESS_ID=0",
      "python", "-m", "experiments.main", "--config=c.py:x"]


@pytest.mark.parametrize("argv, message", [
    (["--nodes", "2", "--node-rank", "2", "--coordinator", "h:1"], "--node-rank 2 must be in 0..1"),
    (["--nodes", "2", "--node-rank", "0", "--coordinator", "h"], "invalid coordinator 'h': expected HOST:PORT"),
    (["--nodes", "2", "--node-rank", "0", "--coordinator", "h:1", "--gpus-per-node", "0"], "at least 1"),
    (["--nodes", "0", "--node-rank", "0", "--coordinator", "h:1"], "--nodes must be at least 1"),
])
def test_gpu_launch_errors(argv, message, capsys):
  assert message in error(gpu_launch, [*argv, "--", "true"], capsys)


def test_gpu_launch_needs_a_command(capsys):
  assert "no command: put it after `--`" in error(gpu_launch, ["--nodes", "1", "--node-rank", "0",
                                                               "--coordinator", "h:1"], capsys)


# ----------------------------------------------------------------------------------------------- validation
@pytest.mark.parametrize("name", ["Lora", "1lora", "lora-", "lora_v5e", "a" * 64, ""])
def test_bad_tpu_names(name, capsys):
  assert f"invalid TPU name {name!r}" in error(delete, ["--name", name, "--zone", "us-west4-a"], capsys)


@pytest.mark.parametrize("name", ["a", "lora-v5e-16", "a" * 63])
def test_good_tpu_names(name):
  assert common.tpu_name(name) == name


@pytest.mark.parametrize("accelerator", ["v4-8", "v5litepod-16", "v5p-32", "v6e-8", "v2-512"])
def test_good_accelerators(accelerator):
  assert common.accelerator_type(accelerator) == accelerator


@pytest.mark.parametrize("accelerator", ["v5litepod", "tpu-8", "v5e_8", "V4-8", "v4-8x"])
def test_bad_accelerators(accelerator, capsys):
  err = error(create, [*NODE, "--accelerator", accelerator], capsys)
  assert f"invalid accelerator type {accelerator!r}" in err and "v5litepod-16" in err


def test_bad_zone(capsys):
  assert "invalid zone 'us-west4'" in error(delete, ["--name", "a", "--zone", "us-west4"], capsys)


@pytest.mark.parametrize("module, flag", [(run, "--workdir"), (sweep, "--workdir-root")])
def test_workdir_must_be_on_gcs(module, flag, config_file, capsys):
  config = [str(config_file)] if module is sweep else [f"{config_file}:tiny"]
  argv = [*NODE, "--config", *config, flag, "/home/me/runs"]
  assert "workdir '/home/me/runs' is not a gs:// path" in error(module, argv, capsys)
  module.main([*argv, "--allow-local-workdir", "--dry-run"])
  assert "--workdir=/home/me/runs" in capsys.readouterr().out


def test_config_must_exist_and_define_get_config(tmp_path, capsys):
  argv = [*NODE, "--workdir", "gs://b/r", "--config"]
  assert "config file 'nope.py' not found" in error(run, [*argv, "nope.py:x"], capsys)
  (tmp_path / "c.py").write_text("x = 1\n")
  assert "does not define get_config()" in error(run, [*argv, f"{tmp_path}/c.py:x"], capsys)


# ----------------------------------------------------------------------------------------------- execution
def test_execute_streams_and_stops_at_first_failure(tmp_path, capfd):
  marker = tmp_path / "ran"
  with pytest.raises(SystemExit, match=r"command failed with exit code 3: sh -c 'echo hi; exit 3'"):
    common.execute([["sh", "-c", "echo hi; exit 3"], ["touch", str(marker)]], dry_run=False)
  assert "hi" in capfd.readouterr().out and not marker.exists()


def test_missing_gcloud_is_a_clear_error(tmp_path, monkeypatch):
  monkeypatch.setenv("PATH", str(tmp_path))
  with pytest.raises(SystemExit, match="command not found: 'gcloud'"):
    delete.main(NODE)


EVIL = ["x; touch pwned", "$(touch pwned)", "`touch pwned`", "a'b\"c && touch pwned", "x\ntouch pwned"]


def test_config_values_never_become_shell_code(tmp_path, config_file, capsys):
  """Values from the command line and configs reach the remote python as single arguments, verbatim, through the real
  remote shell string (run here by bash with a fake venv python); nothing they spell is executed. The sweep runner
  builds each point's command as an argument list (no shell at all)."""
  home = tmp_path / "home"
  venv = home / "lora_jax" / ".venv" / "bin"
  venv.mkdir(parents=True)
  (venv / "python").write_text('#!/bin/sh\nfor a in "$@"; do printf "%s\\0" "$a"; done > "$HOME/args.partial"\n'
                               'mv "$HOME/args.partial" "$HOME/args"\n')
  (venv / "python").chmod(0o755)
  for evil in EVIL:
    override = f"--config.wandb.project={evil}"
    only = f"lora|{evil}"  # a regex that still selects a point
    for module, argv in ((run, ["--config", f"{config_file}:tiny", "--workdir", "gs://b/r"]),
                         (sweep, ["--config", str(config_file), "--workdir", "gs://b/s", "--only", only])):
      module.main([*NODE, *argv, override, "--dry-run"])
      cmd = shlex.split("\n".join(l for l in capsys.readouterr().out.splitlines() if not l.startswith("#")))
      subprocess.run(["bash", "-c", remote(cmd)], cwd=tmp_path, env={**os.environ, "HOME": str(home)}, check=True)
      for _ in range(200):  # the remote command runs detached (nohup ... &)
        if (home / "args").exists():
          break
        time.sleep(0.05)
      args = (home / "args").read_text().split("\0")[:-1]
      (home / "args").unlink()
      assert override in args and (module is run or f"--only={only}" in args), args
      assert not list(tmp_path.rglob("pwned")), evil
    assert override in experiments_sweep.point_command("c.py", "tiny", "w", [override])
