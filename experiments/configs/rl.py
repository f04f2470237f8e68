"""RL with LoRA vs full fine-tuning: the study's finding 7 (rank 1 matches full FT's peak reward; LoRA has a wider
band of good learning rates).

The study's algorithm (`lora_jax.rl`): per round, `prompts_per_step` prompts x `group_size` completions sampled from
the current policy (temperature 1), reward 1/0 by answer checking, advantage = reward - the group's mean reward (no
std normalisation), loss = importance-weighted policy gradient with ratio p_learner/p_sampler per token; no KL
penalty, no clipping (`rl.clip_eps`, `rl.kl_coef`: switches, 0 = off). On-policy: `rl.steps_per_sample = 1` (one
optimizer step per sampling round; k > 1 makes the round's j-th step learn from samples j steps stale).

CPU (`tiny`): the built-in tiny base (hidden 64, 2 layers, character tokenizer, pretrained on the synthetic corpus),
given a short supervised warm-up (full FT on the training problems, `warmup.*`, cached) so that RL starts neither at
reward 0 nor at 1; task: every addition a+b= with operands 0-19 (400 problems, 100 held out for the greedy accuracy),
reward 1 when the completion starts with the right sum. 16 prompts x 8 completions per step, 4 new tokens, 150 steps
(~0.15 s a step; a point takes ~30-45 s on 2 free cores, mostly start-up and compilation). Sweep: LoRA ranks 1 and 8
and full FT, each over 7 LRs a factor 2 apart (LoRA 6.25e-5..4e-3, full FT 1.56e-5..1e-3: each reaches one step past
the edges of the good-LR band measured in the first one-seed run, where the policy collapsed), seeds 0-2 (the gap
rule needs 3 a cell): 63 points, ~40 min on 2 free cores. This family keeps its own base (hidden 64, with a
supervised warm-up, cached): RL needs a policy that already solves some problems, which the study base's recipe does
not give by itself.

    python -m experiments.sweep --config experiments/configs/rl.py:tiny --workdir runs/rl_tiny
    python -m experiments.report runs/rl_tiny      # reward vs LR per rank, reward curves, the finding-7 verdicts
    python -m experiments.main --config experiments/configs/rl.py:tiny,method=lora,rank=1,lr=1e-3 --workdir runs/rl1

Calibration of the warm-up, on the tiny base pretrained before its corpus held the tasks' tokens (it now does:
`synthetic.pretraining_corpus`, so these figures and the measured results below are to be remeasured; 2-core CPU,
2026-12-01; greedy accuracy on the 100 held-out problems / mean sampled reward of the first round): 60 steps 0.01 /
0.05 (8 prompts a round), 150 steps 0.06 / 0.09, 300 steps 0.35 / 0.40, 600 steps 0.85 / 0.81. 300 it is: reward
~0.4, room to rise and enough groups with mixed rewards (at 0.05 most groups are all-zero and give no gradient;
Adam's momentum then drifts the policy, which collapsed a 60-step pilot to 0).
Pilot runs at 100 steps (mean reward over the last quarter): LoRA r1 0.49 at lr 1e-3 and 0.47 at 3e-3, r8 0.52 at
1e-3; full FT 0.48 at 1e-4, 0.50 at 3e-4 and 0.30 at 1e-3 (the grid spans both sides of every optimum).

First one-seed run (`tiny`, 2026-12-01, before the calibrated study reran it): start reward 0.40 (every run: same base, first round); peak
final reward (mean over the last quarter of steps) LoRA r1 0.518 at lr 1e-3, r8 0.530 at 1e-3, full FT 0.511 at
2.5e-4 -> finding 7's peak half agrees (rank 1 within 0.03 of full FT). Good-LR bands (gain >= half the best gain):
LoRA 1.25e-4..2e-3 (x16) for both ranks, full FT 3.13e-5..5e-4 (x16) -> not wider: disagree. The best LR of LoRA is
4x full FT's (the study: ~10). LRs >= 4e-3 (LoRA) and >= 1e-3 (full FT) collapse the policy. Greedy held-out
accuracy at the end is best for full FT (0.58 at 1.25e-4; LoRA 0.53-0.55). One seed: seed noise is not measured.

`quick` is a pipeline check (rank 1 and full FT at 3 LRs, 50 steps). Real scale (GPU/TPU VMs; data read from the hub
at run time with `datasets`): `model=Qwen/Qwen3-8B-Base,task=math` (the study's setting; by default the algebra
subject of `EleutherAI/hendrycks_math`; give `--config.data.train=FILE.jsonl` with `problem`/`solution` fields for
the whole train split) and `model=meta-llama/Llama-3.1-8B,task=gsm8k` (`openai/gsm8k:main`, train/test), ranks 1, 8,
32 and full FT over 7 LRs a factor 2 apart centred on the cookbook rule (the study: its LR ratio ~10 holds for RL
too). What the study states and what it does not (../shared/reference/blog.md):
- stated: plain policy gradient with the ratio p_learner/p_sampler, group-mean advantages, no KL, no clipping, no std
  normalisation; Qwen3-8B-Base on MATH (~10k problems x 32 samples: read here as group size 32) and GSM8K; Adam,
  constant LR; every weight matrix incl. the unembedding adapted; alpha 32.
- NOT STATED, chosen here: prompts per step (32), GSM8K's group size (16), steps (MATH 300, GSM8K 200), the prompt
  format (`data.prompt_template`), completion caps (GSM8K 512, MATH 1024 tokens; the study's 8192 cap is from its
  DeepMath runs), on-policy sampling (1 step per round), the LR grid, held-out sizes (500), Llama-3.1-8B's RL task
  (GSM8K here).

Point arguments: `tiny` | `quick` | `model=HUB_ID`, `task=arithmetic|gsm8k|math`, `method=lora|full`, `rank=`,
`lr=`, `seed=`.
"""

from __future__ import annotations

import ml_collections

from experiments.configs import common
from lora_jax import rules

TINY_RANKS = (1, 8)
REAL_RANKS = (1, 8, 32)
TINY_LRS = (6.25e-5, 1.25e-4, 2.5e-4, 5e-4, 1e-3, 2e-3, 4e-3)  # LoRA's CPU grid (the policy collapsed at >= 4e-3).
TINY_FULL_LRS = (1.56e-5, 3.13e-5, 6.25e-5, 1.25e-4, 2.5e-4, 5e-4, 1e-3)  # Full FT's: its band sat 2 steps lower.
QUICK_LRS = (2.5e-4, 1e-3, 4e-3)
TINY_SEEDS = (0, 1, 2)  # The gap rule needs 3 seeds a cell (analysis.MIN_SEEDS).
SWEEPS = ("tiny", "quick", "model=Qwen/Qwen3-8B-Base,task=math", "model=meta-llama/Llama-3.1-8B,task=gsm8k")
REAL_TASKS = {  # task -> (default train source, train split, eval split, group size, max new tokens, max prompt tokens)
    "gsm8k": ("openai/gsm8k:main", "train", "test", 16, 512, 512),
    "math": ("EleutherAI/hendrycks_math:algebra", "train", "test", 32, 1024, 1024),
}
PROMPTS = {  # NOT STATED by the study: plain prompts for base models, asking for the format the reward parses.
    "gsm8k": "Solve the problem. End with '#### ' and the final number.\n\nQuestion: {question}\nAnswer:",
    "math": "Solve the problem. Put the final answer in \\boxed{{}}.\n\nProblem: {question}\nSolution:",
    "arithmetic": "{question}",
}


def get_config(arg: str = "tiny,method=lora,rank=1") -> ml_collections.ConfigDict:
  """One sweep point: one method at one rank, LR and seed (see the module docstring)."""
  args = common.parse_arg(arg, tiny=False, quick=False, model="", task="", method="lora", rank=1, lr=0.0, seed=0)
  if args.method not in ("lora", "full"):
    raise ValueError(f"rl: method must be lora or full (one run per point), got {args.method!r}")
  cpu = args.tiny or args.quick
  task = args.task or ("arithmetic" if cpu else "math")
  if cpu and task != "arithmetic":
    raise ValueError(f"rl: the tiny and quick variants train on task=arithmetic, got task={task!r}")
  if not cpu and task not in REAL_TASKS:
    raise ValueError(f"rl: task {task!r} at real scale; valid: {sorted(REAL_TASKS)}")
  if not cpu and not args.model:
    raise ValueError("rl: give tiny, quick or model=HUB_ID")
  config = ml_collections.ConfigDict()
  config.seed = args.seed  # Adapter init and the sampling keys.
  config.data_seed = args.seed  # Order of the training prompts.
  config.eval_seed = 0  # Which problems are held out (the same for every point).
  config.methods = (args.method,)  # One run per point.

  config.model = ml_collections.ConfigDict()
  config.model.name = "tiny" if cpu else args.model  # "tiny" (built-in, pretrained and warmed up here) or HF id.
  config.model.dtype = "float32" if cpu else "bfloat16"  # Compute dtype.
  config.model.param_dtype = "float32" if cpu else "bfloat16"  # Dtype the frozen base is stored in.
  config.model.scan_layers = not cpu  # Stack layers with nn.scan.
  # Per-layer rematerialisation: "none" (keep every activation), "full" (keep each layer's input, recompute the layer
  # in the backward pass) or "save_matmuls" (keep the projections' outputs, recompute the rest).
  config.model.remat = "none" if cpu else "full"

  config.rl = ml_collections.ConfigDict()
  real = REAL_TASKS.get(task)
  config.rl.group_size = 8 if cpu else real[3]  # Completions per prompt (G).
  config.rl.prompts_per_step = 16 if cpu else 32  # Prompts per sampling round (study: NOT STATED).
  config.rl.max_new_tokens = 4 if cpu else real[4]  # Completion cap (a sum of two operands <= 19, then EOS).
  config.rl.temperature = 1.0  # Sampling temperature (1: the ratio compares the policies themselves).
  config.rl.steps_per_sample = 1  # Optimizer steps per sampling round: 1 = on-policy (the ratio ~ 1).
  config.rl.clip_eps = 0.0  # PPO-style clipping of the ratio; 0 = off (the study's).
  config.rl.kl_coef = 0.0  # KL(learner || base) penalty; 0 = off (the study's).
  config.rl.track_base_kl = cpu  # Log KL to the base (a second copy of the model for full FT: off at real scale).
  config.rl.eval_batch_size = 100 if cpu else 64  # Prompts per greedy-evaluation batch.
  config.rl.sample_batch_size = 0 if cpu else 64  # Completions sampled per generation batch (0 = the whole round).

  config.data = ml_collections.ConfigDict()
  config.data.task = task  # arithmetic | gsm8k | math: the reward (lora_jax.rewards) and how problems are read.
  config.data.train = "" if cpu else real[0]  # JSON/JSONL file or hub dataset "ID[:CONFIG]" (not for arithmetic).
  config.data.train_split = "train" if cpu else real[1]  # Split of a hub dataset to train on.
  config.data.eval = "" if cpu else config.data.train  # Source of held-out problems ("" = hold out from train).
  config.data.eval_split = "test" if cpu else real[2]  # Split of a hub dataset to evaluate on.
  config.data.eval_size = 100 if cpu else 500  # Held-out problems for the greedy accuracy.
  config.data.max_operand = 19  # Arithmetic: operands 0..max_operand (every pair is a problem).
  config.data.chat = cpu  # Prompts through the tokenizer's chat template (the tiny base's); base models: plain text.
  config.data.prompt_template = PROMPTS[task]  # The question in a prompt (study: NOT STATED).
  config.data.max_prompt_tokens = 16 if cpu else real[5]  # Longer prompts are skipped.
  # The learner's step shape (checked against rl.*): rows = prompts_per_step * group_size / steps_per_sample, and
  # tokens = max_prompt_tokens + max_new_tokens; also what a memory plan of the step uses.
  config.data.batch_size = config.rl.prompts_per_step * config.rl.group_size
  config.data.seq_len = config.data.max_prompt_tokens + config.rl.max_new_tokens

  config.warmup = ml_collections.ConfigDict()  # Supervised warm-up of the tiny base (model.name == "tiny").
  config.warmup.steps = 300 if cpu else 0  # Full-FT steps on the training problems; 0 = none (calibration: docstring).
  config.warmup.lr = 3e-3  # Its LR.
  config.warmup.batch_size = 16  # Its rows per step (packed).
  config.warmup.seq_len = 64  # Its row length.
  config.warmup.seed = 0  # Its data order.
  config.warmup.cache_dir = ".cache/lora_jax/rl_warmup"  # Where the warmed-up base (an HF directory) is kept.

  config.lora = common.lora_defaults(rank=args.rank)  # lora.LoraSpec fields (all matrices + unembedding, alpha 32).
  config.moe_expert_rank = "total/active"  # MoE: rank per expert = rank / experts per token.

  config.optim = ml_collections.ConfigDict()
  config.optim.lr = args.lr or default_lr(args.model, args.method, cpu)  # The run's LR.
  config.optim.full_lr_ratio = 1.0  # Unused (one method per point).
  config.optim.schedule = "constant"  # The study's schedule.
  config.optim.warmup_steps = 0  # Linear warm-up steps.
  config.optim.b1 = 0.9  # Adam beta1.
  config.optim.b2 = 0.999  # Adam beta2.
  config.optim.eps = 1e-8  # Adam epsilon.
  config.optim.weight_decay = 0.0  # AdamW decay (0 = Adam).
  config.optim.grad_clip_norm = ml_collections.config_dict.placeholder(float)  # None = no clipping.
  config.optim.lr_b_ratio = 1.0  # LoRA+: LR of B relative to A (1 = the study's).

  config.train = ml_collections.ConfigDict()
  config.train.steps = (50 if args.quick else 150) if cpu else (300 if task == "math" else 200)  # Optimizer steps.
  # Micro-batches per step (gradients averaged): the real steps' 512-1,024 completions in parts of 16.
  config.train.grad_accum = 1 if cpu else config.data.batch_size // 16
  config.train.log_every = 1  # Steps between train metric records (every step: the reward curves).
  config.train.eval_every = 25  # Steps between greedy held-out evaluations.
  config.train.checkpoint_every = 25 if args.quick else 75 if cpu else 25  # Steps between checkpoints.
  config.train.keep_checkpoints = 2  # Checkpoints kept.
  config.train.collapse_steps = 0  # Unused by RL (a zero gradient is normal when every group has one reward).

  config.mesh = ml_collections.ConfigDict({"data": 1, "fsdp": -1, "tensor": 1})  # Device mesh; -1 = the rest.
  config.sharding_rules = ml_collections.ConfigDict(rules.DEFAULT_RULES)  # Logical axis -> mesh axis.
  config.tiny_base = common.tiny_base_config()  # Used when model.name == "tiny".
  config.wandb = ml_collections.ConfigDict({"project": ""})  # W&B project; empty = off.
  return config


def default_lr(model: str, method: str, cpu: bool) -> float:
  """The centre of a method's LR grid: 1e-3 on CPU (the tiny grid's middle), the cookbook rule at real scale."""
  if cpu:
    return 1e-3
  if model not in common.REAL_MODELS:
    raise ValueError(f"rl: model {model!r} has no cookbook LR here; known: {sorted(common.REAL_MODELS)} (or give lr=)")
  p = common.preset(model)
  return common.cookbook_lr(p.architecture, p.hidden_size, lora=method == "lora")


def get_sweep(arg: str = "tiny") -> list[str]:
  """Points of a variant: `tiny` (ranks and full FT x LR grid x 3 seeds), `quick` or `model=HUB_ID,task=TASK`."""
  args = common.parse_arg(arg, tiny=False, quick=False, model="", task="")
  if args.tiny or args.quick:
    prefix = "tiny" if args.tiny else "quick"
    ranks, grid = (TINY_RANKS, TINY_LRS) if args.tiny else ((1,), QUICK_LRS)
    full_grid = TINY_FULL_LRS if args.tiny else grid
    methods = [("lora", r, grid) for r in ranks] + [("full", 0, full_grid)]
  elif args.model:
    prefix = f"model={args.model}" + (f",task={args.task}" if args.task else "")
    methods = [(m, r, common.lr_grid(default_lr(args.model, m, False), 2.0, 3, 3))
               for m, r in [("lora", r) for r in REAL_RANKS] + [("full", 0)]]
  else:
    raise ValueError(f"rl: sweep variant {arg!r}; valid: tiny, quick, model=HUB_ID[,task=gsm8k|math]")
  seeds = TINY_SEEDS if args.tiny else (0,)
  points = []
  for method, rank, lrs in methods:
    for lr in lrs:
      for seed in seeds:
        points.append(f"{prefix},method={method}" + (f",rank={rank}" if method == "lora" else "") + f",lr={lr:g}"
                      + (f",seed={seed}" if len(seeds) > 1 else ""))
  return points
