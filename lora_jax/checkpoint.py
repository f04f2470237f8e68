"""Orbax checkpoints of the training state: adapter-only for LoRA, everything trainable for full fine-tuning.

A checkpoint holds the trainable tree, the optimizer state, the step and the RNG (never the frozen base of a LoRA
run), plus a JSON record: the data iterator's position and which base model the adapters belong to. Orbax writes
each step to a temporary directory and renames it only when complete, so an interrupted or failed save (killed
process, full disk) leaves the previous checkpoint as it was; ``latest_step`` only sees finished ones.
"""

from __future__ import annotations

from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath


class Checkpointer:
  """Saves and restores ``(tree, record)`` pairs under ``directory/<step>``, keeping the last ``keep``."""

  def __init__(self, directory: str | epath.PathLike, keep: int = 2):
    directory = epath.Path(directory)
    self.directory = directory if "://" in str(directory) else directory.absolute()  # local or gs://
    self._manager = ocp.CheckpointManager(
        self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True))

  def save(self, step: int, tree: Any, record: dict) -> None:
    """Writes one checkpoint and waits until it is durable; raises (leaving older ones intact) on failure."""
    self._manager.save(int(step), args=ocp.args.Composite(state=ocp.args.StandardSave(tree),
                                                           record=ocp.args.JsonSave(record)), force=True)
    self._manager.wait_until_finished()

  def latest_step(self) -> int | None:
    """Step of the newest complete checkpoint, or None."""
    self._manager.reload()
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    """Steps of all complete checkpoints, oldest first."""
    self._manager.reload()
    return sorted(self._manager.all_steps())

  def restore(self, step: int, like: Any) -> tuple[Any, dict]:
    """Restores the tree (shaped, typed and sharded like ``like``) and the JSON record of a step."""
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
    out = self._manager.restore(int(step), args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                                                    record=ocp.args.JsonRestore()))
    return out["state"], dict(out["record"])

  def restore_record(self, step: int) -> dict:
    """Only the JSON record of a step (e.g. to see which base model an adapter checkpoint belongs to)."""
    out = self._manager.restore(int(step), args=ocp.args.Composite(record=ocp.args.JsonRestore()))
    return dict(out["record"])

  def close(self):
    """Finishes pending writes and releases the manager."""
    self._manager.wait_until_finished()
    self._manager.close()
