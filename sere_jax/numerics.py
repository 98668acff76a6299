"""Dot products shared by the kernels' references, the models and the library: operand
precision, and activation-by-weight dots that stay matrix products for one token."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def mixed_dot_operands(*arrays: jax.Array) -> tuple[jax.Array, ...]:
  """Operands for a dot with `preferred_element_type=float32`.

  Low-precision operands stay as they are (the GPU and TPU multiply bf16 into f32
  directly, without an f32 copy of a weight in memory); the CPU backend has no
  bf16 x bf16 -> f32 dot, so there they are upcast (exact).
  """
  if jax.default_backend() == "cpu":
    return tuple(a.astype(jnp.float32) for a in arrays)
  return arrays


def gemm_dot(x: jax.Array, w: jax.Array, *,
             preferred_element_type: jnp.dtype | None = None) -> jax.Array:
  """`jnp.dot(x, w)` of activations `x [..., K]` and a weight `w [K, N]`, kept a matrix
  product when `x` holds a single row.

  XLA's GPU compiler rewrites a vector-by-matrix dot whose weight is below about 10 M
  elements into an elementwise multiply and a separate reduction; on an H200 the
  `[1, 4096] x [4096, 2048]` bf16 output projection took 30.7 µs that way against
  9.7 µs as a two-row GEMM (`docs/benchmarks/decode_layer_sweep_b1_h200.json`). So a
  single row is padded with a zero row, and the padding sliced off the result.
  """
  if w.ndim != 2:
    raise ValueError(f"gemm_dot takes a [K, N] weight, got shape {w.shape}")
  if math.prod(x.shape[:-1]) != 1:
    return jnp.dot(x, w, preferred_element_type=preferred_element_type)
  rows = jnp.pad(x.reshape(1, x.shape[-1]), ((0, 1), (0, 0)))
  out = jnp.dot(rows, w, preferred_element_type=preferred_element_type)[:1]
  return out.reshape(*x.shape[:-1], w.shape[1])
