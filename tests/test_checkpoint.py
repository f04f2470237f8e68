"""Checkpoints: items restored alone, records that describe the run, and clear errors on damaged checkpoints."""

from __future__ import annotations

import pathlib

import jax.numpy as jnp
import numpy as np
import pytest

from lora_jax import checkpoint


def _items(step: int) -> dict:
  return {"trainable": {"w": jnp.full((3,), float(step))}, "opt_state": {"mu": jnp.zeros((3,))},
          "step": jnp.asarray(step, jnp.int32)}


def _saved(tmp_path, steps=(1, 2)) -> checkpoint.Checkpointer:
  ck = checkpoint.Checkpointer(tmp_path / "ck", keep=5)
  for s in steps:
    ck.save(s, _items(s), {"data": {"position": s}})
  return ck


def test_items_restore_alone_and_the_record_says_what_is_held(tmp_path):
  ck = _saved(tmp_path)
  assert ck.latest_step() == 2 and ck.all_steps() == [1, 2]
  items, record = ck.restore(2, {"trainable": _items(0)["trainable"]})  # no optimizer template needed
  assert list(items) == ["trainable"]
  np.testing.assert_array_equal(items["trainable"]["w"], np.full((3,), 2.0))
  assert record["data"] == {"position": 2}
  assert record["holds"] == {"items": ["opt_state", "step", "trainable"], "trainable": {"w": [3]}}
  items, _ = ck.restore(1, _items(0))
  assert int(items["step"]) == 1 and items["opt_state"]["mu"].shape == (3,)


def _damage(path: pathlib.Path, keep_bytes: int | None = None, text: str | None = None):
  if text is not None:
    path.write_text(text)
  else:
    path.write_bytes(path.read_bytes()[:keep_bytes])


def test_a_corrupt_metadata_file_is_named(tmp_path):
  ck = _saved(tmp_path)
  _damage(tmp_path / "ck" / "2" / "trainable" / "_METADATA", text="{not json")
  with pytest.raises(checkpoint.CheckpointError, match=r"ck/2 can't be read"):
    ck.restore(2, {"trainable": _items(0)["trainable"]})


def test_a_corrupt_record_is_named(tmp_path):
  ck = _saved(tmp_path)
  _damage(tmp_path / "ck" / "2" / "record" / "metadata", text='{"data": ')
  with pytest.raises(checkpoint.CheckpointError, match=r"record of checkpoint .*ck/2 can't be read"):
    ck.restore_record(2)


def test_an_unreadable_newest_checkpoint_falls_back_to_the_previous_one(tmp_path, capsys):
  ck = _saved(tmp_path)
  for f in (tmp_path / "ck" / "2" / "trainable").rglob("*"):
    if f.is_file() and f.parent.name == "d":
      _damage(f, keep_bytes=4)  # truncated array data (e.g. a full disk under a copy)
  step, items, record = ck.restore_latest({"trainable": _items(0)["trainable"]})
  assert step == 1 and record["data"] == {"position": 1}
  np.testing.assert_array_equal(items["trainable"]["w"], np.full((3,), 1.0))
  out = capsys.readouterr().out
  assert "ck/2 can't be read" in out and "falling back to the previous checkpoint, step 1" in out


def test_open_run_explains_what_is_missing(tmp_path):
  with pytest.raises(FileNotFoundError, match="no such run directory"):
    checkpoint.open_run(tmp_path / "nope")
  (tmp_path / "empty").mkdir()
  with pytest.raises(FileNotFoundError, match="no finished checkpoint"):
    checkpoint.open_run(tmp_path / "empty")
  _saved(tmp_path)  # a record without the run description (format 2)
  with pytest.raises(checkpoint.CheckpointError, match="record of format None"):
    checkpoint.open_run(tmp_path / "ck")
