"""One writer per directory: a lock file ``<dir>.lock`` beside a run, experiment, stack or sweep directory.

    with lock.hold(workdir):   # raises DirectoryLocked naming the holder (host, pid, command, since when)
      ...write workdir...

The lock is an ``flock`` on ``<dir>.lock`` (beside the directory, so deleting or comparing the directory never touches
it), which the kernel releases when its holder dies however it dies; the file says who holds it. A lock file left by a
holder that died (e.g. SIGKILL) is taken over with a message naming it. Holding is re-entrant within a process (a
runner and the training loop it calls lock the same directory once). Remote directories (``gs://``) cannot be locked
and are not. On a multi-host job only process 0 should lock (its other processes write the same files by design).
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import os
import socket
import sys

from etils import epath

_HELD: dict[str, list] = {}  # lock path -> [fd, depth] held by this process


class DirectoryLocked(RuntimeError):
  """Another process writes the directory; the message names it and its holder."""


def lock_path(directory: str | os.PathLike, tag: str = "") -> epath.Path:
  """Where the lock of ``directory`` lives: ``<directory>.lock`` beside it (``<directory>.<tag>.lock`` with a tag,
  e.g. one sweep shard's)."""
  directory = epath.Path(directory)
  directory = directory if "://" in str(directory) else directory.absolute()
  return directory.parent / ".".join([directory.name, *([tag] if tag else []), "lock"])


def _describe(holder: dict) -> str:
  return (f"process {holder.get('pid')} on host {holder.get('host')!r} (since {holder.get('since')}: "
          f"{holder.get('command')})")


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


def _read(fd: int) -> dict | None:
  os.lseek(fd, 0, os.SEEK_SET)
  text = os.read(fd, 1 << 16).decode(errors="replace").strip()
  if not text:
    return None
  try:
    holder = json.loads(text)
  except json.JSONDecodeError:
    return {"pid": None, "host": None, "since": None, "command": f"unreadable lock file: {text[:80]!r}"}
  return holder if isinstance(holder, dict) else None


def _acquire(path: epath.Path) -> int:
  """The descriptor of ``path`` with an exclusive flock on it, the file naming this process; raises DirectoryLocked."""
  while True:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = _read(fd)
      os.close(fd)
      who = _describe(holder) if holder else "another process (it has not written its name yet)"
      raise DirectoryLocked(f"{path.parent / path.name.split('.lock')[0]} is being written by {who}; lock file {path}. "
                            "Wait for it to finish or stop it: two writers of one directory would corrupt each other's "
                            "files.")
    try:
      same = os.stat(path).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
      same = False
    if same:
      break
    os.close(fd)  # its holder removed the file between our open and flock: take the new one
  previous = _read(fd)
  if previous:
    here = previous.get("host") == socket.gethostname()
    state = ("its process is gone" if here and isinstance(previous.get("pid"), int) and not _alive(previous["pid"])
             else "no process holds it")
    print(f"recovered a stale lock {path} of {_describe(previous)}: {state}", flush=True)
  holder = {"host": socket.gethostname(), "pid": os.getpid(), "command": " ".join(sys.argv)[:500],
            "since": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
  os.ftruncate(fd, 0)
  os.lseek(fd, 0, os.SEEK_SET)
  os.write(fd, (json.dumps(holder) + "\n").encode())
  return fd


@contextlib.contextmanager
def hold(directory: str | os.PathLike, enabled: bool = True, tag: str = ""):
  """Holds the one-writer lock of ``directory`` (module docstring; ``tag`` names one of several, e.g. a sweep shard's)
  for the ``with`` block; ``enabled=False`` (or a remote directory) holds nothing."""
  path = lock_path(directory, tag)
  if not enabled or "://" in str(path):
    yield
    return
  key = str(path)
  if key in _HELD:
    _HELD[key][1] += 1
  else:
    _HELD[key] = [_acquire(path), 1]
  try:
    yield
  finally:
    _HELD[key][1] -= 1
    if not _HELD[key][1]:
      fd = _HELD.pop(key)[0]
      with contextlib.suppress(FileNotFoundError):
        os.unlink(path)  # unlinked before the unlock: a waiting opener then finds a changed inode and retries
      os.close(fd)


@contextlib.contextmanager
def hold_all(directories, enabled: bool = True):
  """``hold`` for every directory of ``directories`` (a stack's runs), released together."""
  with contextlib.ExitStack() as stack:
    for d in directories:
      stack.enter_context(hold(d, enabled))
    yield
