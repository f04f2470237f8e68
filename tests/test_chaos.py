"""The chaos harness (benchmarks/chaos.py), small: one random SIGKILL of a single run, rerun, compared bitwise."""

import re

import pytest

from benchmarks import chaos
from tests import _base


@pytest.mark.slow
def test_a_run_killed_mid_run_finishes_bitwise_equal(tmp_path, capsys):
  """The harness's small version: an experiments.main run SIGKILLed (with everything under it) as soon as its step-8
  checkpoint exists, then the same command again: it resumes and ends with the same metrics records (each step
  logged once), checkpoint arrays (trainable, optimizer state, step, RNG) and data position as the uninterrupted run.
  (The harness's random moments: python -m benchmarks.chaos; docs/reliability.md.)"""
  total, survived, bitwise = chaos.chaos(["run"], kills=1, seed=0, signals=["KILL"], workdir=tmp_path,
                                        base=_base.overrides(), after_checkpoint=8)
  out = capsys.readouterr().out
  assert (total, survived, bitwise) == (1, 1, 1), out
  assert re.search(r"\[run\] kill 1/1 \(seed 0\): SIGKILL once checkpoint 8 was saved \([\d.]+ s\) \(exit -9, "
                   r"checkpoints at steps \[(4, )?8(, 12)?\]\), 1 rerun\(s\) -> finished, bitwise equal", out), out
  assert out.strip().endswith("kills survived: 1/1, bitwise: 1/1")


def test_the_outcome_keeps_computed_values_and_drops_timings(tmp_path):
  run = tmp_path / "lora"
  run.mkdir()
  (run / "metrics.jsonl").write_text('{"step": 1, "train/loss": 1.5, "train/step_time_s": 0.2, "eval/nll": 2.0, '
                                     '"train/tokens_per_s": 9.0, "train/peak_memory_bytes": 7, "train/tokens": 24}\n')
  assert chaos.outcome(tmp_path) == {"lora/metrics.jsonl": [
      {"step": 1, "train/loss": 1.5, "eval/nll": 2.0, "train/tokens": 24}]}


def test_bad_arguments_name_the_culprit(capsys):
  for argv, message in ((["--layers", "run,nope"], "--layers ['nope']: valid layers are"),
                        (["--signals", "HUP"], "--signals ['HUP']: valid signals are"),
                        (["--kills", "0"], "--kills must be >= 1")):
    with pytest.raises(SystemExit):
      chaos.main(argv)
    assert message in capsys.readouterr().err
