"""GPU (Pallas Triton) kernels: interpret-mode correctness and CUDA lowering on CPU.

Correctness runs the kernels with `interpret=True`. Pallas interpret mode fills fresh
float outputs with NaN, so a grouped-matmul row that no program writes shows up as
non-finite. The lowering tests run the real Pallas -> Triton lowering for an H200 on
this CPU machine.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sere_jax.config import RerouteConfig
from sere_jax.kernels.gmm_reference import gmm_reference
from sere_jax.kernels.gmm_triton import TILES, gmm_triton
from sere_jax.kernels.lowering_check import export_for
from sere_jax.kernels.moe_ffn import moe_ffn
from sere_jax.kernels.schedule import build_schedule
from sere_jax.kernels.schedule_triton import schedule_triton
from tests import kernel_checks

T, K, E = 16, 3, 8  # grouped-matmul batches: 48 rows over 8 experts
_TRITON_CALL = "__gpu$xla.gpu.triton"


def _routing(kind: str, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
  """`ids [T, K]`, `valid [T]` of one routing scenario."""
  valid = np.ones(T, bool)
  if kind == "random":  # duplicate (token, expert) slots, invalid tokens, empty experts
    ids = rng.integers(1, E - 2, (T, K))
    valid = rng.random(T) < 0.75
  elif kind == "duplicates":  # every token sends all its slots to one expert
    ids = np.repeat(rng.integers(0, E, (T, 1)), K, axis=1)
  elif kind == "one_expert":  # 48 rows, a single active expert (the last one)
    ids = np.full((T, K), E - 1)
  elif kind == "all_active":
    ids = (np.arange(T * K).reshape(T, K) * 5) % E
  elif kind == "big_group":  # exactly 40 rows of expert 2, more than a 32-row tile
    flat = np.concatenate([np.full(40, 2), rng.choice([0, 4, 6], T * K - 40)])
    ids = rng.permutation(flat).reshape(T, K)
  elif kind == "odd_rows":  # 13 valid tokens: 39 rows, not a block multiple
    ids = rng.integers(0, E, (T, K))
    valid = np.arange(T) < 13
  elif kind == "no_valid":
    ids, valid = rng.integers(0, E, (T, K)), np.zeros(T, bool)
  else:
    raise ValueError(kind)
  return ids.astype(np.int32), valid


SCENARIOS = ("random", "duplicates", "one_expert", "all_active", "big_group", "odd_rows",
             "no_valid")

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
    # the production tiles (block_n, block_k clamp to the small dims)
    "f32_sorted_production_tiles": (jnp.float32, 40, 48, False, TILES),
    "bf16_gather_production_tiles": (jnp.bfloat16, 40, 48, True, TILES),
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
  tol = dict(rtol=1e-5, atol=1e-4) if w_dtype == jnp.float32 else dict(rtol=1e-2,
                                                                         atol=1e-2)
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


def test_gmm_reference_is_an_independent_matmul():
  """Pins the oracle itself to a NumPy loop (gathered and sorted rows)."""
  rng = np.random.default_rng(5)
  ids, valid = _routing("random", rng)
  sched = build_schedule(jnp.asarray(ids), jnp.asarray(valid), E)
  x = rng.normal(size=(T, 40)).astype(np.float32)
  w = rng.normal(size=(E, 40, 24)).astype(np.float32)
  offsets, row_token = np.asarray(sched.group_offsets), np.asarray(sched.row_token)
  want = np.zeros((T * K, 24), np.float32)
  for e in range(E):
    for r in range(offsets[e], offsets[e + 1]):
      want[r] = x[row_token[r]].astype(np.float64) @ w[e]
  got = gmm_reference(jnp.asarray(x), jnp.asarray(w), sched.group_offsets, sched.row_token)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-4)
  got = gmm_reference(jnp.asarray(x[row_token]), jnp.asarray(w), sched.group_offsets)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-4)


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
  np.testing.assert_allclose(out[:37], want[:37], rtol=1e-5, atol=1e-4)


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

SCHEDULE_CONFIGS = [
    RerouteConfig(policy="none"),
    RerouteConfig(select_top_k=0),  # S = 0: no re-routing
    RerouteConfig(select_top_k=4),  # S = K: no re-routing
    RerouteConfig(select_top_k=1, threshold=0.0),
    RerouteConfig(select_top_k=2, threshold=0.5),
    RerouteConfig(select_top_k=3, threshold=1.0),
    RerouteConfig(select_top_k=2, threshold=0.5, min_batch=4),
]


def _schedule_case(rng, num_tokens, top_k, num_experts, case):
  valid = rng.random(num_tokens) < (0.0, 0.6, 1.0)[case % 3]
  if case % 2:  # distinct experts per token, as a router gives
    ids = np.argsort(rng.random((num_tokens, num_experts)), axis=1)[:, :top_k]
  else:  # repeats within a token and few experts
    ids = rng.integers(0, min(num_experts, 6), (num_tokens, top_k))
  # Quarter steps: similarity ties, and values equal to the thresholds.
  sim = rng.integers(0, 5, (num_experts, num_experts)).astype(np.float32) / 4
  np.fill_diagonal(sim, 1.0)
  return jnp.asarray(ids, jnp.int32), jnp.asarray(valid), jnp.asarray(sim)


# (T, K, E, kernel options, configs, cases per config)
SCHEDULE_SHAPES = {
    "small": (6, 4, 16, dict(max_chunk=256), SCHEDULE_CONFIGS[:6], 6),  # min_batch below
    "batch_of_one": (1, 4, 16, dict(max_chunk=256),
                     [SCHEDULE_CONFIGS[i] for i in (0, 3, 6)], 3),
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
      ids, valid, sim = _schedule_case(rng, num_tokens, top_k, num_experts, case)
      got = schedule_triton(ids, valid, sim, config, num_experts=num_experts,
                            interpret=True, **options)
      want = kernel_checks.jitted_reference_schedule(config, num_experts)(ids, valid, sim)
      kernel_checks.check_schedule(got, want, np.asarray(valid), f"{config} case {case}")


def test_schedule_reroutes_and_sorts():
  """A hand-checked case: the kernel really re-routes (not only matches a no-op)."""
  ids = jnp.asarray([[0, 1, 2], [0, 1, 3], [4, 1, 2]], jnp.int32)
  valid = jnp.asarray([True, True, False])
  sim = np.eye(8, dtype=np.float32)
  sim[2, 1] = sim[3, 0] = 0.9  # 2 -> 1, 3 -> 0; everything else below rho
  config = RerouteConfig(select_top_k=2, threshold=0.5)
  got = schedule_triton(ids, valid, jnp.asarray(sim), config, num_experts=8, interpret=True)
  np.testing.assert_array_equal(np.asarray(got.ids)[:2], [[0, 1, 1], [0, 1, 0]])
  # stable sort by expert: expert 0 <- slots 0, 3, 5; expert 1 <- slots 1, 2, 4
  np.testing.assert_array_equal(got.group_offsets, [0, 3, 6, 6, 6, 6, 6, 6, 6])
  np.testing.assert_array_equal(got.active_experts, [0, 1, 1, 1, 1, 1, 1, 1])
  np.testing.assert_array_equal(np.asarray(got.row_token)[:6], [0, 1, 1, 0, 0, 1])
  np.testing.assert_array_equal(np.asarray(got.slot_row)[:2], [[0, 3, 4], [1, 5, 2]])
  # distinct before (0, 1, 2, 3), after (0, 1), no critical, 2 slots re-routed, 6 rows
  np.testing.assert_array_equal(got.stats, [4, 2, 0, 2, 6])


@pytest.mark.parametrize("option", [dict(max_chunk=32), dict(max_chunk=96),
                                    dict(max_scan_chunk=48), dict(max_place_chunk=32)])
def test_schedule_rejects_bad_chunks(option):
  ids, valid = jnp.zeros((4, 2), jnp.int32), jnp.ones((4,), bool)
  with pytest.raises(ValueError, match=f"{next(iter(option))} must be a power of two"):
    schedule_triton(ids, valid, jnp.eye(8), RerouteConfig(select_top_k=1),
                    num_experts=8, interpret=True, **option)


def test_schedule_rejects_unfused_policy():
  ids, valid = jnp.zeros((4, 2), jnp.int32), jnp.ones((4,), bool)
  with pytest.raises(ValueError, match="oea"):
    schedule_triton(ids, valid, jnp.eye(8), RerouteConfig(policy="oea", select_top_k=1),
                    num_experts=8, interpret=True)


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
