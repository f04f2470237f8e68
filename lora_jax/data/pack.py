"""Batches: mixing sources, shuffling by (seed, epoch), packing into rows, slicing rows per host, resumable.

An epoch is planned from example lengths alone, identically on every host: each source contributes a number of
examples (its size, or its weight's share of all examples when weights are given, upsampling or subsampling it), drawn
from its own stream of per-pass permutations so a down-weighted source is still seen in full over several epochs; the
mixed list is shuffled and packed in order into rows of ``seq_len`` positions (next-fit), or one example per row. Batch
b of an epoch is rows ``[b * batch_size, (b + 1) * batch_size)``; host p materialises only its contiguous
``batch_size / process_count`` of them. The position (epoch, index of the next batch) is the whole iterator state.

An example of n tokens fills n - 1 positions: inputs are its tokens but the last, targets its tokens but the first,
so the loss at position t predicts token t + 1 and takes its mask from the target token; no position predicts across
two documents. Batches are dicts of numpy arrays ``inputs``, ``targets``, ``segment_ids`` (1.. per document of a
row, 0 = padding), ``positions`` (restarting at 0 per document), int32 [B, T], and ``loss_mask`` float32 [B, T].
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import NamedTuple

import numpy as np

from lora_jax.data.dataset import TokenizedSource
from lora_jax.data.formats import DataError

_SOURCE_STREAM, _MIX_STREAM = 1, 2  # separate random streams (the train/eval split uses 3)
BATCH_KEYS = ("inputs", "targets", "loss_mask", "segment_ids", "positions")


class Plan(NamedTuple):
  """One epoch: the examples in order (source, example, positions filled), their rows, the batch count."""
  source: np.ndarray  # [items] int64
  example: np.ndarray  # [items] int64
  lengths: np.ndarray  # [items] int64, positions (tokens - 1)
  row_starts: np.ndarray  # [rows + 1] int64, row r holds items row_starts[r]:row_starts[r + 1]
  num_batches: int


def mixture(sizes: Sequence[int], weights: Sequence[float] | None, *, seed: int, epoch: int,
            shuffle: bool) -> tuple[np.ndarray, np.ndarray]:
  """The (source, example) pairs of one epoch, mixed by weight (None: each source once) and shuffled by seed."""
  sizes = np.asarray(sizes, dtype=np.int64)
  if weights is None:
    counts = sizes
  else:
    weights = np.asarray(weights, dtype=np.float64)
    counts = np.round(weights / weights.sum() * sizes.sum()).astype(np.int64)
  sources, examples = [], []
  for s, (size, count) in enumerate(zip(sizes, counts)):
    stream = np.arange(epoch * count, (epoch + 1) * count)  # positions in this source's endless stream
    passes, within = np.divmod(stream, size)
    chosen = np.empty(count, dtype=np.int64)
    for k in np.unique(passes):
      order = (np.random.default_rng([seed, _SOURCE_STREAM, s, k]).permutation(size) if shuffle
               else np.arange(size))
      chosen[passes == k] = order[within[passes == k]]
    sources.append(np.full(count, s, dtype=np.int64))
    examples.append(chosen)
  source, example = np.concatenate(sources), np.concatenate(examples)
  if shuffle:
    order = np.random.default_rng([seed, _MIX_STREAM, epoch]).permutation(len(source))
    source, example = source[order], example[order]
  return source, example


def pack_rows(lengths: np.ndarray, seq_len: int) -> np.ndarray:
  """Row boundaries packing items of these lengths in order into rows of seq_len (next-fit)."""
  starts, used = [0], 0
  for i, n in enumerate(lengths.tolist()):
    if used + n > seq_len:
      starts.append(i)
      used = 0
    used += n
  starts.append(len(lengths))
  return np.asarray(starts if len(lengths) else [0], dtype=np.int64)


class BatchIterator:
  """Batches over tokenised sources for one host; `state()` / `restore()` save and resume its position exactly."""

  def __init__(self, sources: Sequence[TokenizedSource], *, batch_size: int, seq_len: int, seed: int,
               shuffle: bool = True, packing: bool = True, num_epochs: int | None = None,
               drop_remainder: bool = True, process_index: int = 0, process_count: int = 1, pad_id: int = 0):
    if not sources:
      raise DataError("no data sources")
    if batch_size % process_count:
      raise DataError(f"batch_size {batch_size} is not divisible by process_count {process_count}")
    if not 0 <= process_index < process_count:
      raise DataError(f"process_index {process_index} outside [0, {process_count})")
    empty = [source.name for source in sources if not len(source)]
    if empty:
      raise DataError(f"no examples in {', '.join(empty)}")
    weights = [source.weight for source in sources]
    if any(w is None for w in weights) and not all(w is None for w in weights):
      raise DataError("give a weight to every source or to none")
    self.sources = list(sources)
    self.batch_size, self.seq_len, self.seed = batch_size, seq_len, seed
    self.shuffle, self.packing, self.num_epochs, self.drop_remainder = shuffle, packing, num_epochs, drop_remainder
    self.process_index, self.process_count, self.pad_id = process_index, process_count, pad_id
    self.local_batch_size = batch_size // process_count
    self._weights = None if weights[0] is None else weights
    self._lengths = [source.lengths() - 1 for source in self.sources]  # positions per example
    for source, lengths in zip(self.sources, self._lengths):
      if len(lengths) and lengths.max() > seq_len:
        raise DataError(f"{source.name}: an example of {lengths.max() + 1} tokens does not fit seq_len "
                        f"{seq_len}; tokenise with max_len = seq_len + 1")
    self._epoch, self._index, self._plan = 0, 0, None

  def plan(self, epoch: int) -> Plan:
    """The order, packing and batch count of an epoch (the same on every host)."""
    if self._plan is not None and self._plan[0] == epoch:
      return self._plan[1]
    source, example = mixture([len(s) for s in self.sources], self._weights, seed=self.seed, epoch=epoch,
                              shuffle=self.shuffle)
    lengths = np.zeros(len(source), dtype=np.int64)
    for s, source_lengths in enumerate(self._lengths):
      lengths[source == s] = source_lengths[example[source == s]]
    row_starts = pack_rows(lengths, self.seq_len) if self.packing else np.arange(len(source) + 1)
    rows = len(row_starts) - 1
    num_batches = rows // self.batch_size if self.drop_remainder else -(-rows // self.batch_size)
    if num_batches == 0 and self.drop_remainder:
      raise DataError(f"epoch {epoch} fills {rows} rows of {self.seq_len} positions, fewer than one batch "
                      f"of {self.batch_size}")
    plan = Plan(source, example, lengths, row_starts, num_batches)
    self._plan = (epoch, plan)
    return plan

  def state(self) -> dict[str, int]:
    """The position of the next batch: {'epoch', 'index'}."""
    return {"epoch": self._epoch, "index": self._index}

  def restore(self, state: Mapping[str, int]) -> None:
    """Continue from a position saved by `state()`."""
    self._epoch, self._index = int(state["epoch"]), int(state["index"])

  def __iter__(self) -> BatchIterator:
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    while True:
      if self.num_epochs is not None and self._epoch >= self.num_epochs:
        raise StopIteration
      plan = self.plan(self._epoch)
      if self._index < plan.num_batches:
        break
      self._epoch, self._index = self._epoch + 1, 0
    batch = self.batch(plan, self._index)
    self._index += 1
    return batch

  def batch(self, plan: Plan, index: int) -> dict[str, np.ndarray]:
    """This host's rows of batch `index` of an epoch's plan (rows past the data are padding)."""
    shape = (self.local_batch_size, self.seq_len)
    batch = {key: np.zeros(shape, dtype=np.float32 if key == "loss_mask" else np.int32) for key in BATCH_KEYS}
    batch["inputs"][:] = self.pad_id
    batch["targets"][:] = self.pad_id
    first = index * self.batch_size + self.process_index * self.local_batch_size
    bounds = plan.row_starts[min(first, len(plan.row_starts) - 1):first + self.local_batch_size + 1]
    if len(bounds) < 2:
      return batch
    # Every filled position at once: item i of row r fills columns col[i]:col[i] + n[i] with its tokens.
    items = np.arange(bounds[0], bounds[-1])
    n = plan.lengths[items]
    row = np.repeat(np.arange(len(bounds) - 1), np.diff(bounds))
    ends = np.cumsum(n)
    col = ends - n - np.concatenate([[0], ends])[bounds[:-1] - bounds[0]][row]  # start within its row
    segment = items - bounds[:-1][row] + 1
    item = np.repeat(np.arange(len(items)), n)  # the item of each filled position
    j = np.arange(len(item)) - (ends - n)[item]  # position within its item
    rows, cols = row[item], col[item] + j
    for s, source in enumerate(self.sources):
      at = plan.source[items[item]] == s
      if not at.any():
        continue
      token = source.offsets[source.index[plan.example[items[item[at]]]]] + j[at]  # the input token's offset
      batch["inputs"][rows[at], cols[at]] = source.ids[token]
      batch["targets"][rows[at], cols[at]] = source.ids[token + 1]
      batch["loss_mask"][rows[at], cols[at]] = source.mask[token + 1]
    batch["segment_ids"][rows, cols] = segment[item]
    batch["positions"][rows, cols] = j
    return batch


def eval_batches(sources: Sequence[TokenizedSource], *, batch_size: int, seq_len: int) -> list[dict]:
  """Every example of ``sources`` once, in order, as batches (the last one padded, without loss on padding)."""
  return list(BatchIterator(sources, batch_size=batch_size, seq_len=seq_len, seed=0, shuffle=False, num_epochs=1,
                            drop_remainder=False))
