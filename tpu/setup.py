"""Put the project on every worker of a TPU VM (git clone or upload) and install it into a venv with jax[tpu]."""

import shlex
import tempfile
from pathlib import Path

from tpu import common

REMOTE_ARCHIVE = "lora_jax.tar.gz"  # relative to the remote home directory


def fetch_commands(args) -> list[list[str]]:
  """Commands that replace the workers' checkout with a clone of --repo or an upload of this tree."""
  fresh = f"rm -rf {common.REMOTE_DIR} && "
  if not args.upload:
    checkout = f" && git -C {common.REMOTE_DIR} checkout --quiet {shlex.quote(args.ref)}" if args.ref else ""
    clone = f"git clone --quiet {shlex.quote(args.repo)} {common.REMOTE_DIR}{checkout}"
    return [common.ssh(args, fresh + clone)]
  archive = str(Path(tempfile.gettempdir()) / f"lora_jax-{args.name}.tar.gz")
  unpack = (f"mkdir -p {common.REMOTE_DIR} && tar -xzf ~/{REMOTE_ARCHIVE} -C {common.REMOTE_DIR}"
            f" && rm ~/{REMOTE_ARCHIVE}")
  return [["git", "-C", str(common.ROOT), "archive", "--format=tar.gz", f"--output={archive}", args.ref or "HEAD"],
          common.scp(args, archive, REMOTE_ARCHIVE),
          common.ssh(args, fresh + unpack)]


def install_commands(args) -> list[list[str]]:
  """Commands that build the venv, install the pinned requirements, jax[tpu] and the package, then check TPUs."""
  steps = [
      # The TPU images ship Python 3.10, older than the pins allow; uv fetches the Python the tests ran with.
      "python3 -m pip install --user --quiet uv && "
      f"python3 -m uv venv --seed --python {shlex.quote(args.python)} .venv",
      ".venv/bin/pip install -r requirements.txt -r requirements-cloud.txt",
      ".venv/bin/pip install " + shlex.quote(f"jax[tpu]=={common.jax_version()}"),
      ".venv/bin/pip install --no-deps -e .",
      ".venv/bin/python -c " + shlex.quote('import jax; assert jax.default_backend() == "tpu", jax.devices(); '
                                           'print(jax.process_index(), jax.process_count(), jax.devices())'),
  ]
  return [common.ssh(args, common.in_checkout(step)) for step in steps]


def main(argv=None) -> None:
  """Set up the project on all workers from the command line."""
  p = common.parser(__spec__.name, __doc__)
  source = p.add_mutually_exclusive_group(required=True)
  source.add_argument("--repo", help="git URL the workers clone (they need access to it)")
  source.add_argument("--upload", action="store_true",
                      help="upload this checkout's --ref (default HEAD; uncommitted changes are NOT included)")
  p.add_argument("--ref", help="branch, tag or commit to check out (default: the repo's default branch / HEAD)")
  p.add_argument("--python", default="3.11", help="Python version of the workers' venv")
  args = p.parse_args(argv)
  common.execute(fetch_commands(args) + install_commands(args), args.dry_run)


if __name__ == "__main__":
  main()
