"""`numerics.gemm_dot`: the same product as `jnp.dot`, computed over two rows for one;
`split_k_dot`: partials that sum to that product."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sere_jax.numerics import gemm_dot, split_k_count, split_k_dot, sum_partials
from tests import kernel_backends

# float32 dots run in TF32 on a GPU.
TOLERANCE = kernel_backends.f32_tolerance(rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("x_shape", [(5,), (1, 5), (1, 1, 5), (3, 5), (2, 4, 5)])
@pytest.mark.parametrize("out_dtype", [None, jnp.float32])
def test_gemm_dot_matches_dot(x_shape, out_dtype):
  kx, kw = jax.random.split(jax.random.key(len(x_shape) + sum(x_shape)))
  x = jax.random.normal(kx, x_shape, jnp.float32)
  w = jax.random.normal(kw, (5, 7), jnp.float32)
  got = gemm_dot(x, w, preferred_element_type=out_dtype)
  want = jnp.dot(x, w, preferred_element_type=out_dtype)
  assert got.shape == want.shape == (*x_shape[:-1], 7)
  assert got.dtype == want.dtype
  np.testing.assert_allclose(got, want, **TOLERANCE)


def _dot_lhs_rows(x, w, fn=gemm_dot) -> set[int]:
  """The row counts of the left operands of the dots in `fn`'s lowered program."""
  text = jax.jit(fn).lower(x, w).as_text()
  rows = set()
  for line in text.splitlines():
    if "dot_general" in line:
      lhs_type = line.split(":")[-1].split("->")[0].strip(" (")
      rows.add(int(lhs_type.split("tensor<")[1].split("x")[0]))
  return rows


def test_one_row_is_computed_as_two():
  w = jnp.ones((8, 4), jnp.bfloat16)
  assert _dot_lhs_rows(jnp.ones((1, 1, 8), jnp.bfloat16), w) == {2}
  assert _dot_lhs_rows(jnp.ones((3, 8), jnp.bfloat16), w) == {3}


def test_rejects_a_weight_that_is_not_a_matrix():
  with pytest.raises(ValueError, match=r"\[K, N\] weight"):
    gemm_dot(jnp.ones((1, 4)), jnp.ones((2, 4, 3)))


@pytest.mark.parametrize("x_shape", [(8,), (1, 8), (1, 1, 8), (3, 8), (2, 4, 8)])
@pytest.mark.parametrize("splits", [1, 2, 4, 8])
def test_split_k_partials_sum_to_the_product(x_shape, splits):
  kx, kw = jax.random.split(jax.random.key(splits + sum(x_shape)))
  x = jax.random.normal(kx, x_shape, jnp.float32)
  w = jax.random.normal(kw, (8, 6), jnp.float32)
  parts = split_k_dot(x, w, splits)
  single = np.prod(x_shape[:-1], dtype=int) == 1
  per_chunk = 2 if single else 1  # one row: each chunk's partial, then the zero row's
  assert parts.shape == (per_chunk * splits, *x_shape[:-1], 6)
  assert parts.dtype == jnp.float32
  chunks = np.split(np.asarray(x), splits, axis=-1)
  w_chunks = np.split(np.asarray(w), splits, axis=0)
  for p, part in enumerate(parts):
    want = (chunks[p // per_chunk] @ w_chunks[p // per_chunk]) * (p % per_chunk == 0)
    np.testing.assert_allclose(part, want, **TOLERANCE)
  np.testing.assert_allclose(parts.sum(0), jnp.dot(x, w), **TOLERANCE)


def test_split_k_dot_computes_one_row_as_two():
  w = jnp.ones((8, 4), jnp.bfloat16)
  dot = lambda x, w: split_k_dot(x, w, 2)
  assert _dot_lhs_rows(jnp.ones((1, 1, 8), jnp.bfloat16), w, dot) == {2}
  assert _dot_lhs_rows(jnp.ones((3, 8), jnp.bfloat16), w, dot) == {3}


@pytest.mark.parametrize("x_shape,w_shape,splits,match", [
    ((2, 8), (8, 3), 3, "positive divisor of K = 8"),
    ((2, 8), (8, 3), 0, "positive divisor"),
    ((2, 8), (6, 3), 2, r"w \[K, N\]"),
    ((2, 8), (2, 4, 3), 2, r"w \[K, N\]"),
])
def test_split_k_dot_rejects_bad_input(x_shape, w_shape, splits, match):
  with pytest.raises(ValueError, match=match):
    split_k_dot(jnp.ones(x_shape), jnp.ones(w_shape), splits)


@pytest.mark.parametrize("k,n,want", [
    (2048, 5120, 4),   # Qwen3-30B-A3B q/k/v
    (4096, 2048, 8),   # its output projection
    (2048, 128, 32),   # its router
    (2048, 64 * 256, 1),  # enough column tiles already
    (256, 128, 4),     # chunks of at least 64
    (96, 128, 1),      # 48-wide chunks would be too narrow
    (192, 128, 2),     # 96-wide chunks; 48 would be too narrow
    (390, 128, 2),     # 4 chunks would not divide 390
])
def test_split_k_count(k, n, want):
  assert split_k_count(k, n) == want


def test_sum_partials_adds_in_order():
  """((p0 + p1) + p2) in float32: 1 + 2^-24 rounds back to 1 each time, so the order
  shows (summing p1 + p2 first would give 1 + 2^-23)."""
  partials = jnp.asarray([[1.0], [2.0 ** -24], [2.0 ** -24]], jnp.float32)
  assert float(sum_partials(partials)[0]) == 1.0
  assert float(sum_partials(partials[::-1])[0]) == 1.0 + 2.0 ** -23
