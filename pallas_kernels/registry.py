"""The implementation registry every kernel op's `api.py` keeps.

An op maps implementation names to callables. Conventional names:
  triton         Pallas Triton kernels; run on NVIDIA GPUs only.
  tpu            Pallas Mosaic kernels; run on TPUs only.
  mosaic_gpu     Pallas Mosaic GPU kernels; run on (Hopper) NVIDIA GPUs only.
  interpret      the Triton kernels in Pallas interpret mode (any backend; tests).
  tpu_interpret  the TPU kernels in Pallas' TPU interpret mode (any backend; tests).
  mosaic_gpu_interpret  the Mosaic GPU kernels in their interpret mode (any backend).
  xla            the pure-jnp reference (`reference.py` beside the op's api).
`auto` picks `triton` on GPU, `tpu` on TPU and `interpret` elsewhere; an op without
that backend falls back to its `fallback` (its reference). Asking for a backend that
cannot run on the current device raises ValueError.
"""

from __future__ import annotations

import logging
from typing import Callable, Mapping

import jax

from sere_jax.kernels import lowering_check

AUTO = "auto"
# `auto` on each jax backend; any other backend (cpu) gets `interpret`.
_PREFERRED = {"gpu": "triton", "tpu": "tpu"}
_DEFAULT_PREFERRED = "interpret"
# The backends that need a device; every other implementation runs anywhere.
_RUNS_ON = {"triton": "gpu", "tpu": "tpu", "mosaic_gpu": "gpu"}


_LOGGED: set[str] = set()


def log_once(message: str) -> None:
  """Logs `message` as a warning the first time this process sees it: a kernel that
  cannot take its inputs says once why the op runs another path instead."""
  if message not in _LOGGED:
    _LOGGED.add(message)
    logging.getLogger("sere_jax.kernels").warning(message)


def log_triton_fallback(op: str, reason: str, *, interpret: bool,
                        running: str = "the XLA reference") -> None:
  """Logs once that `op`'s Triton kernel (`interpret`: in interpret mode) cannot take
  its inputs (`reason`, from the backend's `unsupported`) and what runs instead."""
  name = "interpret" if interpret else "triton"
  log_once(f"{op} ({name}): the Triton kernel {reason}; running {running}")


def current_platform() -> str:
  """The jax backend that code traced now is for: the target of
  `lowering_check.export_for`, else that of an abstract mesh with a device
  (`jax.sharding.use_abstract_mesh`), else `jax.default_backend()`."""
  target = lowering_check.lowering_platform()
  if target is not None:
    return target
  device = getattr(jax.sharding.get_abstract_mesh(), "abstract_device", None)
  if device is not None and getattr(device, "platform", None):
    return device.platform
  return jax.default_backend()


class Registry:
  """Implementations of one kernel op, by name, with `auto` and a device check.

  Args:
    op: the op's name, for error messages.
    implementations: name -> callable (the `auto` entry is implicit).
    references: the names that are references (pure jnp / XLA), not kernels.
    fallback: what `auto` picks where the platform's preferred kernel is missing.
    arg: the keyword that selects the implementation, for error messages.
  """

  def __init__(self, op: str, implementations: Mapping[str, Callable], *,
               references: tuple[str, ...], fallback: str, arg: str = "implementation"):
    if AUTO in implementations or fallback not in implementations:
      raise ValueError(f"{op}: bad registry (fallback {fallback!r}, names "
                       f"{tuple(implementations)})")
    self.op, self.arg = op, arg
    self.implementations = dict(implementations)
    self.references, self.fallback = tuple(references), fallback

  @property
  def names(self) -> tuple[str, ...]:
    """`auto` and every implementation, in registration order."""
    return (AUTO, *self.implementations)

  @property
  def kernels(self) -> tuple[str, ...]:
    """The implementations that are not references."""
    return tuple(n for n in self.implementations if n not in self.references)

  def resolve(self, implementation: str) -> str:
    """Validates the name and maps `auto` to the default backend's implementation."""
    if implementation not in self.names:
      raise ValueError(f"{self.arg} must be one of {self.names}, got {implementation!r}")
    if implementation != AUTO:
      return implementation
    preferred = _PREFERRED.get(jax.default_backend(), _DEFAULT_PREFERRED)
    return preferred if preferred in self.implementations else self.fallback

  def runs_here(self, implementation: str) -> bool:
    """Whether the (resolved) implementation can run on `current_platform()`."""
    needs = _RUNS_ON.get(implementation)
    return needs is None or needs == current_platform()

  def check(self, implementation: str) -> None:
    """Raises ValueError unless the (resolved) implementation runs here."""
    if not self.runs_here(implementation):
      anywhere = [n for n in self.implementations if n not in _RUNS_ON]
      raise ValueError(
          f"{self.op}: {self.arg} {implementation!r} runs only on "
          f"{_RUNS_ON[implementation]} devices, not on this {current_platform()!r} "
          f"device (jax.default_backend() is {jax.default_backend()!r}); these run "
          f"anywhere: {tuple(anywhere)}")

  def get(self, implementation: str) -> Callable:
    """The callable of `implementation` (`auto` resolved), checked to run here."""
    name = self.resolve(implementation)
    self.check(name)
    return self.implementations[name]
