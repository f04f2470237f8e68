"""Calibration of the CPU study's setting: a strong method against a deliberately weak one, before any sweep.

A setting can carry the study's verdicts only if it separates full fine-tuning at its best LR from a weak method
(LoRA rank 1 on the attention projections only, no unembedding: ~1,800 trainable parameters) by many seed standard
deviations, and if that separation holds at 50%, 75% and 100% of the steps. `python -m experiments.calibrate DIR`
reads this sweep and says both (docs/results/calibration/).

CPU (`tiny`): `lr_sweep`'s setting (the study base of `common.study_base`, ~3 epochs of 2-digit additions, 500
held-out problems); full FT over 4 LRs and the weak method over 4 LRs, a factor 2 apart, seeds 0-2 (24 points).
`tiny_long`: the same at 600 steps (the weak method's grid a factor 2 lower). `tiny_dialect`: the same grids on
`synthetic:dialect` (a new language over known characters: a distribution to learn, not a skill that clicks).
`tiny_dialect_known10`: the dialect on a base that read the dialect's plain register in 10% of its text documents
(the screen that passed), 5 LRs a factor 2 apart per method, seeds 0-2 (30 points).
`quick`: each method at one LR, 3 seeds (a pipeline check).

    python -m experiments.sweep --config experiments/configs/calibration.py:tiny --workdir runs/calibration
    python -m experiments.calibrate runs/calibration

`tiny_screen_*`: each method at its best LR of the 300-step calibration, 3 seeds, on a candidate setting (a pilot
that says whether a full calibration is worth its compute): `tiny_screen_sums` the study's setting (packed rows: ~3
epochs of the 9,000 sums in 300 steps), `tiny_screen_sums49` sums with operands up to 49 (2,000 problems trained on,
~13 epochs: a skill small enough to be learnt), `tiny_screen_batch32` batch 32 (twice the tokens, half the gradient
noise), `tiny_screen_dialect_knownNN` the dialect on a base that has read the dialect's plain register in NN% (30, 10,
3) of its text documents (`common.tiny_base_config().dialect_fraction`), so fine-tuning shifts format and style, not
words.

Point arguments: `tiny`, `method=full|weak`, `lr=`, `seed=`, `steps=`, `task=sums|dialect`, `batch=` (rows per step),
`operands=` (the sums' largest operand), `known=` (the base's share of text documents in the dialect).
"""

from __future__ import annotations

import ml_collections

from experiments.configs import common, lr_sweep

SWEEPS = ("tiny", "quick", "tiny_long", "tiny_dialect", "tiny_screen_sums", "tiny_screen_sums49", "tiny_screen_batch32",
          "tiny_screen_dialect_known30", "tiny_screen_dialect_known10", "tiny_screen_dialect_known03",
          "tiny_dialect_known10")
# Each candidate's point arguments beyond the study's setting.
SCREENS = {"tiny_screen_sums": "", "tiny_screen_sums49": ",operands=49", "tiny_screen_batch32": ",batch=32",
           **{f"tiny_screen_dialect_known{p:02d}": f",task=dialect,known={p / 100}" for p in (30, 10, 3)}}
SCREEN_LRS = {"full": 2e-3, "weak": 2e-3}  # both methods' best grid LR at 300 steps (docs/results/calibration)
DIALECT_SCREEN_LRS = {"full": 2e-3, "weak": 4e-3}  # the same on the dialect (dialect_newwords at 100%)
DIALECT_EXAMPLES = 10_500  # ~one epoch in 300 steps at batch 16 (1.7 answers a row), 500 of them held out
LRS = {"full": (5e-4, 1e-3, 2e-3, 4e-3), "weak": (2e-3, 4e-3, 8e-3, 1.6e-2)}
LONG_LRS = {"full": (5e-4, 1e-3, 2e-3, 4e-3), "weak": (1e-3, 2e-3, 4e-3, 8e-3)}  # the weak optimum sat at 2e-3 (edge)
# One more LR each way than LRS: on the dialect both optima sat at their grid's edge at some fraction of the steps.
KNOWN_LRS = {"full": (5e-4, 1e-3, 2e-3, 4e-3, 8e-3), "weak": (2e-3, 4e-3, 8e-3, 1.6e-2, 3.2e-2)}
SEEDS = (0, 1, 2)


def get_config(arg: str = "tiny,method=full") -> ml_collections.ConfigDict:
  """One point: full FT, or the weak method (LoRA r1 on attention only), at one LR and seed."""
  args = common.parse_arg(arg, tiny=False, method="full", lr=0.0, seed=0, steps=300, task="sums", batch=16,
                          operands=99, known=0.0)
  if args.task not in ("sums", "dialect"):
    raise ValueError(f"calibration: task must be sums or dialect, got {args.task!r}")
  if args.method not in LRS:
    raise ValueError(f"calibration: method must be one of {sorted(LRS)}, got {args.method!r}")
  method = "full" if args.method == "full" else "lora"
  lr = args.lr or LRS[args.method][1]
  config = lr_sweep.get_config(f"tiny,method={method},rank=1,lr={lr!r},seed={args.seed}")
  if args.method == "weak":
    config.lora.targets = ("attention",)
  config.train.steps = args.steps
  config.data.batch_size = args.batch
  if args.operands != 99:  # (operands + 1)^2 distinct problems: 500 held out, the rest trained on
    config.data.synthetic_max_operand = args.operands
    config.data.synthetic_examples = min(config.data.synthetic_examples, (args.operands + 1) ** 2)
  if not 0.0 <= args.known < 1.0:
    raise ValueError(f"calibration: known (a share of the base's text documents) must be in [0, 1), got {args.known}")
  config.tiny_base.dialect_fraction = args.known
  if args.task == "dialect":
    config.data.train = ("synthetic:dialect",)
    config.data.synthetic_examples = DIALECT_EXAMPLES
  return config


def get_sweep(arg: str = "tiny") -> list[str]:
  """Every point of the calibration: ``tiny`` (300 steps, as the study), ``tiny_long`` (600 steps), ``tiny_dialect``
  (the dialect task), ``tiny_dialect_known10`` (the dialect on a base that read it in 10% of its text, 5 LRs a
  method), a screen (``SCREENS``) or ``quick`` (each method at one LR)."""
  if arg not in SWEEPS:
    raise ValueError(f"calibration: sweep variant {arg!r}; valid: {list(SWEEPS)}")
  if arg == "quick":  # a pipeline check: each method at its grid's second LR
    return [f"tiny,method={m},lr={lrs[1]!r},seed={s}" for m, lrs in LRS.items() for s in SEEDS]
  if arg in SCREENS:  # each method at its best LR of the 300-step calibration, on a candidate setting
    lrs = DIALECT_SCREEN_LRS if "task=dialect" in SCREENS[arg] else SCREEN_LRS
    return [f"tiny,method={m},lr={lr!r},seed={s}{SCREENS[arg]}" for m, lr in lrs.items() for s in SEEDS]
  grid, extra = {"tiny": (LRS, ""), "tiny_long": (LONG_LRS, ",steps=600"), "tiny_dialect": (LRS, ",task=dialect"),
                 "tiny_dialect_known10": (KNOWN_LRS, ",task=dialect,known=0.1")}[arg]
  return [f"tiny,method={m},lr={lr!r},seed={s}{extra}" for m, lrs in grid.items() for lr in lrs for s in SEEDS]
