"""The residual add + RMSNorm in jnp: the definition the kernel is tested against.

A pre-norm transformer adds each sublayer's output to its residual stream and
normalises the sum for the next sublayer. The update comes whole, in the residual's
dtype; as float32 split-K partials of the projection that made it
(`sere_jax.numerics.split_k_dot`), whose sum rounded to the residual's dtype is that
projection's output; or as the MoE FFN's rows before their weighted combine
(`moe_ffn.ExpertRows`), whose combine in the residual's dtype is the FFN's output.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from sere_jax.kernels.decode_attention.reference import rms_norm
from sere_jax.kernels.moe_ffn.reference import ExpertRows


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


def check_expert_rows(residual: jax.Array, update: ExpertRows) -> None:
  """Raises ValueError unless `update` holds float32 row partials `[S, R, D]`, weights
  and int32 slot rows `[T, K]` and a token mask `[T]` for the residual's T rows of D."""
  dim, tokens = residual.shape[-1], math.prod(residual.shape[:-1])
  rows, weights, valid, slot_row = update
  if rows.ndim != 3 or rows.shape[2] != dim or rows.dtype != jnp.float32:
    raise ValueError(f"expert rows must be float32 partials [S, R, {dim}], got "
                     f"{rows.dtype} {rows.shape}")
  if weights.ndim != 2 or weights.shape[0] != tokens:
    raise ValueError(f"expert weights must be [{tokens}, K], got {weights.shape}")
  if slot_row.shape != weights.shape or slot_row.dtype != jnp.int32:
    raise ValueError(f"slot rows must be int32 {weights.shape}, got {slot_row.dtype} "
                     f"{slot_row.shape}")
  if valid.shape != (tokens,) or valid.dtype != jnp.bool_:
    raise ValueError(f"the token mask must be bool [{tokens}], got {valid.dtype} "
                     f"{valid.shape}")


def residual_norm_reference(residual: jax.Array, update: jax.Array | ExpertRows,
                            weight: jax.Array, *, eps: float) -> tuple[jax.Array, jax.Array]:
  """`(residual + update, rms_norm(residual + update) * weight)`, both in the
  residual's dtype; partials are summed in order in float32 and rounded first, expert
  rows combined (`moe_ffn.combine`) into the residual's dtype first."""
  if isinstance(update, ExpertRows):
    check_expert_rows(residual, update)
    update = update.combine(residual.dtype).reshape(residual.shape)
  else:
    update_partials(residual, update)
    if update.ndim > residual.ndim:  # partials
      update = functools.reduce(jnp.add, list(update)).astype(residual.dtype)
  total = residual + update
  return total, rms_norm(total, weight, eps)
