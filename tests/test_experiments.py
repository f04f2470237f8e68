"""The experiment CLI end to end: configs, the tiny run, workdir safety, kill-and-resume, checkpoint safety."""

import errno
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from experiments import main as exp_main
from experiments.configs import finetune
from lora_jax import checkpoint, lora

ROOT = pathlib.Path(__file__).parents[1]


def small_config(tmp_path, **changes):
  """The tiny config shrunk further so a test runs in seconds; the base is cached per test session."""
  config = finetune.get_config("tiny")
  config.tiny_base.steps = 40
  config.tiny_base.corpus_documents = 400
  config.tiny_base.cache_dir = str(tmp_path.parent / "tiny_base_cache")
  config.data.synthetic_examples = 200
  config.data.eval_size = 32
  config.data.cache_dir = str(tmp_path / "tok")
  config.train.steps = 20
  config.train.eval_every = 10
  config.train.checkpoint_every = 10
  config.optim.lr = 3e-3
  for key, value in changes.items():
    node = config
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return config


def test_every_config_builds_at_every_sweep_point():
  for arg in ["tiny", *finetune.get_sweep()]:
    config = finetune.get_config(arg)
    assert config.methods and config.lora.alpha == 32.0
    lora.LoraSpec.from_dict(config.lora.to_dict())  # a valid spec
  with pytest.raises(ValueError, match="unknown config argument 'rnk'"):
    finetune.get_config("tiny,rnk=4")


def test_tiny_run_fine_tunes_with_lora_and_full_and_reports(tmp_path, capsys):
  results = exp_main.run(small_config(tmp_path), tmp_path / "run")
  report = (tmp_path / "run" / "report.md").read_text()
  base = float(report.split("| base model | - | - | ")[1].split(" ")[0])
  assert all(0.0 <= r["accuracy"] <= 1.0 for r in results.values())  # generation-based eval ran
  assert (tmp_path / "run" / "report.png").stat().st_size > 10_000 and "report.png" in report
  assert set(results) == {"lora", "full"}
  for method, r in results.items():
    assert r["eval_nll"] < base - 1.0, (method, r, base)  # both learn the task
    assert f"| {method} |" in report
  assert results["lora"]["trainable"] < results["full"]["trainable"]
  info = json.loads((tmp_path / "run" / "run_info.json").read_text())
  assert {"git_commit", "packages", "devices"} <= set(info) and info["packages"]["jax"]
  assert json.loads((tmp_path / "run" / "config.json").read_text())["train"]["steps"] == 20
  assert "model/layers_0/mlp/down_proj/kernel" in (tmp_path / "run" / "lora" / "summary.txt").read_text()
  record = checkpoint.Checkpointer(tmp_path / "run" / "lora" / "checkpoints").restore_record(20)
  assert record["method"] == "lora" and record["base_model"].startswith(str(tmp_path.parent / "tiny_base_cache"))

  # The run's adapters go on: a merged HF export (base read from the run's record) and the generation CLI.
  from lora_jax import export, generate

  assert export.main(["--run", str(tmp_path / "run" / "lora"), "--out", str(tmp_path / "merged"), "--merged"]) == 0
  assert (tmp_path / "merged" / "config.json").exists() and (tmp_path / "merged" / "tokenizer.json").exists()
  generate.main(["--model", record["base_model"], "--adapter", str(tmp_path / "run" / "lora"), "--prompt", "2+3=",
                 "--prompt", "40+1=", "--max-new-tokens", "4"])
  merged_out = capsys.readouterr().out
  generate.main(["--model", str(tmp_path / "merged"), "--prompt", "2+3=", "--prompt", "40+1=", "--max-new-tokens", "4"])
  assert "### 2+3=" in merged_out and capsys.readouterr().out.split("### 2+3=")[1] == merged_out.split("### 2+3=")[1]
  assert export.main(["--run", str(tmp_path / "run" / "lora"), "--out", str(tmp_path / "peft"), "--peft"]) == 0
  capsys.readouterr()
  generate.main(["--model", record["base_model"], "--adapter", str(tmp_path / "peft"), "--prompt", "2+3=",
                 "--prompt", "40+1=", "--max-new-tokens", "4"])
  assert capsys.readouterr().out.split("### 2+3=")[1] == merged_out.split("### 2+3=")[1]  # PEFT dir: same output


def test_workdir_of_another_config_is_refused_unless_overwrite(tmp_path):
  config = small_config(tmp_path, methods=("lora",), **{"train.steps": 2})
  exp_main.run(config, tmp_path / "run")
  other = small_config(tmp_path, methods=("lora",), **{"train.steps": 2, "optim.lr": 5e-3})
  with pytest.raises(SystemExit, match="holds a run of a different config \\(differs in: optim.lr\\)"):
    exp_main.run(other, tmp_path / "run")
  exp_main.run(other, tmp_path / "run", overwrite=True)
  assert json.loads((tmp_path / "run" / "config.json").read_text())["optim"]["lr"] == 5e-3


def test_cli_rejects_a_mistyped_config_key(tmp_path):
  out = subprocess.run([sys.executable, "-m", "experiments.main", "--config",
                        "experiments/configs/finetune.py:tiny", "--workdir", str(tmp_path), "--config.optim.lrr=1"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert out.returncode != 0 and "lrr" in out.stderr


def _cli(tmp_path, workdir, *extra):
  overrides = ["--config.tiny_base.steps=40", "--config.tiny_base.corpus_documents=400",
               f"--config.tiny_base.cache_dir={tmp_path.parent / 'tiny_base_cache'}",
               "--config.data.synthetic_examples=200", "--config.data.eval_size=32",
               f"--config.data.cache_dir={tmp_path / 'tok'}", "--config.train.steps=30",
               "--config.train.checkpoint_every=5", "--config.train.eval_every=10", "--config.train.log_every=1",
               "--config.methods=('lora',)"]
  return [sys.executable, "-m", "experiments.main", "--config", "experiments/configs/finetune.py:tiny",
          "--workdir", str(workdir), *overrides, *extra]


def _final(workdir):
  ck = checkpoint.Checkpointer(workdir / "lora" / "checkpoints")
  step = ck.latest_step()
  path = ck.directory / str(step) / "state"
  return step, sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.is_file()), ck


def test_sigkill_mid_run_then_resume_equals_uninterrupted(tmp_path):
  straight = tmp_path / "straight"
  subprocess.run(_cli(tmp_path, straight), cwd=ROOT, check=True, capture_output=True, timeout=600)
  killed = tmp_path / "killed"
  proc = subprocess.Popen(_cli(tmp_path, killed), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  ckdir = killed / "lora" / "checkpoints"
  deadline = time.time() + 300
  while time.time() < deadline and not (ckdir / "10").exists():
    time.sleep(0.05)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert (ckdir / "10").exists()
  assert not (ckdir / "30").exists(), "the run finished before it could be killed"
  subprocess.run(_cli(tmp_path, killed), cwd=ROOT, check=True, capture_output=True, timeout=600)

  like = _restore_like(straight)
  s_state, _ = checkpoint.Checkpointer(straight / "lora" / "checkpoints").restore(30, like)
  k_state, k_record = checkpoint.Checkpointer(killed / "lora" / "checkpoints").restore(30, like)
  for a, b in zip(jax.tree.leaves(s_state), jax.tree.leaves(k_state)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # bitwise, data position included
  assert k_record["data"] == checkpoint.Checkpointer(straight / "lora" / "checkpoints").restore_record(30)["data"]
  steps = [json.loads(l)["step"] for l in (killed / "lora" / "metrics.jsonl").read_text().splitlines()
           if "train/loss" in l]
  assert steps == list(range(1, 31))  # no gaps, no duplicates after the resume


def _restore_like(workdir):
  """A template tree for restoring a LoRA checkpoint of the CLI's tiny run, rebuilt the way main builds it."""
  import ml_collections

  from lora_jax import hf, train
  from lora_jax.models import transformer

  config = ml_collections.ConfigDict(json.loads((workdir / "config.json").read_text()))
  base = checkpoint.Checkpointer(workdir / "lora" / "checkpoints").restore_record(30)["base_model"]
  model_config = hf.load_config(base)
  params = hf.load_params(base, model_config)
  spec = exp_main.make_spec("lora", config)
  layouts = lora.trace_layouts(transformer.CausalLM(model_config), np.zeros((1, 8), np.int32))
  params, adapters = lora.create(params, spec, jax.random.key(config.seed), layouts=layouts)
  return train.init_state(params, adapters, spec, exp_main.make_optim("lora", config), config.seed).checkpoint_tree()


def _tree(value):
  return {"w": np.full((64, 64), value, np.float32)}


def _fail_renames_with_enospc(monkeypatch):
  """A full disk at the worst moment: the data is written but the final rename (the commit) fails."""
  calls = {"n": 0}

  def failing_rename(src, dst, *args, **kwargs):
    calls["n"] += 1
    raise OSError(errno.ENOSPC, "No space left on device", str(src))

  monkeypatch.setattr(os, "rename", failing_rename)
  return calls


def test_a_save_that_fails_on_a_full_disk_leaves_the_previous_checkpoint_usable(tmp_path, monkeypatch):
  ck = checkpoint.Checkpointer(tmp_path / "ck", keep=2)
  ck.save(1, _tree(1.0), {"data": {"index": 1}})
  calls = _fail_renames_with_enospc(monkeypatch)
  with pytest.raises(Exception, match="No space left on device"):
    ck.save(2, _tree(2.0), {"data": {"index": 2}})
  monkeypatch.undo()
  assert calls["n"] >= 1
  fresh = checkpoint.Checkpointer(tmp_path / "ck", keep=2)
  assert fresh.latest_step() == 1
  tree, record = fresh.restore(1, _tree(0.0))
  assert float(tree["w"][0, 0]) == 1.0 and record["data"] == {"index": 1}


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs needs root; the injected-fault test covers it")
def test_a_save_on_a_really_full_tmpfs_leaves_the_previous_checkpoint_usable(tmp_path):
  mnt = tmp_path / "small"
  mnt.mkdir()
  if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=400k", "tmpfs", str(mnt)]).returncode != 0:
    pytest.skip("mount is not permitted here; the injected-fault test covers it")
  try:
    ck = checkpoint.Checkpointer(mnt / "ck", keep=3)
    ck.save(1, _tree(1.0), {"data": {"index": 1}})
    with pytest.raises(Exception):
      big = np.random.default_rng(0).standard_normal((512, 512)).astype(np.float32)  # 1 MiB, incompressible
      ck.save(2, {"w": big}, {"data": {"index": 2}})
    fresh = checkpoint.Checkpointer(mnt / "ck", keep=3)
    assert fresh.latest_step() == 1
    tree, _ = fresh.restore(1, _tree(0.0))
    assert float(tree["w"][0, 0]) == 1.0
  finally:
    subprocess.run(["umount", "-l", str(mnt)])


def test_moe_rank_per_expert_is_total_rank_over_active_experts():
  from lora_jax.models import transformer

  config = finetune.get_config("tiny,rank=8")
  moe = transformer.ModelConfig.tiny_qwen3_moe(scan_layers=True)  # 2 experts per token
  model = transformer.CausalLM(moe)
  params = transformer.init_params(moe, jax.random.key(0))
  layouts = lora.trace_layouts(model, np.zeros((1, 4), np.int32))
  ranks = {}
  for rule, expected in (("total/active", 4), ("same", 8)):
    config.moe_expert_rank = rule
    _, adapters = lora.create(params, exp_main.make_spec("lora", config, moe), jax.random.key(0), layouts=layouts)
    ranks = {"/".join(p): a.rank for p, a in lora.adapter_items(adapters)}
    assert ranks["model/layers/mlp/experts/up_proj"] == expected
    assert ranks["model/layers/self_attn/q_proj"] == 8
  config.moe_expert_rank = "half"
  with pytest.raises(SystemExit, match="moe_expert_rank 'half'"):
    exp_main.make_spec("lora", config, moe)
