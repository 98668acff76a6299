"""The grouped-matmul op (`sere_jax.kernels.gmm`): every backend that runs here, through
the op's api with its default (tuned) options, against the pure-jnp reference; and
the reference against a NumPy loop. Backend options, unwritten rows and lowering are
tested in test_triton_kernels.py and test_tpu_kernels.py."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from sere_jax.kernels import gmm as gmm_op
from sere_jax.kernels.gmm import api as gmm_api
from sere_jax.kernels.gmm.tiles import TILES
from sere_jax.kernels.schedule.reference import build_schedule
from tests import kernel_backends

T, K, E = 16, 3, 8  # 48 rows over 8 experts

# (w dtype, D, N, gather rows by token): the tuned blocks clamp to the small dims.
CASES = {
    "f32_sorted": (jnp.float32, 40, 48, False),
    "bf16_gather": (jnp.bfloat16, 40, 48, True),
    # whole 64-wide tiles: the Mosaic GPU kernel runs (it falls back on the cases above)
    "bf16_tiles": (jnp.bfloat16, 64, 128, True),
}


@kernel_backends.over_implementations(gmm_op.REGISTRY)
@pytest.mark.parametrize("case", CASES)
def test_matches_reference(implementation, case):
  w_dtype, d, n, gather = CASES[case]
  rng = np.random.default_rng(sum(map(ord, case)))
  w = jnp.asarray(rng.normal(size=(E, d, n)), w_dtype)
  tol = (kernel_backends.F32_TOLERANCE if w_dtype == jnp.float32
         else dict(rtol=1e-2, atol=1e-2))
  for kind in kernel_backends.SCENARIOS:
    sched, x, row_token, options = kernel_backends.gmm_case(kind, rng, T, K, E, d, w_dtype,
                                                            gather)
    rows = int(sched.stats[4])
    out = gmm_op.gmm(x, w, sched.group_offsets, row_token,
                     active_experts=sched.active_experts, num_active=sched.num_distinct,
                     implementation=implementation, **options).block_until_ready()
    want = gmm_op.gmm(x, w, sched.group_offsets, row_token, implementation="xla",
                      **options)
    assert out.shape == (T * K, n) and out.dtype == jnp.float32, kind
    got = np.asarray(out[:rows])
    assert np.all(np.isfinite(got)), (kind, np.argwhere(~np.isfinite(got))[:5])
    np.testing.assert_allclose(got, np.asarray(want[:rows]), err_msg=kind, **tol)


@kernel_backends.over_implementations(gmm_op.REGISTRY)
@pytest.mark.parametrize("fused", [False, True], ids=["tiles", "fused_tiles"])
def test_swiglu_activation_matches_reference(implementation, fused, monkeypatch):
  """`activation="swiglu"` gives `SiLU(gate) * up` in `out_dtype` on every backend;
  `fused` sets `tiles.SWIGLU_TILES`, so the Triton kernels compute it in-kernel."""
  if fused:
    monkeypatch.setattr(gmm_api, "SWIGLU_TILES", dict(TILES, k_splits=1))
  rng = np.random.default_rng(11)
  d, f = 64, 64
  w = jnp.asarray(rng.normal(size=(E, d, 2 * f)), jnp.bfloat16)
  for kind in ("random", "one_expert"):
    sched, x, row_token, options = kernel_backends.gmm_case(kind, rng, T, K, E, d,
                                                            jnp.bfloat16, True)
    rows = int(sched.stats[4])
    out = gmm_op.gmm(x, w, sched.group_offsets, row_token, activation="swiglu",
                     out_dtype=jnp.bfloat16, implementation=implementation,
                     **options).block_until_ready()
    assert out.shape == (T * K, f) and out.dtype == jnp.bfloat16, kind
    want = gmm_op.swiglu(gmm_op.gmm_reference(x, w, sched.group_offsets, row_token))
    np.testing.assert_allclose(np.asarray(out[:rows], np.float32),
                               np.asarray(want[:rows]), rtol=2e-2, atol=2e-2,
                               err_msg=kind)


def test_bad_activation_is_named():
  x, w, offsets = jnp.zeros((4, 8)), jnp.zeros((2, 8, 6)), jnp.zeros((3,), jnp.int32)
  with pytest.raises(ValueError, match="activation must be one of"):
    gmm_op.gmm(x, w, offsets, activation="gelu", implementation="xla")
  with pytest.raises(ValueError, match="even number of columns"):
    gmm_op.gmm(x, w[..., :5], offsets, activation="swiglu", implementation="xla")


@kernel_backends.over_implementations(gmm_op.REGISTRY)
def test_active_experts_default_to_the_offsets(implementation):
  """Without the schedule's active-expert list (which only the TPU kernel reads), the
  op derives it from the offsets."""
  rng = np.random.default_rng(4)
  ids, valid = kernel_backends.routing("random", rng, T, K, E)
  sched = build_schedule(jnp.asarray(ids), jnp.asarray(valid), E)
  x = jnp.asarray(rng.normal(size=(T, 40)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(E, 40, 24)), jnp.float32)
  rows = int(sched.stats[4])
  got = gmm_op.gmm(x, w, sched.group_offsets, sched.row_token,
                   implementation=implementation)
  want = gmm_op.gmm_reference(x, w, sched.group_offsets, sched.row_token)
  np.testing.assert_allclose(np.asarray(got[:rows]), np.asarray(want[:rows]),
                             **kernel_backends.F32_TOLERANCE)


def test_reference_is_an_independent_matmul():
  """Pins the oracle itself to a NumPy loop (gathered and sorted rows)."""
  rng = np.random.default_rng(5)
  ids, valid = kernel_backends.routing("random", rng, T, K, E)
  sched = build_schedule(jnp.asarray(ids), jnp.asarray(valid), E)
  x = rng.normal(size=(T, 40)).astype(np.float32)
  w = rng.normal(size=(E, 40, 24)).astype(np.float32)
  offsets, row_token = np.asarray(sched.group_offsets), np.asarray(sched.row_token)
  want = np.zeros((T * K, 24), np.float32)
  for e in range(E):
    for r in range(offsets[e], offsets[e + 1]):
      want[r] = x[row_token[r]].astype(np.float64) @ w[e]
  got = gmm_op.gmm_reference(jnp.asarray(x), jnp.asarray(w), sched.group_offsets,
                             sched.row_token)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-4)
  got = gmm_op.gmm_reference(jnp.asarray(x[row_token]), jnp.asarray(w), sched.group_offsets)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-4)
  # sorted rows with extra rows after them: only the first num_rows are read
  extra = np.concatenate([x[row_token], np.ones((5, 40), np.float32)])
  got = gmm_op.gmm_reference(jnp.asarray(extra), jnp.asarray(w), sched.group_offsets,
                             num_rows=T * K)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-4)
