"""Batch size: LoRA vs full FT, each at its best LR, over batch sizes at a fixed number of steps and at a fixed
number of training rows, side by side.

The study's finding 5: LoRA pays a growing loss penalty against full FT as the batch grows, and a higher rank does not
remove it; both do best at small batches. A batch comparison must say what it holds fixed: at a fixed number of rows
(a data budget) a larger batch trains fewer steps; at a fixed number of steps it sees more data. The report reads
both from one sweep: the settings at one `train.steps` form the fixed-steps line, those with one batch x steps the
fixed-rows line (the point at the centre batch is on both), and each line gets its own verdict.

CPU (`tiny`): `lr_sweep`'s calibrated setting (the study base, the dialect task, 500 held-out answers) at batch 8,
16 and 32 rows: a fixed 150 steps (1,200 / 2,400 / 4,800 rows) and a fixed 2,400 rows (300 / 150 / 75 steps), all
within one epoch of the 10,000 answers; LoRA r4 and full FT, evaluated every 25 steps; 4 LRs sqrt(2) apart per
cell around a centre: the batch-16 optimum at that step count (`PILOT`, read from `lr_sweep`'s 3-seed means at steps
75, 150 and 300) times sqrt(B/16), the grid reaching one step further towards batch 16's LR (the first tiny run found
the optimum moving less than sqrt(B)); seeds 0-2: 120 points, ~22 min with `--stack auto` (a batch-8 step costs
about half a batch-16 one). A higher rank (finding 5's second half) is left to the real-scale variant, for the budget.

First tiny run (the old base, 2-digit additions, a fixed 4,800 rows at batch 4, 16 and 64, seeds 0-1): LoRA's gap
shrank as the batch grew, but batch 64 trained only 75 steps, so batch was confounded with run length: hence the two
lines.

    python -m experiments.sweep --config experiments/configs/batch_size.py:tiny --workdir runs/batch_size

`quick`: batch 8 and 32 at 150 steps, LoRA r4 and full FT, the centre LR only (4 points). Real scale (`real`):
Llama-3.2-1B on the study's batch-size data, a 10k-example OpenThoughts3 subset (`OPENTHOUGHTS_10K`: ShareGPT
records, read as chat), at batch 32, 128 and 512 rows of 4096 tokens over a fixed 16,384 rows (about one epoch of the
subset; the study's budget is NOT STATED), LoRA r16 and full FT, 3 LRs each.

Point arguments: `tiny` | `quick` | `model=HUB_ID`, `batch=`, `steps=` (default: the fixed rows / batch),
`method=lora|full`, `rank=`, `lr=`, `seed=`.
"""

from __future__ import annotations

import math

import ml_collections

from experiments.configs import common, finetune, lr_sweep

ROWS = 2400  # Training rows of the CPU fixed-rows line (batch x steps).
STEPS = 150  # Steps of the CPU fixed-steps line.
PILOT = {  # CPU: batch 16's best grid LR (3-seed means, docs/results/dialect/lr_sweep) at 75, 150 and 300 steps.
    75: {"lora": 4e-3 * 2**0.5, "full": 2e-3 * 2**0.5}, 150: {"lora": 4e-3, "full": 2e-3},
    300: {"lora": 2e-3 * 2**0.5, "full": 1e-3 * 2**0.5}}
REAL_ROWS = 16384  # Rows every real point sees: ~one epoch of the 10k subset in 4096-token rows (NOT STATED).
TINY_BATCHES = (8, 16, 32)
REAL_BATCHES = (32, 128, 512)
TINY_RANKS = (4,)
SWEEPS = ("tiny", "quick", "real")
OPENTHOUGHTS_10K = "open-thoughts/OpenThoughts3-1.2M@train[:10000]"  # The study's batch-size subset (its first 10k).


def get_config(arg: str = "tiny,method=lora") -> ml_collections.ConfigDict:
  """One sweep point: one method at one batch size, step count, LR and seed (steps default: the fixed rows / batch)."""
  args = common.parse_arg(arg, tiny=False, quick=False, model="", batch=16, steps=0, method="lora", rank=16, lr=0.0,
                          seed=0)
  cpu = args.tiny or args.quick
  rows = ROWS if cpu else REAL_ROWS
  if not args.steps and rows % args.batch:
    raise ValueError(f"batch_size: batch {args.batch} does not divide the {rows} rows of the fixed-rows line "
                     f"(give steps=)")
  steps = args.steps or rows // args.batch
  lr = args.lr or float(f"{centre_lr(args.model, args.method, args.batch, steps, cpu):.3g}")
  config = finetune.study_point(cpu, args.model, args.method, args.rank, lr, args.seed)
  if not cpu:
    config.data.train = (OPENTHOUGHTS_10K,)
    config.data.seq_len = 4096  # Reasoning traces are long: an example longer than a row is truncated to it.
  config.data.batch_size = args.batch
  config.train.steps = steps
  if not cpu:
    config.train.eval_every = max(1, steps // 6)
  config.train.log_every = min(config.train.log_every, config.train.eval_every)
  return config


def centre_lr(model: str, method: str, batch: int, steps: int, cpu: bool) -> float:
  """The grid centre: the batch-16 optimum at that step count (CPU: `PILOT`, the nearest step count; real scale:
  lr_sweep's at batch 128) times sqrt(batch / that batch)."""
  if cpu:
    pilot = PILOT[min(PILOT, key=lambda s: abs(math.log(s / steps)))][method]
    return pilot * math.sqrt(batch / 16)  # unrounded: the grid rounds its points
  return float(f"{lr_sweep.default_lr(model, method, cpu=False) * math.sqrt(batch / 128):.3g}")


def get_sweep(arg: str = "tiny") -> list[str]:
  """Points of a variant: `tiny`, `quick` or `real`."""
  args = common.parse_arg(arg, tiny=False, quick=False, real=False)
  if args.tiny:  # both lines: (batch, steps) at a fixed STEPS and at a fixed ROWS (batch 16 at 150 steps is on both)
    prefix, methods, cpu = "tiny", [("lora", r) for r in TINY_RANKS] + [("full", 0)], True
    cells = list(dict.fromkeys([(b, STEPS) for b in TINY_BATCHES] + [(b, ROWS // b) for b in TINY_BATCHES]))
  elif args.quick:
    prefix, methods, cpu, cells = "quick", [("lora", 4), ("full", 0)], True, [(8, STEPS), (32, STEPS)]
  elif args.real:
    prefix, methods, cpu = "model=meta-llama/Llama-3.2-1B", [("lora", 16), ("full", 0)], False
    cells = [(b, REAL_ROWS // b) for b in REAL_BATCHES]
  else:
    raise ValueError(f"batch_size: sweep variant {arg!r}; valid: {list(SWEEPS)}")
  points = []
  for batch, steps in cells:
    for method, rank in methods:
      centre = centre_lr(prefix.removeprefix("model=") if not cpu else "", method, batch, steps, cpu)
      rank_arg = f",rank={rank}" if method == "lora" else ""
      steps_arg = f",steps={steps}" if cpu else ""
      if args.quick:
        lrs = [float(f"{centre:.3g}")]
      elif cpu:  # 4 LRs sqrt(2) apart, one step further towards batch 16's LR (the optimum moves less than sqrt(B))
        lrs = common.lr_grid(centre, 2.0 ** 0.5, *((2, 1) if batch > 16 else (1, 2)))
      else:
        lrs = common.lr_grid(centre, 2.0, 1, 1)
      for lr in lrs:
        for seed in (lr_sweep.SEEDS if args.tiny else (0,)):
          points.append(f"{prefix},batch={batch}{steps_arg},method={method}{rank_arg},lr={lr:g},seed={seed}")
  return points
