"""Which layers to adapt: attention-only vs MLP-only vs all layers, parameter-matched, and the unembedding on/off.

The study's finding 6: attention-only LoRA underperforms MLP-only, and MLP-only is about as good as all layers, even
when attention-only gets as many parameters (Llama-3.1-8B: attention r=256, 0.25B parameters, loses to MLP r=128,
0.24B). Its main runs adapted every matrix including the unembedding.

CPU (`tiny`): `lr_sweep`'s calibrated setting (the study base, the dialect task, 300 steps at batch 16, 500 held-out
answers). Groups (`targets`, rank), each with the unembedding adapted as in the study's runs: attention r=8 (16,200
adapter parameters: q, k, v, o over 2 layers, the KV projections 64 wide, + 1,864 in the unembedding), MLP r=4
(13,220: gate, up, down + 932), all linear layers r=4 (20,388); and all linear layers r=4 without the unembedding
(19,456), the unembedding question as its own arm. Attention-only thus holds ~1.2x MLP-only's parameters, as in the
study. Each over 4 LoRA LRs sqrt(2) apart (1.41e-3..4e-3, around `lr_sweep`'s LoRA optima 2.3e-3..2.6e-3), seeds
0-2: 48 points, ~16 min with `--stack auto`.

First tiny run (the old base, which had never seen the task's tokens; 2-digit additions, 2 seeds; docs/results/tiny
before this study): every group without the unembedding was ~1.0 nats behind (2.29 vs 1.28): the output head was
what LoRA most needed to move there. The calibrated base knows the task's tokens, so this arm now measures the
unembedding's share of a distribution shift rather than of new tokens.

    python -m experiments.sweep --config experiments/configs/layers.py:tiny --workdir runs/layers

`quick`: attention r8 and MLP r4 (each + unembedding) at `lr_sweep`'s LoRA centre, seed 0 (2 points). Real scale (`real`):
Llama-3.1-8B on Tulu3, attention r=256 vs MLP r=128 vs all r=128 (each + unembedding), at the cookbook LoRA LR and a
factor 2 either side.

Point arguments: `tiny` | `quick` | `model=HUB_ID`, `layers=` one of `TARGETS` (e.g. `attention+unembed`), `rank=`, `lr=`, `seed=`.
"""

from __future__ import annotations

import ml_collections

from experiments.configs import common, finetune, lr_sweep

TARGETS = {"attention": ("attention",), "mlp": ("mlp",), "all": ("all-linear",),
           "attention+unembed": ("attention", "unembed"), "mlp+unembed": ("mlp", "unembed"),
           "all+unembed": ("all-linear", "unembed")}
# Attention rank 2k vs MLP rank k, each with the unembedding as in the study's runs; all layers with and without it.
TINY_RANKS = {"attention+unembed": 8, "mlp+unembed": 4, "all": 4, "all+unembed": 4}
REAL_RANKS = {"attention+unembed": 256, "mlp+unembed": 128, "all+unembed": 128}  # The study's pair on Llama-3.1-8B.
REAL_MODEL = "meta-llama/Llama-3.1-8B"
SWEEPS = ("tiny", "quick", "real")


def get_config(arg: str = "tiny,layers=mlp") -> ml_collections.ConfigDict:
  """One sweep point: LoRA on one group of layers at one rank, LR and seed."""
  args = common.parse_arg(arg, tiny=False, quick=False, model="", layers="all+unembed", rank=0, lr=0.0, seed=0)
  if args.layers not in TARGETS:
    raise ValueError(f"layers: layers={args.layers!r}; valid: {sorted(TARGETS)}")
  cpu = args.tiny or args.quick
  rank = args.rank or (TINY_RANKS if cpu else REAL_RANKS)[args.layers]
  lr = args.lr or lr_sweep.default_lr(args.model, "lora", cpu)
  config = finetune.study_point(cpu, args.model, "lora", rank, lr, args.seed)
  config.lora.targets = TARGETS[args.layers]
  return config


def get_sweep(arg: str = "tiny") -> list[str]:
  """Points of a variant: `tiny`, `quick` or `real`."""
  args = common.parse_arg(arg, tiny=False, quick=False, real=False)
  if args.tiny:
    prefix, groups, lrs, seeds = "tiny", list(TINY_RANKS), common.lr_grid(2e-3, 2.0 ** 0.5, 1, 2), lr_sweep.SEEDS
  elif args.quick:
    prefix, groups, lrs, seeds = "quick", ["attention+unembed", "mlp+unembed"], [lr_sweep.TINY_CENTRE["lora"]], (0,)
  elif args.real:
    prefix, groups, seeds = f"model={REAL_MODEL}", list(REAL_RANKS), (0,)
    lrs = common.lr_grid(lr_sweep.default_lr(REAL_MODEL, "lora", cpu=False), 2.0, 1, 1)
  else:
    raise ValueError(f"layers: sweep variant {arg!r}; valid: {list(SWEEPS)}")
  return [f"{prefix},layers={g},lr={lr:g},seed={s}" for g in groups for lr in lrs for s in seeds]
