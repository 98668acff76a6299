"""Shared pytest set-up, made before any test imports jax.

* Eight host CPU devices, so the expert-parallel tests can build meshes of 2, 4 and 8
  devices in the same process as every other test (which run on the first device). An
  XLA_FLAGS given from outside keeps its own device count.
* One JAX compilation cache for the whole run (a fresh temporary folder, removed at the
  end): the xdist workers and the scripts that tests start as child processes inherit
  it, so a program that several tests compile alike is compiled once. A
  JAX_COMPILATION_CACHE_DIR given from outside is used and kept instead.
"""

import os
import shutil
import tempfile

_FLAG = "--xla_force_host_platform_device_count"
if _FLAG not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_FLAG}=8".strip()

_CACHE = "JAX_COMPILATION_CACHE_DIR"
_OWN_CACHE = None
if _CACHE not in os.environ:  # the main pytest process; its workers inherit the folder
  _OWN_CACHE = os.environ[_CACHE] = tempfile.mkdtemp(prefix="sere-jax-test-xla-cache-")


def pytest_unconfigure(config):
  del config
  if _OWN_CACHE is not None:
    shutil.rmtree(_OWN_CACHE, ignore_errors=True)
