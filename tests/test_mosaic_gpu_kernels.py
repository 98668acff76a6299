"""The Mosaic GPU grouped matmul: interpret-mode correctness and Hopper lowering.

Correctness runs in Mosaic GPU interpret mode (`plgpu.InterpretGPUParams`), which
simulates the TMA copies, barriers and wgmma of the kernel on the CPU and fills fresh
buffers with NaN, so rows the kernel fails to write are caught. The lowering test runs
the real Pallas -> Mosaic GPU lowering for an H200 on this CPU machine, down to the
wgmma instructions. The cases every backend shares (through the op's api) are in
test_gmm_op.py; here the multi-block groups, K splits and narrow column blocks the
shared cases are too small for.
"""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax._src.pallas.mosaic_gpu.interpret import interpret_pallas_call as gpu_interpret
from jax.experimental.pallas import mosaic_gpu as plgpu

from sere_jax.config import RerouteConfig
from sere_jax.kernels import gmm as gmm_op
from sere_jax.kernels import moe_ffn
from sere_jax.kernels.gmm import mosaic_gpu
from sere_jax.kernels.gmm.reference import gmm_reference
from sere_jax.kernels.lowering_check import export_for
from sere_jax.kernels.schedule.reference import build_schedule
from tests import kernel_backends

INTERPRET = plgpu.InterpretGPUParams(detect_races=True)
T, K, E = 64, 3, 8  # 192 rows: three 64-row blocks


def _item_table_loop(offsets: np.ndarray, num_rows: int):
  """The work items as a Python loop: (expert, block, first row, rows) per item."""
  items = []
  for e in range(len(offsets) - 1):
    start, end = int(offsets[e]), int(offsets[e + 1])
    row = start
    while row < end:
      block = row // mosaic_gpu.BLOCK_M
      stop = min(end, (block + 1) * mosaic_gpu.BLOCK_M)
      items.append((e, block, row, stop - row))
      row = stop
  return items


@pytest.mark.parametrize("seed", range(6))
def test_item_table_matches_a_loop(seed):
  rng = np.random.default_rng(seed)
  num_rows = int(rng.integers(1, 300))
  sizes = rng.integers(0, 3, E) * rng.integers(0, 90, E)  # empty and multi-block groups
  offsets = np.concatenate([[0], np.cumsum(sizes)])
  offsets = np.minimum(offsets, num_rows - int(rng.integers(0, 2)))  # may end early
  expert, block, first_row, rows, count = mosaic_gpu.item_table(
      jnp.asarray(offsets, jnp.int32), num_rows, E)
  want = _item_table_loop(offsets, num_rows)
  assert int(count[0]) == len(want) <= expert.shape[0]
  got = list(zip(*(np.asarray(a)[:len(want)].tolist()
                   for a in (expert, block, first_row, rows))))
  assert got == want


# (dtype, D, N, gather rows by token, kernel options)
CASES = {
    "bf16_gather_two_n_blocks": (jnp.bfloat16, 128, 256, True, {}),
    "f16_sorted_k_splits": (jnp.float16, 256, 128, False, dict(k_splits=2)),
    "bf16_narrow_n_block": (jnp.bfloat16, 64, 192, True, dict(block_n=128)),
}


@pytest.mark.parametrize("case", CASES)
def test_gmm_matches_reference(case):
  dtype, d, n, gather, options = CASES[case]
  rng = np.random.default_rng(sum(map(ord, case)))
  w = jnp.asarray(rng.normal(size=(E, d, n)), dtype)
  for kind in ("random", "one_expert", "big_group", "odd_rows", "no_valid"):
    sched, x, row_token, extra = kernel_backends.gmm_case(kind, rng, T, K, E, d, dtype,
                                                          gather)
    rows = int(sched.stats[4])
    got = mosaic_gpu.gmm_mosaic_gpu(x, w, sched.group_offsets, row_token,
                                    interpret=INTERPRET, **options,
                                    **extra).block_until_ready()  # see test_moe_ffn._run
    want = gmm_reference(x, w, sched.group_offsets, row_token, **extra)
    assert got.shape == (T * K, n) and got.dtype == jnp.float32, kind
    got = np.asarray(got[:rows])
    assert not gpu_interpret.get_races().races_found, kind
    assert np.all(np.isfinite(got)), (kind, np.argwhere(~np.isfinite(got))[:5])
    np.testing.assert_allclose(got, np.asarray(want[:rows]), rtol=1e-2, atol=1e-2,
                               err_msg=kind)


def test_lowers_for_hopper_at_qwen3_shapes():
  """Qwen3-30B-A3B's gate+up projection at B = 16: the real lowering, down to wgmma."""
  x = jax.ShapeDtypeStruct((16, 2048), jnp.bfloat16)
  w = jax.ShapeDtypeStruct((128, 2048, 1536), jnp.bfloat16)
  offsets = jax.ShapeDtypeStruct((129,), jnp.int32)
  row_token = jax.ShapeDtypeStruct((128,), jnp.int32)
  exported = export_for("cuda", lambda x, w, o, r: gmm_op.gmm(
      x, w, o, r, implementation="mosaic_gpu"), x, w, offsets, row_token)
  text = exported.mlir_module()
  assert "mosaic_gpu" in text and "wgmma.mma_async" in text


def test_unsupported_inputs_fall_back_to_triton_with_one_log_line(caplog):
  rng = np.random.default_rng(1)
  ids, valid = kernel_backends.routing("random", rng, T, K, E)
  sched = build_schedule(jnp.asarray(ids), jnp.asarray(valid), E)
  # Mixed dtypes, which no other test passes: the message is logged once per process.
  x = jnp.asarray(rng.normal(size=(T, 64)), jnp.float16)
  w = jnp.asarray(rng.normal(size=(E, 64, 64)), jnp.bfloat16)
  with caplog.at_level(logging.WARNING):
    for _ in range(2):
      got = gmm_op.gmm(x, w, sched.group_offsets, sched.row_token,
                       implementation="mosaic_gpu_interpret")
  lines = [r.getMessage() for r in caplog.records if "Mosaic GPU" in r.getMessage()]
  assert lines == ["gmm: the Mosaic GPU kernel takes bf16 or f16 x and w of one dtype, "
                   "not float16 and bfloat16; running the Triton kernel"]
  rows = int(sched.stats[4])
  want = gmm_reference(x, w, sched.group_offsets, sched.row_token)
  np.testing.assert_allclose(np.asarray(got[:rows]), np.asarray(want[:rows]), rtol=1e-2,
                             atol=1e-2)


def test_bad_inputs_are_refused_by_name():
  x = jnp.zeros((4, 128), jnp.bfloat16)
  offsets = jnp.array([0, 4], jnp.int32)
  with pytest.raises(ValueError, match="multiple of block_k=64"):
    mosaic_gpu.gmm_mosaic_gpu(x[:, :96], jnp.zeros((1, 96, 64), jnp.bfloat16), offsets,
                              interpret=True)
  with pytest.raises(ValueError, match="output width .40. that is a multiple of 64"):
    mosaic_gpu.gmm_mosaic_gpu(x, jnp.zeros((1, 128, 40), jnp.bfloat16), offsets,
                              interpret=True)
  with pytest.raises(ValueError, match="x has 128 columns but w contracts over 64"):
    mosaic_gpu.gmm_mosaic_gpu(x, jnp.zeros((1, 64, 64), jnp.bfloat16), offsets,
                              interpret=True)
  with pytest.raises(ValueError, match=r"group_offsets must be \[E \+ 1\] = \[3\]"):
    mosaic_gpu.gmm_mosaic_gpu(x, jnp.zeros((2, 128, 64), jnp.bfloat16), offsets,
                              interpret=True)


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="the kernel runs on a GPU")
def test_the_kernel_off_a_gpu_is_an_error():
  with pytest.raises(ValueError, match="'mosaic_gpu' runs only on gpu devices"):
    gmm_op.gmm(jnp.zeros((4, 128), jnp.bfloat16), jnp.zeros((1, 128, 64), jnp.bfloat16),
               jnp.array([0, 4], jnp.int32), implementation="mosaic_gpu")


@pytest.mark.parametrize("policy", ["none", "sere"])
def test_moe_op_with_the_mosaic_gpu_matmul_matches_the_triton_kernels(policy):
  """The MoE op's `mosaic_gpu_interpret`: the interpret-mode schedule and router with
  the Mosaic GPU grouped matmul, against the Triton kernels in interpret mode."""
  assert moe_ffn.BACKENDS["mosaic_gpu"] == moe_ffn.Backends("triton", "mosaic_gpu",
                                                            "triton")
  rng = np.random.default_rng(2)
  t, d, f, e, k = 16, 128, 64, 16, 4
  x = jnp.asarray(rng.normal(size=(t, d)), jnp.bfloat16)
  ids = jnp.asarray(np.argsort(rng.random((t, e)), axis=1)[:, :k], jnp.int32)
  weights = jnp.asarray(rng.random((t, k)), jnp.float32)
  w_gate_up = jnp.asarray(rng.normal(size=(e, d, 2 * f)) / d ** 0.5, jnp.bfloat16)
  w_down = jnp.asarray(rng.normal(size=(e, f, d)) / f ** 0.5, jnp.bfloat16)
  sim = jnp.asarray(rng.random((e, e)), jnp.float32)
  config = RerouteConfig(policy=policy, select_top_k=2, threshold=0.3)
  outs = [jax.block_until_ready(moe_ffn.moe_ffn(x, ids, weights, w_gate_up, w_down,
                                               similarity=sim, config=config, impl=impl))
          for impl in ("mosaic_gpu_interpret", "interpret")]
  np.testing.assert_array_equal(outs[0].ids, outs[1].ids)
  np.testing.assert_allclose(np.asarray(outs[0].y, np.float32),
                             np.asarray(outs[1].y, np.float32), rtol=2e-2, atol=2e-2)
