"""Where a result came from: the checkout's state (commit, uncommitted changes and a hash of them) and the base
model's fingerprint. Every run records both in ``run_info.json``; ``experiments.study --publish`` reads them back."""

from __future__ import annotations

import hashlib
import pathlib
import subprocess

FULL_HASH_LIMIT = 1 << 30  # Bytes of weights hashed whole; above it, names, sizes and each file's first and last MiB.
_CHUNK = 1 << 20


def git_state(cwd=None) -> dict:
  """The checkout's (``cwd``'s, default this code's) commit, whether it has uncommitted changes, and a sha256 of them
  (tracked diffs against HEAD plus untracked files' names and bytes; "" when clean); "unknown"/None outside git."""
  def _git(*args: str) -> bytes:
    return subprocess.run(["git", *args], capture_output=True, check=True,
                          cwd=cwd or pathlib.Path(__file__).parent).stdout
  try:
    commit = _git("rev-parse", "HEAD").decode().strip()
    status = _git("status", "--porcelain", "--untracked-files=all").decode()
    h = hashlib.sha256(_git("diff", "HEAD", "--binary"))
    root = pathlib.Path(_git("rev-parse", "--show-toplevel").decode().strip())
    for line in sorted(status.splitlines()):
      if line.startswith("??"):
        path = root / line[3:]
        h.update(line[3:].encode())
        h.update(path.read_bytes() if path.is_file() else b"")
  except (OSError, subprocess.CalledProcessError):
    return {"git_commit": "unknown", "git_dirty": None, "git_diff_sha256": None}
  dirty = bool(status.strip())
  return {"git_commit": commit, "git_dirty": dirty, "git_diff_sha256": h.hexdigest()[:16] if dirty else ""}


def describe(info: dict, quote: str = "") -> str:
  """A run's code as reports name it (from run_info.json's git fields): the commit (in ``quote``s), and the hash of
  its uncommitted changes if the tree was dirty."""
  return f"{quote}{info.get('git_commit', 'unknown')}{quote}" + (
      f" (uncommitted changes, diff sha256 {info.get('git_diff_sha256') or 'not recorded'})"
      if info.get("git_dirty") else "")


def fingerprint(model_dir) -> str:
  """sha256 (16 hex digits) of a local model directory's config.json and weight files (``*.safetensors``, by name):
  which base a run fine-tuned. Weights up to FULL_HASH_LIMIT bytes are hashed whole; larger ones by name, size and
  their first and last MiB. A hub id that is not a local directory gives "hub:<id>" (its files resolve at load)."""
  path = pathlib.Path(str(model_dir))
  if not path.is_dir():
    return f"hub:{model_dir}"
  files = sorted(path.glob("*.safetensors"))
  whole = sum(f.stat().st_size for f in files) <= FULL_HASH_LIMIT
  h = hashlib.sha256((path / "config.json").read_bytes() if (path / "config.json").exists() else b"")
  for f in files:
    h.update(f.name.encode() + str(f.stat().st_size).encode())
    with open(f, "rb") as fh:
      if whole:
        h.update(fh.read())
      else:
        h.update(fh.read(_CHUNK))
        fh.seek(max(0, f.stat().st_size - _CHUNK))
        h.update(fh.read())
  return h.hexdigest()[:16]
