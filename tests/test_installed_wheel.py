"""The installed package, as a user gets it: `pip wheel .`, a fresh venv, the console
scripts run from a directory outside the repository.

One module fixture builds the wheel from a copy of the package sources (so the build
leaves no `build/` folder in the checkout), creates a venv in a temporary directory
and installs the wheel there with `pip install --no-deps --no-index`. The venv reuses
the packages of the interpreter running the tests (jax, flax, orbax, ...; nothing is
downloaded) through a `.pth` file holding that interpreter's site-packages path. A
plain path line does not run the `.pth` files of that folder, so the checkout's
editable install (a meta-path finder installed by a `.pth` file) stays invisible, and
`import sere_jax` can only find the wheel. (`python -m venv --system-site-packages`
would not do: from a venv's python it exposes the base interpreter's site-packages,
not the venv's.)

The wheel is built without build isolation when this interpreter has setuptools
(`pip install -e '.[test]'` brings it), so the test needs no network; otherwise pip
fetches the build backend.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tomllib
import zipfile

import pytest

# The real checkout (under Bazel this file is a runfiles symlink into it).
REPO = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))
with open(os.path.join(REPO, "pyproject.toml"), "rb") as _fh:
  PYPROJECT = tomllib.load(_fh)
PACKAGE_DIRS = PYPROJECT["tool"]["setuptools"]["package-dir"]  # import name -> folder
SCRIPTS = PYPROJECT["project"]["scripts"]
HELP_SCRIPTS = ["sere-demo", "sere-generate", "sere-evaluate", "sere-calibrate"]
TIMEOUT = 300


def _clean_env(venv: str | None = None) -> dict[str, str]:
  """The environment without anything that points Python at the checkout."""
  env = {k: v for k, v in os.environ.items()
         if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSAFEPATH", "PYTHONUSERBASE",
                      "VIRTUAL_ENV", "__PYVENV_LAUNCHER__")}
  env.pop("PYTHONDONTWRITEBYTECODE", None)  # else setuptools warns it cannot byte-compile
  env.update(PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INPUT="1", PIP_NO_CACHE_DIR="1",
             PIP_ROOT_USER_ACTION="ignore")
  if venv:
    env["VIRTUAL_ENV"] = venv
    env["PATH"] = os.path.join(venv, "bin") + os.pathsep + env.get("PATH", "")
  return env


def _run(cmd: list[str], cwd: str, env: dict[str, str]) -> subprocess.CompletedProcess:
  return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True,
                        timeout=TIMEOUT, check=False)


def _copy_sources(dest: str) -> None:
  """What `pip wheel .` reads: pyproject.toml, the readme, license files and the
  package folders."""
  os.makedirs(dest)
  top = ["pyproject.toml", PYPROJECT["project"]["readme"]]
  top += [n for n in os.listdir(REPO)
          if re.match(r"(LICEN[CS]E|COPYING|NOTICE|AUTHORS)", n)]
  for name in top:
    shutil.copy2(os.path.join(REPO, name), os.path.join(dest, name))
  for folder in sorted(set(PACKAGE_DIRS.values())):
    shutil.copytree(os.path.join(REPO, folder), os.path.join(dest, folder),
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))


def _has_modern_setuptools() -> bool:
  try:
    major = int(importlib.metadata.version("setuptools").split(".")[0])
  except importlib.metadata.PackageNotFoundError:
    return False
  return major >= 77


class Installed:
  def __init__(self, root: str):
    self.root = root
    self.venv = os.path.join(root, "venv")
    self.bin = os.path.join(self.venv, "bin")
    self.python = os.path.join(self.bin, "python")
    self.workdir = os.path.join(root, "elsewhere")  # the user's working directory
    self.env = _clean_env(self.venv)
    self.build_log = ""
    self.wheel = ""
    self.site_packages = ""


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Installed:
  inst = Installed(str(tmp_path_factory.mktemp("installed_wheel")))
  assert not os.path.realpath(inst.root).startswith(REPO + os.sep)
  os.makedirs(inst.workdir)

  # 1. The wheel, from a copy of the sources.
  src, wheels = os.path.join(inst.root, "src"), os.path.join(inst.root, "wheels")
  _copy_sources(src)
  cmd = [sys.executable, "-m", "pip", "wheel", src, "--no-deps", "-v", "-w", wheels]
  if _has_modern_setuptools():
    cmd.append("--no-build-isolation")
  proc = _run(cmd, inst.root, _clean_env())
  inst.build_log = proc.stdout + proc.stderr
  assert proc.returncode == 0, inst.build_log[-5000:]
  (name,) = os.listdir(wheels)
  inst.wheel = os.path.join(wheels, name)

  # 2. A fresh venv that sees this interpreter's packages but not the checkout.
  proc = _run([sys.executable, "-m", "venv", inst.venv], inst.root, _clean_env())
  assert proc.returncode == 0, proc.stderr[-3000:]
  proc = _run([inst.python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
              inst.workdir, inst.env)
  inst.site_packages = proc.stdout.strip()
  deps = dict.fromkeys([sysconfig.get_path("purelib"), sysconfig.get_path("platlib")])
  with open(os.path.join(inst.site_packages, "sere_jax_test_dependencies.pth"), "w") as fh:
    fh.write("".join(p + "\n" for p in deps))

  # 3. pip install of the wheel, offline.
  proc = _run([inst.python, "-m", "pip", "install", "--no-deps", "--no-index", inst.wheel],
              inst.workdir, inst.env)
  assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
  return inst


def test_the_wheel_builds_without_warnings(installed):
  # Not pip's "adding 'file'" lines, which name files, not problems.
  lines = [line for line in installed.build_log.splitlines()
           if not re.match(r"\s*(adding|copying|creating) ", line)]
  problems = [line for line in lines if re.search(r"warn|deprecat", line, re.IGNORECASE)]
  assert not problems, "\n".join(problems)


def test_the_wheel_holds_every_module_and_every_checkpoint_file(installed):
  with zipfile.ZipFile(installed.wheel) as zf:
    names = set(zf.namelist())
  expected = set()
  for package, folder in PACKAGE_DIRS.items():
    root = os.path.join(REPO, folder)
    for directory, dirs, files in os.walk(root):
      dirs[:] = [d for d in dirs if d != "__pycache__"]
      rel_dir = os.path.relpath(directory, root)
      for f in files:
        rel = os.path.normpath(os.path.join(rel_dir, f))
        shipped_data = package == "sere_jax.checkpoints" and os.sep in rel
        if f.endswith(".py") or shipped_data:
          expected.add("/".join(package.split(".") + rel.split(os.sep)))
  missing = sorted(expected - names)
  assert not missing, f"not in the wheel: {missing[:20]}"
  # The shipped model, the Orbax state included.
  prefix = "sere_jax/checkpoints/tiny_shakespeare_moe/"
  for rel in ("config.json", "tokenizer.json", "sere_similarity.safetensors",
              "heldout_test.txt.xz", "state/_METADATA", "state/manifest.ocdbt"):
    assert prefix + rel in names
  assert any(n.startswith(prefix + "state/ocdbt.process_0/d/") for n in names)
  assert not any(n.endswith("BUILD.bazel") for n in names)


def test_python_imports_the_wheel_not_the_checkout(installed):
  code = ("import json, importlib.metadata as md, sere_jax, sere_jax.checkpoints as c, "
          "sere_jax.scripts.demo as d, sere_jax.kernels, sere_jax.models; "
          "print(json.dumps({'sere_jax': sere_jax.__file__, 'demo': d.__file__, "
          "'kernels': sere_jax.kernels.__file__, 'models': sere_jax.models.__file__, "
          "'checkpoint': c.path(), 'names': c.names(), "
          "'dist': str(md.distribution('sere-jax').locate_file(''))}))")
  proc = _run([installed.python, "-c", code], installed.workdir, installed.env)
  assert proc.returncode == 0, proc.stderr[-3000:]
  found = json.loads(proc.stdout.strip().splitlines()[-1])
  assert "tiny_shakespeare_moe" in found.pop("names")
  site = os.path.realpath(installed.site_packages)
  for what, path in found.items():
    assert os.path.realpath(path).startswith(site), (what, path)
  assert os.path.isdir(os.path.join(found["checkpoint"], "state"))


def test_console_scripts_are_installed_and_print_help(installed):
  for name in SCRIPTS:
    assert os.access(os.path.join(installed.bin, name), os.X_OK), name
  procs = {name: subprocess.Popen([os.path.join(installed.bin, name), "--help"],
                                  cwd=installed.workdir, env=installed.env, text=True,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
           for name in HELP_SCRIPTS}
  for name, proc in procs.items():
    out, _ = proc.communicate(timeout=TIMEOUT)
    assert "Traceback" not in out, (name, out[-3000:])
    assert proc.returncode == 0, (name, proc.returncode, out[-3000:])
    # The script's own flags, each of these scripts has --model_dir.
    assert "--model_dir" in out, (name, out[-3000:])


def test_sere_demo_runs_from_outside_the_repository(installed):
  out = os.path.join(installed.workdir, "demo.json")
  proc = _run([os.path.join(installed.bin, "sere-demo"), "--batch=4", "--new_tokens=6",
               "--perplexity_sequences=4", "--seq_len=64", "--policies=sere:1",
               "--show=1", "--impl=xla_dense", f"--json_out={out}"],
              installed.workdir, installed.env)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "distinct/layer" in proc.stdout and "test ppl" in proc.stdout
  assert re.search(r"^none\s+\d", proc.stdout, re.MULTILINE), proc.stdout[-3000:]
  assert re.search(r"^sere S=1 rho=0\s+\d", proc.stdout, re.MULTILINE), proc.stdout[-3000:]
  with open(out) as fh:
    result = json.load(fh)
  # The default model directory is the installed package data.
  assert os.path.realpath(result["model_dir"]).startswith(
      os.path.realpath(installed.site_packages))
  assert [r["policy"] for r in result["rows"]] == ["none", "sere S=1 rho=0"]
