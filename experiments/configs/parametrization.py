"""alpha/r vs alpha/sqrt(r) early in training, and B outgrowing A over a long run: the study's findings 4 and 9.

Finding 4 (second half): under alpha/r, at the same LR, the learning curves of different ranks coincide at the start
(B = 0 at init and Adam's normalised steps make the first updates rank-independent), and loss(r=16) - loss(r=256)
grows slowly with steps; under rsLoRA's alpha/sqrt(r) the curves separate at once. Finding 9: at the end of long runs
the spectral norm of B exceeds A's (B starts at 0) - the implicit LR warm-up behind short runs preferring ~15x.

CPU (`tiny`): `lr_sweep`'s setting (the hidden-128 tiny base, 2-digit additions at batch 16). Ranks 4 and 64 (16x
apart like the study's 16 and 256; 64 is the K/V projections' width, the highest rank every adapted matrix of this
base takes) under each scaling at one LR, 1e-3 (half `lr_sweep`'s LoRA centre, so that rsLoRA's 8x larger scale at
rank 64 stays stable), the same seed (so the same batches and,
per rank, the same A init), 100 steps, train loss logged every step: 4 points. One long run (rank 16, alpha/r, LoRA
centre LR, 2000 steps, evaluated and its A/B norms logged every 100 steps) for finding 9. 5 points, ~4 min.

Measured (`tiny`, docs/results/tiny/parametrization/, 2026-11-30, one seed): mean |loss(r4) - loss(r64)| over steps
1-20 is 0.26 under alpha/r and 0.88 under alpha/sqrt(r) (rule: agree), but under alpha/r r4 runs ahead of r64 early
(d < 0, as the study's "negative for the first few steps") and |d| shrinks later (0.04 over steps 81-100) rather than
growing. Over 2,000 steps at r16 the median ||B||/||A|| reaches 0.76, never above 1 (A's norm grows too under Adam).

    python -m experiments.sweep --config experiments/configs/parametrization.py:tiny --workdir runs/parametrization

`quick`: the two alpha/r early runs and a 600-step long run (3 points). Real scale (`real`): Llama-3.2-1B on Tulu3,
ranks 16 and 256 under both scalings at the cookbook LoRA LR for 100 steps, plus a 780-step r16 run.

Point arguments: `tiny` | `quick` | `model=HUB_ID`, `scaling=alpha/r|alpha/sqrt(r)` (written `r` or `sqrt` in a
point), `rank=`, `lr=`, `steps=`, `seed=`.
"""

from __future__ import annotations

import ml_collections

from experiments.configs import common, finetune, lr_sweep

SCALINGS = {"r": "alpha/r", "sqrt": "alpha/sqrt(r)"}  # Point spelling -> lora.scaling (a point cannot hold "/").
TINY_RANKS = (4, 64)  # 16x apart as the study's 16 and 256; 64 = the K/V projections' width, the most they take
REAL_RANKS = (16, 256)
REAL_MODEL = "meta-llama/Llama-3.2-1B"
EARLY_STEPS = 100
SWEEPS = ("tiny", "quick", "real")


def get_config(arg: str = "tiny,scaling=r") -> ml_collections.ConfigDict:
  """One sweep point: LoRA at one rank and scaling, LR, step count and seed."""
  args = common.parse_arg(arg, tiny=False, quick=False, model="", scaling="r", rank=16, lr=0.0, steps=EARLY_STEPS,
                          seed=0)
  if args.scaling not in SCALINGS:
    raise ValueError(f"parametrization: scaling={args.scaling!r}; valid: {sorted(SCALINGS)} (alpha/r, alpha/sqrt(r))")
  cpu = args.tiny or args.quick
  lr = args.lr or lr_sweep.default_lr(args.model, "lora", cpu) / 2
  config = finetune.study_point(cpu, args.model, "lora", args.rank, lr, args.seed)
  config.lora.scaling = SCALINGS[args.scaling]
  config.train.steps = args.steps
  if args.steps <= EARLY_STEPS:  # an early-curve run: every step's train loss, evaluated at the end
    config.train.log_every = 1
    config.train.eval_every = args.steps
  else:  # a long run: norms of A and B at every evaluation
    config.train.eval_every = 100
  return config


def get_sweep(arg: str = "tiny") -> list[str]:
  """Points of a variant: `tiny`, `quick` or `real`."""
  args = common.parse_arg(arg, tiny=False, quick=False, real=False)
  if args.tiny:
    prefix, ranks, scalings, long_steps, cpu = "tiny", TINY_RANKS, list(SCALINGS), 2000, True
  elif args.quick:
    prefix, ranks, scalings, long_steps, cpu = "quick", TINY_RANKS, ["r"], 600, True
  elif args.real:
    prefix, ranks, scalings, long_steps, cpu = f"model={REAL_MODEL}", REAL_RANKS, list(SCALINGS), 780, False
  else:
    raise ValueError(f"parametrization: sweep variant {arg!r}; valid: {list(SWEEPS)}")
  centre = lr_sweep.default_lr("" if cpu else REAL_MODEL, "lora", cpu)
  early = [f"{prefix},scaling={s},rank={r},lr={centre / 2:g},steps={EARLY_STEPS}" for s in scalings for r in ranks]
  return early + [f"{prefix},scaling=r,rank=16,lr={centre:g},steps={long_steps}"]
