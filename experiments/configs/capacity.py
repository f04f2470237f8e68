"""Capacity: memorising random facts with LoRA ranks 1-64 and full FT, loss vs log(step): the study's finding 2.

The study: full FT and high-rank LoRA lower the loss linearly in log(step); low ranks peel off upward at a step that
grows with rank (they run out of capacity: lower efficiency, not a hard floor). Its heuristics: ~2 bits per parameter,
and LoRA does well while its parameters outnumber what the data holds. Here the data is `synthetic:facts`: random
6-letter keys, each with a 2-digit value drawn from 16, so the completions hold exactly 4 bits per fact; runs are scored
on the facts they trained on (`data.eval_split = "train"`, every fact): memorisation is the point. Each method's
curve in the report is the pointwise minimum over its LRs at each evaluation (the study's plot).

CPU (`tiny`): the hidden-128 tiny base of `lr_sweep`; 300 facts (1,200 bits); LoRA ranks 1, 4, 16 and 64 (every linear
layer and the unembedding: ~5.1k adapter parameters per unit of rank, so rank 1 holds ~5k parameters ~ 10k bits by the
heuristic, rank 64 ~330k) and full FT (420k); 600 steps at batch 16 (~4 facts a row: each fact seen ~130 times),
evaluated every 25 steps; LRs 5e-4, 1e-3, 2e-3 and 4e-3 for every method; seeds 0 and 1 (data order and adapter init;
the facts themselves do not change). 40 points, ~20 min on 2 cores with `--parallel 2`.

Calibration (measured here, 2026-11-30, seed 0): with 1,000 facts full FT at 3e-3 was still at NLL 0.94 after 600
steps (unmemorised ~1.0), so the tiny model cannot memorise that many in a CPU budget; with 300 facts full FT at 1e-3
reaches 0.006 at step 450 and 0.002 at 600, LoRA r16 at 3e-3 0.12 at step 550 but 0.39 at 600 (too high an LR: noisy),
and LoRA r1 at 3e-3 diverges upward (1.9 at step 350): hence a grid from 5e-4. A first tiny run with 5e-4..2e-3
put the best LR of r16, r64 and full FT at or near the top of it, so 4e-3 was added.

Measured (`tiny`, docs/results/tiny/capacity/, 2026-11-30): full FT memorises the 300 facts (final NLL ~0.002 at
its best LR); every LoRA rank ends behind it, by 0.78 (r1), 0.29 (r4), 0.11 (r16) and 0.044 (r64) nats, the gap
shrinking with rank, each beyond twice its seed noise (0.0015-0.08): in the learning curves the ranks peel off in
order, r1 first. With no rank matching full FT, the capacity rule (which needs a high rank that keeps up) is
inconclusive: at this width even r64 (~330k adapter parameters against 1,200 bits) memorises less efficiently.

    python -m experiments.sweep --config experiments/configs/capacity.py:tiny --workdir runs/capacity
    python -m experiments.sweep --config experiments/configs/capacity.py:quick --workdir runs/capacity_quick

`quick`: ranks 1 and 16 and full FT at 1e-3, seed 0 (3 points, ~2 min). Real scale (`real`): Llama-3.2-1B on Tulu3
held-out NLL (the study's curves; real data's information is not known in bits), ranks 1-256 and full FT, 3 LRs a
factor 2 apart around the cookbook rule, evaluated every 50 steps.

Point arguments: `tiny` | `quick` | `model=HUB_ID`, `method=lora|full`, `rank=`, `lr=`, `seed=`, `facts=`, `steps=`.
"""

from __future__ import annotations

import ml_collections

from experiments.configs import common, finetune, lr_sweep

TINY_FACTS = 300  # 1,200 bits.
TINY_RANKS = (1, 4, 16, 64)
TINY_LRS = (5e-4, 1e-3, 2e-3, 4e-3)
REAL_RANKS = (1, 4, 16, 64, 256)
REAL_MODEL = "meta-llama/Llama-3.2-1B"
SWEEPS = ("tiny", "quick", "real")


def get_config(arg: str = "tiny,method=lora") -> ml_collections.ConfigDict:
  """One sweep point: one method at one rank, LR and seed memorising the facts (CPU) or on Tulu3 (real)."""
  args = common.parse_arg(arg, tiny=False, quick=False, model="", method="lora", rank=16, lr=0.0, seed=0,
                          facts=TINY_FACTS, steps=600)
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
    grid = {m: TINY_LRS for m, _ in methods}
    prefix, seeds = "tiny", (0, 1)
  elif args.quick:
    methods, grid, prefix, seeds = [("lora", 1), ("lora", 16), ("full", 0)], {"lora": (1e-3,), "full": (1e-3,)}, \
        "quick", (0,)
  elif args.real:
    methods = [("lora", r) for r in REAL_RANKS] + [("full", 0)]
    grid = {m: common.lr_grid(lr_sweep.default_lr(REAL_MODEL, m, cpu=False), 2.0, 1, 1) for m in ("lora", "full")}
    prefix, seeds = f"model={REAL_MODEL}", (0,)
  else:
    raise ValueError(f"capacity: sweep variant {arg!r}; valid: {list(SWEEPS)}")
  return [f"{prefix},method={m}" + (f",rank={r}" if m == "lora" else "") + f",lr={lr:g},seed={s}"
          for m, r in methods for lr in grid[m] for s in seeds]
