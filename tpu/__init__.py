"""Launch lora_jax runs and sweeps on Cloud TPU VMs (and multi-node GPU); see tpu/README.md.

Each command is a module, `python -m tpu.<command> --help`: create, setup, run, sweep, logs, copy, delete,
gpu_launch. With --dry-run a command prints the exact shell commands it would run, one per line.
"""
