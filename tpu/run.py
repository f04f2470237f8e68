"""Start one training run on all workers of a TPU VM at once, detached (nohup), logging to ~/lora_jax_run.log."""

import sys

from tpu import common


def main(argv=None) -> None:
  """Start `experiments.main` on every worker from the command line; extra --config.KEY=VALUE are overrides."""
  p = common.parser(__spec__.name, __doc__)
  p.add_argument("--config", required=True, type=common.config_arg,
                 help="experiments/configs/FILE.py:ARGS, as for experiments.main")
  p.add_argument("--workdir", required=True, help="gs://BUCKET/DIR shared by all hosts")
  common.add_experiment_args(p)
  args, overrides = common.parse_with_overrides(p, argv)
  common.check_workdir(p, args.workdir, args.allow_local_workdir)
  # One process per host; on TPU, JAX discovers the slice topology itself, so no coordinator flags.
  command = common.experiment_command(args.config, args.workdir, overrides)
  common.execute([common.ssh(args, common.detached(command))], args.dry_run)
  if not args.dry_run:
    print(f"started; follow with: python -m tpu.logs --name {args.name} --zone {args.zone} --follow",
          file=sys.stderr)


if __name__ == "__main__":
  main()
