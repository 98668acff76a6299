"""The residual add + RMSNorm op: `residual_norm(..., implementation=)`.

`(residual + update, rms_norm(residual + update) * weight)`, the update whole or as
float32 split-K partials of the projection that made it. Implementations
(`IMPLEMENTATIONS`, `REGISTRY`):
  triton     one Pallas Triton kernel (NVIDIA GPUs), `triton.residual_norm_triton`;
             a residual stream it cannot take (`triton.unsupported`: another dtype)
             runs `xla` instead, with one log line naming the reason.
  interpret  the Triton kernel in Pallas interpret mode (any backend), the same way.
  xla        the jnp reference, `reference.residual_norm_reference`.
  auto       triton on GPU, interpret on CPU, xla on TPU (no TPU kernel).
"""

from __future__ import annotations

import jax

from sere_jax.kernels import registry
from sere_jax.kernels.residual_norm import triton
from sere_jax.kernels.residual_norm.reference import residual_norm_reference

def _triton(residual, update, weight, *, eps, interpret=False, **options):
  reason = triton.unsupported(residual)
  if reason:
    registry.log_triton_fallback("residual_norm", reason, interpret=interpret)
    return residual_norm_reference(residual, update, weight, eps=eps)
  return triton.residual_norm_triton(residual, update, weight, eps=eps,
                                     interpret=interpret, **options)


IMPLEMENTATIONS = {
    "triton": _triton,
    "interpret": lambda *args, **kw: _triton(*args, interpret=True, **kw),
    "xla": residual_norm_reference,
}
REGISTRY = registry.Registry("residual_norm", IMPLEMENTATIONS, references=("xla",),
                             fallback="xla")


def residual_norm(residual: jax.Array, update: jax.Array, weight: jax.Array, *,
                  eps: float, implementation: str = "auto", **options
                  ) -> tuple[jax.Array, jax.Array]:
  """`(residual + update, its RMSNorm times weight)`, both in the residual's dtype.

  `residual [..., D]`; `update [..., D]` in the residual's dtype or float32 split-K
  partials `[P, ..., D]`; `weight [D]`. `implementation` is one of `REGISTRY.names`;
  `**options` are the chosen backend's tuning knobs (`num_warps` for the Triton
  kernel).
  """
  fn = REGISTRY.get(implementation)
  return fn(residual, update, weight, eps=eps, **options)
