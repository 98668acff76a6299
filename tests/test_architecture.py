"""The floors of docs/architecture.md, checked against the real imports.

Every module of the installed package belongs to one floor; a module may import from
its own floor and the floors below, never above. The re-routing core imports nothing
but jax, numpy and the standard library. The test reads every `import` statement
(including those inside functions) of the source tree, so a new upward import fails it.
"""

from __future__ import annotations

import ast
import os
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Source folder -> installed package name (pyproject.toml's package-dir).
PACKAGE_DIRS = {"sere_jax": "sere_jax", "pallas_kernels": "sere_jax.kernels",
                "models": "sere_jax.models", "scripts": "sere_jax.scripts",
                "checkpoints": "sere_jax.checkpoints"}
# Module-name prefix -> floor (the longest matching prefix wins).
FLOORS = {
    "sere_jax.fileio": 0, "sere_jax.textio": 0,
    "sere_jax.config": 1, "sere_jax.policy_spec": 1, "sere_jax.policies": 1,
    "sere_jax.control_policies": 1, "sere_jax.similarity": 1, "sere_jax.validation": 1,
    "sere_jax.routing": 1, "sere_jax.numerics": 1, "sere_jax.placement": 1,
    "sere_jax.kernels": 2,
    "sere_jax.moe": 3, "sere_jax.expert_parallel": 3,
    "sere_jax.models": 4,
    "sere_jax": 5,  # generation, evaluation, calibration, training, benchmarking, data
    "sere_jax.scripts": 6,
}
# The package itself: its __init__ re-exports the core's public names only.
EXACT = {"sere_jax": 1}
CORE_FLOOR = 1
CORE_LIBRARIES = {"jax", "numpy", "__future__"}


def _modules() -> dict[str, str]:
  """Installed module name -> source path, for every module of the package."""
  found = {}
  for folder, package in PACKAGE_DIRS.items():
    root = os.path.join(REPO, folder)
    for directory, _, files in os.walk(root):
      for name in files:
        if not name.endswith(".py"):
          continue
        rel = os.path.relpath(os.path.join(directory, name), root)[:-3].split(os.sep)
        if rel[-1] == "__init__":
          rel = rel[:-1]
        found[".".join([package] + rel)] = os.path.join(directory, name)
  return found


def floor(module: str) -> int:
  if module in EXACT:
    return EXACT[module]
  best = max((p for p in FLOORS if module == p or module.startswith(p + ".")), key=len)
  return FLOORS[best]


def _imports(path: str, module: str, known: frozenset[str] = frozenset()
             ) -> list[tuple[str, int]]:
  """`(imported module or package, line)` of every import in `path`; `from P import M`
  of a module M in `known` counts as importing P.M alone."""
  tree = ast.parse(open(path, encoding="utf-8").read(), path)
  out = []
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      out += [(a.name, node.lineno) for a in node.names]
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:  # relative: resolve against the importing package
        parts = module.split(".")[:-node.level] if not path.endswith("__init__.py") \
            else module.split(".")[:len(module.split(".")) - node.level + 1]
        base = ".".join(parts + ([base] if base else []))
      names = [f"{base}.{a.name}" for a in node.names]
      out += [(n if n in known else base, node.lineno) for n in names]
  return out


def _violations() -> tuple[list[str], list[str]]:
  modules = _modules()
  upward, core = [], []
  for module, path in sorted(modules.items()):
    mine = floor(module)
    for name, line in _imports(path, module, frozenset(modules)):
      if name.startswith("sere_jax"):
        target = name if name in modules else name.rpartition(".")[0]
        if target in modules and floor(target) > mine:
          upward.append(f"{os.path.relpath(path, REPO)}:{line} (floor {mine}) imports "
                        f"{target} (floor {floor(target)})")
      elif mine <= CORE_FLOOR:
        top = name.split(".")[0]
        if top not in CORE_LIBRARIES and top not in sys.stdlib_module_names:
          core.append(f"{os.path.relpath(path, REPO)}:{line} imports {name}")
  return upward, core


def test_every_module_has_a_floor():
  assert "sere_jax.kernels.moe_ffn.api" in _modules()
  for module in _modules():
    floor(module)  # raises if no prefix matches


def test_no_import_goes_up_a_floor():
  upward, _ = _violations()
  assert not upward, "imports from a higher floor:\n" + "\n".join(upward)


def test_the_core_needs_only_jax_and_numpy():
  _, core = _violations()
  assert not core, "the re-routing core imports other libraries:\n" + "\n".join(core)


@pytest.mark.parametrize("module, expected", [
    ("sere_jax.policies", 1), ("sere_jax.kernels.gmm.triton", 2), ("sere_jax.moe", 3),
    ("sere_jax.models.qwen_moe", 4), ("sere_jax.evaluation.runner", 5),
    ("sere_jax.scripts.demo", 6), ("sere_jax.fileio", 0)])
def test_floor_map(module, expected):
  assert floor(module) == expected


def test_an_upward_import_would_be_caught(tmp_path):
  """The checker itself: a kernel file importing the MoE layer is reported."""
  path = tmp_path / "bad.py"
  path.write_text("from sere_jax import moe\nimport flax\n")
  names = [n for n, _ in _imports(str(path), "sere_jax.kernels.bad",
                                   frozenset(["sere_jax.moe"]))]
  assert "sere_jax.moe" in names
  assert floor("sere_jax.moe") > floor("sere_jax.kernels.bad")


def test_no_test_imports_a_script():
  """Scripts define their absl flags at import, in one registry: two scripts imported
  into one pytest process clash on shared flag names (`--model_dir`, `--merge`). Tests
  run scripts as processes and import what they check from the library floors."""
  tests_dir = os.path.join(REPO, "tests")
  found = []
  for name in sorted(os.listdir(tests_dir)):
    if name.endswith(".py"):
      path = os.path.join(tests_dir, name)
      found += [f"tests/{name}:{line} imports {imported}"
                for imported, line in _imports(path, f"tests.{name[:-3]}",
                                               frozenset(_modules()))
                if imported.startswith("sere_jax.scripts")]
  assert not found, "\n".join(found)
