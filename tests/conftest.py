"""Shared pytest set-up: eight host CPU devices, so the expert-parallel tests can build
meshes of 2, 4 and 8 devices in the same process as every other test (which run on the
first device). Set before any test imports jax; an XLA_FLAGS given from outside keeps
its own device count."""

import os

_FLAG = "--xla_force_host_platform_device_count"
if _FLAG not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_FLAG}=8".strip()
