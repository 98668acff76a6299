"""TPU (Mosaic) Pallas kernels: interpret-mode correctness and TPU lowering.

Correctness runs in TPU interpret mode (`pltpu.InterpretParams`), which simulates
TPU DMAs and fills fresh buffers with NaN, so unwritten output rows are caught. The
lowering tests run the real Pallas -> Mosaic lowering for a TPU on this CPU machine
(Mosaic's own layout passes run only on a TPU host). The cases every backend shares
(through the ops' api) are in test_schedule_op.py and test_gmm_op.py.
"""

from __future__ import annotations

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax._src.pallas.mosaic.interpret import interpret_pallas_call as tpu_interpret
from jax.experimental.pallas import tpu as pltpu

from sere_jax.config import RerouteConfig
from sere_jax.kernels.gmm import tpu as gmm_tpu_lib
from sere_jax.kernels.gmm.reference import gmm_reference
from sere_jax.kernels.gmm.tpu import gmm_tpu
from sere_jax.kernels.lowering_check import export_for
from sere_jax.kernels.schedule.reference import build_schedule
from sere_jax.kernels.schedule.tpu import schedule_tpu
from tests import kernel_backends

INTERPRET = pltpu.InterpretParams()
GMM_INTERPRET = pltpu.InterpretParams(detect_races=True)  # also checks the pipeline's DMAs
T, K, E = 12, 3, 8  # grouped-matmul batches: 36 rows over 8 experts


def _routing(kind: str, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
  """`ids [T, K]`, `valid [T]` of one routing scenario."""
  return kernel_backends.routing(kind, rng, T, K, E)


SCENARIOS = ("random", "one_expert", "all_active", "big_group", "no_valid")

# (x dtype, w dtype, N, D, gather rows by token, kernel options)
GMM_CASES = {
    # 3 row blocks of one row tile, 2 K blocks
    "f32_gather_row_blocks": (jnp.float32, jnp.float32, 24, 256, True,
                              dict(block_m=16, tile_m=16, block_k=128)),
    # 2 row blocks of two row tiles, a static slot axis
    "bf16_sorted_static_grid": (jnp.bfloat16, jnp.bfloat16, 48, 128, False,
                                dict(block_m=32, tile_m=16, dynamic_grid=False)),
    # one row block, 3 N blocks
    "mixed_gather_n_blocks": (jnp.float32, jnp.bfloat16, 384, 128, True,
                              dict(block_n=128)),
}


@pytest.mark.parametrize("case", GMM_CASES)
def test_gmm_matches_reference(case):
  x_dtype, w_dtype, n, d, gather, options = GMM_CASES[case]
  rng = np.random.default_rng(0)
  w = jnp.asarray(rng.normal(size=(E, d, n)), w_dtype)
  if not gather:
    options = dict(options, num_rows=T * K)
  for kind in SCENARIOS:
    ids, valid = _routing(kind, rng)
    sched = build_schedule(jnp.asarray(ids), jnp.asarray(valid), E)
    rows = int(sched.stats[4])
    if gather:
      x = jnp.asarray(rng.normal(size=(T, d)), x_dtype)
      args = (sched.row_token,)
    else:  # sorted rows plus extra rows that must be ignored
      x = jnp.asarray(rng.normal(size=(T * K + 5, d)), x_dtype)
      args = (None,)
    out = gmm_tpu(x, w, sched.group_offsets, sched.active_experts, sched.num_distinct,
                  *args, interpret=GMM_INTERPRET, **options)
    assert not tpu_interpret.races.races_found, kind
    want = gmm_reference(x if gather else x[:T * K], w, sched.group_offsets, *args)
    assert out.shape == (T * K, n) and out.dtype == jnp.float32
    got = np.asarray(out[:rows])
    assert np.all(np.isfinite(got)), kind
    np.testing.assert_allclose(got, np.asarray(want[:rows]), rtol=1e-5, atol=1e-3,
                               err_msg=kind)


# 36 rows in one block, or in 6 blocks of 8 rows (the last one without rows).
@pytest.mark.parametrize("num_blocks,block_m,n_blocks,k_blocks", [(1, 36, 3, 1),
                                                                  (6, 8, 2, 3)])
def test_gmm_reads_each_active_weight_block_once_per_row_block(num_blocks, block_m,
                                                               n_blocks, k_blocks):
  """Walks the static grid in order: a weight DMA happens when the block index changes."""
  rng = np.random.default_rng(2)
  for kind in SCENARIOS:
    ids, valid = _routing(kind, rng)
    sched = build_schedule(jnp.asarray(ids), jnp.asarray(valid), E)
    rows = int(sched.stats[4])
    offsets = np.asarray(sched.group_offsets)
    active = np.asarray(sched.active_experts)
    first, count = (np.asarray(a) for a in gmm_tpu_lib._block_metadata(
        sched.group_offsets, sched.active_experts, sched.num_distinct, num_blocks, block_m))
    index = functools.partial(gmm_tpu_lib._weight_block_index, n_blocks=n_blocks,
                              k_blocks=k_blocks)
    fetched, previous = [], None
    for b, j, k, s in itertools.product(range(num_blocks), range(n_blocks),
                                        range(k_blocks), range(E)):
      block = tuple(int(v) for v in index(b, j, k, s, active, offsets, first, count))
      if block != previous:
        fetched.append((b, block))
        previous = block
    want = {(b, (e, k, j)) for b in range(num_blocks) for e in range(E)
            for k in range(k_blocks) for j in range(n_blocks)
            if max(offsets[e], b * block_m) < min(offsets[e + 1], (b + 1) * block_m)}
    if rows:
      assert sorted(fetched) == sorted(want), kind
    else:  # nothing to compute: only the pipeline's first fetch
      assert len(fetched) == 1


def test_schedule_spanning_sort_chunks_matches_reference():
  """70 tokens x 8 slots: three sort chunks (640 padded slots), 256 expert lanes. The
  small cases (one chunk), shared with the other backends, are in test_schedule_op.py."""
  num_tokens, top_k, num_experts = 70, 8, 130
  config = RerouteConfig(select_top_k=2, threshold=0.5)
  rng = np.random.default_rng(num_tokens)
  for case in range(3):
    ids, valid, sim = kernel_backends.schedule_case(rng, num_tokens, top_k, num_experts,
                                                    case, few=9)
    got = schedule_tpu(ids, valid, sim, config, num_experts=num_experts,
                       interpret=INTERPRET)
    want = kernel_backends.jitted_reference_schedule(config, num_experts)(ids, valid, sim)
    kernel_backends.check_schedule(got, want, np.asarray(valid))


def test_schedule_rejects_bad_inputs():
  ids, valid = jnp.zeros((4, 2), jnp.int32), jnp.ones((4,), bool)
  sere = RerouteConfig(select_top_k=1)
  with pytest.raises(ValueError, match="similarity"):
    schedule_tpu(ids, valid, None, sere, num_experts=8)
  with pytest.raises(ValueError, match="similarity"):
    schedule_tpu(ids, valid, jnp.eye(7), sere, num_experts=8)
  with pytest.raises(ValueError, match="valid"):
    schedule_tpu(ids, valid[:3], jnp.eye(8), sere, num_experts=8)
  with pytest.raises(ValueError, match="policies"):
    schedule_tpu(ids, valid, jnp.eye(8), RerouteConfig(policy="oea", select_top_k=1),
                 num_experts=8)


def test_gmm_rejects_bad_shapes():
  x, w = jnp.zeros((6, 16)), jnp.zeros((4, 16, 8))
  offsets, active, num = jnp.zeros((5,), jnp.int32), jnp.zeros((4,), jnp.int32), 0
  with pytest.raises(ValueError, match="contracts"):
    gmm_tpu(jnp.zeros((6, 8)), w, offsets, active, num)
  with pytest.raises(ValueError, match="group_offsets"):
    gmm_tpu(x, w, offsets[:4], active, num)
  with pytest.raises(ValueError, match="num_rows"):
    gmm_tpu(x, w, offsets, active, num, num_rows=7)
  with pytest.raises(ValueError, match="tile_m"):
    gmm_tpu(x, w, offsets, active, num, tile_m=8)


def _spec(shape, dtype=jnp.int32):
  return jax.ShapeDtypeStruct(shape, dtype)


def _gmm_specs(tokens, top_k, experts, d, n, dtype, gather):
  rows = tokens * top_k
  x = _spec((tokens if gather else rows, d), dtype)
  specs = [x, _spec((experts, d, n), dtype), _spec((experts + 1,)), _spec((experts,)),
           _spec(())]
  return specs + [_spec((rows,))] if gather else specs


# Qwen3-30B-A3B: D=2048, F=768, E=128, K=8; 64 tokens of decode.
@pytest.mark.parametrize("tokens,top_k,experts,d,n,dtype,gather,dynamic", [
    (4, 2, 8, 256, 24, jnp.float32, True, True),
    (64, 8, 128, 2048, 1536, jnp.bfloat16, True, True),  # w_gate_up [E, D, 2F]
    (64, 8, 128, 768, 2048, jnp.bfloat16, False, True),  # w_down [E, F, D]
    (64, 8, 128, 768, 2048, jnp.bfloat16, False, False),
])
def test_gmm_lowers_for_tpu(tokens, top_k, experts, d, n, dtype, gather, dynamic):
  fn = functools.partial(gmm_tpu, dynamic_grid=dynamic)
  exported = export_for("tpu", fn, *_gmm_specs(tokens, top_k, experts, d, n, dtype, gather))
  assert exported.platforms == ("tpu",)
  assert "tpu_custom_call" in exported.mlir_module()


@pytest.mark.parametrize("tokens,top_k,experts,config", [
    (4, 2, 8, RerouteConfig(policy="none")),
    (4, 2, 8, RerouteConfig(select_top_k=1, threshold=0.3)),
    (64, 8, 128, RerouteConfig(select_top_k=2, threshold=0.3)),
])
def test_schedule_lowers_for_tpu(tokens, top_k, experts, config):
  fn = lambda ids, valid, sim: schedule_tpu(ids, valid, sim, config, num_experts=experts)
  exported = export_for("tpu", fn, _spec((tokens, top_k)), _spec((tokens,), jnp.bool_),
                        _spec((experts, experts), jnp.float32))
  assert "tpu_custom_call" in exported.mlir_module()
