"""Bad input to every command: a clear error naming the culprit, and nothing written (docs/reliability.md's table).

Each case runs the command's ``main(argv)`` in-process. Cases covered elsewhere: a sweep config without
``get_sweep`` and other config errors (tests/test_sweep.py::test_config_errors), a mistyped config key
(tests/test_experiments.py::test_cli_rejects_a_mistyped_config_key), bad TPU names, zones and accelerators
(tests/test_tpu.py), a second writer on a workdir (tests/test_lock.py).
"""

from __future__ import annotations

import importlib
import json
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
LR_SWEEP = f"{ROOT}/experiments/configs/lr_sweep.py"


def _cli(module: str):
  """The ``main(argv)`` of a command's module, imported when a case runs."""
  return lambda argv: importlib.import_module(module).main(argv)


_study, _sweep, _stacked = _cli("experiments.study"), _cli("experiments.sweep"), _cli("experiments.stacked")
_evaluate, _main, _tpu_run = _cli("experiments.evaluate"), _cli("experiments.main"), _cli("tpu.run")


# (command, argv with {tmp} for the test's directory, a piece of the message, what must not exist afterwards)
CASES = {
    "study: unknown variant": (_study, ["--variant", "nope", "--workdir", "{tmp}/s"],
                               "argument --variant: invalid choice: 'nope'", "s"),
    "study: unknown family": (_study, ["--variant", "quick", "--families", "layers", "--workdir", "{tmp}/s"],
                              "--families ['layers']: not in the quick study's families ['lr_sweep']", "s"),
    "sweep: unknown variant": (_sweep, ["--config", f"{LR_SWEEP}:nope", "--workdir", "{tmp}/s"],
                               "get_sweep('nope') raised ValueError: unknown config argument 'nope'", "s"),
    "sweep: a config without get_config": (
        _sweep, ["--config", f"{ROOT}/experiments/configs/common.py", "--workdir", "{tmp}/s"],
        "does not define get_config()", "s"),
    "sweep: --shard 3/2": (_sweep, ["--config", f"{LR_SWEEP}:quick", "--workdir", "{tmp}/s", "--shard", "3/2"],
                           "invalid shard '3/2': expected I/N with 0 <= I < N", "s"),
    "sweep: --parallel 0": (_sweep, ["--config", f"{LR_SWEEP}:quick", "--workdir", "{tmp}/s", "--parallel", "0"],
                            "--parallel 0: give at least 1", "s"),
    "stacked: points that cannot share a step": (
        _stacked, ["--config", LR_SWEEP, "--point", "quick,method=lora,rank=4", "--point", "quick,method=full",
                   "--workdir", "{tmp}/a", "--workdir", "{tmp}/b"],
        "point 1 cannot be stacked with point 0: they differ in ['methods']", "a"),
    "stacked: a point without its workdir": (
        _stacked, ["--config", LR_SWEEP, "--point", "quick,method=lora,rank=4", "--point", "quick,method=lora,rank=16",
                   "--workdir", "{tmp}/a"], "2 --point but 1 --workdir", "a"),
    "evaluate: a directory with no runs": (_evaluate, ["{tmp}/empty"], "empty: no config.json (expected a workdir "
                                           "written by experiments.main or experiments.stacked)", "empty/heldout_eval.csv"),
    "RL: answers no reward can score": (
        _main, ["--config", f"{ROOT}/experiments/configs/rl.py:model=meta-llama/Llama-3.1-8B,task=gsm8k",
                "--workdir", "{tmp}/rl", "--config.data.train={tmp}/gsm.jsonl", "--config.data.eval_size=1"],
        "gsm.jsonl (train): record 1's 'answer' cannot be scored by the gsm8k reward: no number in the reference "
        "answer 'about five'", "rl"),
    "TPU: no zone": (_tpu_run, ["--name", "x", "--config", f"{LR_SWEEP}:quick", "--workdir", "gs://b/x"],
                     "the following arguments are required: --zone", None),
    "TPU: no name": (_tpu_run, ["--zone", "us-west4-a", "--config", f"{LR_SWEEP}:quick", "--workdir", "gs://b/x"],
                     "the following arguments are required: --name", None),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_a_clear_error_and_writes_nothing(case, tmp_path, capsys):
  command, argv, message, untouched = CASES[case]
  (tmp_path / "empty").mkdir()
  (tmp_path / "gsm.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [
      {"question": "1+1?", "answer": "so #### 2"}, {"question": "2+3?", "answer": "about five"}]))
  argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
  with pytest.raises(SystemExit) as e:
    code = command(argv)
    raise SystemExit(code)  # a command that returns its status instead of exiting
  out = capsys.readouterr()
  text = f"{e.value.code if isinstance(e.value.code, str) else ''}{out.err}{out.out}"
  assert e.value.code not in (0, None) and message in " ".join(text.split()), text[-2000:]
  assert "Traceback" not in text
  if untouched:
    assert not (tmp_path / untouched).exists()
