"""LoRA ranks vs full fine-tuning over a learning-rate grid: the study's findings 3 and 4.

Finding 3: the LoRA/full-FT optimal-LR ratio (study: ~10, a fit over 14 models gave 9.8). Finding 4: under alpha/r
the optimal LR barely moves with rank (< 2x between ranks 4 and 512; rank 1 prefers a lower LR). Each sweep point is
one run (one method, one rank, one LR, one seed); `python -m experiments.report DIR` fits each method's optimum
(quadratic in log LR around the grid minimum, bootstrap over seeds) and gives the verdicts.

CPU (`tiny`): the built-in character-level base widened to hidden 128 (so rank 64 is half the width, not full rank as
at hidden 64), pretrained 300 steps; 2-digit additions, 300 steps at batch 16, eval NLL on 500 held-out problems;
ranks 1, 4, 16, 64 and full FT, each over 5 LRs a factor 2 apart (LoRA 5e-4..8e-3, full FT 2.5e-4..4e-3), seeds 0-2
(data order and adapter init change with the seed, the held-out set does not). 75 points, ~30 min on 2 cores with
`--parallel 2` (~40 s a point, two at a time).

    python -m experiments.sweep --config experiments/configs/lr_sweep.py:tiny --workdir runs/lr_sweep --parallel 2
    python -m experiments.sweep --config experiments/configs/lr_sweep.py:quick --workdir runs/lr_quick   # ~8 min

`quick` is a subset (ranks 4 and 64 and full FT, the same 5 LRs, seed 0) for a pipeline check: one seed cannot
separate differences smaller than the seed noise, so its verdicts are inconclusive by rule. Calibration: a first
`quick` pilot centred on the default tiny runs' LRs (LoRA 3e-3, full FT 9e-4; docs/results/lr_sweep_quick/, 8 min on
2 cores, ~30 s a point) found interior optima near 1.6e-3 (full FT), 2.0e-3 (r4) and 2.3e-3 (r64): a LoRA/full ratio
of ~1.3-1.5, not the study's ~10, with full FT 0.16 nats ahead of r64 after 300 steps. The grids are centred on
those optima (LoRA 2e-3, full FT 1e-3) with two factor-2 steps either side, so each optimum sits inside; a factor-2
grid locates it to well within x1.5 through the quadratic fit, whose seed-bootstrap interval the report gives.

Measured (`tiny`, docs/results/tiny/lr_sweep/, 2026-11-30): fitted optima full FT 1.12e-3 (90% interval
9.1e-4..1.6e-3), LoRA r1 1.44e-3, r4 1.22e-3, r16 1.23e-3, r64 1.40e-3; LoRA/full ratios 1.1-1.3 (intervals within
0.6-2.8). Seed noise (std of the final NLL over 3 seeds at each best LR): 0.020-0.038 for r4 and full FT, 0.05-0.10 for
r16, r64 and r1 — as large as the rank differences (r4-r64 span 0.045 nats), which is why the verdicts need the seeds;
LRs at and above 4e-3 are unstable (std 0.1-0.4).

Real scale (GPU/TPU VMs): `model=meta-llama/Llama-3.2-1B`, `model=meta-llama/Llama-3.1-8B` or
`model=Qwen/Qwen3-8B-Base` on Tulu3 (the study's SFT data), 780 steps at batch 128, ranks 1-256 and full FT over 7
LRs a factor 2 apart centred on the cookbook rule (`common.cookbook_lr`: Llama-3.2-1B full 4.91e-5, LoRA 4.91e-4).

Point arguments (comma-separated): `tiny` | `quick` | `model=HUB_ID`, `method=lora|full`, `rank=`, `lr=`, `seed=`.
"""

from __future__ import annotations

import ml_collections

from experiments.configs import common

TINY_RANKS = (1, 4, 16, 64)
REAL_RANKS = (1, 4, 16, 64, 256)
TINY_CENTRE = {"lora": 2e-3, "full": 1e-3}  # Near the optima the quick pilot found (see the docstring).
SEEDS = (0, 1, 2)
QUICK_CENTRE = {"lora": 2e-3, "full": 1.41e-3}  # The study base's pilot optima at 300 steps (see the docstring).
QUICK_SEEDS = (0, 1)  # Two seeds: enough for the bootstrap intervals of findings 3 and 4.
SWEEPS = ("tiny", "quick", "model=meta-llama/Llama-3.2-1B", "model=meta-llama/Llama-3.1-8B",
          "model=Qwen/Qwen3-8B-Base")  # The variants get_sweep knows.
REAL_MODELS = common.REAL_MODELS


def get_config(arg: str = "tiny,method=lora") -> ml_collections.ConfigDict:
  """One sweep point: one method at one rank, LR and seed (see the module docstring)."""
  args = common.parse_arg(arg, tiny=False, quick=False, model="", method="lora", rank=16, lr=0.0, seed=0)
  if args.method not in ("lora", "full"):
    raise ValueError(f"lr_sweep: method must be lora or full (one run per point), got {args.method!r}")
  cpu = args.tiny or args.quick
  lr = args.lr or default_lr(args.model, args.method, cpu)
  return common.study_point(cpu, args.model, args.method, args.rank, lr, args.seed)


def default_lr(model: str, method: str, cpu: bool) -> float:
  """The centre of a method's LR grid: the tiny runs' LRs on CPU, the cookbook rule at real scale."""
  if cpu:
    return TINY_CENTRE[method]
  if model not in REAL_MODELS:
    raise ValueError(f"lr_sweep: model {model!r} has no cookbook LR here; known: {sorted(REAL_MODELS)} (or give lr=)")
  preset = common.preset(model)
  return common.cookbook_lr(preset.architecture, preset.hidden_size, lora=method == "lora")


def get_sweep(arg: str = "tiny") -> list[str]:
  """Points of a variant: `tiny`, `quick` or `model=HUB_ID` (every rank and full FT x LR grid x seeds)."""
  args = common.parse_arg(arg, tiny=False, quick=False, model="")
  if args.quick:  # findings 3 and 4 with seed-bootstrap intervals in ~4 minutes of training: 3 LRs x 2 seeds
    methods, below, above, seeds, prefix = [("lora", 4), ("lora", 16), ("full", 16)], 1, 1, QUICK_SEEDS, "quick"
  elif args.tiny:
    methods, below, above, seeds, prefix = [("lora", r) for r in TINY_RANKS] + [("full", 16)], 2, 2, SEEDS, "tiny"
  elif args.model:
    methods, below, above, seeds = [("lora", r) for r in REAL_RANKS] + [("full", 16)], 3, 3, (0,)
    prefix = f"model={args.model}"
  else:
    raise ValueError(f"lr_sweep: sweep variant {arg!r}; valid: tiny, quick, model=HUB_ID")
  points = []
  for method, rank in methods:
    centre = QUICK_CENTRE[method] if args.quick else default_lr(args.model, method, args.tiny or args.quick)
    for lr in common.lr_grid(centre, 2.0, below, above):
      for seed in seeds:
        rank_arg = f",rank={rank}" if method == "lora" else ""
        points.append(f"{prefix},method={method}{rank_arg},lr={lr:g},seed={seed}")
  return points
