"""Data sources: `path[:weight]` specs, and reading their records through Hugging Face `datasets`.

A source is a local ``.jsonl`` / ``.json`` / ``.parquet`` file, a local dataset directory, or a hub dataset name
(``load_dataset(name)``, for machines with network access). Local JSON is first read by our own line-by-line reader,
which reports a corrupt line or a record missing a field as ``file:line: what is wrong`` (``datasets`` would only say
that Arrow failed); the checked file is then loaded with ``datasets`` (Arrow, memory-mapped).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

from lora_jax.data.formats import FORMATS, DataError, check_record, detect_format

JSON_SUFFIXES = (".jsonl", ".json")
LOCAL_SUFFIXES = JSON_SUFFIXES + (".parquet",)


@dataclasses.dataclass(frozen=True)
class Source:
  """One data source: a path or hub name, its mixing weight (None: in proportion to its size), and a hub split."""
  path: str
  weight: float | None = None
  split: str = "train"


@dataclasses.dataclass
class Records:
  """A source's usable records as a `datasets.Dataset`, with the location (file:line) of each row."""
  source: Source
  fmt: str
  rows: Any  # datasets.Dataset
  locations: list[str]
  fingerprint: str  # content hash (local files) or datasets fingerprint (hub)


def parse_source(spec: str | Source) -> Source:
  """Parse 'path[@split][:weight]' (mistral-finetune's mixing syntax; a hub dataset's split may slice it, e.g.
  ``open-thoughts/OpenThoughts3-1.2M@train[:10000]``) into a Source."""
  if isinstance(spec, Source):
    return spec
  path, weight = spec, None
  head, sep, tail = spec.rpartition(":")
  if sep and head:
    try:
      weight = float(tail)
    except ValueError:
      pass  # a colon that is not a weight
    else:
      if not weight > 0:
        raise DataError(f"{spec}: mixing weight must be positive, got {tail}")
      path = head
  name, at, split = path.partition("@")
  if at and name and split and not os.path.exists(path):
    return Source(name, weight, split)
  return Source(path, weight)


def parse_sources(specs: Sequence[str | Source]) -> list[Source]:
  """Parse several specs; either all carry weights or none do (then sources mix in proportion to their sizes)."""
  sources = [parse_source(spec) for spec in specs]
  if not sources:
    raise DataError("no data sources given")
  weighted = [source.weight is not None for source in sources]
  if any(weighted) and not all(weighted):
    raise DataError("give a weight to every source or to none: "
                    + ", ".join(f"{s.path}:{s.weight}" if s.weight else s.path for s in sources))
  return sources


def file_hash(path: str) -> str:
  """SHA-256 of a file's bytes."""
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()


def write_jsonl(path: str, records: Iterable[Mapping[str, Any]]) -> str:
  """Write records one JSON object per line; returns the path."""
  with open(path, "w", encoding="utf-8") as f:
    for record in records:
      f.write(json.dumps(record, ensure_ascii=False) + "\n")
  return path


def scan_json(path: str) -> Iterator[tuple[int, Any, str | None]]:
  """Yield (line, record, JSON problem or None) for each record of a JSONL file or a JSON array file."""
  with open(path, encoding="utf-8") as f:
    head = f.read(4096).lstrip()
  if head.startswith("["):
    yield from _scan_array(path)
    return
  with open(path, encoding="utf-8") as f:
    for line_no, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        yield line_no, json.loads(line), None
      except json.JSONDecodeError as e:
        yield line_no, None, f"invalid JSON: {e.msg} (column {e.colno})"


def _scan_array(path: str) -> Iterator[tuple[int, Any, str | None]]:
  with open(path, encoding="utf-8") as f:
    text = f.read()
  decoder = json.JSONDecoder()
  pos, line_no, counted = text.index("[") + 1, 1, 0

  def skip(pos):
    while pos < len(text) and text[pos] in " \t\r\n":
      pos += 1
    return pos

  while True:
    pos = skip(pos)
    if pos < len(text) and text[pos] == "]":
      return
    line_no += text.count("\n", counted, pos)
    counted = pos
    try:
      record, pos = decoder.raw_decode(text, pos)
    except json.JSONDecodeError as e:
      yield e.lineno, None, f"invalid JSON: {e.msg} (column {e.colno}); the rest of the file is unread"
      return
    yield line_no, record, None
    pos = skip(pos)
    if pos < len(text) and text[pos] == ",":
      pos += 1
    elif not (pos < len(text) and text[pos] == "]"):
      yield line_no, None, "invalid JSON: expected ',' or ']' after a record; the rest of the file is unread"
      return


def load_records(source: Source, fmt: str = "auto", *, cache_dir: str | None = None,
                 problems: list[str] | None = None) -> Records:
  """Read a source's records; bad records raise DataError, or with `problems` are listed there and left out."""
  if fmt != "auto" and fmt not in FORMATS:
    raise DataError(f"unknown data format {fmt!r}; valid: auto, {', '.join(FORMATS)}")
  import datasets  # heavy; only needed when records are actually read

  datasets_cache = os.path.join(cache_dir, "datasets") if cache_dir else None
  path = source.path
  if path.endswith(JSON_SUFFIXES) and os.path.isfile(path):
    return _load_json(source, fmt, datasets_cache, problems)
  if path.endswith(".parquet") and os.path.isfile(path):
    rows = datasets.load_dataset("parquet", data_files=path, split="train", cache_dir=datasets_cache)
    locations = [f"{path}: row {i}" for i in range(len(rows))]
    fingerprint = file_hash(path)
  elif path.endswith(LOCAL_SUFFIXES):
    raise DataError(f"{path}: no such file")
  elif os.path.isfile(path):  # datasets would only say it found no data file
    raise DataError(f"{path}: unsupported file extension {os.path.splitext(path)[1] or '(none)'!r}; supported: "
                    f"{', '.join(LOCAL_SUFFIXES)} files, a dataset directory or a hub dataset name")
  else:  # a local dataset directory or a hub name
    rows = datasets.load_dataset(path, split=source.split, cache_dir=datasets_cache)
    locations = [f"{path}[{source.split}]: row {i}" for i in range(len(rows))]
    fingerprint = rows._fingerprint
  if not len(rows):
    raise DataError(f"{path}: no records")
  try:
    fmt = _format(fmt, rows[0])
  except DataError as e:
    raise DataError(f"{locations[0]}: {e}") from None
  good = []
  for i, row in enumerate(rows):
    if problem := check_record(row, fmt):
      _report(f"{locations[i]}: {problem}", problems)
    else:
      good.append(i)
  if len(good) < len(rows):
    rows, locations = rows.select(good), [locations[i] for i in good]
  return Records(source, fmt, rows, locations, fingerprint)


def _load_json(source: Source, fmt: str, datasets_cache: str | None, problems: list[str] | None) -> Records:
  import datasets

  path = source.path
  lines, bad_lines = [], set()
  for line_no, record, problem in scan_json(path):
    if problem is None:
      try:
        fmt = _format(fmt, record)
      except DataError as e:
        problem = str(e)
    if problem is None:
      problem = check_record(record, fmt)
    if problem:
      _report(f"{path}:{line_no}: {problem}", problems)
      bad_lines.add(line_no)
    else:
      lines.append(line_no)
  if not lines:
    raise DataError(f"{path}: no usable records")
  with tempfile.TemporaryDirectory() as tmp:
    data_file = path
    if bad_lines:  # datasets cannot read a file with corrupt lines: hand it the good ones
      data_file = os.path.join(tmp, "good.jsonl")
      with open(data_file, "w", encoding="utf-8") as f:
        for line_no, record, problem in scan_json(path):
          if line_no not in bad_lines:
            f.write(json.dumps(record) + "\n")
    rows = datasets.load_dataset("json", data_files=data_file, split="train",
                                 cache_dir=tmp if bad_lines else datasets_cache, keep_in_memory=bool(bad_lines))
  if len(rows) != len(lines):
    raise DataError(f"{path}: datasets read {len(rows)} records where {len(lines)} were checked")
  return Records(source, fmt, rows, [f"{path}:{line}" for line in lines], file_hash(path))


def _format(fmt: str, record: Any) -> str:
  if fmt != "auto":
    return fmt
  if not isinstance(record, dict):
    raise DataError(f"expected a JSON object, got {type(record).__name__}")
  return detect_format(record)


def _report(problem: str, problems: list[str] | None) -> None:
  if problems is None:
    raise DataError(problem)
  problems.append(problem)
