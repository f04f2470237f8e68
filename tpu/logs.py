"""Show (or follow) the run/sweep log of a TPU VM worker."""

import argparse

from tpu import common


def worker(value: str) -> str:
  """Check a worker index or `all` (argparse type)."""
  if value != "all" and not value.isdigit():
    raise argparse.ArgumentTypeError(f"invalid worker {value!r}: expected a worker index (0, 1, ...) or 'all'")
  return value


def main(argv=None) -> None:
  """Tail ~/lora_jax_run.log on one worker (or all) from the command line."""
  p = common.parser(__spec__.name, __doc__)
  p.add_argument("--worker", default="0", type=worker, help="worker index, or 'all' (lines interleave)")
  p.add_argument("--lines", type=int, default=100, help="number of trailing lines to show")
  p.add_argument("--follow", action="store_true", help="keep printing new lines (Ctrl-C to stop)")
  args = p.parse_args(argv)
  tail = f"tail -n {args.lines} {'-F ' if args.follow else ''}{common.REMOTE_LOG}"
  common.execute([common.ssh(args, tail, worker=args.worker)], args.dry_run)


if __name__ == "__main__":
  main()
