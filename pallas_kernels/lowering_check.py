"""Runs the real Pallas lowering for a GPU or TPU target on any machine.

`export_for("cuda", f, *args)` lowers `f` for an NVIDIA H200 and `export_for("tpu", ...)`
for a TPU, without the device: this catches unsupported block shapes, non-power-of-2
Triton tiles and Mosaic layout errors on a CPU-only machine. While it lowers,
`lowering_platform()` names the target, so the ops' registries accept the target's
backends (`triton`, `tpu`) on a machine that has no such device.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Callable

import jax
from jax import export
from jax.sharding import AbstractDevice, AbstractMesh

_H200 = AbstractDevice(device_kind="NVIDIA H200", num_cores=132, platform="gpu")
_TRITON_CALL = "__gpu$xla.gpu.triton"
_PLATFORMS = {"cuda": "gpu", "tpu": "tpu"}  # export platform -> jax backend name
_LOWERING_FOR: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "sere_kernels_lowering_for", default=None)


def lowering_platform() -> str | None:
  """The backend (`gpu`, `tpu`) that `export_for` is lowering for now, else None."""
  return _LOWERING_FOR.get()


def export_for(platform: str, fn: Callable, *args) -> export.Exported:
  """Lowers `jax.jit(fn)(*args)` for `platform` ("cuda" or "tpu")."""
  if platform == "cuda":
    scope = jax.sharding.use_abstract_mesh(
        AbstractMesh((1,), ("x",), abstract_device=_H200))
    checks = [export.DisabledSafetyCheck.custom_call(_TRITON_CALL)]
  elif platform == "tpu":
    scope, checks = contextlib.nullcontext(), []
  else:
    raise ValueError(f"platform must be 'cuda' or 'tpu', got {platform!r}")
  token = _LOWERING_FOR.set(_PLATFORMS[platform])
  try:
    with scope:
      return export.export(jax.jit(fn), platforms=[platform],
                           disabled_checks=checks)(*args)
  finally:
    _LOWERING_FOR.reset(token)
