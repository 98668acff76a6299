"""The residual add + RMSNorm in jnp: the definition the kernel is tested against.

A pre-norm transformer adds each sublayer's output to its residual stream and
normalises the sum for the next sublayer. The update comes whole, in the residual's
dtype, or as float32 split-K partials of the projection that made it
(`sere_jax.numerics.split_k_dot`), whose sum rounded to the residual's dtype is that
projection's output.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from sere_jax.kernels.decode_attention.reference import rms_norm
from sere_jax.numerics import sum_partials


def update_partials(residual: jax.Array, update: jax.Array) -> int:
  """The number of partials in `update`: 1 for `[..., D]` in the residual's dtype, P for
  float32 `[P, ..., D]`; raises ValueError on any other shape or dtype."""
  if update.shape == residual.shape and update.dtype == residual.dtype:
    return 1
  if update.shape[1:] == residual.shape and update.dtype == jnp.float32:
    return update.shape[0]
  raise ValueError(f"update must be {residual.shape} in {residual.dtype} (the residual's) "
                   f"or float32 partials [P, *{residual.shape}], got {update.dtype} "
                   f"{update.shape}")


def residual_norm_reference(residual: jax.Array, update: jax.Array, weight: jax.Array, *,
                            eps: float) -> tuple[jax.Array, jax.Array]:
  """`(residual + update, rms_norm(residual + update) * weight)`, both in the
  residual's dtype; partials are summed in order in float32 and rounded first."""
  update_partials(residual, update)
  if update.ndim > residual.ndim:  # partials
    update = sum_partials(update).astype(residual.dtype)
  total = residual + update
  return total, rms_norm(total, weight, eps)
