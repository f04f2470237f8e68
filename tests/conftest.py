"""Session set-up for the whole suite: a persistent XLA compilation cache and one small tiny base (``_base``) shared by
every test and subprocess, a cheaper XLA CPU back end, and the slow tests scheduled first.

Many tests compile the same programs (the same tiny model's train step in a straight, a crashed and a resumed run; the
same CLI run in several subprocesses). The cache lives in a fresh directory per session (results are the same
compiled code either way), and is removed at the end. A caller's own JAX_COMPILATION_CACHE_DIR is respected.

The suite's programs are tiny, so compiling them costs more than running them: the CPU back end's LLVM runs at -O0
(``--xla_backend_optimization_level=0``, about 20% less suite time; XLA's own HLO passes, fusion included, are
unchanged, and no test depends on how fast code runs), and Eigen's matmuls run on one thread
(``--xla_cpu_multi_thread_eigen=false``: the two workers share two cores, and thread hand-offs cost more than tiny
matmuls gain; 12% less time on test_train + test_lora, 155 -> 136 s). Set LORA_JAX_TEST_XLA_OPT=1 to test the
optimised, multi-threaded back end.
Tests marked ``slow`` go first, so that the two workers do not wait on one long test at the end.
"""

import os
import shutil
import tempfile

import pytest

_OWN_DIRS = []


def pytest_configure(config):
  # Set before the workers and subprocesses start, so they inherit them: one compilation cache and one tiny base.
  for name, prefix in (("JAX_COMPILATION_CACHE_DIR", "lora_jax_xla_cache_"),
                       ("LORA_JAX_TEST_BASE_CACHE", "lora_jax_tiny_base_")):  # tests/_base.py
    if not os.environ.get(name):
      _OWN_DIRS.append(tempfile.mkdtemp(prefix=prefix))
      os.environ[name] = _OWN_DIRS[-1]
  if os.environ.get("LORA_JAX_TEST_XLA_OPT") != "1":
    flags = os.environ.get("XLA_FLAGS", "")
    for flag in ("--xla_backend_optimization_level=0", "--xla_cpu_multi_thread_eigen=false"):
      if flag.split("=")[0] not in flags:
        flags = f"{flags} {flag}".strip()
    os.environ["XLA_FLAGS"] = flags
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
  import jax

  jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
  jax.config.update("jax_persistent_cache_min_compile_time_secs",
                    float(os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]))
  jax.config.update("jax_persistent_cache_min_entry_size_bytes",
                    int(os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"]))


def pytest_collection_modifyitems(config, items):
  items.sort(key=lambda item: item.get_closest_marker("slow") is None)  # stable: slow tests first, else as collected


def pytest_unconfigure(config):
  for path in _OWN_DIRS:
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def x64():
  """float64 inside one test (jax_enable_x64 is restored afterwards): where a test claims exactness."""
  import jax

  with jax.enable_x64(True):
    yield
