"""Residual add + RMSNorm in one kernel for NVIDIA GPUs (Pallas Triton).

After the attention's output projection XLA runs two kernels per layer: one sums the
projection's split-K partials into the residual stream, one normalises the result for
the MoE block. This kernel does both: one program per token row loads the residual
and the update (summing the partials of `sere_jax.numerics.split_k_dot` as it loads
them), writes the sum, and writes its RMSNorm. Reference:
`reference.residual_norm_reference`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from sere_jax.kernels.residual_norm.reference import update_partials


def _kernel(residual_ref, update_ref, weight_ref, total_ref, normed_ref, *, partials, dim,
            dim_pad, eps):
  t = pl.program_id(0)
  d = jnp.arange(dim_pad)
  ok = d < dim
  dtype = total_ref.dtype
  update = plt.load(update_ref.at[0, t, d], mask=ok, other=0)
  for p in range(1, partials):  # split-K partials, summed in order
    update += plt.load(update_ref.at[p, t, d], mask=ok, other=0)
  residual = plt.load(residual_ref.at[t, d], mask=ok, other=0)
  # Rounded as the model rounds: the projection's output, then the sum.
  total = (residual.astype(jnp.float32)
           + update.astype(dtype).astype(jnp.float32)).astype(dtype)
  plt.store(total_ref.at[t, d], total, mask=ok)
  x = total.astype(jnp.float32)
  x = x * jax.lax.rsqrt(jnp.sum(x * x) / dim + eps)
  weight = plt.load(weight_ref.at[d], mask=ok, other=0).astype(jnp.float32)
  plt.store(normed_ref.at[t, d], (weight * x).astype(dtype), mask=ok)


_DTYPES = (jnp.bfloat16, jnp.float16, jnp.float32)


def unsupported(residual: jax.Array) -> str | None:
  """Why the kernel cannot take this residual stream (None when it can): it must be
  bfloat16, float16 or float32."""
  if residual.dtype not in _DTYPES:
    return f"takes bfloat16, float16 or float32 residuals, not {residual.dtype}"
  return None


@functools.partial(jax.jit, static_argnames=("eps", "num_warps", "interpret"))
def residual_norm_triton(residual: jax.Array, update: jax.Array, weight: jax.Array, *,
                         eps: float, num_warps: int = 16, interpret: bool = False
                         ) -> tuple[jax.Array, jax.Array]:
  """`reference.residual_norm_reference` as one kernel.

  Args:
    residual: `[..., D]` the residual stream (bfloat16, float16 or float32).
    update: `[..., D]` in the residual's dtype, or float32 split-K partials
      `[P, ..., D]` that sum to it.
    weight: `[D]` the RMSNorm weight, any float dtype (read as stored).
    eps: the RMSNorm epsilon; num_warps: a GPU tuning knob. The default, 16 warps per
      row, was the fastest of 4, 8 and 16 at B = 1, 16 and 64 on an H100, and the only
      one faster than XLA's dot, add and norm at every B (`tools/residual_norm_sweep.py`,
      `docs/benchmarks/experiments/residual_norm_sweep_h100.json`).

  Returns:
    `(residual + update, its RMSNorm)`, both `[..., D]` in the residual's dtype.
  """
  partials = update_partials(residual, update)
  dim = residual.shape[-1]
  if weight.shape != (dim,):
    raise ValueError(f"weight must be [{dim}], got {weight.shape}")
  rows = residual.reshape(-1, dim)
  kernel = functools.partial(_kernel, partials=partials, dim=dim,
                             dim_pad=max(16, 1 << (dim - 1).bit_length()), eps=eps)
  out = jax.ShapeDtypeStruct(rows.shape, residual.dtype)
  total, normed = pl.pallas_call(
      kernel,
      grid=(rows.shape[0],),
      out_shape=(out, out),
      compiler_params=plt.CompilerParams(num_warps=num_warps, num_stages=1),
      interpret=interpret,
      name="sere_residual_norm",
  )(rows, update.reshape(partials, *rows.shape), weight)
  return total.reshape(residual.shape), normed.reshape(residual.shape)
