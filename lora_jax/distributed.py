"""Multi-process start-up through ``jax.distributed``: TPU pods, GPU clusters, and explicit (CPU/manual) runs.

How the processes find each other, in order:
1. explicit arguments (``coordinator_address``, ``num_processes``, ``process_id``): manual and CPU runs;
2. the environment variables ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID`` (set by
   ``python -m tpu.gpu_launch`` on each node of a GPU cluster);
3. a multi-host TPU VM (``TPU_WORKER_HOSTNAMES`` lists several hosts): ``jax.distributed.initialize()`` detects it;
4. otherwise a single process: nothing to do.

With an explicit coordinator, the processes first check in with process 0 over plain TCP on the coordinator's port
(each sends its id), and only then start JAX's coordination service. A peer that never comes, or a coordinator that
cannot be reached, is a ``ConnectionError`` within ``timeout_s`` naming the address and the process count: JAX itself
would abort process 0 (SIGABRT, no address) once its own deadline passed.
"""

from __future__ import annotations

import os
import socket
import time

import jax


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, timeout_s: float = 300.0) -> bool:
  """Starts ``jax.distributed`` when the run has several processes; returns whether it did."""
  env = os.environ
  if coordinator_address is None and env.get("JAX_COORDINATOR_ADDRESS"):
    coordinator_address = env["JAX_COORDINATOR_ADDRESS"]
    num_processes = int(env["JAX_NUM_PROCESSES"]) if num_processes is None else num_processes
    process_id = int(env["JAX_PROCESS_ID"]) if process_id is None else process_id
  if coordinator_address is None:
    hosts = [h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]
    if len(hosts) > 1:
      jax.distributed.initialize(initialization_timeout=int(max(1, timeout_s)))
      return True
    return False
  if num_processes is None or process_id is None:
    raise ValueError(f"coordinator {coordinator_address}: num_processes and process_id are needed too")
  if not 0 <= process_id < num_processes:
    raise ValueError(f"process_id {process_id} is outside [0, {num_processes})")
  if process_id == 0:
    gather_peers(coordinator_address, num_processes, timeout_s)
  else:
    check_in(coordinator_address, process_id, num_processes, timeout_s)
  jax.distributed.initialize(coordinator_address, num_processes=num_processes, process_id=process_id,
                             initialization_timeout=int(max(1, timeout_s)))
  return True


def _host_port(address: str) -> tuple[str, int]:
  host, _, port = address.rpartition(":")
  if not host or not port.isdigit():
    raise ValueError(f"coordinator address {address!r} is not host:port")
  return host.strip("[]"), int(port)


def gather_peers(address: str, num_processes: int, timeout_s: float) -> None:
  """Process 0: waits until processes 1..N-1 have checked in on the coordinator's port; ConnectionError after
  ``timeout_s`` naming the address, the process count and the processes that never came."""
  _, port = _host_port(address)
  missing = set(range(1, num_processes))
  deadline = time.monotonic() + timeout_s
  try:
    server = socket.create_server(("", port), family=socket.AF_INET6, dualstack_ipv6=True) \
        if socket.has_dualstack_ipv6() else socket.create_server(("", port))
  except OSError as e:
    raise ConnectionError(f"process 0 of {num_processes}: cannot listen on the coordinator port of {address} "
                          f"({e}); is another run using it?") from None
  with server:
    while missing:
      left = deadline - time.monotonic()
      if left <= 0:
        raise ConnectionError(
            f"process 0 of {num_processes}: waited {timeout_s:g} s at coordinator {address}, but process(es) "
            f"{sorted(missing)} never connected; start every process with --coordinator_address {address} "
            f"--num_processes {num_processes}, check the address is reachable from them, or raise the timeout")
      server.settimeout(left)
      try:
        conn, _ = server.accept()
      except (socket.timeout, TimeoutError):
        continue
      with conn:
        conn.settimeout(5.0)
        try:
          hello = b""
          while chunk := conn.recv(64):  # the peer closes first, so the port is free for JAX's service at once
            hello += chunk
        except OSError:
          continue
      pid, _, count = hello.decode(errors="replace").strip().partition("/")
      if not (pid.isdigit() and count.isdigit()):
        continue  # not one of ours (e.g. a port probe)
      if int(count) != num_processes:
        raise ConnectionError(f"process {pid} was started with --num_processes {count}, process 0 with "
                              f"{num_processes} (coordinator {address})")
      missing.discard(int(pid))


def check_in(address: str, process_id: int, num_processes: int, timeout_s: float) -> None:
  """Processes 1..N-1: tells process 0 this process is here; ConnectionError if the coordinator cannot be reached
  within ``timeout_s``."""
  host, port = _host_port(address)
  deadline = time.monotonic() + timeout_s
  last = None
  while time.monotonic() < deadline:
    try:
      with socket.create_connection((host, port), timeout=min(2.0, timeout_s)) as conn:
        conn.sendall(f"{process_id}/{num_processes}\n".encode())
        return
    except OSError as e:
      last = e
      time.sleep(0.2)
  raise ConnectionError(f"JAX coordinator {address} not reachable within {timeout_s:g} s from process {process_id} "
                        f"of {num_processes} ({last}); is process 0 running and is the address/port right?")
