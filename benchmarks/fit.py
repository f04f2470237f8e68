"""Will it fit? Per-device memory of one train step, planned before renting hardware.

    python -m benchmarks.fit --model meta-llama/Llama-3.1-8B --method lora --rank 16 --batch 32 --seq 2048 \\
        --mesh fsdp=-1 --devices 16 [--platform tpu --topology v5e:4x4] [--hbm-gib 16]

``--method qlora`` plans LoRA on an NF4 base (``lora_jax.quant``: block 64, double quantization, every linear layer
but the output head, as QLoRA), whose quantized kernels are replicated on every device.

Compiles the real train step (``lora_jax.train``: forward, backward, Adam, explicit shardings from
``lora_jax.sharding``) ahead of time from abstract shapes — no weights are downloaded or allocated — for a target
device count, and prints XLA's memory analysis per device: arguments (params, adapters, optimizer state, batch),
outputs, temporaries (activations, gradients) and their sum, and whether that fits ``--hbm-gib``.

Devices: ``--platform cpu`` (default) uses N fake CPU devices (XLA's CPU buffer assignment: a close, not exact,
stand-in for an accelerator); ``--platform tpu --topology v5e:4x4`` compiles for a real TPU topology with
``libtpu`` (``pip install libtpu``; an optional dependency of this planner only). ``--model`` is a preset hub id
(``ModelConfig.from_preset``) or a local HF directory (its config.json). Parameters and compute are bf16, trained
values and Adam moments fp32 (the trainer's mixed precision). How the model runs is the ModelConfig's:
``--attention`` (auto: the splash kernel on TPU, the exact scores on CPU), ``--loss-chunk-size`` (0: full logits),
``--remat`` (none / full / save_matmuls) and ``--no-scan``.

``--table docs/memory_cases.json`` compiles the docs table's cases (``table_cases``: before/after issue 10, sequence
8192, larger batches, remat policies) for TPU v5e, caching each result in that JSON file (minutes per case on a CPU
host; resumable); ``--table ... --markdown`` prints the table that docs/memory.md shows.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import re
import sys
import time

GIB = 2**30
TABLE_MODELS = ("meta-llama/Llama-3.2-1B", "meta-llama/Llama-3.1-8B", "Qwen/Qwen3-8B")


def parse_mesh(text: str) -> dict[str, int]:
  """``fsdp=8,tensor=2`` -> {"fsdp": 8, "tensor": 2}."""
  out = {}
  for part in filter(None, text.split(",")):
    key, _, value = part.partition("=")
    out[key.strip()] = int(value)
  return out


def devices_for(platform: str, count: int, topology: str | None):
  """The target devices: N fake CPU devices, or the abstract devices of a TPU topology."""
  import jax

  if platform == "tpu":
    from jax.experimental import topologies

    devices = topologies.get_topology_desc(platform="tpu", topology_name=topology).devices
    if count and len(devices) != count:
      raise SystemExit(f"topology {topology} has {len(devices)} devices, not --devices {count}")
    return list(devices)
  devices = jax.devices("cpu")
  if len(devices) < count:
    raise SystemExit(f"only {len(devices)} CPU devices; run through main() so XLA_FLAGS asks for {count}")
  return devices[:count]


# How the model runs: before (exact attention scores, full logits) and after issue 10 (kernels, chunked loss).
BEFORE = dict(attention="xla", loss_chunk_size=0, remat="full", scan_layers=True)
AFTER = dict(attention="auto", loss_chunk_size=256, remat="full", scan_layers=True)


def plan(model: str, method: str, rank: int, batch: int, seq: int, mesh_shape: dict[str, int], devices,
         attention: str = "xla", loss_chunk_size: int = 0, remat: str = "full", scan_layers: bool = True) -> dict:
  """Compiles the train step for ``devices`` and returns XLA's per-device memory figures (bytes).

  ``attention``, ``loss_chunk_size``, ``remat`` and ``scan_layers`` are the ModelConfig fields of that name;
  ``attention="auto"`` resolves for the target devices' platform (splash on TPU), not this host's: the trainer
  traces its step under the mesh (``train.under_mesh``), as in a real run.
  """
  import jax

  from lora_jax import hf, lora, model_lora, optim, quant, sharding, train
  from lora_jax.models import transformer

  platform = devices[0].platform
  if attention == "splash" and platform != "tpu" or attention == "cudnn" and platform not in ("gpu", "cuda"):
    raise SystemExit(f"--attention {attention} does not compile for {platform} devices; use xla or auto")
  changes = dict(param_dtype="bfloat16", dtype="bfloat16", scan_layers=scan_layers, remat=remat,
                 loss_chunk_size=loss_chunk_size, attention=attention)
  if pathlib.Path(model).is_dir():
    config = hf.load_config(model, **changes)
  else:
    config = transformer.ModelConfig.from_preset(model, **changes)
  # Every matrix incl. the unembedding, with the MoE expert-rank rule: what experiments.main trains.
  spec = model_lora.model_spec(lora.LoraSpec(rank=rank, targets=("all-linear", "unembed")), config) \
      if method in ("lora", "qlora") else lora.LoraSpec.full()
  qspec = quant.QuantSpec("nf4", 64, double_quant=True) if method == "qlora" else None
  mesh = sharding.make_mesh(mesh_shape, devices)
  rows_split = mesh.shape["data"] * mesh.shape["fsdp"]
  if batch % rows_split:
    raise SystemExit(f"--batch {batch} is not divisible by the data x fsdp mesh size {rows_split}")
  # The trainer's own set-up, from abstract params: an abstract state with its shardings, nothing allocated.
  params = transformer.abstract_params(config)
  s = train.setup(config, spec, optim.OptimConfig(lr=1e-4), params, mesh=mesh, quant=qspec)
  lowered = train.lower_steps(s, batch, seq)  # the call the loop runs, one step of it
  with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):  # what the step, traced under this mesh, ran
    ran = transformer.resolve_attention(config, seq, False)
  out = {"trainable": sum(x.size for x in jax.tree.leaves(s.state.trainable)), "attention": ran}
  try:
    m = lowered.compile().memory_analysis()
  except jax.errors.JaxRuntimeError as e:  # the TPU compiler refuses a step that cannot fit its HBM
    found = re.search(r"HLO temporaries \(([\d.]+)G\)", str(e))
    if "RESOURCE_EXHAUSTED" not in str(e) or not found:
      raise
    out.update(arguments=float("nan"), outputs=float("nan"), aliased=float("nan"),
               temporaries=float(found[1]) * GIB, total=float("inf"), oom=str(e).splitlines()[0])
  else:
    out.update(arguments=m.argument_size_in_bytes, outputs=m.output_size_in_bytes,
               temporaries=m.temp_size_in_bytes, aliased=m.alias_size_in_bytes)
    out["total"] = out["arguments"] + out["outputs"] - out["aliased"] + out["temporaries"]
  out["params"] = sum(x.size for x in jax.tree.leaves(params))
  out["frozen_bytes"] = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(s.state.frozen))
  return out


TOPOLOGIES = {1: "v5e:1x1", 8: "v5e:2x4", 16: "v5e:4x4", 32: "v5e:4x8"}
SETTINGS = {"before": BEFORE, "after": AFTER, "after, remat none": {**AFTER, "remat": "none"},
            "after, remat save_matmuls": {**AFTER, "remat": "save_matmuls"}}


def table_cases() -> list[dict]:
  """The docs table's compiles, most informative first (each is minutes of TPU compilation on a CPU host)."""
  cases = []

  def add(model, method, n, batch, seq, setting):
    cases.append(dict(model=model, method=method, devices=n, batch=batch, seq=seq, setting=setting))

  one, eight, qwen = TABLE_MODELS
  # The goals: LoRA r16 at 32 x 1024 on 8 chips; Llama-3.1-8B LoRA at 32 x 8192 on <= 32 chips.
  for model in (one, eight):
    add(model, "lora", 8, 32, 1024, "before")
    add(model, "lora", 8, 32, 1024, "after")
  for n in (32, 16, 8):
    add(eight, "lora", n, 32, 8192, "after")
  add(eight, "lora", 32, 32, 8192, "before")
  # Remat policies (layers always scanned), on the 1B model.
  add(one, "lora", 8, 32, 1024, "after, remat none")
  add(one, "lora", 8, 32, 1024, "after, remat save_matmuls")
  # Larger batches at sequence 8192 (the largest that fits is the last "yes" of each group).
  for batch in (64, 128):
    add(eight, "lora", 32, batch, 8192, "after")
  add(eight, "lora", 16, 64, 8192, "after")
  for batch in (32, 64, 128):
    add(one, "lora", 8, batch, 8192, "after")
  # Larger batches at sequence 1024 on 8 chips, before and after.
  for model in (one, eight):
    add(model, "lora", 8, 64, 1024, "before")
    for batch in (128, 256):
      add(model, "lora", 8, batch, 1024, "after")
  # QLoRA (issue 24): does an 8B fine-tune at 8 x 1024 fit one 16 GiB chip? LoRA on the bf16 base beside it.
  for model in (eight, qwen):
    for method in ("qlora", "lora"):
      add(model, method, 1, 8, 1024, "after")
  # The rest of the old table's rows, after.
  for model in TABLE_MODELS:
    for method in ("lora", "full"):
      for n in (8, 16, 32):
        add(model, method, n, 32, 1024, "after")
  unique = []
  for c in cases:
    if c not in unique:
      unique.append(c)
  return unique


def _key(case: dict) -> str:
  return json.dumps(case, sort_keys=True)


def select_cases(cases: list[dict], only: list[str]) -> list[dict]:
  """The cases matching any ``only`` filter (``"devices=8,seq=1024"``), in the order of the filters; all if none."""
  if not only:
    return cases
  chosen = []
  for text in only:
    wanted = dict(part.partition("=")[::2] for part in filter(None, text.split(",")))
    unknown = set(wanted) - set(cases[0])
    if unknown:
      raise SystemExit(f"--only {text}: no case field {sorted(unknown)}; fields are {sorted(cases[0])}")
    chosen += [c for c in cases if c not in chosen and all(str(c[k]) == v for k, v in wanted.items())]
  return chosen


def run_table(cache: pathlib.Path, rank: int, mesh: str, limit_s: float, only: list[str] = ()) -> None:
  """Compiles the table's cases not yet in ``cache`` (a JSON file of results) until ``limit_s`` seconds passed.

  ``only`` restricts and orders the cases (``select_cases``), to compile the chosen ones first.
  """
  done = json.loads(cache.read_text()) if cache.exists() else {}
  start = time.time()
  for case in select_cases(table_cases(), only):
    if _key(case) in done:
      continue
    if time.time() - start > limit_s:
      print(f"stopping: {limit_s:g} s passed; run again to continue", flush=True)
      return
    t = time.time()
    devices = devices_for("tpu", case["devices"], TOPOLOGIES[case["devices"]])
    r = plan(case["model"], case["method"], rank, case["batch"], case["seq"], parse_mesh(mesh), devices,
             **SETTINGS[case["setting"]])
    r["compile_s"] = round(time.time() - t, 1)
    done[_key(case)] = r
    cache.write_text(json.dumps(done, indent=1, sort_keys=True) + "\n")
    print(case, {k: v for k, v in r.items() if k != "oom"}, flush=True)


def _gib(x) -> str:
  return "-" if x != x or x == float("inf") else f"{x / GIB:.2f}"


def table_markdown(cache: pathlib.Path, rank: int, hbm: float) -> str:
  """Markdown rows (one per compiled case) from the results in ``cache``."""
  done = json.loads(cache.read_text())
  lines = ["| model | method | devices | batch x seq | setting | attention | arguments GiB | temporaries GiB | "
           f"total GiB/device | fits {hbm:g} GiB |", "|---|---|---|---|---|---|---|---|---|---|"]
  for case in table_cases():
    r = done.get(_key(case))
    if r is None:
      continue
    if "oom" in r:
      fits = f"no (compiler: {r['temporaries'] / GIB:.1f} GiB of temporaries)"
    else:
      fits = "yes" if r["total"] <= hbm * GIB else "no"
    method = {"full": "full", "lora": f"LoRA r={rank}", "qlora": f"QLoRA r={rank} (NF4)"}[case["method"]]
    lines.append(f"| {case['model']} | {method} | {case['devices']} | {case['batch']} x {case['seq']} | "
                 f"{case['setting']} | {r['attention']} | {_gib(r['arguments'])} | {_gib(r['temporaries'])} | "
                 f"{_gib(r['total'])} | {fits} |")
  return "\n".join(lines) + "\n"


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--model", default="meta-llama/Llama-3.2-1B", help="preset hub id or local HF directory")
  p.add_argument("--method", choices=("lora", "full", "qlora"), default="lora",
                 help="qlora: LoRA on an NF4 base (block 64, double quantization)")
  p.add_argument("--rank", type=int, default=16)
  p.add_argument("--batch", type=int, default=32, help="global rows per step")
  p.add_argument("--seq", type=int, default=2048)
  p.add_argument("--mesh", default="fsdp=-1", help="e.g. fsdp=-1 or fsdp=4,tensor=2 (-1 fills the rest)")
  p.add_argument("--devices", type=int, default=8)
  p.add_argument("--platform", choices=("cpu", "tpu"), default="cpu")
  p.add_argument("--topology", help="TPU topology for --platform tpu, e.g. v5e:2x4, v5e:4x4, v5e:4x8")
  p.add_argument("--hbm-gib", type=float, default=16.0, help="memory per device to check against (v5e: 16)")
  p.add_argument("--attention", choices=("auto", "xla", "cudnn", "splash"), default="auto",
                 help="model.attention ('auto' resolves for the target platform: splash on TPU)")
  p.add_argument("--loss-chunk-size", type=int, default=AFTER["loss_chunk_size"],
                 help="model.loss_chunk_size: sequence positions per loss chunk (0 = full logits)")
  p.add_argument("--remat", choices=("none", "full", "save_matmuls"), default="full", help="model.remat")
  p.add_argument("--no-scan", action="store_true", help="unrolled layers instead of nn.scan")
  p.add_argument("--table", type=pathlib.Path,
                 help="compile the docs table's cases on TPU v5e (results cached in this JSON file, resumable)")
  p.add_argument("--table-limit-s", type=float, default=3600, help="stop starting new table compiles after this")
  p.add_argument("--markdown", action="store_true", help="with --table: print the Markdown table of the cache")
  p.add_argument("--only", action="append", default=[], metavar="FIELD=VALUE[,...]",
                 help="with --table: compile only the cases matching one of these filters, in their order "
                      "(e.g. --only method=full,devices=8 --only model=Qwen/Qwen3-8B,devices=8)")
  args = p.parse_args(argv)
  if args.table:
    if args.markdown:
      print(table_markdown(args.table, args.rank, args.hbm_gib), end="")
    else:
      run_table(args.table, args.rank, args.mesh, args.table_limit_s, args.only)
    return
  if args.platform == "cpu" and "jax" not in sys.modules:
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={args.devices}"
  devices = devices_for(args.platform, args.devices, args.topology)
  r = plan(args.model, args.method, args.rank, args.batch, args.seq, parse_mesh(args.mesh), devices,
           attention=args.attention, loss_chunk_size=args.loss_chunk_size, remat=args.remat,
           scan_layers=not args.no_scan)
  print(f"{args.model}: {args.method} (rank {args.rank}), batch {args.batch} x {args.seq}, mesh {args.mesh} on "
        f"{len(devices)} {args.platform} devices; {r['params']:,} params, {r['trainable']:,} trainable; "
        f"attention {r['attention']}, loss chunk {args.loss_chunk_size}, remat {args.remat}")
  if "oom" in r:
    print(f"does not fit: {r['oom']}")
    return
  for key in ("arguments", "outputs", "aliased", "temporaries", "total"):
    print(f"  {key:<12} {r[key] / GIB:8.3f} GiB per device")
  print(f"fits in {args.hbm_gib:g} GiB: {'yes' if r['total'] <= args.hbm_gib * GIB else 'no'}")


if __name__ == "__main__":
  main()
