"""Mirror a directory between Cloud Storage and local disk (or bucket to bucket), e.g. to fetch sweep results."""

from tpu import common


def main(argv=None) -> None:
  """Rsync --from to --to recursively from the command line (existing files at --to are kept)."""
  p = common.parser(__spec__.name, __doc__, node=False)
  p.add_argument("--from", dest="src", required=True, help="gs://BUCKET/DIR or a local directory")
  p.add_argument("--to", dest="dst", required=True, help="a local directory or gs://BUCKET/DIR")
  p.add_argument("--gsutil", action="store_true", help="use `gsutil -m rsync -r` instead of `gcloud storage rsync`")
  args = p.parse_args(argv)
  if not (args.src.startswith("gs://") or args.dst.startswith("gs://")):
    p.error(f"neither --from {args.src!r} nor --to {args.dst!r} is a gs:// path; use cp/rsync for local copies")
  tool = ["gsutil", "-m", "rsync", "-r"] if args.gsutil else ["gcloud", "storage", "rsync", "--recursive"]
  common.execute([[*tool, args.src, args.dst]], args.dry_run)


if __name__ == "__main__":
  main()
