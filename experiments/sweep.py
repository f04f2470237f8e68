"""Run every point of a config's sweep, each as its own experiment in its own process, into one directory; resumable.

    python -m experiments.sweep --config experiments/configs/finetune.py:tiny --workdir runs/sweep \\
        [--parallel N] [--stack K|auto] [--shard I/N] [--only REGEX] [--dry-run] [--overwrite] [-- --config.x=1 ...]

The config file's ``get_sweep(ARG)`` lists the points: arg strings, each complete by itself
(``tiny,method=lora,rank=4``), or dicts (``{"method": "lora", "rank": 4}`` is ``method=lora,rank=4``). Point k runs
``python -m experiments.main --config FILE:POINT --workdir DIR/NAME [--config.* overrides given after --]`` as a
subprocess, so a crash of one point never stops the others. NAME is the point made filesystem-safe: ``,`` -> ``_``,
any run of characters other than letters, digits and ``._=-`` -> ``-`` (``tiny,method=lora,rank=4`` ->
``tiny_method=lora_rank=4``); a name over 120 characters is cut and ends in a hash of the point. Two points with one
name are an error. What the sweep leaves:

    DIR/sweep.json        {"config", "arg", "overrides", "points": [{"index", "point", "name"}, ...], "argv",
                          "git_commit", "started", ...}: the sweep, every point of get_sweep(ARG) with its name
    DIR/NAME/             the point's experiments.main workdir (config.json, report.md, <method>/metrics.jsonl, ...)
    DIR/NAME/status.json  {"state": "running" | "done" | "failed" | "interrupted", "returncode", "seconds", ...},
                          written by this runner; a failed point also keeps its "last_lines" of output
    DIR/NAME/log.txt      the point's stdout and stderr, every attempt appended under a "=== sweep attempt" line

Rerunning the same command skips the points whose status is "done" and runs the others again: an interrupted point
resumes from its checkpoints (experiments.main does that), a failed one starts over where it failed. A failed point
(non-zero exit) is recorded and the rest go on; the exit status is 1 when a point failed. SIGTERM or SIGINT (Ctrl-C)
is passed on to the running points as SIGTERM (each saves a checkpoint and stops with status 143); they are marked
"interrupted", no new point starts, and the runner exits with 143; a second signal kills them. A DIR that holds another
sweep (other config file, arg or overrides) is refused unless --overwrite, which deletes it; --overwrite is passed on
to every point too, so a point dir holding a run of an older version of its config is replaced rather than refused.
Progress (points done, running, failed, to go, and an ETA from the durations of finished points) goes to stderr, one
line per event, plus a status line refreshed every second on a terminal. ``python -m experiments.report DIR``
reports on the finished sweep.

``--stack K`` trains up to K points together as one stacked run (``experiments.stacked``, ``lora_jax.stack``): points
of one method that differ only in LR, LoRA+ ratio, weight decay, rank, alpha, scaling or seeds share one process,
one base, one compiled step (vmapped over the runs) and, when their data seeds agree, one batch. Each point's
directory ends up the same as when it runs alone (plus ``stack.json``), so reports need not know. ``--stack auto``
(the default) stacks 8 points at a time on the tiny CPU base, where they fit in memory many times over, and runs
real-model points one by one; ``--stack 1`` never stacks.

Several hosts or VMs split a sweep with ``--shard I/N`` each (point k runs on shard k % N) over a shared DIR. When DIR
is not local (gs://), each point's log is written under --log-dir and copied to DIR/NAME/log-HOST.txt when the point
ends. On a multi-host TPU slice every host runs the same command (no --shard, no --overwrite: a point is one
multi-process experiment); ``python -m tpu.sweep`` does that. ``--parallel N`` runs N points at once: on a CPU
machine they share its cores.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import hashlib
import json
import os
import pathlib
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from typing import Callable, Sequence

import ml_collections
from etils import epath

from experiments import overrides as overrides_lib
from experiments import provenance
from experiments.configs import common
from lora_jax import lock

EXIT_FAILED = 1  # a point failed
EXIT_INTERRUPTED = 143  # signalled (as experiments.main's EXIT_PREEMPTED): the same command resumes
MAX_NAME = 120  # characters of a point's directory name
LAST_LINES = 20  # lines of a failed point's output kept in its status
DEFAULT_LOG_DIR = "~/lora_jax_sweep_logs"  # where point logs go while they run when DIR is not local

PointCommand = Callable[[str, str, str, Sequence[str]], list]  # (config file, point, point workdir, extra flags)


def point_command(config_file: str, point: str, workdir: str, extra: Sequence[str]) -> list[str]:
  """The command that runs one point: experiments.main in this Python, the extra flags (overrides, --overwrite) last."""
  return [sys.executable, "-m", "experiments.main", f"--config={config_file}:{point}", f"--workdir={workdir}",
          *extra]


def stacked_command(config_file: str, points: Sequence[str], workdirs: Sequence[str], extra: Sequence[str]) -> list:
  """The command that runs several points as one stack: experiments.stacked, the extra flags last."""
  pairs = [arg for point, workdir in zip(points, workdirs) for arg in (f"--point={point}", f"--workdir={workdir}")]
  flags = [e for e in extra if e == "--overwrite"]
  overrides = [e for e in extra if e != "--overwrite"]
  return [sys.executable, "-m", "experiments.stacked", f"--config={config_file}", *pairs, *flags,
          *(["--", *overrides] if overrides else [])]


AUTO_STACK = 8  # points per stack under --stack auto (tiny base only)


@dataclasses.dataclass(frozen=True)
class Point:
  """One sweep point: its index in ``get_sweep(arg)``, its arg string and its directory name."""
  index: int
  arg: str
  name: str


def point_name(point: str) -> str:
  """The directory name of a point: ``tiny,method=lora,rank=4`` -> ``tiny_method=lora_rank=4`` (module docstring)."""
  name = re.sub(r"[^A-Za-z0-9._=-]+", "-", point.replace(",", "_")).strip("-_.") or "default"
  if len(name) > MAX_NAME:
    name = f"{name[:MAX_NAME - 9]}-{hashlib.sha1(point.encode()).hexdigest()[:8]}"
  return name


def sweep_points(module, arg: str) -> list[Point]:
  """The points of ``module.get_sweep(arg)`` (``get_sweep()`` when ``arg`` is empty) with their names."""
  try:
    raw = module.get_sweep(arg) if arg else module.get_sweep()
  except Exception as e:  # a wrong variant name, or a get_sweep that takes no arg
    raise ValueError(f"get_sweep({arg!r}) raised {type(e).__name__}: {e}") from e
  if not isinstance(raw, (list, tuple)) or not raw or not all(isinstance(p, (str, dict)) for p in raw):
    raise ValueError(f"get_sweep({arg!r}) must return a non-empty list of arg strings or dicts, got {raw!r}")
  args = [common.point_arg(p) for p in raw]
  points = [Point(i, a, point_name(a)) for i, a in enumerate(args)]
  for what, values in (("point", args), ("directory name", [p.name for p in points])):
    twice = sorted({v for v in values if values.count(v) > 1})
    if twice:
      raise ValueError(f"get_sweep({arg!r}) gives the {what}(s) {twice} more than once; make the points distinct")
  return points


def select(points: Sequence[Point], shard: tuple[int, int] | None = None, only: str | None = None) -> list[Point]:
  """The points of shard ``(i, n)`` (index % n == i) whose arg string matches the regex ``only``."""
  return [p for p in points if (shard is None or p.index % shard[1] == shard[0])
          and (only is None or re.search(only, p.arg))]


def check_points(module, points: Sequence[Point], overrides: Sequence[str]) -> None:
  """Builds every point's config and checks that each override names one of its fields, before anything runs."""
  for p in points:
    try:
      config = module.get_config(p.arg)
    except Exception as e:  # the point would fail the same way in its run: say so now
      raise ValueError(f"point [{p.index}] {p.arg!r}: get_config raised {type(e).__name__}: {e}") from e
    if isinstance(config, ml_collections.ConfigDict):
      try:
        overrides_lib.apply(config, overrides)
      except ValueError as e:
        raise ValueError(f"point [{p.index}] {p.arg!r}: {e}") from e


def stack_groups(module, points: Sequence[Point], overrides: Sequence[str], size: int | str) -> list[list[Point]]:
  """The points in groups that run as one stack (``experiments.stacked.stack_key`` equal, at most ``size`` each, in
  sweep order); ``size`` "auto" is ``AUTO_STACK`` when every point trains the tiny base, else 1."""
  from experiments import stacked  # imports jax: only when stacking

  configs = [overrides_lib.apply(module.get_config(p.arg), overrides) for p in points]
  if size == "auto":
    size = AUTO_STACK if all(c.get("model", {}).get("name") == "tiny" for c in configs) else 1
  if size <= 1:
    return [[p] for p in points]
  by_key: dict[str, list[list[Point]]] = {}
  order: list[list[Point]] = []
  for p, c in zip(points, configs):
    key = stacked.stack_key(c)
    if key is None:
      order.append([p])
      continue
    groups = by_key.setdefault(key, [])
    if not groups or len(groups[-1]) >= size:
      groups.append([])
      order.append(groups[-1])
    groups[-1].append(p)
  return order


def _is_local(path: epath.Path) -> bool:
  return "://" not in str(path)


def _write_json(path: epath.Path, record: dict) -> None:
  """Writes ``record``; locally through a renamed temporary file, so a reader never sees half of it."""
  text = json.dumps(record, indent=2) + "\n"
  if not _is_local(path):
    path.write_text(text)
    return
  tmp = pathlib.Path(f"{path}.{os.getpid()}.tmp")
  tmp.write_text(text)
  os.replace(tmp, str(path))


def read_status(point_dir: epath.Path) -> dict | None:
  """A point's ``status.json`` (None when it has none or it cannot be read)."""
  try:
    return json.loads((point_dir / "status.json").read_text())
  except (OSError, ValueError):
    return None


def sweep_identity(config_file: str, arg: str, overrides: Sequence[str]) -> dict:
  """What makes two invocations the same sweep: config file, arg and overrides."""
  return {"config": os.path.normpath(config_file), "arg": arg, "overrides": list(overrides)}


def workdir_conflict(workdir: epath.Path, identity: dict) -> str | None:
  """Why ``workdir`` cannot take this sweep without --overwrite (another sweep's, or other files), or None."""
  if not workdir.exists() or not any(workdir.iterdir()):
    return None
  saved = workdir / "sweep.json"
  if not saved.exists():
    return f"{workdir} is not empty and holds no sweep.json. Use another --workdir, or --overwrite to delete it."
  try:
    old = json.loads(saved.read_text())
  except ValueError:
    old = {}
  old = {k: old.get(k) for k in identity}
  if old == identity:
    return None
  return (f"{workdir} holds another sweep ({old}; this one: {identity}). Use another --workdir, or --overwrite to "
          "delete it.")


def _now() -> str:
  return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


def _duration(seconds: float) -> str:
  if seconds < 10:
    return f"{seconds:.1f}s"
  seconds = int(round(seconds))
  if seconds < 60:
    return f"{seconds}s"
  if seconds < 3600:
    return f"{seconds // 60}m{seconds % 60:02d}s"
  return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class Progress:
  """Sweep progress on a stream: one line per event; on a terminal also a status line refreshed every second."""

  def __init__(self, total: int, parallel: int, earlier: int, earlier_seconds: Sequence[float], stream=None):
    self.stream = stream or sys.stderr
    self.tty = self.stream.isatty()
    self.total, self.parallel, self.earlier = total, parallel, earlier
    self.earlier_seconds = list(earlier_seconds)  # durations recorded by earlier invocations (ETA fallback)
    self.seconds = []  # durations of the points done in this invocation
    self.done, self.failed, self.interrupted = earlier, 0, 0
    self.running = {}  # name -> start time
    self._drawn = 0.0

  def eta(self) -> float | None:
    """Seconds until the selected points are done: the mean duration times the points left, over those at once."""
    durations = self.seconds or self.earlier_seconds
    if not durations:
      return None
    mean = sum(durations) / len(durations)
    now = time.monotonic()
    queued = self.total - self.done - self.failed - self.interrupted - len(self.running)
    work = queued * mean + sum(max(mean - (now - t), 0.0) for t in self.running.values())
    return work / max(1, min(self.parallel, queued + len(self.running)))

  def status(self) -> str:
    """``3/9 done, 2 running, 1 failed, 3 to go, ETA 4m10s``."""
    queued = self.total - self.done - self.failed - self.interrupted - len(self.running)
    eta = self.eta()
    text = f"{self.done}/{self.total} done, {len(self.running)} running, {self.failed} failed, "
    if self.interrupted:
      text += f"{self.interrupted} interrupted, "
    return text + f"{queued} to go, ETA {'?' if eta is None else _duration(eta)}"

  def event(self, text: str) -> None:
    """Prints one event with the counts after it."""
    clear = "\r\033[K" if self.tty else ""
    print(f"{clear}[sweep {datetime.datetime.now():%H:%M:%S}] {text} | {self.status()}", file=self.stream,
          flush=True)
    self._drawn = 0.0

  def tick(self) -> None:
    """Redraws the status line on a terminal (at most once a second)."""
    if self.tty and time.monotonic() - self._drawn >= 1.0:
      print(f"\r\033[K[sweep] {self.status()}", end="", file=self.stream, flush=True)
      self._drawn = time.monotonic()

  def close(self) -> None:
    """Clears the status line."""
    if self.tty:
      print("\r\033[K", end="", file=self.stream, flush=True)


@dataclasses.dataclass
class _Running:
  points: list[Point]  # one point, or the points of one stack
  proc: subprocess.Popen
  log: object  # the log file, open for appending and reading
  log_path: pathlib.Path
  offset: int  # where this attempt's output starts in the log
  status: dict  # the "running" status record
  started: float


class Sweep:
  """Runs selected points of a sweep into ``workdir``, each as a subprocess; see the module docstring."""

  def __init__(self, config_file: str, points: Sequence[Point], workdir: str | epath.PathLike, *,
               extra: Sequence[str] = (), parallel: int = 1, command: PointCommand = point_command,
               log_dir: str | None = None, stream=None, groups: Sequence[Sequence[Point]] | None = None,
               group_command=stacked_command):
    self.config_file, self.points, self.workdir = config_file, list(points), epath.Path(workdir)
    self.groups = [list(g) for g in groups] if groups is not None else [[p] for p in self.points]
    self.group_command = group_command
    self.extra, self.parallel, self.command = list(extra), parallel, command
    if log_dir is None and not _is_local(self.workdir):
      log_dir = os.path.join(DEFAULT_LOG_DIR, point_name(str(self.workdir)))
    self.log_dir = pathlib.Path(os.path.expanduser(log_dir)) if log_dir else None
    self.stream = stream or sys.stderr
    self.host = socket.gethostname()
    self.signals = 0
    self.results = {}  # name -> final status of the points run in this invocation

  def log_path(self, point: Point) -> pathlib.Path:
    """Where a point's output goes while it runs."""
    if self.log_dir is None:
      return pathlib.Path(str(self.workdir / point.name / "log.txt"))
    return self.log_dir / f"{point.name}.txt"

  def point_argv(self, point: Point) -> list[str]:
    """The command of one point."""
    return self.command(self.config_file, point.arg, str(self.workdir / point.name), self.extra)

  def argv(self, points: Sequence[Point]) -> list[str]:
    """The command of one point, or of several as one stack."""
    if len(points) == 1:
      return self.point_argv(points[0])
    return self.group_command(self.config_file, [p.arg for p in points],
                              [str(self.workdir / p.name) for p in points], self.extra)

  def run(self) -> int:
    """Runs every point without a "done" status; returns the exit status (0, EXIT_FAILED or EXIT_INTERRUPTED)."""
    statuses = {p.name: read_status(self.workdir / p.name) for p in self.points}
    finished = [p for p in self.points if (statuses[p.name] or {}).get("state") == "done"]
    todo = [[p for p in g if p not in finished] for g in self.groups]
    todo = [g for g in todo if g]  # a stack whose other points are done reruns only the rest
    self.progress = Progress(len(self.points), self.parallel, len(finished),
                             [statuses[p.name].get("seconds", 0.0) for p in finished], self.stream)
    stacks = [g for g in todo if len(g) > 1]
    self.progress.event(f"{len(self.points)} point(s) in {self.workdir}: {len(finished)} done earlier, "
                        f"{sum(map(len, todo))} to run, {self.parallel} at a time"
                        + (f", {sum(map(len, stacks))} of them in {len(stacks)} stack(s)" if stacks else ""))
    running: list[_Running] = []
    handlers = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    forwarded = 0
    try:
      while running or (todo and not self.signals):
        if self.signals > forwarded:  # the first signal asks each point to save and stop; the next kills them
          for r in running:
            if forwarded == 0:
              r.proc.send_signal(signal.SIGTERM)
            else:
              r.proc.kill()
          if forwarded == 0 and running:
            self.progress.event(f"signal received: stopping {len(running)} running point(s) (they save a "
                                "checkpoint); signal again to kill them")
          forwarded = self.signals
        while todo and len(running) < self.parallel and not self.signals:
          running.append(self._start(todo.pop(0)))
        for r in [r for r in running if r.proc.poll() is not None]:
          running.remove(r)
          self._finish(r, interrupted_by_us=forwarded > 0)
        self.progress.tick()
        time.sleep(0.1)
    finally:
      for s, h in handlers.items():
        signal.signal(s, h)
      self.progress.close()
    self._summary(finished)
    if self.signals:
      return EXIT_INTERRUPTED
    return EXIT_FAILED if any(s["state"] != "done" for s in self.results.values()) else 0

  def _on_signal(self, signum, frame):
    del signum, frame
    self.signals += 1

  def _start(self, points: list[Point]) -> _Running:
    """Starts one point, or several as one stack (their output goes to the first one's log)."""
    for p in points:
      (self.workdir / p.name).mkdir(parents=True, exist_ok=True)
    log_path = self.log_path(points[0])
    log_path.parent.mkdir(parents=True, exist_ok=True)
    attempt = max((read_status(self.workdir / p.name) or {}).get("attempt", 0) for p in points) + 1
    argv = self.argv(points)
    log = open(log_path, "a+b")  # readable too: the lines of a failure, and the log if the point dir was replaced
    log.write(f"=== sweep attempt {attempt} on {self.host} at {_now()}: {shlex.join(argv)}\n".encode())
    log.flush()
    status = {"state": "running", "attempt": attempt, "host": self.host, "started": _now(), "command": argv}
    if len(points) > 1:
      status["stacked_with"] = [p.name for p in points]
    for p in points:
      _write_json(self.workdir / p.name / "status.json",
                  {"point": p.arg, "name": p.name, "index": p.index, **status})
      self.progress.running[p.name] = time.monotonic()
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"},
                            start_new_session=True)  # a terminal's Ctrl-C reaches the runner only; it passes it on
    what = f"[{points[0].index}] {points[0].name}" if len(points) == 1 else (
        f"a stack of {len(points)}: " + ", ".join(f"[{p.index}] {p.name}" for p in points))
    self.progress.event(f"start {what} (attempt {attempt})")
    return _Running(points, proc, log, log_path, log.tell(), status, time.monotonic())

  def _finish(self, r: _Running, interrupted_by_us: bool) -> None:
    code, seconds = r.proc.returncode, time.monotonic() - r.started
    r.log.flush()
    if not r.log_path.exists():  # experiments.main --overwrite replaced the point dir under the open log
      r.log_path.parent.mkdir(parents=True, exist_ok=True)
      r.log.seek(0)
      r.log_path.write_bytes(r.log.read())
    r.log.seek(r.offset)
    attempt_output = r.log.read()
    lines = attempt_output.decode(errors="replace").splitlines()[-LAST_LINES:]
    r.log.close()
    if code == 0:
      state = "done"
    elif interrupted_by_us or code in (EXIT_INTERRUPTED, -signal.SIGTERM):  # saved and stopped (or killed by us)
      state = "interrupted"
    else:
      state = "failed"
    for i, point in enumerate(r.points):
      point_dir = self.workdir / point.name
      point_log = self.log_path(point)
      if i:  # the other points of a stack keep a copy of its output
        with open(point_log, "ab") as f:
          f.write(attempt_output)
      log = str(point_log)
      if self.log_dir is not None:  # keep the log with the point's results
        copy = point_dir / f"log-{self.host}.txt"
        copy.write_bytes(point_log.read_bytes())
        log = str(copy)
      point_state, point_lines = state, lines
      outcome = _read_stack_outcome(point_dir) if len(r.points) > 1 and code in (0, EXIT_FAILED) else None
      if outcome is not None:  # a stack that ran to its end says how each of its points ended
        point_state = outcome["state"]
        point_lines = [outcome.get("error") or ""]
      status = {"point": point.arg, "name": point.name, "index": point.index, **r.status, "state": point_state,
                "returncode": code, "ended": _now(), "seconds": round(seconds, 1), "log": log}
      if point_state == "failed":
        status["last_lines"] = point_lines
      _write_json(point_dir / "status.json", status)
      self.results[point.name] = status
      self._report(point, point_state, code, seconds / len(r.points), log)

  def _report(self, point: Point, state: str, code: int, seconds: float, log: str) -> None:
    del self.progress.running[point.name]
    if state == "done":
      self.progress.done += 1
      self.progress.seconds.append(seconds)
      self.progress.event(f"done [{point.index}] {point.name} in {_duration(seconds)}")
    elif state == "failed":
      self.progress.failed += 1
      self.progress.event(f"FAILED [{point.index}] {point.name} (exit status {code}) after "
                          f"{_duration(seconds)}; log: {log}")
    else:
      self.progress.interrupted += 1
      self.progress.event(f"interrupted [{point.index}] {point.name} (exit status {code})")

  def _summary(self, finished: Sequence[Point]) -> None:
    by_state = {}
    for p in self.points:
      state = "done earlier" if p in finished else self.results.get(p.name, {}).get("state", "not started")
      by_state.setdefault(state, []).append(p)
    counts = ", ".join(f"{len(ps)} {state}" for state, ps in by_state.items())
    lines = [f"sweep: {len(self.points)} point(s) in {self.workdir}: {counts}"]
    for p in by_state.get("failed", []):
      s = self.results[p.name]
      lines.append(f"  FAILED [{p.index}] {p.arg} (exit status {s['returncode']}): {s['log']}")
    if "interrupted" in by_state or "not started" in by_state:
      lines.append("  interrupted or not started: rerun the same command to resume")
    elif "failed" in by_state:
      lines.append("  rerun the same command to retry the failed point(s)")
    else:
      lines.append(f"  report: python -m experiments.report {self.workdir}")
    print("\n".join(lines), file=self.stream, flush=True)


def _read_stack_outcome(point_dir: epath.Path) -> dict | None:
  """How experiments.stacked says a point of a stack ended (``stack.json``), or None when it did not say."""
  try:
    outcome = json.loads((point_dir / "stack.json").read_text())
  except (OSError, ValueError):
    return None
  return outcome if outcome.get("state") in ("done", "failed") else None


def stack_arg(value: str) -> int | str:
  """Parses ``--stack``: a number of points >= 1, or ``auto`` (argparse type)."""
  if value == "auto":
    return value
  if not value.isdigit() or int(value) < 1:
    raise argparse.ArgumentTypeError(f"invalid --stack {value!r}: give a number of points >= 1, or auto")
  return int(value)


def shard_arg(value: str) -> tuple[int, int]:
  """Parses ``I/N`` with 0 <= I < N (argparse type)."""
  m = re.fullmatch(r"(\d+)/(\d+)", value)
  if not m or not int(m[1]) < int(m[2]):
    raise argparse.ArgumentTypeError(f"invalid shard {value!r}: expected I/N with 0 <= I < N, e.g. 0/4")
  return int(m[1]), int(m[2])


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="python -m experiments.sweep", description=__doc__.splitlines()[0])
  p.add_argument("--config", required=True, metavar="FILE.py[:ARG]",
                 help="config file; its get_sweep(ARG) lists the points")
  p.add_argument("--workdir", required=True, help="sweep directory (local or gs://); point NAME runs in DIR/NAME")
  p.add_argument("--parallel", type=int, default=1, help="points run at once (default 1)")
  p.add_argument("--stack", type=stack_arg, default="auto", metavar="K|auto",
                 help="train up to K points that differ only in LR/rank/seed-like fields as one stacked run "
                 f"(default auto: {AUTO_STACK} on the tiny base, else 1)")
  p.add_argument("--shard", type=shard_arg, metavar="I/N", help="run only the points whose index %% N == I")
  p.add_argument("--only", metavar="REGEX", help="run only the points whose arg string matches this regex")
  p.add_argument("--dry-run", action="store_true", help="print the points, their names and commands; run nothing")
  p.add_argument("--overwrite", action="store_true",
                 help="delete a DIR that holds another sweep; passed on to every point")
  p.add_argument("--log-dir", help=f"where point logs are written while they run (default: DIR/NAME/log.txt when "
                 f"DIR is local, else {DEFAULT_LOG_DIR}/...; copied to DIR/NAME/log-HOST.txt)")
  p.add_argument("overrides", nargs="*", metavar="-- --config.KEY=VALUE",
                 help="config overrides for every point, after --")
  return p


def main(argv: Sequence[str] | None = None, command: PointCommand = point_command) -> int:
  """The command line (module docstring); ``command`` builds each point's command (a custom one, as tests give,
  never stacks under ``--stack auto``). Returns the exit status."""
  p = _parser()
  args = p.parse_args(argv)
  config_file, _, arg = args.config.partition(":")
  bad = overrides_lib.bad_syntax(args.overrides)
  if bad:
    p.error(f"unexpected arguments {bad}: after --, give config overrides --config.KEY=VALUE")
  if args.parallel < 1:
    p.error(f"--parallel {args.parallel}: give at least 1")
  try:
    if args.only is not None:
      re.compile(args.only)
    module = overrides_lib.load_config_module(config_file, needs=("get_config", "get_sweep"))
    every = sweep_points(module, arg)
    points = select(every, args.shard, args.only)
    if not points:
      raise ValueError(f"no point selected (--shard {args.shard}, --only {args.only!r})")
    check_points(module, points, args.overrides)
    size = 1 if args.stack == "auto" and command is not point_command else args.stack
    groups = stack_groups(module, points, args.overrides, size)
  except (ValueError, re.error) as e:
    p.error(str(e))
  workdir = epath.Path(args.workdir)
  identity = sweep_identity(config_file, arg, args.overrides)
  conflict = workdir_conflict(workdir, identity)
  extra = [*args.overrides, *(["--overwrite"] if args.overwrite else [])]
  sweep = Sweep(config_file, points, workdir, extra=extra, parallel=args.parallel, command=command,
                log_dir=args.log_dir, groups=groups)
  if args.dry_run:
    print(f"# {args.config} -> {workdir}: {len(points)} of {len(every)} point(s)"
          + (f" (shard {args.shard[0]}/{args.shard[1]})" if args.shard else "")
          + (f" (only {args.only!r})" if args.only else ""))
    if conflict:
      print(f"# note: {conflict}")
    for group in groups:
      for pt in group:
        state = (read_status(workdir / pt.name) or {}).get("state", "not started")
        print(f"[{pt.index}] {pt.arg} -> {pt.name} ({state})")
      print(f"    {shlex.join(sweep.argv(group))}")
    return 0
  # One runner per sweep directory (per shard: shards share the directory, never a point); each point's own run
  # locks its directory too.
  with contextlib.ExitStack() as held:
    try:
      held.enter_context(lock.hold(workdir, tag=f"shard-{args.shard[0]}-of-{args.shard[1]}" if args.shard else ""))
    except lock.DirectoryLocked as e:
      p.error(str(e))
    if conflict:
      if not args.overwrite:
        p.error(conflict)
      workdir.rmtree()
    workdir.mkdir(parents=True, exist_ok=True)
    _write_json(workdir / "sweep.json", {
        **identity, "points": [{"index": q.index, "point": q.arg, "name": q.name} for q in every],
        "argv": [sys.executable, "-m", "experiments.sweep", *(sys.argv[1:] if argv is None else argv)],
        "shard": args.shard, "only": args.only, "parallel": args.parallel, "stack": args.stack,
        "host": socket.gethostname(),
        "started": _now(), **provenance.git_state()})
    return sweep.run()


if __name__ == "__main__":
  sys.exit(main())
