"""Delete a TPU VM (or queued resource and its VM). Billing stops only when this has finished."""

from tpu import common


def main(argv=None) -> None:
  """Delete the TPU VM or queued resource from the command line, without a confirmation prompt."""
  p = common.parser(__spec__.name, __doc__)
  p.add_argument("--queued", action="store_true", help="delete the queued resource (and the VM it holds)")
  args = p.parse_args(argv)
  if args.queued:
    cmd = common.gcloud_tpu(args, "queued-resources", "delete", args.name, "--force", "--quiet")
  else:
    cmd = common.gcloud_tpu(args, "tpu-vm", "delete", args.name, "--quiet")
  common.execute([cmd], args.dry_run)


if __name__ == "__main__":
  main()
