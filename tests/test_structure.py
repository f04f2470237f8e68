"""The project's layering, read from the source: the library (``lora_jax``) imports nothing above it and defines no
command line (those live in ``lora_jax/cli/``, which the library never imports), and no two modules import each
other (module-level or inside a function)."""

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGES = ("lora_jax", "experiments", "benchmarks", "tpu")


def _module_name(path: pathlib.Path) -> str:
  parts = path.relative_to(ROOT).with_suffix("").parts
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _sources() -> dict[str, ast.Module]:
  return {_module_name(p): ast.parse(p.read_text(), str(p)) for package in PACKAGES
          for p in sorted((ROOT / package).rglob("*.py"))}


def _imports(name: str, tree: ast.Module, known: set[str]) -> set[str]:
  """The project modules ``name`` imports anywhere in its file (``from a import b`` counts a.b when b is a module)."""
  found = set()
  package = name if name in {n for n in known if any(k.startswith(n + ".") for k in known)} else name.rpartition(".")[0]
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      found |= {a.name for a in node.names}
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1] + ([base] if base else []))
      found.add(base)
      found |= {f"{base}.{a.name}" for a in node.names}
  return {m for m in found if m in known and m != name}


def _graph() -> dict[str, set[str]]:
  sources = _sources()
  known = set(sources)
  return {name: _imports(name, tree, known) - {p for p in PACKAGES} for name, tree in sources.items()}


def test_the_library_imports_nothing_above_it_and_never_its_cli():
  bad = [f"{m} imports {d}" for m, deps in _graph().items() if m.startswith("lora_jax") and not
         m.startswith("lora_jax.cli") for d in deps if not d.startswith("lora_jax") or d.startswith("lora_jax.cli")]
  assert not bad, bad


def _says_moved(block: ast.If) -> bool:
  """A __main__ block that only says where a command line moved (``raise SystemExit(...)``) defines no CLI."""
  return len(block.body) == 1 and isinstance(block.body[0], ast.Raise) and isinstance(block.body[0].exc, ast.Call) \
      and getattr(block.body[0].exc.func, "id", None) == "SystemExit"


def test_command_lines_live_outside_the_library():
  bad = []
  for name, tree in _sources().items():
    if not name.startswith("lora_jax") or name.startswith("lora_jax.cli"):
      continue
    for node in ast.walk(tree):
      if isinstance(node, (ast.Import, ast.ImportFrom)) and "argparse" in (
          [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module]):
        bad.append(f"{name} imports argparse")
      if isinstance(node, ast.If) and isinstance(node.test, ast.Compare) and \
          isinstance(node.test.left, ast.Name) and node.test.left.id == "__name__" and not _says_moved(node):
        bad.append(f"{name} has a __main__ block")
  assert not bad, bad


def test_no_two_modules_import_each_other():
  graph = _graph()
  pairs = sorted({tuple(sorted((a, b))) for a, deps in graph.items() for b in deps if a in graph.get(b, ())})
  assert not pairs, pairs


def test_a_block_that_only_says_where_a_command_moved_is_no_cli():
  moved, cli = (ast.parse(f'if __name__ == "__main__":\n  {body}\n').body[0]
                for body in ('raise SystemExit("use python -m lora_jax.cli.export")', "main()"))
  assert _says_moved(moved) and not _says_moved(cli)


def test_the_checker_sees_function_level_and_relative_imports():
  tree = ast.parse("def f():\n  from lora_jax import hf\nfrom . import lora\nimport lora_jax.train\n")
  known = {"lora_jax", "lora_jax.hf", "lora_jax.lora", "lora_jax.train", "lora_jax.checkpoint"}
  assert _imports("lora_jax.checkpoint", tree, known) == {"lora_jax", "lora_jax.hf", "lora_jax.lora",
                                                          "lora_jax.train"}


def test_no_input_can_become_code():
  """No shell strings run locally (subprocess with shell=True, os.system/popen), nothing unpickled, no eval/exec, and
  HF loading never passes trust_remote_code: a config value or a file in a run directory stays data."""
  found = []
  for name, tree in _sources().items():
    for node in ast.walk(tree):
      if isinstance(node, ast.Call):
        func = ast.unparse(node.func)
        if func in ("eval", "exec", "os.system", "os.popen", "torch.load") or func.startswith(("pickle.", "cloudpickle.", "dill.")):
          found.append(f"{name}: {func}()")
        for kw in node.keywords:
          if kw.arg in ("shell", "trust_remote_code", "allow_pickle") and not (isinstance(kw.value, ast.Constant) and
                                                                kw.value.value is False):
            found.append(f"{name}: {func}({kw.arg}=...)")
      elif isinstance(node, (ast.Import, ast.ImportFrom)):
        names = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) else [])
        found += [f"{name}: imports {n}" for n in names if n in ("pickle", "cloudpickle", "dill", "marshal")]
  assert not found, found


def test_configs_the_sweep_runner_and_launchers_start_without_jax():
  """Config modules, the override parser, the sweep runner and the TPU launchers import no JAX (they start in a
  fraction of a second; a sweep's every point process and the study's fake points load configs)."""
  import subprocess
  import sys

  modules = [f"experiments.configs.{p.stem}" for p in sorted((ROOT / "experiments" / "configs").glob("*.py"))]
  modules += ["experiments.overrides", "experiments.sweep", "tpu.run", "tpu.sweep", "lora_jax.spec", "lora_jax.lock"]
  code = (f"import importlib, sys\nfor m in {modules!r}:\n  importlib.import_module(m)\n"
          "  assert 'jax' not in sys.modules and 'flax' not in sys.modules, m\n")
  out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr[-2000:]
