"""The residual add + RMSNorm op (`sere_jax.kernels.residual_norm`): every kernel backend
that runs here (interpret mode on a CPU) against its reference, the reference against
the models' own add and norm, and the Triton kernel's CUDA lowering."""

from __future__ import annotations

import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sere_jax.kernels import registry
from sere_jax.kernels import residual_norm as residual_norm_op
from sere_jax.kernels.lowering_check import export_for
from sere_jax.kernels.residual_norm.triton import residual_norm_triton
from sere_jax.models import layers
from tests import kernel_backends

EPS = 1e-6


def _inputs(rng, shape, dtype, partials):
  """A residual, an update (whole, or float32 partials in multiples of 1/8 so that
  their sum is exact in any order) and a norm weight in the residual's dtype."""
  residual = jnp.asarray(rng.normal(size=shape), dtype)
  weight = jnp.asarray(1 + 0.1 * rng.normal(size=shape[-1]), dtype)
  if partials == 0:
    return residual, jnp.asarray(rng.normal(size=shape), dtype), weight
  update = jnp.asarray(rng.integers(-8, 9, (partials, *shape)) / 8, jnp.float32)
  return residual, update, weight


@kernel_backends.over_implementations(residual_norm_op.REGISTRY)
@pytest.mark.parametrize("shape,dtype,partials", [
    ((3, 1, 32), jnp.bfloat16, 8),   # a decode step's [B, 1, D], eight partials
    ((5, 48), jnp.float32, 3),       # D not a power of two
    ((2, 64), jnp.bfloat16, 0),      # a whole update in the residual's dtype
    ((1, 1, 16), jnp.float16, 1),    # one row, one partial
])
def test_matches_reference(shape, dtype, partials, implementation):
  rng = np.random.default_rng(len(shape) * 10 + partials)
  args = _inputs(rng, shape, dtype, partials)
  got = residual_norm_op.residual_norm(*args, eps=EPS, implementation=implementation)
  want = residual_norm_op.residual_norm_reference(*args, eps=EPS)
  for name, g, w in zip(("total", "normed"), got, want):
    assert g.shape == w.shape == shape and g.dtype == w.dtype == dtype, name
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == jnp.float32 else dict(rtol=1e-2, atol=1e-2)
    np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(w, np.float32),
                               err_msg=name, **tol)
  # The sum is exact here (partials in 1/8, residual added once): equal, not close.
  np.testing.assert_array_equal(np.asarray(got[0], np.float32),
                                np.asarray(want[0], np.float32))


def test_reference_is_the_models_add_then_norm():
  """The models' decode path before this op: the projection's output rounded to the
  activation dtype, added to the residual, then `layers.RMSNorm`."""
  rng = np.random.default_rng(7)
  residual, update, weight = _inputs(rng, (4, 1, 32), jnp.bfloat16, 4)
  total, normed = residual_norm_op.residual_norm_reference(residual, update, weight, eps=EPS)
  projection = update.sum(0).astype(jnp.bfloat16)
  want_total = residual + projection
  norm = layers.RMSNorm(32, EPS, jnp.bfloat16)
  norm.weight[...] = weight
  np.testing.assert_array_equal(np.asarray(total, np.float32),
                                np.asarray(want_total, np.float32))
  np.testing.assert_array_equal(np.asarray(normed, np.float32),
                                np.asarray(norm(want_total), np.float32))


@pytest.mark.parametrize("update,weight,match", [
    (jnp.zeros((2, 8), jnp.bfloat16), jnp.ones(8), "update must be"),   # another dtype
    (jnp.zeros((2, 2, 8), jnp.bfloat16), jnp.ones(8), "or float32 partials"),
    (jnp.zeros((2, 4, 8), jnp.float32), jnp.ones(8), "update must be"),  # another shape
    (jnp.zeros((2, 2, 8), jnp.float32), jnp.ones(4), r"weight must be \[8\]"),
])
def test_rejects_bad_input(update, weight, match):
  residual = jnp.zeros((2, 8), jnp.float32)
  with pytest.raises(ValueError, match=match):
    residual_norm_triton(residual, update, weight, eps=EPS, interpret=True)


@kernel_backends.over_implementations(residual_norm_op.REGISTRY)
def test_dtype_the_kernel_cannot_take_runs_xla_with_one_log_line(implementation, caplog):
  """An int32 residual stream: the reference's result, and one log line that names it
  (none for the reference itself)."""
  rng = np.random.default_rng(9)
  residual = jnp.asarray(rng.integers(-4, 5, (2, 16)), jnp.int32)
  update = jnp.asarray(rng.integers(-8, 9, (2, 2, 16)) / 8, jnp.float32)
  weight = jnp.ones((16,), jnp.float32)
  registry._LOGGED.clear()
  with caplog.at_level(logging.WARNING, logger="sere_jax.kernels"):
    got = residual_norm_op.residual_norm(residual, update, weight, eps=EPS,
                                         implementation=implementation)
  want = residual_norm_op.residual_norm_reference(residual, update, weight, eps=EPS)
  for g, w in zip(got, want):
    assert g.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(g), np.asarray(w))
  logged = [r.getMessage() for r in caplog.records if "residual_norm" in r.getMessage()]
  if implementation == "xla":
    assert not logged
  else:
    assert logged == [f"residual_norm ({implementation}): the Triton kernel takes "
                      "bfloat16, float16 or float32 residuals, not int32; running the "
                      "XLA reference"]


def test_lowers_for_cuda():
  """Qwen3-30B-A3B at B = 16: the output projection's eight partials of 2048."""
  spec = jax.ShapeDtypeStruct
  fn = functools.partial(residual_norm_triton, eps=EPS)
  exported = export_for("cuda", fn, spec((16, 1, 2048), jnp.bfloat16),
                        spec((8, 16, 1, 2048), jnp.float32), spec((2048,), jnp.bfloat16))
  assert "__gpu$xla.gpu.triton" in exported.mlir_module()
  assert [a.shape for a in exported.out_avals] == [(16, 1, 2048)] * 2
