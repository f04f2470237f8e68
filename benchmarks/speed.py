"""Training speed side by side: lora_jax (full FT and LoRA ranks) vs PEFT+PyTorch and naive merged LoRA, same shapes.

    python -m benchmarks.speed [--shapes 256,1024,2048 | 1b,8b] [--ranks 1,16,64,256] [--peers peft,merged,dora]
        [--repeats 3] [--out benchmarks/results/speed.json]

For each Llama-shaped model (``--shapes``: a hidden size on CPU, ``1b`` / ``8b`` for Llama-3.2-1B / Llama-3.1-8B
shapes in bf16 on a GPU; the shapes are in ``SHAPES``) it times, in this one process, on the same random batch:

- ``lora_jax full`` and ``lora_jax LoRA rR``: the project's real jitted train step (``train.setup``: forward,
  backward, Adam, mixed precision), LoRA on every attention and MLP matrix;
- ``merged LoRA rR`` (``--peers merged``): the naive x·(W + s·A·B) form in JAX, same loss and optimizer;
- ``PEFT full`` / ``PEFT LoRA rR`` (``--peers peft``): transformers' LlamaForCausalLM (eager, SDPA attention) with
  PEFT's LoRA on the same modules, torch Adam; on a GPU, CUDA with bf16 autocast (fp32 trainables, as ours);
- ``lora_jax DoRA rR`` and, with ``peft``, ``PEFT DoRA rR`` (``--peers dora``): DoRA at the LoRA rank (r16 when
  swept), each framework's ratio to its own LoRA step in ``time_vs_lora`` (goal for ours: <= 1.2 on CPU at hidden 1024).

Each variant is compiled/built and run once (warm-up), then all variants are run in turn ``--repeats`` times
(interleaved, so load from other jobs hits them alike); the median step time gives tokens/s (every processed token).
FLOPs are XLA's ``cost_analysis`` of the compiled step (PEFT's are lora_jax's count of the same method, i.e. the
useful work); achieved FLOP/s is shown as a fraction of the device's matmul peak measured in this run (best of
repeated large matmuls in the compute dtype). Memory is XLA's plan of the compiled step (arguments + outputs +
temporaries - aliased), or torch's peak allocation on CUDA (not measured for torch on CPU). Ratios are within one
shape: step time vs lora_jax full FT, tokens/s vs PEFT's same method. Writes ``--out`` (JSON; ``python -m
benchmarks.results`` then regenerates ``benchmarks/RESULTS.md`` from the results folder); the last line is
``lora_jax LoRA vs PEFT tokens/s: X (hidden H, rR)``.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import json
import os
import pathlib
import platform
import statistics
import sys
import time

import numpy as np

RESULTS_DIR = pathlib.Path(__file__).parent / "results"
RESULTS = RESULTS_DIR / "speed.json"
PACKAGES = ("jax", "jaxlib", "flax", "optax", "torch", "peft", "transformers", "numpy")


@dataclasses.dataclass(frozen=True)
class Shape:
  """One benchmark model and batch: a Llama-shaped config (``flops.llama_shaped``) or a released model's preset."""

  name: str  # "256", "1024", ... (hidden size) or "1b", "8b".
  hidden: int  # Hidden size (for a preset, the preset's).
  layers: int  # Decoder layers.
  batch: int  # Rows per step.
  seq: int  # Tokens per row.
  vocab: int = 32000  # Vocabulary (a preset's own).
  preset: str = ""  # ModelConfig preset (hub id); empty = llama_shaped(hidden, layers, vocab).
  dtype: str = "float32"  # Compute and frozen-weight dtype (trainables and Adam stay float32).
  remat: bool = False  # Rematerialise layers (memory).
  methods: tuple[str, ...] = ("full", "lora")  # full FT is skipped where it cannot fit (8b).


SHAPES = {
    "tiny": Shape("tiny", 64, 2, 2, 32, 256),  # seconds on a CPU: the test and gpu_check.sh's dry run
    # CPU: hidden 1024 is benchmarks/flops.py's model (4 layers, vocab 32000) at a quarter of its batch (2 x 256,
    # not 4 x 512), so that the whole CPU table runs in ~15 minutes on 2 shared cores.
    "256": Shape("256", 256, 4, 4, 512),
    "1024": Shape("1024", 1024, 4, 2, 256),
    "2048": Shape("2048", 2048, 2, 2, 256),
    # GPU (bf16): the study's models.
    "1b": Shape("1b", 2048, 16, 4, 2048, 128256, "meta-llama/Llama-3.2-1B", "bfloat16"),
    "8b": Shape("8b", 4096, 32, 2, 2048, 128256, "meta-llama/Llama-3.1-8B", "bfloat16", remat=True,
                methods=("lora",)),
}
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")  # attention + MLP


def model_config(shape: Shape):
  """The ``transformer.ModelConfig`` of a shape."""
  from benchmarks import flops
  from lora_jax.models import transformer

  if shape.preset:
    return transformer.ModelConfig.from_preset(shape.preset, dtype=shape.dtype, param_dtype=shape.dtype,
                                               remat=shape.remat, scan_layers=shape.remat)
  return flops.llama_shaped(shape.hidden, shape.layers, shape.vocab).replace(dtype=shape.dtype,
                                                                             param_dtype=shape.dtype)


def matmul_peak(dtype: str, gpu: bool, repeats: int = 5) -> float:
  """The device's measured matmul FLOP/s: the best of ``repeats`` large square-ish matmuls in ``dtype``."""
  import jax
  import jax.numpy as jnp

  m, n = (16384, 8192) if gpu else (2048, 2048)
  a = jax.random.normal(jax.random.key(0), (m, n), dtype)
  b = jax.random.normal(jax.random.key(1), (n, n), dtype) / np.sqrt(n)
  f = jax.jit(jnp.dot)
  f(a, b).block_until_ready()
  best = float("inf")
  for _ in range(repeats):
    t = time.perf_counter()
    f(a, b).block_until_ready()
    best = min(best, time.perf_counter() - t)
  return 2 * m * n * n / best


def random_batch(shape: Shape, vocab: int) -> dict[str, np.ndarray]:
  """Random tokens (seed 0): inputs, next-token targets and a loss mask of ones, [batch, seq]."""
  tokens = np.random.default_rng(0).integers(0, vocab, size=(shape.batch, shape.seq + 1), dtype=np.int32)
  return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "loss_mask": np.ones((shape.batch, shape.seq),
                                                                                     np.float32)}


class JaxVariant:
  """A compiled JAX train step ``step(frozen, state_without_frozen, batch)`` with its state, run one step a call."""

  def __init__(self, name, jitted, frozen, state, batch):
    import jax

    self.name, self.frozen, self.state = name, frozen, state
    self.batch = jax.device_put(batch)
    compiled = jitted.lower(frozen, state, self.batch).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    self.flops = float(cost["flops"])
    mem = compiled.memory_analysis()
    self.memory_bytes = int(mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
                            + mem.temp_size_in_bytes)
    self.compiled = compiled

  def step(self) -> float:
    """Runs one step to completion; returns its wall time (s) and keeps the loss."""
    import jax

    t = time.perf_counter()
    self.state, metrics = self.compiled(self.frozen, self.state, self.batch)
    jax.block_until_ready((self.state, metrics))
    self.loss = float(metrics["train/loss"])
    return time.perf_counter() - t

  def close(self):
    """Frees the state."""
    self.state = self.frozen = self.compiled = None


def lora_jax_variants(shape: Shape, config, ranks, merged: bool, batch, dora: bool = False):
  """The project's train step for full FT and each LoRA rank (``train.setup``), DoRA, plus naive merged LoRA."""
  import jax
  import jax.numpy as jnp

  from lora_jax import lora, optim, train
  from lora_jax.models import transformer

  optim_config = optim.OptimConfig(lr=1e-5)
  params = jax.jit(transformer.init_params, static_argnums=0)(config, jax.random.key(0))
  out = []
  if "full" in shape.methods:
    own = jax.tree.map(jnp.copy, params)  # full FT donates its trained weights: not the LoRA runs' shared base
    s = train.setup(config, lora.LoraSpec.full(), optim_config, own)
    out.append(JaxVariant("lora_jax full", s.train_step, s.state.frozen, s.state.replace(frozen=None), batch))
    del own, s
  if "lora" not in shape.methods:
    return out
  for r in ranks:
    s = train.setup(config, lora.LoraSpec(rank=r, targets=TARGETS), optim_config, params)
    out.append(JaxVariant(f"lora_jax LoRA r{r}", s.train_step, s.state.frozen, s.state.replace(frozen=None), batch))
  if dora:
    r = 16 if 16 in ranks else ranks[0]
    s = train.setup(config, lora.LoraSpec(rank=r, targets=TARGETS, variant="dora"), optim_config, params)
    out.append(JaxVariant(f"lora_jax DoRA r{r}", s.train_step, s.state.frozen, s.state.replace(frozen=None), batch))
  if merged:
    r = 16 if 16 in ranks else ranks[0]
    s = train.setup(config, lora.LoraSpec(rank=r, targets=TARGETS), optim_config, params)
    step = jax.jit(merged_train_step(s.model, optim.make_optimizer(optim_config)), donate_argnums=(1,))
    out.append(JaxVariant(f"merged LoRA r{r}", step, s.state.frozen, s.state.replace(frozen=None), batch))
  return out


def merged_train_step(model, tx):
  """A train step of the naive LoRA form x·(W + s·A·B) (``lora.merge`` inside the loss), same loss and Adam."""
  import jax
  import jax.numpy as jnp
  import optax

  from lora_jax import lora

  def step(frozen, state, batch):
    def loss(trainable):
      params, adapters = lora.combine(trainable, frozen)
      merged, _ = lora.merge(params, adapters)
      logits = model.apply({"params": merged}, batch["inputs"]).astype(jnp.float32)
      nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), batch["targets"][..., None], axis=-1)[..., 0]
      return jnp.sum(nll * batch["loss_mask"]) / jnp.maximum(jnp.sum(batch["loss_mask"]), 1.0)

    value, grads = jax.value_and_grad(loss)(state.trainable)
    updates, opt_state = tx.update(grads, state.opt_state, state.trainable)
    return (state.replace(step=state.step + 1, trainable=optax.apply_updates(state.trainable, updates),
                          opt_state=opt_state), {"train/loss": value})

  return step


class PeftVariant:
  """transformers' LlamaForCausalLM (+ PEFT LoRA) with torch Adam on the same shapes and batch."""

  def __init__(self, name, config, rank, batch, cuda: bool, bf16: bool, dora: bool = False):
    import peft
    import torch
    import transformers

    self.name, self.torch, self.cuda = name, torch, cuda
    device = "cuda" if cuda else "cpu"
    hf_config = transformers.LlamaConfig(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers, num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_kv_heads, head_dim=config.head_dim, rms_norm_eps=config.rms_norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": config.rope_theta},
        tie_word_embeddings=config.tie_word_embeddings, max_position_embeddings=max(8192, batch["inputs"].shape[1]),
        attn_implementation="sdpa")
    torch.manual_seed(0)
    # Full FT keeps fp32 weights (bf16 autocast computes); LoRA's frozen base is stored in the compute dtype.
    base_dtype = torch.bfloat16 if bf16 and rank else torch.float32
    model = transformers.LlamaForCausalLM(hf_config).to(device=device, dtype=base_dtype)
    if rank:
      model = peft.get_peft_model(model, peft.LoraConfig(r=rank, lora_alpha=32, target_modules=list(TARGETS),
                                                         lora_dropout=0.0, use_dora=dora))
    self.model = model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    self.opt = torch.optim.Adam(trainable, lr=1e-5, **({"fused": True} if cuda else {"foreach": True}))
    self.bf16 = bf16
    self.inputs = torch.from_numpy(batch["inputs"].astype(np.int64)).to(device)
    self.targets = torch.from_numpy(batch["targets"].astype(np.int64)).to(device)
    self.mask = torch.from_numpy(batch["loss_mask"]).to(device)
    self.flops = None
    self.memory_bytes = None

  def step(self) -> float:
    """One forward, backward and Adam step to completion; returns its wall time (s)."""
    torch = self.torch
    if self.cuda:
      torch.cuda.synchronize()
    t = time.perf_counter()
    with torch.autocast("cuda" if self.cuda else "cpu", dtype=torch.bfloat16, enabled=self.bf16):
      logits = self.model(input_ids=self.inputs).logits
    nll = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), self.targets.flatten(), reduction="none")
    loss = (nll * self.mask.flatten()).sum() / self.mask.sum().clamp(min=1.0)
    loss.backward()
    self.opt.step()
    self.opt.zero_grad(set_to_none=True)
    if self.cuda:
      torch.cuda.synchronize()
    self.loss = loss.detach().item()
    return time.perf_counter() - t

  def close(self):
    """Frees the model and optimizer."""
    self.model = self.opt = None
    if self.cuda:
      self.torch.cuda.empty_cache()


def measure_shape(shape: Shape, ranks, peers, repeats: int, gpu: bool, peak: float) -> list[dict]:
  """Builds every variant of one shape, warms each up, times ``repeats`` interleaved rounds; one row per variant."""
  import jax

  config = model_config(shape)
  batch = random_batch(shape, config.vocab_size)
  tokens = shape.batch * shape.seq
  bf16 = shape.dtype == "bfloat16"
  variants = lora_jax_variants(shape, config, ranks, "merged" in peers, batch, "dora" in peers and "lora" in
                               shape.methods)
  for v in variants:  # warm-up
    v.step()
  if "peft" in peers:
    import torch

    cuda = gpu and torch.cuda.is_available()
    if gpu and not cuda:
      raise SystemExit("--peers peft on a GPU needs the CUDA build of torch (torch.cuda.is_available() is False)")
    rank = 16 if 16 in ranks else ranks[0]
    kinds = list(shape.methods) + (["dora"] if "dora" in peers and "lora" in shape.methods else [])
    for method in kinds:
      held = torch.cuda.memory_allocated() if cuda else 0  # the other torch variants' memory
      if cuda:
        torch.cuda.reset_peak_memory_stats()
      name = {"full": "PEFT full", "lora": f"PEFT LoRA r{rank}", "dora": f"PEFT DoRA r{rank}"}[method]
      variants.append(PeftVariant(name, config, 0 if method == "full" else rank, batch, cuda, bf16,
                                  dora=method == "dora"))
      variants[-1].step()  # warm-up: allocator, kernel selection, Adam state
      if cuda:
        variants[-1].memory_bytes = int(torch.cuda.max_memory_allocated()) - held
  times = {v.name: [] for v in variants}
  for _ in range(repeats):
    for v in variants:
      times[v.name].append(v.step())
  count = {v.name: v.flops for v in variants if v.flops is not None}
  rows = []
  for v in variants:
    flops = v.flops if v.flops is not None else count.get(v.name.replace("PEFT", "lora_jax"))
    t = statistics.median(times[v.name])
    rows.append({"shape": shape.name, "variant": v.name, "step_s": t, "times_s": times[v.name],
                 "tokens_per_s": tokens / t, "xla_flops": flops, "flops_are_lora_jax_count": v.flops is None,
                 "flops_per_s": flops / t if flops else None, "peak_fraction": flops / t / peak if flops else None,
                 "memory_bytes": v.memory_bytes, "loss": v.loss})
    v.close()
  del variants
  jax.clear_caches()
  full = next((r for r in rows if r["variant"] == "lora_jax full"), None)
  for r in rows:
    r["time_vs_full"] = r["step_s"] / full["step_s"] if full else None
    peft_name = r["variant"].replace("lora_jax", "PEFT")
    peft = next((p for p in rows if p["variant"] == peft_name and r["variant"].startswith("lora_jax")), None)
    r["tokens_per_s_vs_peft"] = r["tokens_per_s"] / peft["tokens_per_s"] if peft else None
    lora_row = next((x for x in rows if x["variant"] == r["variant"].replace("DoRA", "LoRA")), None)
    r["time_vs_lora"] = r["step_s"] / lora_row["step_s"] if "DoRA" in r["variant"] and lora_row else None
  return rows


def versions() -> dict:
  """Installed versions of the packages compared."""
  out = {}
  for p in PACKAGES:
    try:
      out[p] = importlib.metadata.version(p)
    except importlib.metadata.PackageNotFoundError:
      out[p] = None
  return out


def _fmt(x, spec, missing="-"):
  return missing if x is None else format(x, spec)


def speed_table(result: dict) -> str:
  """The Markdown table of a speed result."""
  dora = any(r.get("time_vs_lora") for r in result["rows"])  # a DoRA column only when DoRA ran
  lines = ["| shape | variant | s/step | tokens/s | XLA GFLOP | achieved GFLOP/s | of matmul peak | memory GiB | "
           "time vs lora_jax full FT | tokens/s vs PEFT |" + (" time vs own LoRA |" if dora else ""),
           "|---|---|---|---|---|---|---|---|---|---|" + ("---|" if dora else "")]
  shapes = {s["name"]: s for s in result["shapes"]}
  for r in result["rows"]:
    s = shapes[r["shape"]]
    label = f"{s['preset'] or 'hidden ' + str(s['hidden'])}, {s['layers']}L, {s['batch']}x{s['seq']}"
    star = "*" if r["flops_are_lora_jax_count"] and r["xla_flops"] else ""
    lines.append(f"| {label} | {r['variant']} | {r['step_s']:.3f} | {r['tokens_per_s']:.0f} | "
                 f"{_fmt(r['xla_flops'] and r['xla_flops'] / 1e9, '.4g')}{star} | "
                 f"{_fmt(r['flops_per_s'] and r['flops_per_s'] / 1e9, '.3g')}{star} | "
                 f"{_fmt(r['peak_fraction'] and 100 * r['peak_fraction'], '.0f')}{'%' if r['peak_fraction'] else ''} | "
                 f"{_fmt(r['memory_bytes'] and r['memory_bytes'] / 2**30, '.2f')} | {_fmt(r['time_vs_full'], '.2f')} | "
                 f"{_fmt(r['tokens_per_s_vs_peft'], '.2f')} |" + (f" {_fmt(r.get('time_vs_lora'), '.2f')} |" if dora
                                                                else ""))
  return "\n".join(lines)


def headline(result: dict) -> str:
  """``lora_jax LoRA vs PEFT tokens/s: X (hidden H, rR)`` for hidden 1024 (else the first shape) at r16."""
  rows = [r for r in result["rows"] if r["variant"].startswith("lora_jax LoRA") and r["tokens_per_s_vs_peft"]]
  if not rows:
    return "lora_jax LoRA vs PEFT tokens/s: not measured (no PEFT peer)"
  pick = next((r for r in rows if r["shape"] == "1024"), rows[0])
  shape = next(s for s in result["shapes"] if s["name"] == pick["shape"])
  where = f"hidden {shape['hidden']}" if not shape["preset"] else f"{shape['preset']} shape"
  return (f"lora_jax LoRA vs PEFT tokens/s: {pick['tokens_per_s_vs_peft']:.2f} ({where}, "
          f"{pick['variant'].rsplit(' ', 1)[1]})")


# Nominal dense bf16 matmul peaks (FLOP/s) by jax device_kind prefix, for MFU against the datasheet as well.
NOMINAL_BF16_PEAK = {"NVIDIA H100": 989e12, "NVIDIA H200": 989e12, "NVIDIA A100": 312e12}
GOALS = {"mfu": 0.5, "vs_peft": 1.5}  # the GPU goals for LoRA r16 at the ~1B shape


def mfu_report(result: dict) -> list[str]:
  """MFU lines of a speed result: each lora_jax variant's XLA FLOP/s over the measured and the nominal peak, and
  the GPU goals (LoRA r16 >= 50% MFU, >= 1.5x PEFT's tokens/s) where they apply."""
  nominal = next((v for k, v in NOMINAL_BF16_PEAK.items() if result["device"].startswith(k)), None)
  lines = []
  for r in result["rows"]:
    if not r["variant"].startswith("lora_jax") or not r["flops_per_s"]:
      continue
    measured = r["flops_per_s"] / result["matmul_peak_flops"]
    line = (f"MFU {r['shape']} {r['variant']}: {measured:.1%} of the measured {result['compute_dtype_of_peak']} "
            f"matmul peak ({result['matmul_peak_flops'] / 1e12:.3g} TFLOP/s)")
    if nominal and result["compute_dtype_of_peak"] == "bfloat16":
      line += f", {r['flops_per_s'] / nominal:.1%} of the nominal {nominal / 1e12:.0f} TFLOP/s"
    if r["tokens_per_s_vs_peft"]:
      line += f"; {r['tokens_per_s_vs_peft']:.2f}x PEFT's tokens/s"
    if r["variant"] == "lora_jax LoRA r16" and r["shape"] == "1b":
      met = measured >= GOALS["mfu"] and (r["tokens_per_s_vs_peft"] or 0) >= GOALS["vs_peft"]
      line += (f" (goal >= {GOALS['mfu']:.0%} MFU and >= {GOALS['vs_peft']}x PEFT: "
               f"{'met' if met else 'not met'})")
    lines.append(line)
  return lines


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--shapes", default=None, help=f"comma-separated of {list(SHAPES)} (default: 256,1024,2048 "
                      "on CPU, 1b,8b on a GPU)")
  parser.add_argument("--ranks", default="1,16,64,256", help="LoRA ranks at hidden 1024 and tiny (and on GPU); "
                      "the other CPU shapes time r16 only")
  parser.add_argument("--peers", default="peft,merged", help="comma-separated of peft, merged, dora (or none)")
  parser.add_argument("--repeats", type=int, default=3, help="timed steps per variant (after one warm-up step)")
  parser.add_argument("--out", type=pathlib.Path, default=RESULTS)
  parser.add_argument("--mfu", type=pathlib.Path, help="only print the MFU lines of this speed.json")
  args = parser.parse_args(argv)
  if args.mfu:
    print("\n".join(mfu_report(json.loads(args.mfu.read_text()))))
    return
  import jax

  gpu = jax.default_backend() == "gpu"
  names = (args.shapes or ("1b,8b" if gpu else "256,1024,2048")).split(",")
  unknown = [n for n in names if n not in SHAPES]
  if unknown:
    raise SystemExit(f"--shapes: unknown {unknown}; valid: {list(SHAPES)}")
  ranks = [int(r) for r in args.ranks.split(",")]
  peers = [] if args.peers == "none" else args.peers.split(",")
  bad = [p for p in peers if p not in ("peft", "merged", "dora")]
  if bad:
    raise SystemExit(f"--peers: unknown {bad}; valid: peft, merged, dora (or none)")
  if args.repeats < 1:
    raise SystemExit(f"--repeats must be >= 1, got {args.repeats}")
  peak_dtype = "bfloat16" if gpu else "float32"
  peak = matmul_peak(peak_dtype, gpu)
  print(f"device {jax.devices()[0].device_kind} ({jax.default_backend()}); matmul peak {peak / 1e9:.1f} GFLOP/s "
        f"({peak_dtype})", flush=True)
  loadavg, rows = [os.getloadavg()], []

  def record(done):  # after every shape, so that a long run interrupted late keeps what it measured
    result = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "device": jax.devices()[0].device_kind,
              "platform": f"{jax.default_backend()}, {platform.processor() or platform.machine()}, "
                          f"{os.cpu_count()} CPUs",
              "command": "python -m benchmarks.speed " + " ".join(sys.argv[1:] if argv is None else argv),
              "versions": versions(), "matmul_peak_flops": peak, "compute_dtype_of_peak": peak_dtype,
              "repeats": args.repeats, "loadavg": loadavg, "ranks": ranks, "peers": peers,
              "shapes": [dataclasses.asdict(SHAPES[n]) for n in done], "rows": rows}
    if args.out:
      args.out.parent.mkdir(parents=True, exist_ok=True)
      args.out.write_text(json.dumps(result, indent=2) + "\n")
    return result

  for i, name in enumerate(names):
    shape = SHAPES[name]
    shape_ranks = ranks if gpu or name in ("1024", "tiny") else [16]
    rows += measure_shape(shape, shape_ranks, peers, args.repeats, gpu, peak)
    loadavg.append(os.getloadavg())
    for r in rows:
      if r["shape"] == name:
        print(f"{name:>6} {r['variant']:<20} {r['step_s']:8.3f} s/step {r['tokens_per_s']:10.0f} tok/s "
              f"{_fmt(r['peak_fraction'] and 100 * r['peak_fraction'], '5.1f')}% of peak", flush=True)
    record(names[:i + 1])
  peak = max(peak, matmul_peak(peak_dtype, gpu))  # and again at the end: the best seen
  for r in rows:
    r["peak_fraction"] = r["flops_per_s"] / peak if r["flops_per_s"] else None
  result = record(names)
  if args.out:
    print(f"recorded in {args.out}")
  print(speed_table(result))
  print("\n".join(mfu_report(result)))
  print(headline(result))


if __name__ == "__main__":
  main()
