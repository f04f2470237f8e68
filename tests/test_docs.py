"""Docs that cannot drift: every ``module.name`` the README and docs/ name resolves, every ``python -m`` module they
tell users to run exists, and the README's library snippet runs as printed."""

import importlib
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "tpu" / "README.md",
        ROOT / "benchmarks" / "RESULTS.md"]
PACKAGES = ("lora_jax", "lora_jax.models", "lora_jax.data", "experiments", "experiments.configs", "benchmarks", "tpu")
NOT_CODE = {"jsonl", "json", "md", "py", "csv", "png", "txt", "tex", "sh", "yaml", "npz", "safetensors", "bin"}
# `module.attr.attr(...)` inside backticks, not preceded by a name or dot (so `config.train.steps` is not `train`).
REFERENCE = re.compile(r"(?<![\w./-])((?:[a-z_][a-z0-9_]*\.)*[a-z_][a-z0-9_]*)\.([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*)")
RUN_MODULE = re.compile(r"python -m ((?:[a-z_]\w*\.)*[a-z_]\w*)")


def _modules() -> dict[str, list[str]]:
  """Short and dotted names a doc may use for this project's modules -> the import paths they may mean (``common``
  is tpu.common or experiments.configs.common)."""
  found: dict[str, set[str]] = {}
  for package in PACKAGES:
    for path in (ROOT / package.replace(".", "/")).glob("*.py"):
      if path.stem != "__init__":
        full = f"{package}.{path.stem}"
        for name in {path.stem, full, full.removeprefix("lora_jax."), full.removeprefix("experiments.")}:
          found.setdefault(name, set()).add(full)
  return {name: sorted(paths) for name, paths in found.items()}


def _code_spans(text: str) -> list[str]:
  blocks = re.findall(r"```[a-z]*\n(.*?)```", text, flags=re.S)
  inline = re.findall(r"`([^`\n]+)`", re.sub(r"```.*?```", "", text, flags=re.S))
  return blocks + inline


def _references() -> list[tuple[str, str, str]]:
  modules, refs = _modules(), []
  for doc in DOCS:
    for span in _code_spans(doc.read_text()):
      for module, attrs in REFERENCE.findall(span):
        if module in modules and attrs.split(".")[0] not in NOT_CODE:
          refs.append((doc.name, module, tuple(modules[module]), attrs))
  return sorted(set(refs))


def _resolves(module: str, attrs: str) -> bool:
  obj = importlib.import_module(module)
  for attr in attrs.split("."):
    if not hasattr(obj, attr):
      return False
    obj = getattr(obj, attr)
  return True


def _missing(refs) -> list[str]:
  """The references that resolve in none of the modules their name may mean, each as 'doc: name.attrs'."""
  return [f"{doc}: {name}.{attrs} (looked in {', '.join(modules)})" for doc, name, modules, attrs in refs
          if not any(_resolves(m, attrs) for m in modules)]


def test_every_named_function_and_class_exists():
  refs = _references()
  assert len(refs) > 30  # the docs name dozens; a broken pattern would find none
  assert ("README.md", "lora", ("lora_jax.lora",), "LoraSpec") in refs
  missing = _missing(refs)
  assert not missing, "\n".join(missing)


def test_every_module_the_docs_run_exists():
  names = sorted({m for doc in DOCS for m in RUN_MODULE.findall(doc.read_text()) if m.split(".")[0] in
                  {p.split(".")[0] for p in PACKAGES}})
  assert "experiments.main" in names
  missing = [n for n in names if importlib.util.find_spec(n) is None]
  assert not missing, missing


def test_a_name_that_disappeared_is_reported():
  modules = _modules()
  found = REFERENCE.findall("call `hf.load_peft(dir)` or `peft_io.load_peft(dir)`; `config.train.steps` is a field")
  refs = [("README.md", m, tuple(modules[m]), a) for m, a in found if m in modules]
  assert [(r[1], r[3]) for r in refs] == [("hf", "load_peft"), ("peft_io", "load_peft")]
  assert _missing(refs) == ["README.md: hf.load_peft (looked in lora_jax.hf)"]


def test_the_readme_library_snippet_runs(capsys):
  text = (ROOT / "README.md").read_text()
  section = text[text.index("## The library in a few lines"):]
  snippet = re.search(r"```python\n(.*?)```", section, flags=re.S)[1]
  namespace: dict = {}
  exec(compile(snippet, "README.md (library snippet)", "exec"), namespace)  # noqa: S102
  assert "trainable:" in capsys.readouterr().out
  assert namespace["max_err"] is not None and set(namespace["grads"]) == {"lora", "params"}
