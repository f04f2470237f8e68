"""Create a TPU VM, directly or as a queued resource (the way to get spot capacity), and wait until it is ready."""

import shlex
import subprocess
import sys
import time

from tpu import common

# Software (runtime) versions Google recommends for JAX per TPU generation; older generations use the base image.
RUNTIME_VERSIONS = {"v6e": "v2-alpha-tpuv6e", "v5p": "v2-alpha-tpuv5", "v5litepod": "v2-alpha-tpuv5-lite"}
DEFAULT_RUNTIME = "tpu-ubuntu2204-base"
TERMINAL_STATES = ("FAILED", "SUSPENDING", "SUSPENDED")


def default_version(accelerator: str) -> str:
  """The recommended TPU software version for an accelerator type."""
  return RUNTIME_VERSIONS.get(accelerator.split("-")[0], DEFAULT_RUNTIME)


def create_command(args) -> list[str]:
  """The gcloud command that creates the TPU VM or the queued resource."""
  version = args.version or default_version(args.accelerator)
  spot = ["--spot"] if args.spot else []
  if args.queued:
    return common.gcloud_tpu(args, "queued-resources", "create", args.name, f"--node-id={args.name}",
                             f"--accelerator-type={args.accelerator}", f"--runtime-version={version}", *spot)
  return common.gcloud_tpu(args, "tpu-vm", "create", args.name, f"--accelerator-type={args.accelerator}",
                           f"--version={version}", *spot)


def wait_active(args, timeout_s: float, interval_s: float, sleep=time.sleep, clock=time.monotonic) -> None:
  """Poll the queued resource's state until ACTIVE; fail on a terminal state or after timeout_s."""
  cmd = common.gcloud_tpu(args, "queued-resources", "describe", args.name, "--format=value(state.state)")
  if args.dry_run:
    print(shlex.join(cmd))
    return
  deadline = clock() + timeout_s
  while True:
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode:
      raise SystemExit(f"command failed with exit code {result.returncode}: {shlex.join(cmd)}\n{result.stderr}")
    state = result.stdout.strip()
    print(f"queued resource {args.name}: {state}", file=sys.stderr, flush=True)
    if state == "ACTIVE":
      return
    if state in TERMINAL_STATES:
      raise SystemExit(f"queued resource {args.name} is {state}; delete it with "
                       f"`python -m tpu.delete --name {args.name} --zone {args.zone} --queued`")
    if clock() >= deadline:
      raise SystemExit(f"queued resource {args.name} still {state} after {timeout_s:.0f}s; it stays in the "
                       "queue: check again with the describe command above, or delete it")
    sleep(interval_s)


def main(argv=None) -> None:
  """Create a TPU VM (or queued resource) from the command line."""
  p = common.parser(__spec__.name, __doc__)
  p.add_argument("--accelerator", required=True, type=common.accelerator_type, help="e.g. v5litepod-16, v4-8")
  p.add_argument("--version", help="TPU software version (default: Google's recommendation for the generation, "
                                   + ", ".join(f"{k}: {v}" for k, v in RUNTIME_VERSIONS.items())
                                   + f", else {DEFAULT_RUNTIME})")
  p.add_argument("--queued", action="store_true", help="create a queued resource and wait for it to be ACTIVE")
  p.add_argument("--spot", action="store_true", help="spot capacity: much cheaper, may be preempted at any time")
  p.add_argument("--wait-timeout", type=float, default=3600, help="seconds to wait for ACTIVE with --queued")
  p.add_argument("--poll-interval", type=float, default=30, help="seconds between state polls with --queued")
  args = p.parse_args(argv)
  common.execute([create_command(args)], args.dry_run)
  if args.queued:
    wait_active(args, args.wait_timeout, args.poll_interval)


if __name__ == "__main__":
  main()
