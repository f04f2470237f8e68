"""Tokenised sources: every example of a source as token ids and a loss mask, cached on disk, split train/eval.

``tokenize`` turns a source's records into flat arrays (all ids concatenated, a 0/1 mask over them, example
offsets), truncating each example to ``max_len`` tokens with EOS kept. The arrays are cached under
``cache_dir/tokens/<key>`` keyed by the file's content hash, the tokenizer and every setting that changes the tokens,
and are memory-mapped on later runs, so each host touches only the examples of its own batch rows.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
import zlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from lora_jax.data.formats import DataError, check_tokenizer, encode, resolve_template, special_prefix, truncate
from lora_jax.data.sources import LOCAL_SUFFIXES, Source, file_hash, load_records, parse_sources

CACHE_VERSION = 1  # bump when tokenisation changes, so stale caches are not read
OVERFLOW = ("error", "skip")

_OK, _TRUNCATED, _SKIPPED, _EMPTY, _BAD = range(5)
_SPLIT_STREAM = 3  # separates the split's random stream from the shuffles' (lora_jax.data.pack)


@dataclasses.dataclass(frozen=True)
class TokenizedSource:
  """A source's examples as flat arrays; `index` selects the examples of this view (e.g. its train split)."""
  name: str
  weight: float | None
  ids: np.ndarray  # [tokens] int32, all examples concatenated
  mask: np.ndarray  # [tokens] uint8, 1 where the token is a loss target
  offsets: np.ndarray  # [examples + 1] int64, example e is ids[offsets[e]:offsets[e + 1]]
  index: np.ndarray  # [examples in view] int64
  stats: Mapping[str, Any]

  def __len__(self) -> int:
    return len(self.index)

  def example(self, i: int) -> tuple[np.ndarray, np.ndarray]:
    """Token ids and loss mask of the view's i-th example."""
    e = self.index[i]
    start, end = self.offsets[e], self.offsets[e + 1]
    return self.ids[start:end], self.mask[start:end]

  def lengths(self) -> np.ndarray:
    """Tokens per example of the view."""
    return self.offsets[self.index + 1] - self.offsets[self.index]

  def subset(self, rows: np.ndarray) -> TokenizedSource:
    """The view restricted to some of its examples."""
    return dataclasses.replace(self, index=self.index[np.asarray(rows, dtype=np.int64)])


def tokenizer_fingerprint(tokenizer) -> str:
  """A hash of everything in a tokenizer that changes token ids or chat rendering."""
  parts = [type(tokenizer).__name__, tokenizer.backend_tokenizer.to_str(), tokenizer.chat_template or "",
           str(tokenizer.eos_token_id), str(special_prefix(tokenizer))]
  return hashlib.sha256("\0".join(parts).encode()).hexdigest()


def tokenize(source: Source, tokenizer, *, max_len: int, fmt: str = "auto", template: str = "alpaca",
             train_on_inputs: bool = False, overflow: str = "error", cache_dir: str | None = None,
             num_proc: int | None = None, problems: list[str] | None = None) -> TokenizedSource:
  """Tokenise a source's records into examples of at most max_len tokens (EOS kept), cached under cache_dir.

  A prompt that leaves no room for its completion raises DataError naming the record (overflow='error') or is
  skipped and counted (overflow='skip'). With `problems`, bad records are listed there and left out instead of
  raising (the validator's mode; the cache is then not used).
  """
  if overflow not in OVERFLOW:
    raise DataError(f"unknown overflow policy {overflow!r}; valid: {', '.join(OVERFLOW)}")
  if max_len < 2:
    raise DataError(f"max_len must be at least 2 (a token and its successor), got {max_len}")
  check_tokenizer(tokenizer)
  prompt_template = resolve_template(template)
  settings = dict(version=CACHE_VERSION, tokenizer=tokenizer_fingerprint(tokenizer), fmt=fmt,
                  template=prompt_template, train_on_inputs=train_on_inputs, max_len=max_len, overflow=overflow)
  use_cache = cache_dir is not None and problems is None
  local = source.path.endswith(LOCAL_SUFFIXES) and os.path.isfile(source.path)
  if use_cache and local:
    cached = _read_cache(cache_dir, _cache_key(file_hash(source.path), settings), source)
    if cached is not None:
      return cached
  problems_before = len(problems) if problems is not None else 0
  records = load_records(source, fmt, cache_dir=cache_dir, problems=problems)
  unreadable = len(problems) - problems_before if problems is not None else 0
  key = _cache_key(records.fingerprint, settings)
  if use_cache and not local:
    cached = _read_cache(cache_dir, key, source)
    if cached is not None:
      return cached
  strict = problems is None
  encode_kwargs = dict(tokenizer=tokenizer, fmt=records.fmt, template=prompt_template,
                       train_on_inputs=train_on_inputs, max_len=max_len, overflow=overflow,
                       locations=records.locations, strict=strict)
  map_fingerprint = _cache_key(records.rows._fingerprint, dict(settings, key=key, strict=strict))
  encoded = records.rows.map(_encode_batch, batched=True, with_indices=True, fn_kwargs=encode_kwargs,
                             remove_columns=records.rows.column_names, num_proc=num_proc,
                             new_fingerprint=map_fingerprint, desc=f"tokenizing {source.path}")
  table = encoded.with_format("arrow")[:]
  status = table.column("status").to_numpy()
  if problems is not None:
    problems.extend(p for p in table.column("problem").to_pylist() if p)
  # Only kept examples have tokens (at least 2), so the flat values are exactly the kept examples' tokens.
  ids_column, mask_column = table.column("ids").combine_chunks(), table.column("mask").combine_chunks()
  ids = np.asarray(ids_column.flatten().to_numpy(zero_copy_only=False), dtype=np.int32)
  mask = np.asarray(mask_column.flatten().to_numpy(zero_copy_only=False), dtype=np.uint8)
  lengths = ids_column.value_lengths().to_numpy(zero_copy_only=False)
  lengths = lengths[(status == _OK) | (status == _TRUNCATED)].astype(np.int64)
  offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
  # A first token is never a target (the loss at t predicts t + 1), so its mask does not count.
  loss_tokens = int(mask.sum(dtype=np.int64) - mask[offsets[:-1]].sum(dtype=np.int64))
  stats = dict(format=records.fmt, records=len(status) + unreadable, examples=len(lengths),
               truncated=int((status == _TRUNCATED).sum()), skipped=int((status == _SKIPPED).sum()),
               empty=int((status == _EMPTY).sum()), bad=int((status == _BAD).sum()) + unreadable,
               tokens=int(len(ids)), loss_tokens=loss_tokens)
  if use_cache:
    _write_cache(cache_dir, key, ids, mask, offsets, stats)
  return TokenizedSource(source.path, source.weight, ids, mask, offsets, np.arange(len(lengths)), stats)


def _encode_batch(batch: Mapping[str, list], indices: list[int], *, tokenizer, fmt, template, train_on_inputs,
                  max_len, overflow, locations, strict) -> dict[str, list]:
  out = {"ids": [], "mask": [], "status": [], "problem": []}
  for row, index in enumerate(indices):
    record = {key: values[row] for key, values in batch.items()}
    ids, mask, status, problem = np.zeros(0, np.int32), np.zeros(0, np.uint8), _OK, ""
    try:
      example = encode(record, tokenizer, fmt, template=template, train_on_inputs=train_on_inputs)
    except DataError as e:
      if strict:
        raise DataError(f"{locations[index]}: {e}") from None
      status, problem = _BAD, f"{locations[index]}: {e}"
    else:
      if example.prompt_len is not None and example.prompt_len >= max_len - 1:
        problem = (f"{locations[index]}: the prompt is {example.prompt_len} tokens, leaving no room for the "
                   f"completion within {max_len} tokens (seq_len {max_len - 1})")
        if strict and overflow == "error":
          raise DataError(problem + "; raise seq_len, or skip such records with overflow='skip' (in an experiment "
                          "config: data.overflow)")
        if overflow == "skip":
          problem = ""  # skipped as asked: counted in the stats, not a problem
        status = _SKIPPED
      elif len(example.ids) < 2:
        status = _EMPTY  # nothing to predict
      else:
        example, cut = truncate(example, max_len, tokenizer.eos_token_id)
        ids, mask, status = example.ids, example.mask, _TRUNCATED if cut else _OK
    out["ids"].append(ids)
    out["mask"].append(mask)
    out["status"].append(status)
    out["problem"].append(problem)
  return out


def _cache_key(fingerprint: str, settings: Mapping[str, Any]) -> str:
  return hashlib.sha256(json.dumps([fingerprint, settings], sort_keys=True).encode()).hexdigest()[:32]


def _read_cache(cache_dir: str, key: str, source: Source) -> TokenizedSource | None:
  path = os.path.join(cache_dir, "tokens", key)
  if not os.path.isfile(os.path.join(path, "stats.json")):
    return None
  with open(os.path.join(path, "stats.json")) as f:
    stats = json.load(f)
  arrays = {name: np.load(os.path.join(path, f"{name}.npy"), mmap_mode="r") for name in ("ids", "mask", "offsets")}
  n = len(arrays["offsets"]) - 1
  return TokenizedSource(source.path, source.weight, arrays["ids"], arrays["mask"], arrays["offsets"],
                         np.arange(n), stats)


def _write_cache(cache_dir: str, key: str, ids, mask, offsets, stats) -> None:
  final = os.path.join(cache_dir, "tokens", key)
  os.makedirs(os.path.dirname(final), exist_ok=True)
  tmp = tempfile.mkdtemp(dir=os.path.dirname(final), prefix=f".{key}.")
  for name, array in (("ids", ids), ("mask", mask), ("offsets", offsets)):
    np.save(os.path.join(tmp, f"{name}.npy"), array)
  with open(os.path.join(tmp, "stats.json"), "w") as f:
    json.dump(stats, f)  # written last: its presence marks a complete entry
  try:
    os.rename(tmp, final)
  except OSError:  # another process (host) wrote the same entry first
    shutil.rmtree(tmp, ignore_errors=True)


def load(specs: Sequence[str | Source], tokenizer, *, seq_len: int, **kwargs) -> list[TokenizedSource]:
  """Tokenise several `path[:weight]` sources for rows of seq_len positions (examples up to seq_len + 1 tokens)."""
  return [tokenize(source, tokenizer, max_len=seq_len + 1, **kwargs) for source in parse_sources(specs)]


def split(source: TokenizedSource, eval_size: int | float, seed: int) -> tuple[TokenizedSource, TokenizedSource]:
  """Split a source into disjoint (train, eval) views by seed; eval_size is a count or a fraction in (0, 1)."""
  n = len(source)
  if isinstance(eval_size, float):
    if not 0 < eval_size < 1:
      raise DataError(f"eval_size must be a count or a fraction in (0, 1), got {eval_size}")
    n_eval = int(round(eval_size * n))
  else:
    n_eval = int(eval_size)
  if not 0 <= n_eval < n:
    raise DataError(f"{source.name}: eval_size {eval_size} leaves no training examples out of {n}")
  # Seeded by the file's name, not its directory: the same data copied elsewhere (another workdir, a cache on
  # another machine) splits the same way.
  rng = np.random.default_rng([seed, _SPLIT_STREAM, zlib.crc32(os.path.basename(source.name).encode())])
  order = rng.permutation(n)
  evaluation = dataclasses.replace(source.subset(np.sort(order[:n_eval])), weight=None)  # eval is not mixed
  return source.subset(np.sort(order[n_eval:])), evaluation
