"""Shared pieces of the tpu commands: argument validation, gcloud command builders, and a runner."""

import argparse
import re
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Paths on the TPU VM workers, left unquoted in remote commands so that the remote shell expands `~`.
REMOTE_DIR = "~/lora_jax"
REMOTE_LOG = "~/lora_jax_run.log"
GCLOUD_TPU = ("gcloud", "compute", "tpus")

_NAME_RE = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")
_ZONE_RE = re.compile(r"[a-z]+(-[a-z]+[0-9]+)+-[a-z]")
_ACCELERATOR_RE = re.compile(r"v[0-9]+[a-z]*-[0-9]+")
_COORDINATOR_RE = re.compile(r"[^:\s]+:[0-9]{1,5}")


# ----------------------------------------------------------------------------------------------- validation
def tpu_name(value: str) -> str:
  """Check a TPU/queued-resource name against GCP's rules (argparse type)."""
  if len(value) > 63 or not _NAME_RE.fullmatch(value):
    raise argparse.ArgumentTypeError(
        f"invalid TPU name {value!r}: use at most 63 lowercase letters, digits and hyphens, "
        "starting with a letter and not ending with a hyphen (e.g. 'lora-v5e-16')")
  return value


def zone(value: str) -> str:
  """Check that a zone looks like a GCP zone such as us-central2-b (argparse type)."""
  if not _ZONE_RE.fullmatch(value):
    raise argparse.ArgumentTypeError(f"invalid zone {value!r}: expected e.g. 'us-central2-b' or 'europe-west4-a'")
  return value


def accelerator_type(value: str) -> str:
  """Check a TPU accelerator type such as v4-8, v5litepod-16, v5p-32, v6e-8 (argparse type)."""
  if not _ACCELERATOR_RE.fullmatch(value):
    raise argparse.ArgumentTypeError(
        f"invalid accelerator type {value!r}: expected <generation>-<cores or chips>, "
        "e.g. v4-8, v5litepod-16, v5p-32, v6e-8")
  return value


def config_arg(value: str) -> str:
  """Check that a `path.py[:args]` config exists and defines get_config; make it repo-relative (argparse type)."""
  file, colon, config_args = value.partition(":")
  path = Path(file)
  if path.suffix != ".py" or not path.is_file():
    raise argparse.ArgumentTypeError(
        f"config file {file!r} not found (expected e.g. experiments/configs/finetune.py:method=lora)")
  if "def get_config" not in path.read_text():
    raise argparse.ArgumentTypeError(f"config file {file!r} does not define get_config()")
  try:  # The workers run from their own checkout, so the path they get is relative to the repository root.
    file = path.resolve().relative_to(ROOT).as_posix()
  except ValueError:
    print(f"warning: config {file!r} is outside the repository; the workers will not have it",
          file=sys.stderr)
  return file + colon + config_args


def coordinator(value: str) -> str:
  """Check a HOST:PORT coordinator address (argparse type)."""
  if not _COORDINATOR_RE.fullmatch(value) or not 0 < int(value.rsplit(":", 1)[1]) < 65536:
    raise argparse.ArgumentTypeError(f"invalid coordinator {value!r}: expected HOST:PORT, e.g. 10.0.0.2:1234")
  return value


def check_workdir(parser: argparse.ArgumentParser, workdir: str, allow_local: bool) -> None:
  """Reject a non-gs:// workdir: every host of a slice writes to it, so it must be shared storage."""
  if not workdir.startswith("gs://") and not allow_local:
    parser.error(f"workdir {workdir!r} is not a gs:// path; every TPU host writes to it, so it must be shared "
                 "storage (pass --allow-local-workdir for a single-host slice if you really mean it)")


# ----------------------------------------------------------------------------------------------- parsers
def parser(module: str, description: str, *, node: bool = True) -> argparse.ArgumentParser:
  """An ArgumentParser for `python -m MODULE` with --dry-run and, for commands on a TPU, --name/--zone/--project."""
  p = argparse.ArgumentParser(prog=f"python -m {module}", description=description)
  if node:
    p.add_argument("--name", required=True, type=tpu_name, help="TPU VM (and queued resource) name")
    p.add_argument("--zone", required=True, type=zone, help="GCP zone, e.g. us-central2-b")
    p.add_argument("--project", help="GCP project (default: gcloud's configured project)")
  p.add_argument("--dry-run", action="store_true", help="print the shell commands instead of running them")
  return p


def add_experiment_args(p: argparse.ArgumentParser) -> None:
  """Add the --allow-local-workdir flag shared by run and sweep."""
  p.add_argument("--allow-local-workdir", action="store_true",
                 help="accept a workdir that is not on gs:// (only sensible on a single-host slice)")


def parse_with_overrides(p: argparse.ArgumentParser, argv) -> tuple[argparse.Namespace, list[str]]:
  """Parse argv, collecting `--config.KEY=VALUE` overrides; any other unknown flag is an error."""
  from experiments import overrides  # only here: the other tpu commands need nothing but the standard library

  args, extra = p.parse_known_args(argv)
  bad = overrides.bad_syntax(extra)
  if bad:
    p.error(f"unrecognized arguments: {' '.join(bad)} (config overrides take the form --config.KEY=VALUE)")
  return args, extra


# ----------------------------------------------------------------------------------------------- commands
def gcloud_tpu(args: argparse.Namespace, *words: str) -> list[str]:
  """`gcloud compute tpus WORDS... --zone=Z [--project=P]`."""
  cmd = [*GCLOUD_TPU, *words, f"--zone={args.zone}"]
  return cmd + ([f"--project={args.project}"] if args.project else [])


def ssh(args: argparse.Namespace, remote: str, worker: str = "all") -> list[str]:
  """Run the shell string `remote` on the given worker(s) of the TPU VM."""
  return gcloud_tpu(args, "tpu-vm", "ssh", args.name, f"--worker={worker}") + ["--command", remote]


def scp(args: argparse.Namespace, local: str, remote: str) -> list[str]:
  """Copy a local file to `remote` on every worker of the TPU VM."""
  return gcloud_tpu(args, "tpu-vm", "scp", local, f"{args.name}:{remote}", "--worker=all")


def in_checkout(command: str) -> str:
  """A remote shell string that runs `command` inside the project checkout."""
  return f"cd {REMOTE_DIR} && {command}"


def detached(command: str) -> str:
  """A remote shell string that starts `command` in the checkout, surviving ssh exit, logging to REMOTE_LOG."""
  return in_checkout(f"nohup {command} > {REMOTE_LOG} 2>&1 < /dev/null &")


def experiment_command(config: str, workdir: str, overrides: list[str]) -> str:
  """The shell string that trains one config point with the checkout's venv."""
  return shlex.join([".venv/bin/python", "-m", "experiments.main", f"--config={config}",
                     f"--workdir={workdir}", *overrides])


def jax_version(requirements: Path = ROOT / "requirements.txt") -> str:
  """The jax version pinned in requirements.txt (the TPU install must match it)."""
  for line in requirements.read_text().splitlines():
    m = re.fullmatch(r"\s*jax\s*==\s*([^\s#;]+)\s*(#.*)?", line)
    if m:
      return m.group(1)
  raise ValueError(f"no 'jax==VERSION' pin in {requirements}")


# ----------------------------------------------------------------------------------------------- running
def execute(cmds: list[list[str]], dry_run: bool) -> None:
  """Print the commands (dry run) or run them in order, streaming output, stopping at the first failure."""
  for cmd in cmds:
    if dry_run:
      print(shlex.join(cmd), flush=True)
      continue
    print(f"+ {shlex.join(cmd)}", file=sys.stderr, flush=True)
    try:
      code = subprocess.run(cmd).returncode
    except FileNotFoundError:
      raise SystemExit(f"command not found: {cmd[0]!r} (is the Google Cloud CLI installed and on PATH?)")
    if code:
      raise SystemExit(f"command failed with exit code {code}: {shlex.join(cmd)}")
