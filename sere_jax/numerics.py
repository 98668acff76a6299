"""Dot products shared by the kernels' references, the models and the library: operand
precision, activation-by-weight dots that stay matrix products for one token, and
split-K partials for kernels that sum them as they load."""

from __future__ import annotations

import functools
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
  out = jnp.dot(_two_rows(x), w, preferred_element_type=preferred_element_type)[:1]
  return out.reshape(*x.shape[:-1], w.shape[1])


def _two_rows(x: jax.Array) -> jax.Array:
  """A single row `x [..., K]` as `[2, K]`: itself and a zero row (see `gemm_dot`)."""
  return jnp.pad(x.reshape(1, x.shape[-1]), ((0, 1), (0, 0)))


def split_k_count(k: int, n: int, *, min_chunk: int = 64, programs: int = 256) -> int:
  """How many split-K partials `split_k_dot` makes of a skinny `[M, K] x [K, N]` dot.

  The power of two that brings the `N / 64` column tiles to `programs` programs, with
  contraction chunks of at least `min_chunk` that divide `K`. It reproduces the split
  XLA's autotuner chose for Qwen3-30B-A3B's decode dots on an H200 at 16 tokens: 4 for
  q/k/v (`N` = 5120), 8 for the output projection, 32 for the router (`N` = 128).
  """
  want = 1 << max(0, math.ceil(math.log2(programs / math.ceil(n / 64))))
  splits = 1
  while splits < want and k % (2 * splits) == 0 and k // (2 * splits) >= min_chunk:
    splits *= 2
  return splits


def sum_partials(partials: jax.Array) -> jax.Array:
  """Split-K partials `[P, ...]` summed over the first axis in order, `((p0 + p1) + p2)
  ...`, as the kernels that read `split_k_dot`'s output sum them as they load them."""
  return functools.reduce(jnp.add, list(partials))


def split_k_dot(x: jax.Array, w: jax.Array, splits: int) -> jax.Array:
  """The float32 split-K partials of `x [..., K] @ w [K, N]`: `[P, ..., N]`, whose sum
  over the first axis is the product; partial `p` is chunk `p` of the contraction.

  A kernel that reads the product can sum the partials as it loads them, instead of a
  separate reduction kernel after XLA's own split-K dot. One row is computed as two,
  itself and a zero row (`gemm_dot`), and the zero row's partials are returned as
  further partials (`P = 2 * splits`, chunk `p // 2`): they add zeros for finite
  weights, and no slice kernel stands between the dot and its reader. Operands are
  used as given (see `mixed_dot_operands`).
  """
  if w.ndim != 2 or x.shape[-1] != w.shape[0]:
    raise ValueError(f"split_k_dot takes x [..., K] and w [K, N], got {x.shape} and "
                     f"{w.shape}")
  k, n = w.shape
  if splits < 1 or k % splits:
    raise ValueError(f"splits must be a positive divisor of K = {k}, got {splits}")
  rows = x.reshape(-1, k)
  single = rows.shape[0] == 1
  if single:
    rows = _two_rows(rows)
  out = jnp.einsum("msk,skn->smn", rows.reshape(rows.shape[0], splits, k // splits),
                   w.reshape(splits, k // splits, n), preferred_element_type=jnp.float32)
  return out.reshape(-1, *x.shape[:-1], n)
