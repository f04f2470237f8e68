"""The LoRA/full-FT optimal-LR ratio at several base widths: how a tiny-scale ratio reads against the study's ~10.

The study fits its ~10x over 14 models with hidden sizes 2k-8k, and its LR rule (`common.cookbook_lr`) scales LoRA
and full FT by the same (2000/hidden)^p: the ratio should not depend on width. The tiny `lr_sweep` sits at hidden 128;
this family asks whether the ratio moves with width before anyone reads a tiny ratio against the study's.

CPU (`tiny`): the tiny base at hidden 64, 128 and 256 (intermediate 3x hidden, 2 layers, 4 heads, 2 KV heads, each
pretrained 300 steps on the synthetic corpus: one cached base per width), then `lr_sweep`'s setting (2-digit additions,
300 steps at batch 16, 500 held-out problems). LoRA rank 4 (<= width/16 at every width, so it is low rank everywhere)
and full FT, each over 5 LRs a factor 2 apart centred on `lr_sweep`'s centres moved by the cookbook's width exponent
((128/hidden)^0.781), seed 0 only: the seed noise is measured at hidden 128 by `lr_sweep:tiny` (3 seeds), so this family
spends its budget on widths, and its verdict uses point estimates (the report says so). 30 points, ~25 min on 2 cores.

Measured (`tiny`, docs/results/tiny/lr_width/, 2026-11-30, one seed): LoRA/full optimal-LR ratio 0.61 (hidden 64),
1.9 (128) and 1.0 (256): no trend towards the study's ~10 with width over this range, and a spread (x3) that one
seed cannot separate from noise (at hidden 128 `lr_sweep`'s 3 seeds give 1.1-1.3); full FT's optimum falls as
hidden^-0.9, LoRA r4's as hidden^-0.55 (the cookbook's exponent: -0.78 for both).

    python -m experiments.sweep --config experiments/configs/lr_width.py:tiny --workdir runs/lr_width
    python -m experiments.sweep --config experiments/configs/lr_width.py:quick --workdir runs/lr_width_quick

`quick`: hidden 64 and 128, 3 LRs each (12 points). Real scale (`real`): Llama-3.2-1B (hidden 2048) and Llama-3.1-8B
(4096) on Tulu3, LoRA r16 and full FT over 5 LRs a factor 2 apart around the cookbook rule.

Point arguments: `tiny` | `quick` | `model=HUB_ID`, `hidden=` (CPU), `method=lora|full`, `rank=`, `lr=`, `seed=`.
"""

from __future__ import annotations

import ml_collections

from experiments.configs import common, finetune, lr_sweep

TINY_WIDTHS = (64, 128, 256)
QUICK_WIDTHS = (64, 128)
TINY_RANK = 4
REAL_MODELS = ("meta-llama/Llama-3.2-1B", "meta-llama/Llama-3.1-8B")
SWEEPS = ("tiny", "quick", "real")


def get_config(arg: str = "tiny,method=lora") -> ml_collections.ConfigDict:
  """One sweep point: one method at one base width (CPU) or model (real), LR and seed."""
  args = common.parse_arg(arg, tiny=False, quick=False, model="", hidden=128, method="lora", rank=TINY_RANK,
                          lr=0.0, seed=0)
  cpu = args.tiny or args.quick
  lr = args.lr or centre_lr(args.model, args.method, args.hidden, cpu)
  config = finetune.study_point(cpu, args.model, args.method, args.rank, lr, args.seed)
  if cpu:
    config.tiny_base.hidden_size = args.hidden
    config.tiny_base.intermediate_size = 3 * args.hidden
  return config


def centre_lr(model: str, method: str, hidden: int, cpu: bool) -> float:
  """The grid centre: lr_sweep's at hidden 128 moved by the cookbook's width exponent on CPU; the cookbook rule else."""
  if cpu:
    return lr_sweep.TINY_CENTRE[method] * (128 / hidden) ** common.COOKBOOK_LR_EXPONENT["llama"]
  return lr_sweep.default_lr(model, method, cpu=False)


def get_sweep(arg: str = "tiny") -> list[str]:
  """Points of a variant: `tiny`, `quick` (CPU widths) or `real` (the two Llama widths)."""
  args = common.parse_arg(arg, tiny=False, quick=False, real=False)
  points = []
  if args.tiny or args.quick:
    prefix, widths, half = ("tiny", TINY_WIDTHS, 2) if args.tiny else ("quick", QUICK_WIDTHS, 1)
    for hidden in widths:
      for method in ("lora", "full"):
        for lr in common.lr_grid(centre_lr("", method, hidden, True), 2.0, half, half):
          rank = f",rank={TINY_RANK}" if method == "lora" else ""
          points.append(f"{prefix},hidden={hidden},method={method}{rank},lr={lr:g},seed=0")
  elif args.real:
    for model in REAL_MODELS:
      for method in ("lora", "full"):
        for lr in common.lr_grid(centre_lr(model, method, 0, False), 2.0, 2, 2):
          rank = ",rank=16" if method == "lora" else ""
          points.append(f"model={model},method={method}{rank},lr={lr:g},seed=0")
  else:
    raise ValueError(f"lr_width: sweep variant {arg!r}; valid: {list(SWEEPS)}")
  return points
