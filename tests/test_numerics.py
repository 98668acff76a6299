"""`numerics.gemm_dot`: the same product as `jnp.dot`, computed over two rows for one."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sere_jax.numerics import gemm_dot


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
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def _dot_lhs_rows(x, w) -> set[int]:
  """The row counts of the left operands of the dots in `gemm_dot`'s lowered program."""
  text = jax.jit(gemm_dot).lower(x, w).as_text()
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
