"""One small tiny base for every test that trains the tiny config: the same settings everywhere and one cache shared
by the suite's workers and subprocesses (``conftest`` makes it per session), so it is pretrained once per suite run
(``tiny_base``'s lock lets concurrent builders wait for the first)."""

import os

ENV = "LORA_JAX_TEST_BASE_CACHE"  # set by conftest.pytest_configure
STEPS = 40  # Pretraining steps: enough that fine-tuning from it is fine-tuning (its loss has started to fall).
DOCUMENTS = 400  # Pretraining documents.


def cache_dir() -> str:
  """The session's tiny-base cache."""
  return os.environ[ENV]


def overrides() -> list[str]:
  """The tiny base's settings as ``--config.*`` flags of a tiny config."""
  return [f"--config.tiny_base.steps={STEPS}", f"--config.tiny_base.corpus_documents={DOCUMENTS}",
          f"--config.tiny_base.cache_dir={cache_dir()}"]


def shrink(config):
  """A tiny config (in place, and returned) set to the session's small base."""
  config.tiny_base.steps = STEPS
  config.tiny_base.corpus_documents = DOCUMENTS
  config.tiny_base.cache_dir = cache_dir()
  return config
