"""Pure-jnp grouped matmul: the definition the kernels (`triton.py`, `tpu.py`,
`mosaic_gpu.py`) are tested against, and its optional SwiGLU epilogue."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def swiglu(gate_up: jax.Array) -> jax.Array:
  """`SiLU(gate) * up` of a fused `[..., 2F]` projection (gate first)."""
  gate, up = jnp.split(gate_up, 2, axis=-1)
  return jax.nn.silu(gate) * up


def row_experts(group_offsets: jax.Array, num_rows: int) -> jax.Array:
  """`[M]` int32 expert of each row; `E` for rows past the last group."""
  rows = jnp.arange(num_rows, dtype=jnp.int32)
  return (jnp.searchsorted(group_offsets, rows, side="right") - 1).astype(jnp.int32)


def gmm_reference(x: jax.Array, w: jax.Array, group_offsets: jax.Array,
                  row_token: jax.Array | None = None, num_rows: int | None = None
                  ) -> jax.Array:
  """`out[r] = x[row_token[r]] @ w[expert(r)]` in float32; rows outside groups are 0.

  Args:
    x: `[M, D]` rows in expert order, or `[T, D]` tokens gathered by `row_token`.
    w: `[E, D, N]` expert weights.
    group_offsets: `[E + 1]` int32 row offsets of each expert's group.
    row_token: `[M]` int32 token of each row; None means row `r` is `x[r]`.
    num_rows: M; defaults to `len(row_token)` or `len(x)`.
  """
  num_experts = w.shape[0]
  if row_token is not None:
    num_rows = row_token.shape[0] if num_rows is None else num_rows
    lhs = x[row_token]
  else:
    num_rows = x.shape[0] if num_rows is None else num_rows
    lhs = x[:num_rows]
  expert = row_experts(group_offsets, num_rows)
  inside = jnp.arange(num_rows) < group_offsets[num_experts]
  rhs = w[jnp.clip(expert, 0, num_experts - 1)].astype(jnp.float32)
  out = jnp.einsum("md,mdn->mn", lhs.astype(jnp.float32), rhs,
                   precision=jax.lax.Precision.HIGHEST)
  return jnp.where(inside[:, None], out, 0.0)
