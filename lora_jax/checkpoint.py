"""Orbax checkpoints of the training state: adapter-only for LoRA, everything trainable for full fine-tuning.

A checkpoint holds one Orbax item per part of the state (``trainable``, ``opt_state``, ``step``, ``rng``; never
the frozen base of a LoRA run) plus a JSON ``record`` that makes it self-describing: the data iterator's position,
the base model it was trained from (absolute path or hub id, and a fingerprint of its config and weights), the
model's layout (``model_config``, incl. ``scan_layers``), the LoRA spec, and which items and trainable leaves it
holds (``describe_run`` and ``Checkpointer.save``). Readers of trained parameters restore the ``trainable`` item
alone: they never rebuild the optimizer. Orbax writes each step to a temporary directory and renames it only when
complete, so an interrupted save leaves the previous checkpoint as it was; ``latest_step`` only sees finished
ones, and ``restore_latest`` falls back to an older checkpoint when the newest can't be read (a reader leaves the
directory as it is; a resuming trainer moves the unreadable one aside with ``set_aside``).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, NamedTuple

import jax
import orbax.checkpoint as ocp
from etils import epath

from lora_jax import hf, lora, model_lora

RECORD_FORMAT = 2  # Version of the record's layout; bumped when what a checkpoint holds changes.


class CheckpointError(RuntimeError):
  """A checkpoint that can't be read; the message names its directory and what is wrong."""


def describe_run(base_model: str | os.PathLike, model_config, spec) -> dict:
  """The part of a checkpoint's record that makes it self-describing: the base model (absolute path or hub id,
  fingerprint), the model's layout (``ModelConfig`` fields incl. ``scan_layers``) and the LoRA spec."""
  return {"format": RECORD_FORMAT, **hf.base_identity(base_model), "model_config": dataclasses.asdict(model_config),
          "lora_spec": spec.to_dict()}


def _leaf_shapes(tree) -> dict[str, list[int]]:
  """'/'-joined path -> shape of every array in ``tree`` (for the record: what the checkpoint holds)."""
  return {jax.tree_util.keystr(path, simple=True, separator="/"): list(leaf.shape)
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


class Checkpointer:
  """Saves and restores ``(items, record)`` pairs under ``directory/<step>``, keeping the last ``keep``."""

  def __init__(self, directory: str | epath.PathLike, keep: int = 2):
    directory = epath.Path(directory)
    self.directory = directory if "://" in str(directory) else directory.absolute()  # local or gs://
    self._manager = ocp.CheckpointManager(
        self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True))

  def save(self, step: int, items: dict[str, Any], record: dict) -> None:
    """Writes one checkpoint (each top-level entry of ``items`` an Orbax item) and waits until it is durable;
    raises (leaving older ones intact) on failure."""
    holds = {"items": sorted(items)}
    if "trainable" in items:
      holds["trainable"] = _leaf_shapes(items["trainable"])
    args = {name: ocp.args.StandardSave({name: value}) for name, value in items.items()}
    self._manager.save(int(step), args=ocp.args.Composite(record=ocp.args.JsonSave({**record, "holds": holds}),
                                                           **args), force=True)
    self._manager.wait_until_finished()

  def latest_step(self) -> int | None:
    """Step of the newest complete checkpoint, or None."""
    self._manager.reload()
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    """Steps of all complete checkpoints, oldest first."""
    self._manager.reload()
    return sorted(self._manager.all_steps())

  def restore(self, step: int, like: dict[str, Any]) -> tuple[dict[str, Any], dict]:
    """Restores the items named in ``like`` (shaped, typed and sharded like it) and the JSON record of a step;
    items not in ``like`` (e.g. the optimizer state, for a reader of trained parameters) are not read."""
    args = {name: ocp.args.StandardRestore({name: jax.tree.map(ocp.utils.to_shape_dtype_struct, value)})
            for name, value in like.items()}
    try:
      out = self._manager.restore(int(step), args=ocp.args.Composite(record=ocp.args.JsonRestore(), **args))
    except Exception as err:  # Orbax raises many kinds (ValueError, KeyError, JSONDecodeError, tensorstore errors)
      raise CheckpointError(f"checkpoint {self.directory / str(step)} can't be read (items {sorted(like)}): "
                            f"{type(err).__name__}: {_first_line(err)}") from err
    return {name: out[name][name] for name in like}, self._record(out)

  def restore_latest(self, like: dict[str, Any]) -> tuple[int, dict[str, Any], dict] | None:
    """``(step, items, record)`` of the newest checkpoint that can be read, or None when there is none; a newer
    unreadable one (e.g. truncated by a full disk) is reported and skipped."""
    steps = self.all_steps()
    for i, step in enumerate(reversed(steps)):
      try:
        items, record = self.restore(step, like)
      except CheckpointError as err:
        older = steps[-i - 2] if i + 1 < len(steps) else None
        if older is None:
          raise
        print(f"WARNING: {err}\nfalling back to the previous checkpoint, step {older}")
        continue
      return step, items, record
    return None

  def set_aside(self, step: int) -> epath.Path:
    """Renames the unreadable checkpoint ``step`` to ``<step>.corrupt`` (``.corrupt-2``, ... if taken), kept for a
    person to look at and out of the way of a rerun that saves that step again; returns the new path."""
    old, suffix, n = self.directory / str(step), ".corrupt", 1
    while (new := self.directory / f"{step}{suffix}").exists():
      n += 1
      suffix = f".corrupt-{n}"
    old.rename(new)
    self._manager.reload()
    return new

  def delete(self, step: int) -> None:
    """Deletes checkpoint ``step`` (one a resumed run will write again)."""
    self._manager.delete(int(step))
    self._manager.reload()

  def restore_record(self, step: int) -> dict:
    """Only the JSON record of a step (e.g. to see which base model an adapter checkpoint belongs to)."""
    try:
      out = self._manager.restore(int(step), args=ocp.args.Composite(record=ocp.args.JsonRestore()))
    except Exception as err:
      raise CheckpointError(f"the record of checkpoint {self.directory / str(step)} can't be read: "
                            f"{type(err).__name__}: {_first_line(err)}") from err
    return self._record(out)

  def _record(self, out) -> dict:
    record = out["record"]
    if not isinstance(record, dict):
      raise CheckpointError(f"checkpoint record in {self.directory} is {type(record).__name__}, not a JSON object")
    return dict(record)

  def close(self):
    """Finishes pending writes and releases the manager."""
    self._manager.wait_until_finished()
    self._manager.close()


def _first_line(err: Exception) -> str:
  text = str(err).strip() or repr(err)
  return text.splitlines()[0][:500]


class OpenRun(NamedTuple):
  """A run's checkpoints opened for reading: its newest step and that checkpoint's record."""

  checkpointer: Checkpointer
  step: int
  record: dict


def open_run(run_dir: str | epath.PathLike) -> OpenRun:
  """The newest checkpoint of a run directory (``RUN/checkpoints``) or a checkpoints directory, with its record;
  every way it can be unusable is one clear error naming the directory."""
  run_dir = epath.Path(run_dir)
  if not run_dir.exists():
    raise FileNotFoundError(f"{run_dir}: no such run directory")
  directory = run_dir / "checkpoints" if (run_dir / "checkpoints").exists() else run_dir
  checkpointer = Checkpointer(directory)
  step = checkpointer.latest_step()
  if step is None:
    raise FileNotFoundError(f"{directory}: no finished checkpoint (expected a run directory written by "
                            "experiments.main, holding checkpoints/<step>)")
  record = checkpointer.restore_record(step)
  if record.get("format") != RECORD_FORMAT or "lora_spec" not in record:
    raise CheckpointError(f"checkpoint {directory / str(step)} has a record of format {record.get('format')!r} "
                          f"(this lora_jax reads format {RECORD_FORMAT}: base model, layout and LoRA spec in the "
                          "record); it was written by another version")
  return OpenRun(checkpointer, step, record)


def restore_trained(run: OpenRun, params, layouts=None) -> tuple[Any, Any]:
  """``(params, adapters)`` of an opened run's newest checkpoint, on top of the base ``params`` it was trained from.

  Only the ``trainable`` item is read (never the optimizer state), into a template built from the recorded spec:
  whatever optimizer, clipping or schedule the run used, its trained parameters read the same way.
  """
  checkpointer, step, record = run
  spec = lora.LoraSpec.from_dict(record["lora_spec"])
  base, adapters = lora.create(params, spec, jax.random.key(0), layouts=layouts)
  trainable, frozen = lora.split(base, adapters, spec)
  got = _leaf_shapes(trainable)
  saved = record.get("holds", {}).get("trainable", got)
  if got != saved:
    diff = sorted(k for k in set(got) | set(saved) if got.get(k) != saved.get(k))
    raise CheckpointError(f"checkpoint {checkpointer.directory / str(step)} holds trainable arrays of other "
                          f"shapes than this base gives ({len(diff)} differ, e.g. {diff[0]}: checkpoint "
                          f"{saved.get(diff[0])}, base {got.get(diff[0])}); is it the base the run was trained on?")
  restored, _ = checkpointer.restore(step, {"trainable": trainable})
  return lora.combine(restored["trainable"], frozen)


# Trained runs on their base.


class BaseMismatch(ValueError):
  """A run's adapters applied to a base other than the one it was trained from."""


def load_run_base(run_dir: str | os.PathLike, record: dict, base: str | None = None, *, force: bool = False,
                  dtype=None) -> tuple[hf.ModelConfig, dict[str, Any]]:
  """``(config, params)`` of the base a run was trained from, as its checkpoint ``record`` names it (or ``base``):
  the run's layout (``scan_layers``), the same shapes, and the recorded fingerprint unless ``force``."""
  recorded, trained_on = record["base_model"], record["model_config"]
  name = str(base) if base else recorded
  root = hf.resolve_checkpoint(name)
  config = hf.load_config(root, scan_layers=bool(trained_on.get("scan_layers", False)))
  differ = [f"{k} {trained_on.get(k)} -> {v}" for k, v in hf.model_fields(config).items() if trained_on.get(k) != v]
  if differ:
    raise BaseMismatch(f"run {run_dir} was trained on {recorded}, a model of other shapes or settings than {name} "
                       f"({', '.join(differ)}); its adapters can't be applied to it")
  found = hf.fingerprint(root)
  if found != record["base_fingerprint"] and not force:
    raise BaseMismatch(f"run {run_dir} was trained on {recorded} (fingerprint {record['base_fingerprint']}), "
                       f"but {name} has fingerprint {found}: other weights, so the adapters would compute garbage. "
                       "Give the base it was trained on, or force it (--force) if you know better")
  return config, hf.load_params(root, config, dtype)


def load_trained(run_dir: str | os.PathLike, base: str | None = None, *, force: bool = False,
                 dtype=None) -> tuple[hf.ModelConfig, dict[str, Any], Any, dict]:
  """``(config, params, adapters, record)``: a run's trained parameters on the base it was trained from.

  The base is the one the run's checkpoint records (an absolute path or hub id) unless ``base`` names another; its
  fingerprint must equal the recorded one (``force`` applies the adapters to a different base anyway, but never to
  one of other shapes). The layout (``scan_layers``) is the run's. Only the trained parameters are read.
  """
  run = open_run(run_dir)
  try:
    config, params = load_run_base(run_dir, run.record, base, force=force, dtype=dtype)
    layouts = model_lora.layouts(config)
    params, adapters = restore_trained(run, params, layouts)
  finally:
    run.checkpointer.close()
  return config, params, adapters, run.record
