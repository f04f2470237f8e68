"""Chaos harness: kill each layer a user runs at random moments, rerun the same command, compare bitwise.

    python -m benchmarks.chaos [--layers run,stack,sweep,rl] [--kills 10] [--seed 0] [--signals KILL,TERM]
                               [--workdir runs/chaos]

For each layer (a single ``experiments.main`` run, an ``experiments.stacked`` stack of 3 runs, an
``experiments.sweep --parallel 2`` sweep of 3 points, an RL run) it first runs the command uninterrupted and records
its outcome: every metrics file's records (losses, NLLs, rewards, accuracies, norms; not timings) and the newest
checkpoint's arrays (trainable, optimizer state, step, RNG) and data position. Then, per kill, it starts the command in a fresh directory, sends the signal to the command and
every process under it (as a VM that dies takes all of them) at a moment drawn uniformly over the reference's wall
time, reruns the same command until it exits 0 (a SIGTERM exits 143: "rerun to resume"), and compares the outcome
with the reference bitwise. Each kill prints its seed (``--seed S --kills 1 --layers L`` with the printed seed
replays it); the last line is ``kills survived: X/Y, bitwise: X/Y``. The runs are tiny (the small test base, a few
dozen steps), so a layer takes ~1-3 minutes per kill on 2 cores. tests/test_chaos.py runs one kill of the single run.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import pathlib
import random
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence

ROOT = pathlib.Path(__file__).resolve().parent.parent
LAYERS = ("run", "stack", "sweep", "rl")
SIGNALS = {"KILL": signal.SIGKILL, "TERM": signal.SIGTERM}
# Metric keys never compared: how fast a run ran and how much memory it took (everything it computes is compared).
DROPPED = ("time", "per_s", "memory", "peak", "mfu")
# A small base shared by every layer (built once, by the reference of the first layer).
BASE = ["--config.tiny_base.steps=20", "--config.tiny_base.corpus_documents=200"]
SFT = ["--config.train.steps=24", "--config.train.checkpoint_every=4", "--config.train.eval_every=8",
       "--config.train.log_every=1", "--config.data.synthetic_examples=200", "--config.data.eval_size=16",
       "--config.eval.arithmetic_examples=0"]


def commands(layer: str, workdir: pathlib.Path, cache: pathlib.Path, base: Sequence[str] | None = None) -> list[str]:
  """The command of a layer into ``workdir`` (run from the repository root); ``base`` overrides replace the small
  base's (e.g. a test suite's shared one)."""
  py = [sys.executable, "-m"]
  base = [*BASE, f"--config.tiny_base.cache_dir={cache / 'base'}"] if base is None else list(base)
  common = [*base, f"--config.data.cache_dir={cache / 'data'}"]
  if layer == "run":
    return py + ["experiments.main", "--config", "experiments/configs/finetune.py:tiny,method=lora,rank=4",
                 "--workdir", str(workdir), *SFT, *common]
  if layer == "stack":
    points = [a for k, lr in enumerate((2e-3, 4e-3, 8e-3))
              for a in ("--point", f"tiny,method=lora,rank=4,lr={lr}", "--workdir", str(workdir / f"p{k}"))]
    return py + ["experiments.stacked", "--config", "experiments/configs/finetune.py", *points, "--", *SFT, *common]
  if layer == "sweep":
    return py + ["experiments.sweep", "--config", "experiments/configs/finetune.py:tiny", "--only", "rank=(1|4|16)$",
                 "--parallel", "2", "--stack", "1", "--workdir", str(workdir), "--", *SFT, *common]
  if layer == "rl":
    return py + ["experiments.main", "--config", "experiments/configs/rl.py:quick,method=lora,rank=1",
                 "--workdir", str(workdir), "--config.train.steps=8", "--config.train.eval_every=4",
                 "--config.train.checkpoint_every=2", "--config.warmup.steps=20", *common]
  raise ValueError(f"unknown layer {layer!r}; valid: {list(LAYERS)}")


def _kept(key: str) -> bool:
  return not key.endswith("_s") and not any(k in key for k in DROPPED)


def outcome(workdir: pathlib.Path) -> dict:
  """What a finished command left: per metrics file, its records without timings and memory; per run, the newest
  checkpoint's step, a hash of every array it holds (trainable, optimizer state, step, RNG) and the data position."""
  import jax
  import numpy as np
  import orbax.checkpoint as ocp

  out = {}
  for path in sorted(workdir.rglob("metrics.jsonl")):
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    out[str(path.relative_to(workdir))] = [{k: v for k, v in r.items() if _kept(k)} for r in records]
  for ckpts in sorted(workdir.rglob("checkpoints")):
    steps = sorted(int(p.name) for p in ckpts.iterdir() if p.name.isdigit())
    if not steps:
      continue
    newest = ckpts / str(steps[-1])
    digest = hashlib.sha256()
    for item in sorted(p.name for p in newest.iterdir() if p.is_dir() and p.name != "record"):
      leaves, _ = jax.tree_util.tree_flatten_with_path(ocp.StandardCheckpointer().restore(newest / item))
      for path, leaf in leaves:  # trainable arrays, optimizer state, step, RNG
        digest.update(f"{item}{path}".encode())
        digest.update(np.ascontiguousarray(np.asarray(leaf)).tobytes())
    data = json.loads((newest / "record" / "metadata").read_text()).get("data")  # the data iterator's position
    out[str(ckpts.relative_to(workdir))] = [steps[-1], digest.hexdigest(), data]
  return out


def _descendants(pid: int) -> list[int]:
  """``pid`` and every process under it (read from /proc; the sweep starts its points in their own sessions)."""
  children: dict[int, list[int]] = {}
  for stat in pathlib.Path("/proc").glob("[0-9]*/stat"):
    try:
      fields = stat.read_text().rsplit(")", 1)[1].split()
    except OSError:
      continue
    children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
  out, todo = [], [pid]
  while todo:
    p = todo.pop()
    out.append(p)
    todo += children.get(p, [])
  return out


def _saved_steps(workdir: pathlib.Path) -> list[int]:
  """The steps of every checkpoint under ``workdir``, read while a run may be writing there: directories that vanish
  during the walk (Orbax renaming its temporaries) are skipped, and checkpoints are not walked into."""
  steps = []
  for root, dirs, _ in os.walk(workdir, onerror=lambda _: None):
    if os.path.basename(root) == "checkpoints":
      steps += [int(d) for d in dirs if d.isdigit()]
      dirs.clear()
  return sorted(steps)


def _run(argv: list[str], log: pathlib.Path, kill_at=None, sig: int = signal.SIGKILL) -> int:
  """Runs ``argv`` (output appended to ``log``); with ``kill_at`` (seconds, or a function that says when) sends
  ``sig`` to it and everything under it then. Returns its exit status (negative: killed by a signal)."""
  log.parent.mkdir(parents=True, exist_ok=True)
  with open(log, "a") as f:
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    if kill_at is None:
      return proc.wait()
    if callable(kill_at):
      while proc.poll() is None and not kill_at():
        time.sleep(0.02)
      if proc.poll() is not None:
        return proc.returncode  # it finished before the kill
    else:
      try:
        return proc.wait(timeout=kill_at)  # it finished before the kill
      except subprocess.TimeoutExpired:
        pass
    if sig == signal.SIGTERM:
      os.killpg(proc.pid, sig)  # as a preemption notice: the runner passes it on to its children
    else:
      for p in _descendants(proc.pid):
        try:
          os.kill(p, sig)
        except ProcessLookupError:
          pass
    return proc.wait()


def chaos(layers: Sequence[str], kills: int, seed: int, signals: Sequence[str], workdir: pathlib.Path,
          stream=None, base: Sequence[str] | None = None, after_checkpoint: int | None = None) -> tuple[int, int, int]:
  """Runs the harness (module docstring), printing to ``stream`` (default stdout); returns (kills, survived,
  bitwise). ``after_checkpoint`` replaces the random moment by "as soon as a checkpoint of that step exists" (a
  test's deterministic kill mid-run)."""
  stream = sys.stdout if stream is None else stream
  cache = workdir / "cache"
  total = survived = bitwise = 0
  for layer in layers:
    ref_dir = workdir / layer / "reference"
    if layer == layers[0] and base is None:  # build the small base first: every kill finds it built
      _run([*commands(layer, workdir / "warmup", cache, base), "--config.train.steps=1"], workdir / "warmup.log")
    shutil.rmtree(ref_dir, ignore_errors=True)
    t0 = time.monotonic()
    code = _run(commands(layer, ref_dir, cache, base), workdir / layer / "reference.log")
    wall = time.monotonic() - t0
    if code != 0:
      raise SystemExit(f"chaos: the uninterrupted {layer} run failed (exit {code}); see {workdir / layer}/reference.log")
    reference = outcome(ref_dir)
    print(f"[{layer}] reference: {wall:.1f} s, {len(reference)} metrics files and checkpoints", file=stream, flush=True)
    for i in range(kills):
      kill_seed = seed * 1000 + i
      rng = random.Random(f"{layer}:{kill_seed}")
      sig_name = signals[i % len(signals)]
      d = workdir / layer / f"kill{i}"
      shutil.rmtree(d, ignore_errors=True)
      d.mkdir(parents=True)
      if after_checkpoint is None:
        kill_at, moment = rng.uniform(0.05, 0.95) * wall, None
      else:
        kill_at = lambda: after_checkpoint in _saved_steps(d / "run")  # noqa: E731
        moment = f"once checkpoint {after_checkpoint} was saved"
      argv = commands(layer, d / "run", cache, base)
      t0 = time.monotonic()
      first = _run(argv, d / "log.txt", kill_at, SIGNALS[sig_name])
      moment = moment or f"at {kill_at:.1f} s"
      if after_checkpoint is not None:
        moment += f" ({time.monotonic() - t0:.1f} s)"
      saved = _saved_steps(d / "run")
      reruns, code = 0, first
      while code != 0 and reruns < 3:  # a rerun resumes; a SIGTERM'd run asks for one (143)
        code = _run(argv, d / "log.txt")
        reruns += 1
      total += 1
      ok = code == 0
      same = ok and outcome(d / "run") == reference
      survived += ok
      bitwise += same
      left = f"checkpoints at steps {sorted(set(saved))}" if saved else "no checkpoint"
      print(f"[{layer}] kill {i + 1}/{kills} (seed {kill_seed}): SIG{sig_name} {moment} (exit {first}, "
            f"{left}), {reruns} rerun(s) -> {'finished' if ok else f'FAILED (exit {code})'}"
            f"{', bitwise equal' if same else (', DIFFERENT' if ok else '')}", file=stream, flush=True)
      if same:
        shutil.rmtree(d, ignore_errors=True)  # keep only what needs looking at
  print(f"kills survived: {survived}/{total}, bitwise: {bitwise}/{total}", file=stream, flush=True)
  return total, survived, bitwise


def main(argv: Sequence[str] | None = None) -> int:
  """The command line (module docstring); exit status 1 unless every kill was survived bitwise."""
  p = argparse.ArgumentParser(prog="python -m benchmarks.chaos", description=__doc__.splitlines()[0])
  p.add_argument("--layers", default=",".join(LAYERS), help=f"comma-separated, of {list(LAYERS)}")
  p.add_argument("--kills", type=int, default=10, help="kills per layer (default 10)")
  p.add_argument("--seed", type=int, default=0, help="kill i of a layer uses seed SEED*1000+i")
  p.add_argument("--signals", default="KILL,TERM", help="signals used in turn: KILL, TERM or KILL,TERM")
  p.add_argument("--workdir", default="runs/chaos", help="where the runs go (kept only for kills that failed)")
  args = p.parse_args(argv)
  layers = [x.strip() for x in args.layers.split(",") if x.strip()]
  signals = [x.strip().upper() for x in args.signals.split(",") if x.strip()]
  if unknown := [x for x in layers if x not in LAYERS]:
    p.error(f"--layers {unknown}: valid layers are {list(LAYERS)}")
  if bad := [x for x in signals if x not in SIGNALS]:
    p.error(f"--signals {bad}: valid signals are {list(SIGNALS)}")
  if args.kills < 1:
    p.error(f"--kills must be >= 1, got {args.kills}")
  total, survived, bitwise = chaos(layers, args.kills, args.seed, signals, pathlib.Path(args.workdir).absolute())
  return 0 if survived == bitwise == total else 1


if __name__ == "__main__":
  sys.exit(main())
