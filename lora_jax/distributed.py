"""Multi-process start-up through ``jax.distributed``: TPU pods, GPU clusters, and explicit (CPU/manual) runs.

How the processes find each other, in order:
1. explicit arguments (``coordinator_address``, ``num_processes``, ``process_id``): manual and CPU runs;
2. the environment variables ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID`` (set by
   ``python -m tpu.gpu_launch`` on each node of a GPU cluster);
3. a multi-host TPU VM (``TPU_WORKER_HOSTNAMES`` lists several hosts): ``jax.distributed.initialize()`` detects it;
4. otherwise a single process: nothing to do.

A coordinator that cannot be reached fails within ``timeout_s`` with its address in the message (JAX itself would
abort the process after its own deadline with no address).
"""

from __future__ import annotations

import os
import socket
import time

import jax


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, timeout_s: float = 120.0) -> bool:
  """Starts ``jax.distributed`` when the run has several processes; returns whether it did."""
  env = os.environ
  if coordinator_address is None and env.get("JAX_COORDINATOR_ADDRESS"):
    coordinator_address = env["JAX_COORDINATOR_ADDRESS"]
    num_processes = int(env["JAX_NUM_PROCESSES"]) if num_processes is None else num_processes
    process_id = int(env["JAX_PROCESS_ID"]) if process_id is None else process_id
  if coordinator_address is None:
    hosts = [h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]
    if len(hosts) > 1:
      jax.distributed.initialize()
      return True
    return False
  if num_processes is None or process_id is None:
    raise ValueError(f"coordinator {coordinator_address}: num_processes and process_id are needed too")
  if not 0 <= process_id < num_processes:
    raise ValueError(f"process_id {process_id} is outside [0, {num_processes})")
  if process_id != 0:  # process 0 runs the coordinator; the others must be able to reach it
    wait_for_coordinator(coordinator_address, timeout_s)
  jax.distributed.initialize(coordinator_address, num_processes=num_processes, process_id=process_id,
                             initialization_timeout=int(max(1, timeout_s)))
  return True


def wait_for_coordinator(address: str, timeout_s: float) -> None:
  """Waits until a TCP connection to ``host:port`` succeeds; raises ConnectionError after ``timeout_s``."""
  host, _, port = address.rpartition(":")
  if not host or not port.isdigit():
    raise ValueError(f"coordinator address {address!r} is not host:port")
  deadline = time.monotonic() + timeout_s
  last = None
  while time.monotonic() < deadline:
    try:
      with socket.create_connection((host.strip("[]"), int(port)), timeout=min(2.0, timeout_s)):
        return
    except OSError as e:
      last = e
      time.sleep(0.2)
  raise ConnectionError(f"JAX coordinator {address} not reachable within {timeout_s:g} s ({last}); is process 0 "
                        "running and is the address/port right?")
