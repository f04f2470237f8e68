"""Batch size: LoRA (two ranks) vs full FT, each at its best LR, over batch sizes at a fixed number of examples.

The study's finding 5: LoRA pays a growing loss penalty against full FT as the batch grows, and a higher rank does not
remove it; both do best at small batches. Every point sees the same number of training rows (a fixed data budget:
`ROWS` packed rows, so batch B trains ROWS/B steps) and is scored on held-out NLL at the end, so the batch size is
the only thing that changes between settings.

CPU (`tiny`): `lr_sweep`'s setting (the hidden-128 tiny base, 2-digit additions, 500 held-out problems) at batch 4,
16 and 64 rows (1200, 300 and 75 steps; 4800 rows each), LoRA ranks 4 and 64 and full FT. LRs a factor 2 apart
around `lr_sweep`'s centres scaled by sqrt(B/16) (Adam's usual batch rule): 3 at batch 16, and at batch 4 and 64 one
more step towards batch 16's LRs (a first run put full FT's and r4's best LR at batch 4 at the grid's top and r4's at
batch 64 at its bottom: the optimum moves less than sqrt(B) here). Seed 0 at every LR and seed 1 at the centre: the
report's gap rule gets a seed-noise estimate at the best LR when it is the centre, and the bootstrap is skipped (the
LR optimum is not this family's question). 42 points, ~25 min with `--parallel 2`.

Measured (`tiny`, docs/results/tiny/batch_size/, 2026-11-30): LoRA's gap to full FT at each one's best LR shrinks as
the batch grows — r4 +0.17 nats at batch 4 to -0.05 at batch 64, r64 +0.08 to -0.02 (seed std where two seeds
exist: 0.005-0.066) — the opposite of the study's finding; all three methods do best at the smallest batch, as in the study.
Caveat: at a fixed 4,800 rows, batch 64 trains only 75 steps.

    python -m experiments.sweep --config experiments/configs/batch_size.py:tiny --workdir runs/batch_size

`quick`: batch 4 and 64, LoRA r4 and full FT, the centre LR only (4 points). Real scale (`real`): Llama-3.2-1B on the
study's batch-size data, a 10k-example OpenThoughts3 subset (`OPENTHOUGHTS_10K`: ShareGPT records, read as chat), at
batch 32, 128 and 512 rows of 4096 tokens over a fixed 16,384 rows (about one epoch of the subset; the study's
budget is NOT STATED), LoRA r16 and full FT, 3 LRs each.

Point arguments: `tiny` | `quick` | `model=HUB_ID`, `batch=`, `method=lora|full`, `rank=`, `lr=`, `seed=`.
"""

from __future__ import annotations

import math

import ml_collections

from experiments.configs import common, finetune, lr_sweep

ROWS = 4800  # Training rows every CPU point sees (batch x steps).
REAL_ROWS = 16384  # Rows every real point sees: ~one epoch of the 10k subset in 4096-token rows (NOT STATED).
TINY_BATCHES = (4, 16, 64)
REAL_BATCHES = (32, 128, 512)
TINY_RANKS = (4, 64)
SWEEPS = ("tiny", "quick", "real")
OPENTHOUGHTS_10K = "open-thoughts/OpenThoughts3-1.2M@train[:10000]"  # The study's batch-size subset (its first 10k).


def get_config(arg: str = "tiny,method=lora") -> ml_collections.ConfigDict:
  """One sweep point: one method at one batch size, LR and seed, trained on a fixed number of rows."""
  args = common.parse_arg(arg, tiny=False, quick=False, model="", batch=16, method="lora", rank=16, lr=0.0, seed=0)
  cpu = args.tiny or args.quick
  lr = args.lr or centre_lr(args.model, args.method, args.batch, cpu)
  config = finetune.study_point(cpu, args.model, args.method, args.rank, lr, args.seed)
  rows = ROWS if cpu else REAL_ROWS
  if rows % args.batch:
    raise ValueError(f"batch_size: batch {args.batch} does not divide the {rows} rows every point trains on")
  if not cpu:
    config.data.train = (OPENTHOUGHTS_10K,)
    config.data.seq_len = 4096  # Reasoning traces are long: an example longer than a row is truncated to it.
  config.data.batch_size = args.batch
  config.train.steps = rows // args.batch
  config.train.eval_every = max(1, config.train.steps // 6)  # The same 6 evaluations (in examples) at every batch.
  config.train.log_every = min(config.train.log_every, config.train.eval_every)
  return config


def centre_lr(model: str, method: str, batch: int, cpu: bool) -> float:
  """The grid centre: lr_sweep's (batch 16 on CPU, 128 at real scale) times sqrt(batch / that batch)."""
  if cpu:
    return float(f"{lr_sweep.TINY_CENTRE[method] * math.sqrt(batch / 16):.3g}")
  return float(f"{lr_sweep.default_lr(model, method, cpu=False) * math.sqrt(batch / 128):.3g}")


def get_sweep(arg: str = "tiny") -> list[str]:
  """Points of a variant: `tiny`, `quick` or `real`."""
  args = common.parse_arg(arg, tiny=False, quick=False, real=False)
  if args.tiny:
    prefix, batches, methods, cpu = "tiny", TINY_BATCHES, [("lora", r) for r in TINY_RANKS] + [("full", 0)], True
  elif args.quick:
    prefix, batches, methods, cpu = "quick", (4, 64), [("lora", 4), ("full", 0)], True
  elif args.real:
    prefix, batches, methods, cpu = "model=meta-llama/Llama-3.2-1B", REAL_BATCHES, [("lora", 16), ("full", 0)], False
  else:
    raise ValueError(f"batch_size: sweep variant {arg!r}; valid: {list(SWEEPS)}")
  points = []
  for batch in batches:
    for method, rank in methods:
      centre = centre_lr(prefix.removeprefix("model=") if not cpu else "", method, batch, cpu)
      rank_arg = f",rank={rank}" if method == "lora" else ""
      # The optimum moved less than sqrt(B) in the first tiny run: the grids reach one step further towards batch 16's.
      below, above = (1, 2) if batch < 16 else (2, 1) if batch > 16 else (1, 1)
      lrs = [centre] if args.quick else common.lr_grid(centre, 2.0, below, above if cpu else 1)
      for lr in lrs:
        for seed in ((0, 1) if lr == centre and args.tiny else (0,)):
          points.append(f"{prefix},batch={batch},method={method}{rank_arg},lr={lr:g},seed={seed}")
  return points
