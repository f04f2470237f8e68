"""Run a config's sweep on a TPU VM with `experiments.sweep`, started on every worker, one point after another.

On a multi-host slice each point is one multi-process experiment, so every worker runs the same `experiments.sweep`
command, detached with nohup (the runner's progress in ~/lora_jax_run.log; each point's output in
~/lora_jax_sweep_logs/ while it runs, then in WORKDIR/NAME/log-HOST.txt). A failed point is recorded and the sweep
goes on; running the same command again resumes it (finished points are skipped). Split one sweep over several TPU
VMs by giving each its own `--shard I/N`.
"""

import re
import shlex

from experiments import overrides as overrides_lib
from experiments import sweep as experiments_sweep
from tpu import common


def sweep_command(config: str, workdir: str, only: str | None, shard: tuple[int, int] | None,
                  overrides: list[str]) -> str:
  """The shell string that runs the sweep with the checkout's venv (overrides after `--`)."""
  words = [".venv/bin/python", "-m", "experiments.sweep", f"--config={config}", f"--workdir={workdir}"]
  words += [f"--only={only}"] if only is not None else []
  words += [f"--shard={shard[0]}/{shard[1]}"] if shard else []
  return shlex.join(words + (["--", *overrides] if overrides else []))


def main(argv=None) -> None:
  """Run a config's sweep on a TPU VM from the command line; extra --config.KEY=VALUE apply to every point."""
  p = common.parser(__spec__.name, __doc__.splitlines()[0])
  p.add_argument("--config", required=True, type=common.config_arg,
                 help="experiments/configs/FILE.py[:ARG]; the points come from its get_sweep(ARG)")
  p.add_argument("--workdir", "--workdir-root", dest="workdir", required=True,
                 help="gs://BUCKET/DIR; point NAME writes to DIR/NAME")
  p.add_argument("--only", metavar="REGEX", help="run only the points whose arg string matches this regex")
  p.add_argument("--shard", metavar="I/N", type=experiments_sweep.shard_arg,
                 help="run only the points whose index %% N == I (one shard per TPU VM)")
  common.add_experiment_args(p)
  args, overrides = common.parse_with_overrides(p, argv)
  common.check_workdir(p, args.workdir, args.allow_local_workdir)
  file, _, arg = args.config.partition(":")
  try:  # the points are checked here, before any worker is touched
    if args.only is not None:
      re.compile(args.only)
    module = overrides_lib.load_config_module(str(common.ROOT / file), needs=("get_config", "get_sweep"))
    points = experiments_sweep.select(experiments_sweep.sweep_points(module, arg), args.shard, args.only)
    if not points:
      raise ValueError(f"no point selected (--shard {args.shard}, --only {args.only!r})")
    experiments_sweep.check_points(module, points, overrides)
  except (ValueError, re.error) as e:
    p.error(str(e))
  if args.dry_run:
    print(f"# {len(points)} point(s), each into {args.workdir.rstrip('/')}/NAME:")
    print("\n".join(f"#   [{q.index}] {q.name}: {q.arg}" for q in points))
  command = sweep_command(args.config, args.workdir.rstrip("/"), args.only, args.shard, overrides)
  common.execute([common.ssh(args, common.detached(command))], args.dry_run)


if __name__ == "__main__":
  main()
