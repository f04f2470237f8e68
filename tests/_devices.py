"""The environment of a subprocess that sees ``n`` fake CPU devices, keeping the suite's other XLA flags."""

import os


def env_with_devices(n: int) -> dict:
  """``os.environ`` with ``--xla_force_host_platform_device_count=n`` added to XLA_FLAGS and JAX on the CPU."""
  flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={n}".strip()
  return {**os.environ, "XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu"}
