"""GPU (Pallas Triton) kernels: their options in interpret mode, and CUDA lowering on CPU.

Correctness runs the kernels with `interpret=True`. Pallas interpret mode fills fresh
float outputs with NaN, so a grouped-matmul row that no program writes shows up as
non-finite. The lowering tests run the real Pallas -> Triton lowering for an H200 on
this CPU machine. The cases every backend shares (through the ops' api) are in
test_schedule_op.py and test_gmm_op.py.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sere_jax.config import RerouteConfig
from sere_jax.kernels.gmm.reference import gmm_reference, swiglu
from sere_jax.kernels.gmm.tiles import TILES
from sere_jax.kernels.gmm.triton import gmm_triton
from sere_jax.kernels.lowering_check import export_for
from sere_jax.kernels.moe_ffn import moe_ffn
from sere_jax.kernels.schedule.reference import build_schedule
from sere_jax.kernels.schedule.triton import schedule_triton
from tests import kernel_backends

T, K, E = 16, 3, 8  # grouped-matmul batches: 48 rows over 8 experts
_TRITON_CALL = "__gpu$xla.gpu.triton"


def _routing(kind: str, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
  """`ids [T, K]`, `valid [T]` of one routing scenario."""
  return kernel_backends.routing(kind, rng, T, K, E)


SCENARIOS = kernel_backends.SCENARIOS

# (w dtype, D, N, gather rows by token, kernel options)
GMM_CASES = {
    # 3 contraction chunks of 16 split 2 ways (2 + 1 chunks), 2 N blocks (16 + 8)
    "f32_gather_ksplit": (jnp.float32, 40, 24,
                          True, dict(row_tiles=(16,), block_n=16, block_k=16, k_splits=2)),
    # pre-sorted rows (plus extra rows to ignore), one split, 2 N blocks (32 + 16)
    "bf16_sorted_nosplit": (jnp.bfloat16, 40, 48,
                            False, dict(row_tiles=(16,), block_n=32, block_k=32, k_splits=1)),
    # a split per chunk (3), one N block wider than N
    "bf16_gather_ksplit3": (jnp.bfloat16, 40, 24,
                            True, dict(row_tiles=(16,), block_n=32, block_k=16, k_splits=4)),
    # 16-row items for groups of up to 16 rows, 32-row items for bigger groups
    "f32_gather_two_tiles": (jnp.float32, 40, 24, True,
                             dict(row_tiles=(16, 32), block_n=16, block_k=16, k_splits=2)),
    # the production row tiles (16, 32, 64) with small N and K blocks: groups of
    # up to 16, up to 32 and more rows in one call (scenario big_group: 40 rows)
    "bf16_gather_three_tiles": (jnp.bfloat16, 40, 24, True,
                                dict(TILES, block_n=16, block_k=16)),
    # few programs, each looping over several work items (4 = 2 N blocks x 2 splits x 1)
    "f32_gather_one_program_per_column": (jnp.float32, 40, 24, True,
                                          dict(row_tiles=(16, 32), block_n=16,
                                               block_k=16, k_splits=2, max_programs=4)),
    # D = 40 is one K chunk (no split) and N = 48 one N block: 6 programs for 11
    # possible items
    "bf16_sorted_six_item_programs": (jnp.bfloat16, 40, 48, False,
                                      dict(TILES, max_programs=6)),
}


@pytest.mark.parametrize("case", GMM_CASES)
def test_gmm_matches_reference(case):
  w_dtype, d, n, gather, options = GMM_CASES[case]
  rng = np.random.default_rng(sum(map(ord, case)))
  w = jnp.asarray(rng.normal(size=(E, d, n)), w_dtype)
  tol = (kernel_backends.f32_tolerance(rtol=1e-5, atol=1e-4) if w_dtype == jnp.float32
         else dict(rtol=1e-2, atol=1e-2))
  if not gather:
    options = dict(options, num_rows=T * K)
  for kind in SCENARIOS:
    ids, valid = _routing(kind, rng)
    sched = build_schedule(jnp.asarray(ids), jnp.asarray(valid), E)
    rows = int(sched.stats[4])
    assert rows == int(valid.sum()) * K
    if gather:
      x = jnp.asarray(rng.normal(size=(T, d)), w_dtype)
      row_token = sched.row_token
    else:  # sorted rows plus extra rows that must be ignored
      x = jnp.asarray(rng.normal(size=(T * K + 5, d)), w_dtype)
      row_token = None
    out = gmm_triton(x, w, sched.group_offsets, row_token, interpret=True, **options)
    want = gmm_reference(x if gather else x[:T * K], w, sched.group_offsets, row_token)
    assert out.shape == (T * K, n) and out.dtype == jnp.float32, kind
    got = np.asarray(out[:rows])
    assert np.all(np.isfinite(got)), (kind, np.argwhere(~np.isfinite(got))[:5])
    np.testing.assert_allclose(got, np.asarray(want[:rows]), err_msg=kind, **tol)


# (w dtype, D, F, gather rows by token, output dtype, kernel options): the fused
# SwiGLU epilogue reads the gate block and the up block F columns further.
SWIGLU_CASES = {
    # 3 contraction chunks, 2 output blocks (16 + 4): the up block starts mid-block
    "f32_gather": (jnp.float32, 40, 20, True, jnp.float32,
                   dict(row_tiles=(16,), block_n=16, block_k=16, k_splits=1)),
    # bf16 out, pre-sorted rows with extra rows, one output block wider than F
    "bf16_sorted_bf16_out": (jnp.bfloat16, 40, 24, False, jnp.bfloat16,
                             dict(row_tiles=(16, 32), block_n=32, block_k=32, k_splits=1)),
    # the production row tiles, looping programs
    "bf16_gather_three_tiles": (jnp.bfloat16, 40, 24, True, jnp.bfloat16,
                                dict(TILES, block_n=16, block_k=16, k_splits=1,
                                     max_programs=4)),
}


@pytest.mark.parametrize("case", SWIGLU_CASES)
def test_gmm_swiglu_matches_reference(case):
  """`swiglu=True`: `SiLU(gate) * up` of the fused projection, in the output dtype."""
  w_dtype, d, f, gather, out_dtype, options = SWIGLU_CASES[case]
  rng = np.random.default_rng(sum(map(ord, case)))
  w = jnp.asarray(rng.normal(size=(E, d, 2 * f)), w_dtype)
  for kind in SCENARIOS:
    sched, x, row_token, rows_option = kernel_backends.gmm_case(kind, rng, T, K, E, d,
                                                                w_dtype, gather)
    rows = int(sched.stats[4])
    out = gmm_triton(x, w, sched.group_offsets, row_token, swiglu=True,
                     out_dtype=out_dtype, interpret=True, **options, **rows_option)
    assert out.shape == (T * K, f) and out.dtype == out_dtype, kind
    want = swiglu(gmm_reference(x, w, sched.group_offsets, row_token, T * K))
    got = np.asarray(out[:rows], np.float32)
    assert np.all(np.isfinite(got)), (kind, np.argwhere(~np.isfinite(got))[:5])
    tol = (kernel_backends.f32_tolerance(rtol=1e-4, atol=1e-4,
                                         tf32=kernel_backends.TF32_SWIGLU_TOLERANCE)
           if out_dtype == jnp.float32 else dict(rtol=2e-2, atol=2e-2))
    np.testing.assert_allclose(got, np.asarray(want[:rows]), err_msg=kind, **tol)


def test_gmm_swiglu_rejects_a_k_split_or_odd_columns():
  x, offsets = jnp.zeros((6, 8)), jnp.zeros((5,), jnp.int32)
  with pytest.raises(ValueError, match="swiglu needs .* k_splits=1"):
    gmm_triton(x, jnp.zeros((4, 8, 8)), offsets, swiglu=True, k_splits=2, interpret=True)
  with pytest.raises(ValueError, match="even number of weight columns"):
    gmm_triton(x, jnp.zeros((4, 8, 7)), offsets, swiglu=True, k_splits=1, interpret=True)


def test_gmm_num_cols_reads_the_leading_columns_of_a_padded_weight():
  """`num_cols=n` over a `[E, D, n + pad]` weight: the product with its first n
  columns, as if the weight were stored unpadded (n = 20 ends mid-block)."""
  rng = np.random.default_rng(5)
  padded = jnp.asarray(rng.normal(size=(E, 40, 29)), jnp.float32)
  for kind in SCENARIOS:
    sched, x, row_token, rows_option = kernel_backends.gmm_case(kind, rng, T, K, E, 40,
                                                                jnp.float32, True)
    rows = int(sched.stats[4])
    out = gmm_triton(x, padded, sched.group_offsets, row_token, num_cols=20,
                     interpret=True, row_tiles=(16,), block_n=16, block_k=16, k_splits=2,
                     **rows_option)
    assert out.shape == (T * K, 20), kind
    want = gmm_reference(x, padded[:, :, :20], sched.group_offsets, row_token, T * K)
    np.testing.assert_allclose(np.asarray(out[:rows]), np.asarray(want[:rows]),
                               err_msg=kind,
                               **kernel_backends.f32_tolerance(rtol=1e-5, atol=1e-4))


@pytest.mark.parametrize("num_cols, swiglu", [(0, False), (9, False), (4, True)])
def test_gmm_rejects_bad_num_cols(num_cols, swiglu):
  with pytest.raises(ValueError, match="num_cols must be in"):
    gmm_triton(jnp.zeros((6, 8)), jnp.zeros((4, 8, 8)), jnp.zeros((5,), jnp.int32),
               num_cols=num_cols, swiglu=swiglu, k_splits=1, interpret=True)


@pytest.mark.parametrize("tiles", [dict(row_tiles=(16,)), dict(row_tiles=(16, 32)),
                                   dict(row_tiles=(16, 32, 64)),
                                   dict(row_tiles=(16,), max_programs=2 * 2 * 2)],
                         ids=["one_tile", "two_tiles", "three_tiles", "looping_programs"])
def test_gmm_writes_only_grouped_rows(tiles):
  """Rows past the last group are left alone (NaN in interpret mode); an expert with
  several row blocks gets one work item per block, all written, and a tile larger than
  its group writes none of the rows after it."""
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.normal(size=(T, 40)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(E, 40, 24)), jnp.float32)
  # 37 rows: expert 1 has 33 (three 16-row blocks), expert 5 has 4; 11 rows ungrouped.
  offsets = jnp.asarray([0, 0, 33, 33, 33, 33, 37, 37, 37], jnp.int32)
  row_token = jnp.asarray(rng.integers(0, T, T * K), jnp.int32)
  options = dict(tiles, block_n=16, block_k=16, k_splits=2)
  out = np.asarray(gmm_triton(x, w, offsets, row_token, interpret=True, **options))
  assert np.all(np.isnan(out[37:]))
  want = np.asarray(gmm_reference(x, w, offsets, row_token))
  np.testing.assert_allclose(out[:37], want[:37],
                             **kernel_backends.f32_tolerance(rtol=1e-5, atol=1e-4))


@pytest.mark.parametrize("row_tiles", [(), (32, 16), (16, 16), (16, 24), (8,)])
def test_gmm_rejects_bad_row_tiles(row_tiles):
  with pytest.raises(ValueError, match="row_tiles must be ascending distinct powers of two"):
    gmm_triton(jnp.zeros((6, 8)), jnp.zeros((4, 8, 8)), jnp.zeros((5,), jnp.int32),
               row_tiles=row_tiles, interpret=True)


def test_gmm_rejects_bad_contraction():
  with pytest.raises(ValueError, match="contracts"):
    gmm_triton(jnp.zeros((6, 8)), jnp.zeros((4, 16, 8)), jnp.zeros((5,), jnp.int32),
               interpret=True)


def test_gmm_rejects_bad_offsets():
  with pytest.raises(ValueError, match=r"group_offsets must be \[E \+ 1\]"):
    gmm_triton(jnp.zeros((6, 16)), jnp.zeros((4, 16, 8)), jnp.zeros((4,), jnp.int32),
               interpret=True)


# ---------------------------------------------------------------- schedule kernel

# The cases without kernel options (one chunk) are in test_schedule_op.py.
SCHEDULE_CONFIGS = [
    RerouteConfig(policy="none"),
    RerouteConfig(select_top_k=0),  # S = 0: no re-routing
    RerouteConfig(select_top_k=4),  # S = K: no re-routing
    RerouteConfig(select_top_k=1, threshold=0.0),
    RerouteConfig(select_top_k=2, threshold=0.5),
    RerouteConfig(select_top_k=3, threshold=1.0),
    RerouteConfig(select_top_k=2, threshold=0.5, min_batch=4),
]


# (T, K, E, kernel options, configs, cases per config)
SCHEDULE_SHAPES = {
    # 160 slots in 3 chunks of 64 (the last one partial), 20 experts in 32 lanes; the
    # marking, re-routing and placing passes take all 160 slots in one 256-lane step
    "multi_chunk": (40, 4, 20, dict(max_chunk=64), [SCHEDULE_CONFIGS[0], SCHEDULE_CONFIGS[4],
                                                    SCHEDULE_CONFIGS[6]], 3),
    # the same with those passes in 64-slot steps (3, the last one partial)
    "multi_chunk_multi_scan": (40, 4, 20, dict(max_chunk=64, max_scan_chunk=64,
                                               max_place_chunk=64), SCHEDULE_CONFIGS[3:5], 2),
    # 3 programs splitting the offsets of 100 experts (128 lanes) into 64-wide slices;
    # two 128-slot marking / re-routing steps, placing in one step
    "multi_chunk_many_experts": (40, 4, 100, dict(max_chunk=64, max_scan_chunk=128),
                                 SCHEDULE_CONFIGS[3:5], 2),
    # placing in two 128-slot steps, marking and re-routing in one
    "multi_chunk_multi_place": (40, 4, 20, dict(max_chunk=64, max_place_chunk=128),
                                SCHEDULE_CONFIGS[3:5], 2),
}


@pytest.mark.parametrize("shape", SCHEDULE_SHAPES)
def test_schedule_matches_reference(shape):
  num_tokens, top_k, num_experts, options, configs, cases = SCHEDULE_SHAPES[shape]
  rng = np.random.default_rng(num_tokens)
  for config in configs:
    for case in range(cases):
      ids, valid, sim = kernel_backends.schedule_case(rng, num_tokens, top_k,
                                                      num_experts, case)
      got = schedule_triton(ids, valid, sim, config, num_experts=num_experts,
                            interpret=True, **options)
      want = kernel_backends.jitted_reference_schedule(config, num_experts)(ids, valid, sim)
      kernel_backends.check_schedule(got, want, np.asarray(valid), f"{config} case {case}")


@pytest.mark.parametrize("option", [dict(max_chunk=32), dict(max_chunk=96),
                                    dict(max_scan_chunk=48), dict(max_place_chunk=32)])
def test_schedule_rejects_bad_chunks(option):
  ids, valid = jnp.zeros((4, 2), jnp.int32), jnp.ones((4,), bool)
  with pytest.raises(ValueError, match=f"{next(iter(option))} must be a power of two"):
    schedule_triton(ids, valid, jnp.eye(8), RerouteConfig(select_top_k=1),
                    num_experts=8, interpret=True, **option)


# ---------------------------------------------------------------- CUDA lowering


def _spec(shape, dtype=jnp.int32):
  return jax.ShapeDtypeStruct(shape, dtype)


def _assert_triton(exported):
  assert exported.platforms == ("cuda",)
  assert _TRITON_CALL in exported.mlir_module()


# Qwen3-30B-A3B: D=2048, F=768, E=128, K=8; 64 tokens of decode (512 rows).
@pytest.mark.parametrize("x_shape,w_shape,gather", [
    ((64, 2048), (128, 2048, 1536), True),  # w_gate_up [E, D, 2F], tokens gathered
    ((512, 768), (128, 768, 2048), False),  # w_down [E, F, D], pre-sorted rows
], ids=["gate_up", "down"])
def test_gmm_lowers_for_cuda(x_shape, w_shape, gather):
  experts = w_shape[0]
  specs = [_spec(x_shape, jnp.bfloat16), _spec(w_shape, jnp.bfloat16),
           _spec((experts + 1,))]
  if gather:
    specs.append(_spec((512,)))
  fn = functools.partial(gmm_triton, **TILES)
  _assert_triton(export_for("cuda", fn, *specs))


def test_gmm_swiglu_lowers_for_cuda():
  """The fused gate/up projection at Qwen3-30B-A3B shapes, 64 tokens gathered."""
  specs = [_spec((64, 2048), jnp.bfloat16), _spec((128, 2048, 1536), jnp.bfloat16),
           _spec((129,)), _spec((512,))]
  fn = functools.partial(gmm_triton, swiglu=True, out_dtype=jnp.bfloat16,
                         **dict(TILES, k_splits=1, block_n=64))
  exported = export_for("cuda", fn, *specs)
  _assert_triton(exported)
  assert exported.out_avals[0].shape == (512, 768)
  assert exported.out_avals[0].dtype == jnp.bfloat16


@pytest.mark.parametrize("tokens", [1, 64, 256])
def test_schedule_lowers_for_cuda(tokens):
  config = RerouteConfig(select_top_k=2, threshold=0.3)
  fn = lambda ids, valid, sim: schedule_triton(ids, valid, sim, config, num_experts=128)
  _assert_triton(export_for("cuda", fn, _spec((tokens, 8)), _spec((tokens,), jnp.bool_),
                            _spec((128, 128), jnp.float32)))


def test_moe_ffn_lowers_for_cuda():
  tokens, top_k, experts, d, f = 16, 8, 128, 2048, 768
  config = RerouteConfig(select_top_k=2, threshold=0.3)

  def fn(x, ids, weights, w_gate_up, w_down, valid, sim):
    return moe_ffn(x, ids, weights, w_gate_up, w_down, valid=valid, similarity=sim,
                   config=config, impl="triton").y

  exported = export_for(
      "cuda", fn, _spec((tokens, d), jnp.bfloat16), _spec((tokens, top_k)),
      _spec((tokens, top_k), jnp.float32), _spec((experts, d, 2 * f), jnp.bfloat16),
      _spec((experts, f, d), jnp.bfloat16), _spec((tokens,), jnp.bool_),
      _spec((experts, experts), jnp.float32))
  _assert_triton(exported)
  assert exported.mlir_module().count(_TRITON_CALL) >= 3  # schedule + two matmuls
  assert exported.out_avals[0].shape == (tokens, d)
  assert exported.out_avals[0].dtype == jnp.bfloat16
