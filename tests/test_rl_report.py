"""The RL sweep report: scores, good-LR bands and the finding-7 verdicts from run files alone; the RL config family
through experiments.main's checks; micro-batched RL steps."""

import itertools
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import analysis, report
from experiments import main as exp_main
from experiments.configs import rl as rl_configs
from lora_jax import lora, optim, rl, train
from lora_jax.models import transformer
from tests import _base
from tests._tolerance import assert_exact, config64

LRS = (1e-4, 2e-4, 4e-4, 8e-4, 1.6e-3)


def test_final_reward_averages_the_last_quarter():
  rewards = {s: float(s) for s in range(1, 101)}
  assert analysis.final_reward(rewards, 100) == np.mean(range(76, 101))
  assert math.isnan(analysis.final_reward({}, 100))


def test_good_band_is_the_run_of_good_lrs_around_the_best_and_knows_its_open_ends():
  b = analysis.good_band(LRS, [0.0, 0.2, 0.5, 0.3, 0.0], threshold=0.2)
  assert (b.lo, b.hi, b.closed, b.width) == (2e-4, 8e-4, True, 4.0)
  b = analysis.good_band(LRS, [0.3, 0.2, 0.5, 0.0, 0.4], threshold=0.2)  # 1.6e-3 is good but not contiguous
  assert (b.lo, b.hi, b.open_low, b.open_high) == (1e-4, 4e-4, True, False)
  assert analysis.good_band(LRS, [0.0] * 5, threshold=0.1) is None


def test_band_and_peak_verdicts():
  closed = analysis.Band(2e-4, 4e-4, False, False)
  wide = analysis.Band(1e-4, 8e-4, False, False)
  assert analysis.verdict_rl_band(wide, closed).verdict == analysis.AGREE
  assert analysis.verdict_rl_band(closed, wide).verdict == analysis.DISAGREE
  assert analysis.verdict_rl_band(wide, analysis.Band(2e-4, 4e-4, True, False)).verdict == analysis.INCONCLUSIVE
  assert analysis.verdict_rl_band(None, closed).verdict == analysis.INCONCLUSIVE
  noise = analysis.Noise(0.01, 6)
  full = [0.60, 0.61, 0.62]
  lora = lambda d: [-(v - d) for v in full]  # noqa: E731  (costs: negated rewards, LoRA's peak d below full FT's)
  peak = lambda d, interior=True: analysis.compare(lora(d), [-v for v in full], noise, 0.03, interior)  # noqa: E731
  assert analysis.verdict_rl_peak(peak(0.0), 0.2).verdict == analysis.AGREE
  assert analysis.verdict_rl_peak(peak(-0.1), 0.2).verdict == analysis.AGREE  # LoRA ahead
  assert analysis.verdict_rl_peak(peak(0.1), 0.2).verdict == analysis.DISAGREE
  assert analysis.verdict_rl_peak(peak(0.1, interior=False), 0.2).verdict == analysis.INCONCLUSIVE  # at the edge
  assert analysis.verdict_rl_peak(peak(0.03), 0.2).verdict == analysis.INCONCLUSIVE  # straddles the margin
  assert analysis.verdict_rl_peak(peak(0.0), 0.0).verdict == analysis.INCONCLUSIVE  # nothing learned


SEED_OFFSETS = (0.0, 0.002, -0.002)  # three seeds per LR (the gap rule needs 3): each shifts every score by this


def write_sweep(root, finals: dict[str, list[float]], steps=8, start=0.4):
  """A sweep directory of the tiny RL family with made-up rewards: per condition ("lora1", "full") the score at each LR
  of LRS, shifted per seed by SEED_OFFSETS (the reward rises from ``start`` to it at step 2 and stays)."""
  points = []
  for name, scores in finals.items():
    for (lr, final0), (seed, offset) in itertools.product(zip(LRS, scores), enumerate(SEED_OFFSETS)):
      final = final0 + offset
      method, rank = ("full", "") if name == "full" else ("lora", f",rank={name[4:]}")
      point = f"tiny,method={method}{rank},lr={lr:g},seed={seed}"
      d = root / point.replace(",", "_")
      (d / method).mkdir(parents=True)
      (d / "config.json").write_text(rl_configs.get_config(point).to_json())
      (d / "status.json").write_text(json.dumps({"state": "done"}))
      lines = [{"step": 0, "eval/accuracy": start}]
      for s in range(1, steps + 1):
        reward = start if s == 1 else final
        lines.append({"step": s, "train/reward": reward, "train/entropy": 0.5, "train/kl_sampler": 0.0,
                      "train/kl_base": 0.1, "train/completion_length": 3.0, "train/tokens_per_s": 1000.0})
      lines.append({"step": steps, "eval/accuracy": final})
      (d / method / "metrics.jsonl").write_text("".join(json.dumps(l) + "\n" for l in lines))
      points.append({"index": len(points), "point": point, "name": d.name})
  (root / "sweep.json").write_text(json.dumps({"config": "experiments/configs/rl.py", "arg": "tiny", "points": points}))
  for p in root.iterdir():  # the configs' steps must match the made-up runs
    if p.is_dir():
      c = json.loads((p / "config.json").read_text())
      c["train"]["steps"] = steps
      (p / "config.json").write_text(json.dumps(c))


def verdicts(text: str, finding: str) -> list[str]:
  section = text.split(f"### Finding {finding}:")[1].split("###")[0]
  return [line.split("**")[1] for line in section.splitlines() if line.startswith("|") and "**" in line]


def test_report_agrees_when_rank_1_matches_full_ft_with_a_wider_band(tmp_path):
  write_sweep(tmp_path, {"lora1": [0.45, 0.55, 0.605, 0.58, 0.5], "full": [0.4, 0.45, 0.61, 0.42, 0.3]})
  text = report.write_sweep(tmp_path)  # dispatches to the RL report
  assert text.startswith("# RL sweep report: rl (tiny)")
  assert verdicts(text, "7") == ["agree"]  # 0.605 vs 0.61 ± 0.0035: within the margin (0.05 x the best gain 0.21)
  assert verdicts(text, "7b") == ["agree", "agree"]  # rank 1: 2e-4..8e-4 vs full FT: 4e-4 alone
  assert analysis.RULE_RL_PEAK in text and analysis.RULE_RL_BAND in text
  assert "| lora r=1 | 0.400 | 0.605 | 4e-4 | 2e-4..8e-4 (x4) |" in text  # good: gain >= 0.5 * 0.21
  rows = (tmp_path / "results.csv").read_text().splitlines()
  assert rows[0].startswith("family,point,method,rank,lr,seed,step,train_reward") and len(rows) == 1 + 10 * 9 * 3
  for f in ("rl_reward_vs_lr.png", "rl_reward_curves.pdf"):
    assert (tmp_path / "figures" / f).stat().st_size > 1000
  assert report.write_sweep(tmp_path) == text  # deterministic


def test_report_disagrees_when_rank_1_is_behind_and_its_band_is_no_wider(tmp_path):
  write_sweep(tmp_path, {"lora1": [0.4, 0.42, 0.52, 0.42, 0.4], "full": [0.4, 0.55, 0.6, 0.58, 0.4]})
  text = report.write_sweep(tmp_path)
  assert verdicts(text, "7") == ["disagree"]
  assert verdicts(text, "7b") == ["disagree", "disagree"]


def test_every_rl_point_passes_experiments_mains_checks_and_bad_fields_are_named():
  for variant in rl_configs.SWEEPS:
    for point in rl_configs.get_sweep(variant):
      config = rl_configs.get_config(point)
      exp_main.check_config(config)
      assert config.data.batch_size % config.train.grad_accum == 0
  config = rl_configs.get_config("tiny,method=lora,rank=1")
  config.rl.group_size = 4
  with pytest.raises(ValueError, match="config.data.batch_size 128 must equal"):
    exp_main.check_config(config)
  config = rl_configs.get_config("tiny,method=lora,rank=1")
  config.data.task = "aime"
  with pytest.raises(ValueError, match="config.data.task 'aime'; valid"):
    exp_main.check_config(config)
  with pytest.raises(ValueError, match="tiny and quick variants train on task=arithmetic"):
    rl_configs.get_config("tiny,task=math")
  from experiments import stacked

  assert stacked.stack_key(rl_configs.get_config("tiny,method=full")) is None  # each RL point runs on its own


def test_micro_batches_give_the_same_step(x64):
  config = config64(transformer.ModelConfig(architecture="llama", vocab_size=50, hidden_size=32, intermediate_size=64,
                                            num_layers=1, num_heads=4, num_kv_heads=2, head_dim=8))
  model = transformer.CausalLM(config)
  spec = lora.LoraSpec(rank=2, targets=("all-linear",), dtype="float64")
  params, adapters = lora.create(transformer.init_params(config, jax.random.key(0)), spec, jax.random.key(1))
  rng = np.random.default_rng(0)
  tokens, lengths = rng.integers(1, 49, size=(4, 4)), np.asarray([4, 2, 3, 1])
  batch = rl.completion_batch([[3, 14, 15], [9, 2]] * 2, tokens, lengths, 3, 0)
  batch = {**batch, "sampler_logp": np.log(rng.uniform(0.01, 0.2, size=(4, 4))),
           "advantages": np.asarray([0.5, -0.5, -0.25, 0.25], np.float32)}
  batch = jax.tree.map(jnp.asarray, batch)
  optim_config = optim.OptimConfig(lr=1e-2)
  states = []
  for accum in (1, 2):
    state = train.init_state(params, adapters, spec, optim_config, seed=0)
    step = jax.jit(rl.make_rl_step(model, optim.make_optimizer(optim_config), rl.RLConfig(group_size=2), accum))
    states.append(step(state, batch))
  (a, ma), (b, mb) = states
  for x, y in zip(jax.tree.leaves(a.trainable), jax.tree.leaves(b.trainable)):
    assert_exact(x, y)
  assert_exact(ma["train/loss"], mb["train/loss"])


@pytest.mark.slow
def test_an_rl_experiment_end_to_end_through_experiments_main(tmp_path):
  """experiments.main dispatches an RL config to experiments.rl_run: warm-up, run files, report; rerunning resumes."""
  from experiments import report as report_lib

  config = rl_configs.get_config("tiny,method=lora,rank=1,lr=1e-3")
  _base.shrink(config)
  config.warmup.steps = 10
  config.warmup.cache_dir = str(tmp_path / "warmup")
  config.data.max_operand = 9
  config.data.eval_size = 10
  config.rl.prompts_per_step = 4
  config.rl.group_size = 4
  config.data.batch_size = 16
  config.train.steps = config.train.checkpoint_every = 4
  config.train.eval_every = 2
  out = exp_main.run(config, tmp_path / "run")
  assert set(out) == {"lora"}
  run_dir = tmp_path / "run" / "lora"
  records = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in records if "eval/accuracy" in r] == [0, 2, 4]
  train_records = [r for r in records if "train/reward" in r]
  assert [r["step"] for r in train_records] == [1, 2, 3, 4]
  for key in ("train/reward", "train/completion_length", "train/entropy", "train/kl_sampler", "train/kl_base",
              "train/tokens_per_s", "train/loss", "train/grad_norm", "params/trainable"):
    assert key in train_records[0], key
  assert (run_dir / "checkpoints" / "4").exists() and (run_dir / "summary.txt").exists()
  text = (tmp_path / "run" / "report.md").read_text()
  assert "| lora | 0.001 | 2,601 |" in text and "→" in text
  assert report_lib.write(tmp_path / "run")[0] in text  # experiments.report rebuilds it from the files
  before = (run_dir / "metrics.jsonl").read_text()
  exp_main.run(config, tmp_path / "run")  # finished: resumes at step 4, trains nothing
  assert (run_dir / "metrics.jsonl").read_text() == before
