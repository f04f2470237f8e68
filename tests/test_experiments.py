"""The experiment CLI end to end: configs, the tiny run, workdir safety, kill-and-resume, preemption, reports,
checkpoint safety."""

import errno
import json
import math
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
from experiments import run as run_lib
from experiments import overrides, report
from experiments.configs import common, finetune
from lora_jax import checkpoint, data, lora, synthetic
from tests import _base

ROOT = pathlib.Path(__file__).parents[1]


def small_config(tmp_path, **changes):
  """The tiny config shrunk further so a test runs in seconds; the base is cached per test session."""
  config = finetune.get_config("tiny")
  _base.shrink(config)
  config.data.synthetic_examples = 200
  config.data.eval_size = 32
  config.data.cache_dir = str(tmp_path / "tok")
  config.train.steps = 20
  config.train.eval_every = 10
  config.train.checkpoint_every = 10
  config.optim.lr = 3e-3
  return overrides.apply(config, changes)


def test_every_config_builds_at_every_sweep_point():
  for arg in ["tiny", *finetune.get_sweep()]:
    config = finetune.get_config(arg)
    assert config.methods and config.lora.alpha == 32.0
    common.lora_spec(config.lora)  # a valid spec
    exp_main.check_config(config)
    if len(config.methods) == 1:  # a single-method point trains at exactly its config's LR
      assert run_lib.make_optim(config.methods[0], config).lr == config.optim.lr
  with pytest.raises(ValueError, match="unknown config argument 'rnk'"):
    finetune.get_config("tiny,rnk=4")


def test_a_sweep_points_lr_is_the_lr_its_run_uses():
  for arg, method in (("tiny,method=full,lr=1e-3", "full"), ("tiny,method=lora,lr=1e-3", "lora"),
                      ("model=m,method=full,lr=1e-3", "full"), ("tiny,lr=1e-3", "lora")):
    assert run_lib.make_optim(method, finetune.get_config(arg)).lr == 1e-3, arg
  both = finetune.get_config("tiny,lr=1e-3")  # the `both` default: full FT at lr * full_lr_ratio
  assert run_lib.make_optim("full", both).lr == pytest.approx(1e-3 * both.optim.full_lr_ratio)
  # Without lr=, a full-only point trains at the LR full FT gets in the default `both` experiment.
  for prefix in ("tiny,", "model=m,"):
    assert run_lib.make_optim("full", finetune.get_config(prefix + "method=full")).lr == \
        pytest.approx(run_lib.make_optim("full", finetune.get_config(prefix.rstrip(","))).lr)


def _parse_flags(*overrides):
  return exp_main.parse_args([f"--config={ROOT}/experiments/configs/finetune.py:tiny", "--workdir", "w",
                              *overrides])[1]


def test_a_dotted_override_of_a_per_module_rank_or_alpha_works_and_typos_fail():
  from lora_jax.models import transformer

  config = _parse_flags("--config.lora.rank=4", "--config.lora.rank_pattern.k_proj=8",
                        "--config.lora.alpha_pattern.k_proj=64")
  spec = common.lora_spec(config.lora)
  assert spec.rank_pattern == {"k_proj": 8} and spec.alpha_pattern == {"k_proj": 64.0}
  model_config = transformer.ModelConfig.tiny_llama()
  params = transformer.init_params(model_config, jax.random.key(0))
  layouts = lora.trace_layouts(transformer.CausalLM(model_config), np.zeros((1, 4), np.int32))
  _, adapters = lora.create(params, spec, jax.random.key(0), layouts=layouts)
  ranks = {"/".join(p): a.rank for p, a in lora.adapter_items(adapters)}
  assert ranks["model/layers_0/self_attn/k_proj"] == 8 and ranks["model/layers_0/self_attn/q_proj"] == 4
  with pytest.raises(SystemExit):
    _parse_flags("--config.lora.rank_pattern.kproj=8")


@pytest.mark.slow
def test_two_jobs_asking_for_the_tiny_base_at_once_build_it_once(tmp_path):
  """As the first two points of `experiments.sweep --parallel 2` on a fresh machine: one builds, the other waits on
  the lock and reuses it (without the lock both build into the same directory)."""
  import subprocess
  import sys

  code = ("from experiments import tiny_base; from experiments.configs import common; c = common.tiny_base_config(); "
          f"c.steps = 6; c.corpus_documents = 200; c.cache_dir = {str(tmp_path / 'cache')!r}; "
          "print('built:', tiny_base.pretrained(c))")
  jobs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
          for _ in range(2)]
  outs = [job.communicate(timeout=600)[0] for job in jobs]
  assert [job.returncode for job in jobs] == [0, 0], outs
  assert len({line for out in outs for line in out.splitlines() if line.startswith("built:")}) == 1
  assert sum(out.count("pretraining the tiny base model") for out in outs) == 1, outs
  assert sum(out.count("reusing the tiny base model") for out in outs) == 1, outs


def test_seed_data_seed_and_eval_seed_each_drive_one_thing(tmp_path):
  tokenizer = synthetic.char_tokenizer()

  def parts(**changes):
    config = small_config(tmp_path, **changes)
    train_sources, evals = run_lib.load_data(config, tokenizer)
    return evals[0]["inputs"], next(run_lib.train_batches(config, train_sources))["inputs"]

  evals, first = parts()
  other_order = parts(data_seed=1)
  assert np.array_equal(other_order[0], evals) and not np.array_equal(other_order[1], first)
  other_split = parts(eval_seed=1)
  assert not np.array_equal(other_split[0], evals)
  other_init = parts(seed=1)  # init and dropout only: the same data in the same order
  assert np.array_equal(other_init[0], evals) and np.array_equal(other_init[1], first)


def test_data_overflow_is_a_config_key(tmp_path):
  tokenizer = synthetic.char_tokenizer()
  config = small_config(tmp_path, **{"data.seq_len": 12})  # most sums' chat prompts are 12 tokens
  with pytest.raises(data.DataError, match="overflow='skip' \\(in an experiment config: data.overflow\\)"):
    run_lib.load_data(config, tokenizer)
  config.data.overflow = "skip"
  train_sources, _ = run_lib.load_data(config, tokenizer)
  assert train_sources[0].stats["skipped"] > 0 and len(train_sources[0]) > 0


@pytest.mark.slow
def test_tiny_run_fine_tunes_with_lora_and_full_and_reports(tmp_path, capsys):
  results = exp_main.run(small_config(tmp_path), tmp_path / "run")
  report = (tmp_path / "run" / "report.md").read_text()
  base = float(report.split("| base model | - | - | ")[1].split(" ")[0])
  assert all(0.0 <= r["accuracy"] <= 1.0 for r in results.values())  # generation-based eval ran
  assert (tmp_path / "run" / "report.png").stat().st_size > 10_000 and "report.png" in report
  assert set(results) == {"lora", "full"}
  assert base < math.log(105) - 1.0  # the base knows the tokens and the chat format (~2.3 nats; ln(vocab) 4.65)
  for method, r in results.items():
    assert r["eval_nll"] < base - 0.5, (method, r, base)  # both learn the task
    assert f"| {method} |" in report
  assert results["lora"]["trainable"] < results["full"]["trainable"]
  info = json.loads((tmp_path / "run" / "run_info.json").read_text())
  assert {"git_commit", "packages", "devices"} <= set(info) and info["packages"]["jax"]
  card = info["base_card"]  # the base's card and fingerprint travel with the run
  assert info["base_fingerprint"] == card["fingerprint"] and card["vocab_size"] == 105 and card["parameters"] > 0
  assert json.loads((tmp_path / "run" / "config.json").read_text())["train"]["steps"] == 20
  assert "model/layers_0/mlp/down_proj/kernel" in (tmp_path / "run" / "lora" / "summary.txt").read_text()
  record = checkpoint.Checkpointer(tmp_path / "run" / "lora" / "checkpoints").restore_record(20)
  assert record["method"] == "lora" and record["base_model"].startswith(_base.cache_dir())

  # The run's adapters go on: a merged HF export (base read from the run's record) and the generation CLI.
  from lora_jax.cli import export as export_cli
  from lora_jax.cli import generate as generate_cli

  assert export_cli.main(["--run", str(tmp_path / "run" / "lora"), "--out", str(tmp_path / "merged"), "--merged"]) == 0
  assert (tmp_path / "merged" / "config.json").exists() and (tmp_path / "merged" / "tokenizer.json").exists()
  generate_cli.main(["--model", record["base_model"], "--adapter", str(tmp_path / "run" / "lora"), "--prompt", "2+3=",
                 "--prompt", "40+1=", "--max-new-tokens", "4"])
  merged_out = capsys.readouterr().out
  generate_cli.main(["--model", str(tmp_path / "merged"), "--prompt", "2+3=", "--prompt", "40+1=",
                     "--max-new-tokens", "4"])
  assert "### 2+3=" in merged_out and capsys.readouterr().out.split("### 2+3=")[1] == merged_out.split("### 2+3=")[1]
  assert export_cli.main(["--run", str(tmp_path / "run" / "lora"), "--out", str(tmp_path / "peft"), "--peft"]) == 0
  capsys.readouterr()
  generate_cli.main(["--model", record["base_model"], "--adapter", str(tmp_path / "peft"), "--prompt", "2+3=",
                 "--prompt", "40+1=", "--max-new-tokens", "4"])
  assert capsys.readouterr().out.split("### 2+3=")[1] == merged_out.split("### 2+3=")[1]  # PEFT dir: same output


@pytest.mark.parametrize("bad", [{"sharding_rules.vocab": "tensr"}, {"lora.targets": ("q_projj",)},
                                 {"data.overflow": "drop"}])
def test_overwrite_with_a_config_that_fails_its_checks_keeps_the_finished_run(tmp_path, bad):
  config = small_config(tmp_path, methods=("lora",), **{"train.steps": 2})
  exp_main.run(config, tmp_path / "run")
  with pytest.raises(SystemExit, match=f"not started, {tmp_path / 'run'} untouched: "):
    exp_main.run(small_config(tmp_path, methods=("lora",), **{"train.steps": 4, **bad}), tmp_path / "run",
                 overwrite=True)
  assert (tmp_path / "run" / "lora" / "checkpoints" / "2").exists()
  assert json.loads((tmp_path / "run" / "config.json").read_text())["train"]["steps"] == 2


def test_a_failed_start_leaves_no_trace_so_the_corrected_command_runs(tmp_path):
  (tmp_path / "data.csv").write_text("instruction,output\n1+1=,2\n")
  bad = small_config(tmp_path, methods=("lora",), **{"train.steps": 2, "data.train": (str(tmp_path / "data.csv"),)})
  with pytest.raises(SystemExit, match="data.csv: unsupported file extension '.csv'; supported: .jsonl, .json"):
    exp_main.run(bad, tmp_path / "run")
  assert not (tmp_path / "run").exists()
  exp_main.run(small_config(tmp_path, methods=("lora",), **{"train.steps": 2}), tmp_path / "run")
  assert (tmp_path / "run" / "lora" / "checkpoints" / "2").exists()


def test_a_sharding_rule_naming_no_mesh_axis_is_refused_with_the_valid_axes(tmp_path):
  config = small_config(tmp_path, **{"sharding_rules.vocab": "tensr"})
  with pytest.raises(ValueError, match="sharding rule 'vocab' maps to mesh axis 'tensr', which is not one of the "
                                       "mesh's axes \\['data', 'fsdp', 'tensor'\\]"):
    exp_main.check_config(config)


@pytest.mark.slow
def test_workdir_of_another_config_is_refused_unless_overwrite(tmp_path):
  config = small_config(tmp_path, methods=("lora",), **{"train.steps": 2})
  exp_main.run(config, tmp_path / "run")
  other = small_config(tmp_path, methods=("lora",), **{"train.steps": 2, "optim.lr": 5e-3})
  with pytest.raises(SystemExit, match="holds a run of a different config \\(differs in: optim.lr\\)"):
    exp_main.run(other, tmp_path / "run")
  exp_main.run(other, tmp_path / "run", overwrite=True)
  assert json.loads((tmp_path / "run" / "config.json").read_text())["optim"]["lr"] == 5e-3


def test_cli_rejects_a_mistyped_config_key(tmp_path, capsys):
  with pytest.raises(SystemExit) as e:
    exp_main.main(["--config", f"{ROOT}/experiments/configs/finetune.py:tiny", "--workdir", str(tmp_path / "w"),
                   "--config.optim.lrr=1"])
  assert e.value.code != 0 and "lrr" in capsys.readouterr().err and not (tmp_path / "w").exists()


def _cli(tmp_path, workdir, *extra, methods="('lora',)", steps=30, checkpoint_every=5):
  overrides = [*_base.overrides(),
               "--config.data.synthetic_examples=200", "--config.data.eval_size=32",
               f"--config.data.cache_dir={tmp_path / 'tok'}", f"--config.train.steps={steps}",
               f"--config.train.checkpoint_every={checkpoint_every}", "--config.train.eval_every=10",
               "--config.train.log_every=1", f"--config.methods={methods}"]
  return [sys.executable, "-m", "experiments.main", "--config", "experiments/configs/finetune.py:tiny",
          "--workdir", str(workdir), *overrides, *extra]


@pytest.mark.slow
def test_sigterm_during_lora_stops_the_whole_experiment_and_the_report_says_unfinished(tmp_path):
  workdir = tmp_path / "run"
  cmd = _cli(tmp_path, workdir, "--config.eval.arithmetic_examples=4", methods="('lora','full')", steps=100_000,
             checkpoint_every=100_000)
  proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  metrics_file = workdir / "lora" / "metrics.jsonl"
  deadline = time.time() + 300
  while time.time() < deadline and proc.poll() is None and \
      not (metrics_file.exists() and "train/loss" in metrics_file.read_text()):
    time.sleep(0.05)
  proc.send_signal(signal.SIGTERM)
  try:
    out = proc.communicate(timeout=300)[0]
  finally:
    proc.kill()
  assert proc.returncode == run_lib.EXIT_PREEMPTED, out[-3000:]
  assert "preempted by signal 15" in out and "the remaining runs were not started" in out
  assert not (workdir / "full").exists()  # full FT never started
  step = checkpoint.Checkpointer(workdir / "lora" / "checkpoints").latest_step()
  assert step is not None and step < 100_000
  text = (workdir / "report.md").read_text()
  assert "**Unfinished: lora, full.**" in text and f"| {step} of 100000 (unfinished" in text
  assert "| full | - | - | - | - | - | not started |" in text


def test_report_marks_unfinished_and_not_started_runs(tmp_path):
  (tmp_path / "config.json").write_text(json.dumps({"methods": ["lora", "full"], "train": {"steps": 10}}))
  (tmp_path / "lora").mkdir()
  records = [{"step": 0, "eval/nll": 3.0, "eval/perplexity": 20.0},
             {"step": 5, "train/loss": 2.0, "train/lr": 1e-3, "params/trainable": 10},
             {"step": 5, "eval/nll": 2.5, "eval/perplexity": 12.2},
             {"step": 7, "train/loss": 1.9, "train/lr": 1e-3, "params/trainable": 10}]
  (tmp_path / "lora" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
  table, runs = report.write(tmp_path)
  assert runs["lora"]["finished"] is False and runs["lora"]["steps"] == 7 and "full" not in runs
  assert "| lora | 0.001 | 10 | 2.5000 | 12.200 | - | 7 of 10 (unfinished; eval NLL at step 5) |" in table
  assert "| full | - | - | - | - | - | not started |" in table
  assert "**Unfinished: lora, full.**" in (tmp_path / "report.md").read_text()


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


@pytest.mark.slow
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
    _, adapters = lora.create(params, run_lib.make_spec("lora", config, moe), jax.random.key(0), layouts=layouts)
    ranks = {"/".join(p): a.rank for p, a in lora.adapter_items(adapters)}
    assert ranks["model/layers/mlp/experts/up_proj"] == expected
    assert ranks["model/layers/self_attn/q_proj"] == 8
  config.moe_expert_rank = "half"
  with pytest.raises(ValueError, match="moe_expert_rank 'half'"):
    run_lib.make_spec("lora", config, moe)
  with pytest.raises(ValueError, match="moe_expert_rank 'half'"):
    exp_main.check_config(config)


def test_a_tied_hf_model_runs_with_the_default_config_adapting_its_output_side(tmp_path):
  """finetune.py:model=DIR on a tied model (Llama-3.2-1B, small Qwen3) with the study's all-linear + unembed."""
  from lora_jax import hf
  from lora_jax.models import transformer

  tokenizer = synthetic.char_tokenizer()
  model_config = transformer.ModelConfig.tiny_qwen3(vocab_size=len(tokenizer))
  assert model_config.tie_word_embeddings
  hf.save_params(transformer.init_params(model_config, jax.random.key(0)), model_config, tmp_path / "tied")
  tokenizer.save_pretrained(tmp_path / "tied")
  config = small_config(tmp_path, **{"model.name": str(tmp_path / "tied"), "methods": ("lora",),
                                     "train.steps": 4, "train.eval_every": 4, "train.checkpoint_every": 4,
                                     "eval.arithmetic_examples": 0})
  assert config.lora.targets == ("all-linear", "unembed")
  results = exp_main.run(config, tmp_path / "run")
  assert results["lora"]["steps"] == 4 and results["lora"]["finished"]
  summary = (tmp_path / "run" / "lora" / "summary.txt").read_text()
  assert "model/embed_tokens/embedding (output side)" in summary
