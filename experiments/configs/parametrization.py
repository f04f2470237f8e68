"""alpha/r vs alpha/sqrt(r) early in training, and B outgrowing A over a long run: the study's findings 4 and 9.

Finding 4 (second half): under alpha/r, at the same LR, the learning curves of different ranks coincide at the start
(B = 0 at init and Adam's normalised steps make the first updates rank-independent), and loss(r=16) - loss(r=256)
grows slowly with steps; under rsLoRA's alpha/sqrt(r) the curves separate at once. Finding 9: at the end of long runs
the spectral norm of B exceeds A's (B starts at 0) - the implicit LR warm-up behind short runs preferring ~15x.

CPU (`tiny`): `lr_sweep`'s calibrated setting (the study base, the dialect task at batch 16). Ranks 4 and 64 (16x
apart like the study's 16 and 256; 64 is the K/V projections' width, the highest rank every adapted matrix of this
base takes) under each scaling at one LR, 1.41e-3 (half `lr_sweep`'s LoRA centre, so that rsLoRA's 8x larger scale
at rank 64 stays stable), 100 steps, train loss logged every step, seeds 0-2 (per seed the same batches and, per
rank, the same A init under both scalings): 12 points, ~3 min. Finding 9 is not judged at this scale: the ratio
||B||/||A|| depends on the width (B's norm grows with sqrt(d_out), A's init is normalised by 1/sqrt(d_in)), so a
hidden-128 model says nothing of the study's 4096; the long run is the `quick` and `real` variants' (and the width
family's question).

First tiny run (the old base, one seed): mean |loss(r4) - loss(r64)| over steps 1-20 was 0.26 under alpha/r and 0.88
under alpha/sqrt(r); over 2,000 steps at r16 the median ||B||/||A|| reached 0.76.

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
  if args.tiny:  # the early curves only, over 3 seeds (finding 9 is not judged at this width: see the docstring)
    prefix, ranks, scalings, long_steps, cpu = "tiny", TINY_RANKS, list(SCALINGS), 0, True
  elif args.quick:
    prefix, ranks, scalings, long_steps, cpu = "quick", TINY_RANKS, ["r"], 600, True
  elif args.real:
    prefix, ranks, scalings, long_steps, cpu = f"model={REAL_MODEL}", REAL_RANKS, list(SCALINGS), 780, False
  else:
    raise ValueError(f"parametrization: sweep variant {arg!r}; valid: {list(SWEEPS)}")
  centre = lr_sweep.default_lr("" if cpu else REAL_MODEL, "lora", cpu)
  seeds = lr_sweep.SEEDS if args.tiny else (0,)
  early = [f"{prefix},scaling={s},rank={r},lr={centre / 2:.3g},steps={EARLY_STEPS}" + (f",seed={seed}" if args.tiny else "")
           for s in scalings for r in ranks for seed in seeds]
  return early + ([f"{prefix},scaling=r,rank=16,lr={centre:.3g},steps={long_steps}"] if long_steps else [])
