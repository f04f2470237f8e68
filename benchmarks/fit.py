"""Will it fit? Per-device memory of one train step, planned before renting hardware.

    python -m benchmarks.fit --model meta-llama/Llama-3.1-8B --method lora --rank 16 --batch 32 --seq 2048 \\
        --mesh fsdp=-1 --devices 16 [--platform tpu --topology v5e:4x4] [--hbm-gib 16]

Compiles the real train step (``lora_jax.train``: forward, backward, Adam, explicit shardings from
``lora_jax.sharding``) ahead of time from abstract shapes — no weights are downloaded or allocated — for a target
device count, and prints XLA's memory analysis per device: arguments (params, adapters, optimizer state, batch),
outputs, temporaries (activations, gradients) and their sum, and whether that fits ``--hbm-gib``.

Devices: ``--platform cpu`` (default) uses N fake CPU devices (XLA's CPU buffer assignment: a close, not exact,
stand-in for an accelerator); ``--platform tpu --topology v5e:4x4`` compiles for a real TPU topology with
``libtpu`` (``pip install libtpu``; an optional dependency of this planner only). ``--model`` is a preset hub id
(``ModelConfig.from_preset``) or a local HF directory (its config.json). Parameters and compute are bf16, trained
values and Adam moments fp32 (the trainer's mixed precision); layers are scanned and rematerialised.
``--table`` writes the docs table (docs/memory.md) for the study's models.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import re
import sys

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
  ``attention="auto"`` resolves for the target devices' platform (splash on TPU), not this host's.
  """
  import jax
  import jax.numpy as jnp

  from lora_jax import hf, lora, optim, sharding, train
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
  if attention == "auto":
    config = config.replace(attention=transformer.resolve_attention(config, seq, False, platform=platform))
  # Every matrix incl. the unembedding, with the MoE expert-rank rule: what experiments.main trains.
  spec = transformer.model_spec(lora.LoraSpec(rank=rank, targets=("all-linear", "unembed")), config) \
      if method == "lora" else lora.LoraSpec.full()
  mesh = sharding.make_mesh(mesh_shape, devices)
  rows_split = mesh.shape["data"] * mesh.shape["fsdp"]
  if batch % rows_split:
    raise SystemExit(f"--batch {batch} is not divisible by the data x fsdp mesh size {rows_split}")
  # The trainer's own set-up, from abstract params: an abstract state with its shardings, nothing allocated.
  params = transformer.abstract_params(config)
  s = train.setup(config, spec, optim.OptimConfig(lr=1e-4), params, mesh=mesh)
  tokens = jax.ShapeDtypeStruct((batch, seq), jnp.int32, sharding=s.batch_sharding)
  batch_tree = {"inputs": tokens, "targets": tokens,
                "loss_mask": jax.ShapeDtypeStruct((batch, seq), jnp.float32, sharding=s.batch_sharding)}
  with jax.set_mesh(mesh):  # the splash kernel runs in shard_map over this mesh
    lowered = s.train_step.lower(s.state.frozen, s.state.replace(frozen=None), batch_tree)
  out = {"trainable": sum(x.size for x in jax.tree.leaves(s.state.trainable)), "attention": config.attention}
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
  return out


def _row(model, method, rank, n, r, hbm):
  if "oom" in r:
    arguments, total = "-", "-"
    fits = f"no (compiler: {r['temporaries'] / GIB:.1f} GiB of temporaries)"
  else:
    arguments, total = f"{r['arguments'] / GIB:.2f}", f"{r['total'] / GIB:.2f}"
    fits = "yes" if r["total"] <= hbm * GIB else "no"
  return (f"| {model} | {method if method == 'full' else f'LoRA r={rank}'} | {n} | {arguments} | "
          f"{r['temporaries'] / GIB:.2f} | {total} | {fits} |")


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--model", default="meta-llama/Llama-3.2-1B", help="preset hub id or local HF directory")
  p.add_argument("--method", choices=("lora", "full"), default="lora")
  p.add_argument("--rank", type=int, default=16)
  p.add_argument("--batch", type=int, default=32, help="global rows per step")
  p.add_argument("--seq", type=int, default=2048)
  p.add_argument("--mesh", default="fsdp=-1", help="e.g. fsdp=-1 or fsdp=4,tensor=2 (-1 fills the rest)")
  p.add_argument("--devices", type=int, default=8)
  p.add_argument("--platform", choices=("cpu", "tpu"), default="cpu")
  p.add_argument("--topology", help="TPU topology for --platform tpu, e.g. v5e:2x4, v5e:4x4, v5e:4x8")
  p.add_argument("--hbm-gib", type=float, default=16.0, help="memory per device to check against (v5e: 16)")
  p.add_argument("--table", type=pathlib.Path, help="write the docs table for the study's models to this file")
  args = p.parse_args(argv)
  if args.platform == "cpu" and "jax" not in sys.modules:
    counts = (8, 16, 32) if args.table else (args.devices,)
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={max(counts)}"
  header = ["| model | method | devices | arguments GiB | temporaries GiB | total GiB/device | fits "
            f"{args.hbm_gib:g} GiB |", "|---|---|---|---|---|---|---|"]
  if args.table:
    rows = []
    topologies = {8: "v5e:2x4", 16: "v5e:4x4", 32: "v5e:4x8"}
    for model in TABLE_MODELS:
      for method in ("lora", "full"):
        for n in (8, 16, 32):
          devices = devices_for(args.platform, n, topologies[n] if args.platform == "tpu" else None)
          r = plan(model, method, args.rank, args.batch, args.seq, parse_mesh(args.mesh), devices)
          rows.append(_row(model, method, args.rank, n, r, args.hbm_gib))
          print(rows[-1], flush=True)
    args.table.parent.mkdir(parents=True, exist_ok=True)
    platform = f"TPU v5e topologies ({', '.join(topologies.values())})" if args.platform == "tpu" else \
        "fake CPU devices"
    args.table.write_text(
        "# Memory per device of one train step\n\n"
        f"Planned with `python -m benchmarks.fit --table {args.table} --platform {args.platform} --batch "
        f"{args.batch} --seq {args.seq} --mesh {args.mesh} --hbm-gib {args.hbm_gib:g}` on {platform}: bf16 "
        "weights and compute, fp32 trained values and Adam moments, scanned and rematerialised layers, LoRA on every "
        "matrix incl. the unembedding. Figures are XLA's memory analysis of the compiled step.\n\n"
        + "\n".join(header + rows) + "\n")
    print(f"wrote {args.table}")
    return
  devices = devices_for(args.platform, args.devices, args.topology)
  r = plan(args.model, args.method, args.rank, args.batch, args.seq, parse_mesh(args.mesh), devices)
  print(f"{args.model}: {args.method} (rank {args.rank}), batch {args.batch} x {args.seq}, mesh {args.mesh} on "
        f"{len(devices)} {args.platform} devices; {r['params']:,} params, {r['trainable']:,} trainable")
  if "oom" in r:
    print(f"does not fit: {r['oom']}")
    return
  for key in ("arguments", "outputs", "aliased", "temporaries", "total"):
    print(f"  {key:<12} {r[key] / GIB:8.3f} GiB per device")
  print(f"fits in {args.hbm_gib:g} GiB: {'yes' if r['total'] <= args.hbm_gib * GIB else 'no'}")


if __name__ == "__main__":
  main()
