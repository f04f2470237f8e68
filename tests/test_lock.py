"""One writer per directory (lora_jax.lock): a second writer fails at once naming the holder, in the library's loop and
in every runner; a lock left by a dead process is taken over with a message."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap

import pytest

from lora_jax import lock

HOLDER = textwrap.dedent("""
    import sys, time
    from lora_jax import lock
    with lock.hold(sys.argv[1], tag=sys.argv[2]):
      print("held", flush=True)
      time.sleep(120)
""")


@pytest.fixture
def held_elsewhere():
  """Starts another process holding the lock of a directory (and tag); yields its pid; stops it afterwards."""
  procs = []

  def start(directory, tag=""):
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(directory), tag], stdout=subprocess.PIPE, text=True,
                            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    procs.append(proc)
    assert proc.stdout.readline().strip() == "held"
    return proc.pid

  yield start
  for proc in procs:
    proc.kill()
    proc.wait()


def test_a_second_writer_fails_naming_the_holder_and_a_released_lock_is_gone(tmp_path, held_elsewhere):
  pid = held_elsewhere(tmp_path / "run")
  with pytest.raises(lock.DirectoryLocked, match=rf"run is being written by process {pid} on host "
                                                 rf"'{socket.gethostname()}' \(since .*\).* lock file .*run\.lock"):
    with lock.hold(tmp_path / "run"):
      pass
  with lock.hold(tmp_path / "other"):  # another directory is free; holding is re-entrant in one process
    with lock.hold(tmp_path / "other"):
      assert json.loads(lock.lock_path(tmp_path / "other").read_text())["pid"] == os.getpid()
    assert lock.lock_path(tmp_path / "other").exists()
  assert not lock.lock_path(tmp_path / "other").exists()  # released: the file goes with it
  with lock.hold(tmp_path / "run", tag="shard-1-of-2"):  # a tagged lock (a sweep shard's) is a lock of its own
    pass


def test_a_lock_left_by_a_dead_process_is_recovered_with_a_message(tmp_path, capsys):
  dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
  pid = int(dead.stdout)
  path = lock.lock_path(tmp_path / "run")
  path.write_text(json.dumps({"host": socket.gethostname(), "pid": pid, "command": "python -m experiments.main",
                              "since": "2026-12-07T00:00:00+00:00"}))  # what a SIGKILLed holder leaves
  with lock.hold(tmp_path / "run"):
    assert json.loads(path.read_text())["pid"] == os.getpid()
  out = capsys.readouterr().out
  assert f"recovered a stale lock {path} of process {pid}" in out and "its process is gone" in out


def test_the_training_loop_refuses_a_run_directory_another_process_writes(tmp_path, held_elsewhere):
  from lora_jax import loop, train

  pid = held_elsewhere(tmp_path / "run")
  runs = loop.open_runs([tmp_path / "run"], train.LoopConfig(steps=1))
  with pytest.raises(lock.DirectoryLocked, match=f"process {pid}"):
    loop.fit(_OneRunProgram(), None, train.LoopConfig(steps=1), runs)  # stops before the program is used
  assert not (tmp_path / "run" / "metrics.jsonl").exists()


class _OneRunProgram:
  size = 1


def test_experiment_sweep_and_study_runners_stop_before_writing(tmp_path, held_elsewhere, capsys):
  from experiments import main as exp_main
  from experiments import study, sweep

  pid = held_elsewhere(tmp_path / "exp")
  with pytest.raises(SystemExit, match=rf"not started: .*exp is being written by process {pid}"):
    exp_main.main(["--config=experiments/configs/finetune.py:tiny", f"--workdir={tmp_path / 'exp'}"])
  assert not (tmp_path / "exp").exists()

  held_elsewhere(tmp_path / "sw", "shard-0-of-2")
  argv = ["--config=experiments/configs/finetune.py:tiny", f"--workdir={tmp_path / 'sw'}"]
  with pytest.raises(SystemExit):
    sweep.main([*argv, "--shard=0/2"], command=lambda *a: ["true"])
  assert "is being written by process" in capsys.readouterr().err and not (tmp_path / "sw").exists()

  held_elsewhere(tmp_path / "st")
  with pytest.raises(SystemExit):
    study.main([f"--workdir={tmp_path / 'st'}", "--variant=quick"])
  assert "is being written by process" in capsys.readouterr().err and not (tmp_path / "st").exists()
