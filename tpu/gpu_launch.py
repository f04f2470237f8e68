"""Start one process of a multi-node GPU job: set the jax.distributed environment and exec the command.

    python -m tpu.gpu_launch --nodes 2 --node-rank 0 --coordinator 10.0.0.2:1234 -- \
        python -m experiments.main --config=... --workdir=...

Run it once on every node (same --nodes/--coordinator, node ranks 0..N-1); the coordinator is node 0's address.
One process per node drives all of that node's GPUs. A single multi-GPU host needs no launcher: run the command.
"""

import os
import shlex
import sys

from tpu import common


def launch_env(nodes: int, node_rank: int, coordinator: str, gpus_per_node: int | None) -> dict[str, str]:
  """The environment variables for this node's process."""
  env = {"JAX_COORDINATOR_ADDRESS": coordinator, "JAX_NUM_PROCESSES": str(nodes), "JAX_PROCESS_ID": str(node_rank)}
  if gpus_per_node is not None:
    env["CUDA_VISIBLE_DEVICES"] = ",".join(str(i) for i in range(gpus_per_node))
  return env


def main(argv=None) -> None:
  """Parse `OPTIONS -- COMMAND...`, then print (dry run) or exec COMMAND with the distributed environment."""
  argv = sys.argv[1:] if argv is None else list(argv)
  p = common.parser(__spec__.name, __doc__.splitlines()[0], node=False)
  p.usage = "python -m tpu.gpu_launch [options] -- COMMAND [ARG ...]"
  p.add_argument("--nodes", type=int, required=True, help="number of nodes (= processes)")
  p.add_argument("--node-rank", type=int, required=True, help="this node's index, 0..nodes-1 (0 = coordinator)")
  p.add_argument("--coordinator", type=common.coordinator, required=True, help="HOST:PORT of node 0")
  p.add_argument("--gpus-per-node", type=int, help="if given, set CUDA_VISIBLE_DEVICES=0,...,G-1")
  split = argv.index("--") if "--" in argv else len(argv)
  args, command = p.parse_args(argv[:split]), argv[split + 1:]
  if not command:
    p.error("no command: put it after `--`, e.g. -- python -m experiments.main --config=...")
  if args.nodes < 1:
    p.error(f"--nodes must be at least 1, got {args.nodes}")
  if not 0 <= args.node_rank < args.nodes:
    p.error(f"--node-rank {args.node_rank} must be in 0..{args.nodes - 1} (--nodes {args.nodes})")
  if args.gpus_per_node is not None and args.gpus_per_node < 1:
    p.error(f"--gpus-per-node must be at least 1, got {args.gpus_per_node}")
  env = launch_env(args.nodes, args.node_rank, args.coordinator, args.gpus_per_node)
  line = shlex.join(["env", *(f"{k}={v}" for k, v in env.items()), *command])
  if args.dry_run:
    print(line)
    return
  print(f"+ {line}", file=sys.stderr, flush=True)
  try:
    os.execvpe(command[0], command, {**os.environ, **env})
  except FileNotFoundError:
    raise SystemExit(f"command not found: {command[0]!r}")


if __name__ == "__main__":
  main()
