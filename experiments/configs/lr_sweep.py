"""LoRA ranks vs full fine-tuning over a learning-rate grid: the study's findings 3 and 4.

Finding 3: the LoRA/full-FT optimal-LR ratio (study: ~10, a fit over 14 models gave 9.8). Finding 4: under alpha/r
the optimal LR barely moves with rank (< 2x between ranks 4 and 512; rank 1 prefers a lower LR). Each sweep point is
one run (one method, one rank, one LR, one seed); `python -m experiments.report DIR` fits each method's optimum
(quadratic in log LR around the grid minimum, bootstrap over seeds) and gives the verdicts.

CPU (`tiny`): the calibrated setting (docs/results/calibration/dialect_known10): the study base (`common.study_base`:
hidden 128, 2 layers, pretrained on a corpus holding every token and format of the task and the dialect's plain
register in 10% of its text; step-0 held-out NLL 2.17 nats vs ln(vocab) 4.65) fine-tuned on the dialect task (10,000
answers, ~one epoch in 300 steps at batch 16, 500 held out), eval NLL on the held-out answers every 25 steps; ranks
1, 4, 16, 64 and full FT, each over 5 LRs sqrt(2) apart around its optimum (LoRA 1.41e-3..5.66e-3, full FT
7.07e-4..2.83e-3), seeds 0-2: 75 points, ~25 min on 2 cores with `--stack auto`. The grids are centred by the pilot
below and narrowed from 7 to 5 points by the first full run (docs/results/dialect/lr_sweep, 7 LRs, clean commit
6461afd: every rank's optimum 2.3e-3..2.6e-3 and full FT's 1.2e-3, each inside the 5-point grid; the two outer
points of each 7-point grid were 0.009-0.36 nats worse than its best).

    python -m experiments.sweep --config experiments/configs/lr_sweep.py:tiny --workdir runs/lr_sweep
    python -m experiments.sweep --config experiments/configs/lr_sweep.py:quick --workdir runs/lr_quick   # ~5 min

`quick` is a subset (ranks 4 and 16 and full FT, 3 LRs a factor 2 apart around the same optima, seeds 0 and 1) that
gives findings 3 and 4 with seed-bootstrap intervals. Pilot (2026-12-07, seed 0, 300 steps, commit 53d737b; not
published): full FT best at 1e-3 on {7.1e-4, ..., 5.7e-3} (final NLL 0.449; 0.450 at 1.41e-3), LoRA r4 and r64 best
at 4e-3 and 2.83e-3 on {1e-3, ..., 8e-3} (0.471, 0.458), unstable at 8e-3 (r4 1.88). At a constant LR (the study's
schedule) single runs at the higher LRs spike late (full FT 4e-3: 0.524 at half the steps, 0.669 at the end), so the
verdicts lean on the 3 seeds and on the 50/75/100% stability rule. The sums' measurements on the old base are in
docs/results/tiny/.

`tiny_quant` is the QLoRA arm: LoRA r16 on the study base stored NF4 (`config.quant`: block 64, double
quantization; every linear layer but the head, dequantized layer by layer) and on its full-precision base, each beside
full FT (which always trains the full-precision base; its points carry the arm's quant field so that each arm is one
setting with its own full-FT cells), over `tiny`'s 5-point grids and seeds 0-2: 60 points (the quantized ones do not
stack), ~25 min.

Real scale (GPU/TPU VMs): `model=meta-llama/Llama-3.2-1B`, `model=meta-llama/Llama-3.1-8B` or
`model=Qwen/Qwen3-8B-Base` on Tulu3 (the study's SFT data), 780 steps at batch 128, ranks 1-256 and full FT over 7
LRs a factor 2 apart centred on the cookbook rule (`common.cookbook_lr`: Llama-3.2-1B full 4.91e-5, LoRA 4.91e-4).

Point arguments (comma-separated): `tiny` | `quick` | `model=HUB_ID`, `method=lora|full`, `rank=`, `lr=`, `seed=`,
`quant=none|nf4|int8` (the base LoRA trains on).
"""

from __future__ import annotations

import ml_collections

from experiments.configs import common, finetune

TINY_RANKS = (1, 4, 16, 64)
REAL_RANKS = (1, 4, 16, 64, 256)
TINY_CENTRE = {"lora": 2e-3 * 2**0.5, "full": 1e-3 * 2**0.5}  # Grid centres: the pilot optima (see the docstring).
SEEDS = (0, 1, 2)
QUICK_CENTRE = {"lora": 2e-3 * 2**0.5, "full": 1e-3 * 2**0.5}  # The pilot optima at 300 steps (see the docstring).
QUICK_SEEDS = (0, 1)  # Two seeds: enough for the bootstrap intervals of findings 3 and 4.
SWEEPS = ("tiny", "quick", "tiny_quant", "model=meta-llama/Llama-3.2-1B", "model=meta-llama/Llama-3.1-8B",
          "model=Qwen/Qwen3-8B-Base")  # The variants get_sweep knows.
REAL_MODELS = common.REAL_MODELS


def get_config(arg: str = "tiny,method=lora") -> ml_collections.ConfigDict:
  """One sweep point: one method at one rank, LR and seed (see the module docstring)."""
  args = common.parse_arg(arg, tiny=False, quick=False, model="", method="lora", rank=16, lr=0.0, seed=0,
                          quant="none")
  if args.method not in ("lora", "full"):
    raise ValueError(f"lr_sweep: method must be lora or full (one run per point), got {args.method!r}")
  cpu = args.tiny or args.quick
  lr = args.lr or default_lr(args.model, args.method, cpu)
  if args.quant not in ("none", "nf4", "int8"):
    raise ValueError(f"lr_sweep: quant={args.quant!r}; valid: none, nf4, int8")
  config = finetune.study_point(cpu, args.model, args.method, args.rank, lr, args.seed)
  config.quant.kind = args.quant  # QLoRA's base for LoRA (full FT ignores it: runs.make_quant)
  config.quant.double_quant = args.quant == "nf4"  # QLoRA's default
  return config


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
  if arg == "tiny_quant":  # each arm: LoRA r16 and full FT, the arm's quant field on both (one setting per arm)
    return [point.replace("tiny,", f"tiny,quant={q},", 1) for q in ("none", "nf4")
            for point in get_sweep("tiny") if ",rank=16," in point or ",method=full," in point]
  args = common.parse_arg(arg, tiny=False, quick=False, model="")
  if args.quick:  # findings 3 and 4 with seed-bootstrap intervals in ~4 minutes of training: 3 LRs x 2 seeds
    methods, below, above, seeds, prefix = [("lora", 4), ("lora", 16), ("full", 16)], 1, 1, QUICK_SEEDS, "quick"
  elif args.tiny:  # 5 LRs sqrt(2) apart (6.6 a decade) around each optimum
    methods, below, above, seeds, prefix = [("lora", r) for r in TINY_RANKS] + [("full", 16)], 2, 2, SEEDS, "tiny"
  elif args.model:
    methods, below, above, seeds = [("lora", r) for r in REAL_RANKS] + [("full", 16)], 3, 3, (0,)
    prefix = f"model={args.model}"
  else:
    raise ValueError(f"lr_sweep: sweep variant {arg!r}; valid: tiny, quick, model=HUB_ID")
  points = []
  for method, rank in methods:
    centre = QUICK_CENTRE[method] if args.quick else default_lr(args.model, method, args.tiny or args.quick)
    for lr in common.lr_grid(centre, 2.0 ** 0.5 if args.tiny else 2.0, below, above):
      for seed in seeds:
        rank_arg = f",rank={rank}" if method == "lora" else ""
        points.append(f"{prefix},method={method}{rank_arg},lr={lr:g},seed={seed}")
  return points
