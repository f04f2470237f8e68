"""Capacity: memorising random facts with LoRA ranks and full FT, loss vs log(step): the study's finding 2.

The study: full FT and high-rank LoRA lower the loss linearly in log(step); low ranks peel off upward at a step that
grows with rank (they run out of capacity: lower efficiency, not a hard floor). Its heuristics: ~2 bits per parameter,
and LoRA does well while its parameters outnumber what the data holds. Here the data is `synthetic:facts`: random
6-letter keys, each with a 2-digit value drawn from 16, so the completions hold exactly 4 bits per fact; runs are scored
on the facts they trained on (`data.eval_split = "train"`, every fact): memorisation is the point. Each method's
curve in the report is the pointwise minimum over its LRs at each evaluation (the study's plot).

CPU (`tiny`): the study base (`common.study_base`, the calibrated recipe of `lr_sweep`) memorising 75 or 300 facts
(300 or 1,200 bits; each size is its own setting, so the report judges the ranks at each), LoRA ranks 1, 4 and 16
(every linear layer and the unembedding: ~5.1k adapter parameters per unit of rank) and full FT (420k), 300 steps at
batch 16 (~4 facts a row: each fact seen ~256 times at 75 facts, ~64 times at 300), evaluated every 25 steps on every
fact; 5 LRs sqrt(2) apart per method (full FT 5e-4..2e-3, LoRA 1e-3..4e-3), seeds 0-2 (data order and adapter
init; the facts themselves do not change): 120 points, ~35 min with `--stack auto`. Calibration (the study of
2026-12-07 at commit 885f4cc, 3 LRs per method around the old base's optima: full FT, r1, r4 7.07e-4..1.41e-3, r16
1e-3..2e-3): 7 of the 8 best LRs sat at a grid edge (LoRA at the top at both sizes, full FT at the bottom with 300
facts), so no capacity verdict could be given; the gaps at the best grid LR still ranked the ranks in order
(300 facts: r1 +0.40, r4 +0.11, r16 +0.03 nats behind full FT; 75 facts: r1 +0.06, r4 and r16 0.000), hence the
wider grids. Memorisation needs many epochs, so this family is not one epoch (the study's own capacity runs are
not either). Two sizes show whether the rank at which LoRA falls behind moves up with the data. By the study's ~2
bits per parameter even rank 1 holds ~10k bits, so "out of capacity" here is in the study's softer sense (lower
efficiency: the ranks peel off in order), which is what the two sizes test; a hard capacity limit would need more
facts than full FT can memorise in a CPU budget (1,000 facts were not memorised in 600 steps).

First tiny run (the old base, 300 facts, 600 steps, LRs 5e-4..4e-3, 2 seeds; docs/results/tiny/capacity before this
study): full FT memorised them (NLL 0.002 at 1e-3); LoRA ended behind by 0.78 (r1), 0.29 (r4), 0.11 (r16) and 0.044
(r64) nats at best LRs 1e-3 (r1, r4) and 2e-3 (r16, r64).

    python -m experiments.sweep --config experiments/configs/capacity.py:tiny --workdir runs/capacity
    python -m experiments.sweep --config experiments/configs/capacity.py:quick --workdir runs/capacity_quick

`quick`: ranks 1 and 16 and full FT at 1e-3, 75 facts, seed 0 (3 points, ~2 min). Real scale (`real`): Llama-3.2-1B on Tulu3
held-out NLL (the study's curves; real data's information is not known in bits), ranks 1-256 and full FT, 3 LRs a
factor 2 apart around the cookbook rule, evaluated every 50 steps.

Point arguments: `tiny` | `quick` | `model=HUB_ID`, `method=lora|full`, `rank=`, `lr=`, `seed=`, `facts=`, `steps=`.
"""

from __future__ import annotations

import ml_collections

from experiments.configs import common, finetune, lr_sweep

TINY_FACTS = (75, 300)  # 300 and 1,200 bits: two sizes, two settings.
TINY_RANKS = (1, 4, 16)
TINY_STEPS = 300
TINY_CENTRE = {"full": 1e-3, "lora": 2e-3}  # 5-point grids around these (the calibration in the docstring).
TINY_SEEDS = (0, 1, 2)
REAL_RANKS = (1, 4, 16, 64, 256)
REAL_MODEL = "meta-llama/Llama-3.2-1B"
SWEEPS = ("tiny", "quick", "real")


def get_config(arg: str = "tiny,method=lora") -> ml_collections.ConfigDict:
  """One sweep point: one method at one rank, LR and seed memorising the facts (CPU) or on Tulu3 (real)."""
  args = common.parse_arg(arg, tiny=False, quick=False, model="", method="lora", rank=16, lr=0.0, seed=0,
                          facts=TINY_FACTS[0], steps=TINY_STEPS)
  cpu = args.tiny or args.quick
  lr = args.lr or (1e-3 if cpu else lr_sweep.default_lr(args.model, args.method, cpu=False))
  config = finetune.study_point(cpu, args.model, args.method, args.rank, lr, args.seed)
  if cpu:
    config.data.train = ("synthetic:facts",)
    config.data.synthetic_examples = args.facts
    config.data.eval_split = "train"  # Scored on the facts trained on.
    config.data.eval_size = args.facts  # Every one of them.
    config.train.steps = args.steps
    config.train.eval_every = 25
  else:
    config.train.eval_every = 50
  return config


def get_sweep(arg: str = "tiny") -> list[str]:
  """Points of a variant: `tiny`, `quick` or `real`."""
  args = common.parse_arg(arg, tiny=False, quick=False, real=False)
  if args.tiny:
    methods = [("lora", r) for r in TINY_RANKS] + [("full", 0)]
    grid = {(m, r): common.lr_grid(TINY_CENTRE[m], 2.0 ** 0.5, 2, 2) for m, r in methods}
    prefix, seeds, sizes = "tiny", TINY_SEEDS, TINY_FACTS
  elif args.quick:
    methods = [("lora", 1), ("lora", 16), ("full", 0)]
    grid, prefix, seeds, sizes = {m: (1e-3,) for m in methods}, "quick", (0,), TINY_FACTS[:1]
  elif args.real:
    methods = [("lora", r) for r in REAL_RANKS] + [("full", 0)]
    grid = {(m, r): common.lr_grid(lr_sweep.default_lr(REAL_MODEL, m, cpu=False), 2.0, 1, 1) for m, r in methods}
    prefix, seeds, sizes = f"model={REAL_MODEL}", (0,), (0,)
  else:
    raise ValueError(f"capacity: sweep variant {arg!r}; valid: {list(SWEEPS)}")
  return [f"{prefix}" + (f",facts={n}" if n else "") + f",method={m}" + (f",rank={r}" if m == "lora" else "")
          + f",lr={lr:g},seed={s}" for n in sizes for m, r in methods for lr in grid[(m, r)] for s in seeds]
