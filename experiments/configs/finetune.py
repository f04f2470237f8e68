"""Fine-tune a base model with LoRA and with full fine-tuning on the same data, step and evaluation.

Run locally (tiny variant: pretrains a 0.1M-parameter character-level base once on a synthetic corpus that holds the
task's tokens and chat format (``synthetic.pretraining_corpus``), caches it, then fine-tunes it with LoRA r=16 and
full FT on synthetic 2-digit additions; ~45 s on 2 CPU cores it has to itself, base pretraining included):

    python -m experiments.main --config experiments/configs/finetune.py:tiny --workdir runs/tiny

Expected (measured on 2 cores, 2026-12-07): held-out NLL per completion token falls from 2.890 (base) to 0.554 (LoRA,
exact-match accuracy on held-out sums 0.42) and 0.873 (full FT, 0.06); float32 rounding differs by CPU, so another
host lands nearby. The report is ``runs/tiny/report.md`` (+ ``report.png``); the numbers are what a pipeline check
needs, not a finding.

On a GPU/TPU VM, a Hugging Face model and dataset (the study's Tulu3 setting, one epoch at batch 128):

    python -m experiments.main --config experiments/configs/finetune.py:model=meta-llama/Llama-3.2-1B \\
        --workdir gs://BUCKET/llama1b --config.data.train='("allenai/tulu-3-sft-mixture",)'

Memory at real scale is set by ``config.model`` (the planner ``benchmarks/fit.py`` and docs/memory.md show the
effect): ``remat`` ``none`` (keep every activation) / ``full`` (keep only each layer's input, recompute the layer in
the backward pass) / ``save_matmuls`` (keep the projections' outputs, recompute norms, RoPE, attention and
activations); ``attention`` ``auto`` (splash on TPU, cuDNN on GPU, exact elsewhere) / ``xla`` / ``cudnn`` /
``splash``; ``loss_chunk_size`` (positions per loss chunk, 0 = full logits). E.g. ``--config.model.remat=full``.

Arguments (comma-separated ``key=value``): ``tiny`` (the CPU variant), ``model=`` (HF directory or hub id),
``method=lora|full|both``, ``rank=``, ``lr=`` (the LR of the method named: ``method=full,lr=X`` trains full FT at X;
with ``both``, LoRA's, and full FT runs at ``lr * optim.full_lr_ratio``).
"""

from __future__ import annotations

import ml_collections

from experiments.configs import common
from lora_jax import rules


def get_config(arg: str = "tiny") -> ml_collections.ConfigDict:
  """The config of one sweep point; ``arg`` is ``tiny`` or ``key=value`` pairs (see the module docstring)."""
  args = common.parse_arg(arg, tiny=False, model="", method="both", rank=16, lr=0.0)
  lora_lr, full_lr_ratio = (3e-3, 0.3) if args.tiny else (4.91e-4, 0.1)  # Default LRs: LoRA's; full FT's / LoRA's.
  config = ml_collections.ConfigDict()
  config.seed = 0  # Seed of adapter init and adapter dropout.
  config.data_seed = 0  # Seed of the training data's order (shuffling, mixing).
  config.eval_seed = 0  # Seed of which examples are held out for evaluation.
  config.methods = {"lora": ("lora",), "full": ("full",), "both": ("lora", "full")}[args.method]  # Runs to make.

  config.model = ml_collections.ConfigDict()
  config.model.name = "tiny" if args.tiny else args.model  # "tiny" (built-in, pretrained here) or HF dir / hub id.
  config.model.dtype = "float32"  # Compute dtype (bfloat16 on accelerators).
  config.model.param_dtype = "float32"  # Dtype the frozen base is stored in.
  config.model.scan_layers = False  # Stack layers with nn.scan (faster compiles for deep models).
  # Per-layer rematerialisation: "none" (keep every activation), "full" (keep each layer's input, recompute the layer
  # in the backward pass: least memory) or "save_matmuls" (keep the projections' outputs, recompute the rest).
  config.model.remat = "none"
  # Attention kernel: "auto" (TPU splash / GPU cuDNN flash attention / else exact), "xla", "cudnn" or "splash".
  config.model.attention = "auto"
  # Loss over this many sequence positions at a time, never the full [batch, seq, vocab] logits; 0 = full logits.
  config.model.loss_chunk_size = 0 if args.tiny else 256

  config.data = ml_collections.ConfigDict()
  config.data.train = ("synthetic:arithmetic",) if args.tiny else ("allenai/tulu-3-sft-mixture",)  # Sources (path[:weight]).
  config.data.eval_size = 64 if args.tiny else 1000  # Held-out examples per source for eval NLL.
  config.data.eval_split = "held_out"  # Eval on examples never trained on, or "train": a sample of the training
  # examples themselves (memorisation, e.g. the capacity family); eval_size >= the source's size then takes all.
  config.data.seq_len = 64 if args.tiny else 2048  # Tokens per packed row.
  config.data.batch_size = 16 if args.tiny else 128  # Rows per optimizer step (global, all hosts).
  config.data.template = "alpaca"  # Prompt template for Alpaca-style records.
  config.data.train_on_inputs = False  # Also put loss on prompt tokens.
  config.data.packing = True  # Pack several examples per row (segment ids keep them apart).
  config.data.overflow = "error"  # A prompt too long for seq_len: "error" (stop, naming it) or "skip" (and count).
  config.data.cache_dir = ".cache/lora_jax/tokenized"  # Where tokenised data is cached.
  config.data.synthetic_examples = 3000  # Records generated for synthetic:* sources.
  config.data.synthetic_seed = 0  # Seed of those records, i.e. of the data itself (+ 1: the accuracy eval's sums).
  config.data.synthetic_max_operand = 99  # Largest operand of synthetic:sums problems.

  config.lora = common.lora_defaults(rank=args.rank)  # lora.LoraSpec fields.
  config.moe_expert_rank = "total/active"  # MoE: rank per expert = rank / experts per token (the study's) | "same".
  # QLoRA: LoRA runs on a base whose linear layers (not the head) are stored quantized, dequantized layer by layer
  # (lora_jax.quant): kind "none" | "nf4" (bitsandbytes' NF4) | "int8"; block_size values share one absmax; double_quant
  # also codes the absmaxes in 8 bits. Full FT always trains the full-precision base.
  config.quant = ml_collections.ConfigDict({"kind": "none", "block_size": 64, "double_quant": False})

  config.optim = ml_collections.ConfigDict()
  # The LR of the method(s) run, exactly as `lr=` gives it; with both, LoRA's (study: ~10x full FT's).
  config.optim.lr = args.lr or (lora_lr * full_lr_ratio if args.method == "full" else lora_lr)
  config.optim.full_lr_ratio = full_lr_ratio  # Only when both methods run: full FT's LR = lr * this (study: 1/10;
  # the tiny model prefers ~1/3, as a public toy reproduction of the study also found).
  config.optim.schedule = "constant"  # The study's schedule.
  config.optim.warmup_steps = 0  # Linear warm-up steps.
  config.optim.b1 = 0.9  # Adam beta1.
  config.optim.b2 = 0.999  # Adam beta2.
  config.optim.eps = 1e-8  # Adam epsilon.
  config.optim.weight_decay = 0.0  # AdamW decay (0 = Adam, the study's).
  config.optim.grad_clip_norm = ml_collections.config_dict.placeholder(float)  # None = no clipping.
  config.optim.lr_b_ratio = 1.0  # LoRA+: LR of B relative to A.

  config.train = ml_collections.ConfigDict()
  config.train.steps = 300 if args.tiny else 780  # Optimizer steps.
  config.train.grad_accum = 1  # Micro-batches per step.
  config.train.log_every = 10  # Steps between train metric records.
  config.train.eval_every = 50 if args.tiny else 100  # Steps between evaluations.
  config.train.checkpoint_every = 100  # Steps between checkpoints.
  config.train.keep_checkpoints = 2  # Checkpoints kept.
  config.train.collapse_steps = 20  # Stop when the gradient is exactly 0 this many steps in a row (0 = never).
  # Steps per jitted call (cut to divide eval_every and checkpoint_every): the tiny model's step is short enough
  # that per-step host work would cost ~30% of it; a real model's is not (and SIGTERM waits for the call in flight).
  config.train.steps_per_call = 10 if args.tiny else 1

  config.mesh = ml_collections.ConfigDict({"data": 1, "fsdp": -1, "tensor": 1})  # Device mesh; -1 = the rest.
  config.sharding_rules = ml_collections.ConfigDict(rules.DEFAULT_RULES)  # Logical axis -> mesh axis (or None).

  config.eval = ml_collections.ConfigDict()
  config.eval.arithmetic_examples = 64 if args.tiny else 0  # Greedy exact-match accuracy on held-out sums; 0 = off.
  config.eval.max_new_tokens = 8  # Generation budget of that eval.

  config.tiny_base = common.tiny_base_config()  # Used when model.name == "tiny".
  config.wandb = ml_collections.ConfigDict({"project": ""})  # W&B project; empty = off.
  return config


def get_sweep(arg: str = "") -> list[str]:
  """Sweep points: ``tiny`` (CPU, a few ranks), ``real`` (the study's rank grid on Llama-3.2-1B), or both (no arg)."""
  variants = {
      "tiny": [f"tiny,method=lora,rank={r}" for r in (1, 4, 16)] + ["tiny,method=full"],
      "real": [f"model=meta-llama/Llama-3.2-1B,method=lora,rank={r}" for r in (1, 4, 16, 64, 256)]
              + ["model=meta-llama/Llama-3.2-1B,method=full"],
  }
  if arg and arg not in variants:
    raise ValueError(f"unknown sweep variant {arg!r}; valid: {sorted(variants)} (or none for all)")
  return variants[arg] if arg else variants["tiny"] + variants["real"]


def study_point(cpu: bool, model: str, method: str, rank: int, lr: float, seed: int) -> ml_collections.ConfigDict:
  """One run of a study family: ``finetune``'s config for one method at one rank, LR and seed, with the study's CPU
  setting when ``cpu`` (the calibrated one: the study base and the dialect task, 500 held-out answers; see
  ``lr_sweep``'s docstring)."""
  if method not in ("lora", "full"):
    raise ValueError(f"method must be lora or full (one run per sweep point), got {method!r}")
  config = get_config(("tiny," if cpu else f"model={model},") + f"method={method},rank={rank},lr={lr}")
  config.seed = seed  # Adapter init and dropout.
  config.data_seed = seed  # Training order: a seed is one draw of both.
  config.eval_seed = 0  # The held-out set is the same for every point.
  if cpu:
    common.study_base(config.tiny_base)
    # The calibrated setting (docs/results/calibration/dialect_known10): 10,500 dialect answers, 500 held out, the
    # rest ~one epoch in 300 steps at batch 16 (1.7 answers a row), as the study.
    config.data.train = ("synthetic:dialect",)
    config.data.synthetic_examples = 10_500
    config.data.eval_size = 500  # Held-out answers: the NLL's sampling error well below the seed noise.
    config.eval.arithmetic_examples = 0  # The study's metric is held-out NLL.
    config.train.eval_every = 25  # 50% and 75% of the steps are evaluations (analysis.RULE_STABLE)
    config.train.checkpoint_every = 1000  # Points are short: a checkpoint at the end (always) and every 1000 steps.
  else:  # GPU/TPU: bf16 base and compute (trained values and Adam moments stay fp32), scanned and rematerialised
    config.model.dtype = config.model.param_dtype = "bfloat16"  # layers, as benchmarks/fit.py plans memory for
    config.model.scan_layers = True
    config.model.remat = "full"  # Keep only each layer's input; recompute the layer in the backward pass.
  return config
