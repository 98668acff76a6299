"""`reroute(policy='sere')` against the brute-force oracle of the method (docs/concepts.md)."""

from __future__ import annotations

import functools

import jax
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sere_jax import RerouteConfig, reroute
from tests.oracle import random_valid_mask, sere_oracle

# Physical shapes of the main property test: every drawn case of T <= 12 tokens and
# E <= 16 experts is embedded in a 12 x 16 batch (extra rows are invalid tokens, extra
# experts are unused), so eager JAX compiles each primitive only once per K.
T_PHYS = 12
E_PHYS = 16

SETTINGS = settings(max_examples=200, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])


def _stats(stats):
  """The four routing counts; the similarity was valid."""
  assert int(stats.invalid_similarity) == 0
  return tuple(int(x) for x in stats[:4])


def _sere(ids, weights, valid, sim, s, rho, min_batch=1, jit=False):
  """reroute with a SERE config; returns numpy ids, weights and int stats.

  `jit=True` runs a jitted reroute cached per config (cheaper than eager JAX for a
  shape that is used only a few times).
  """
  args = (np.asarray(ids, np.int32), np.asarray(weights, np.float32),
          np.asarray(valid, bool), np.asarray(sim, np.float32))
  if jit:
    new_ids, new_w, stats = _jitted_sere(s, rho, min_batch)(*args)
  else:
    cfg = RerouteConfig(policy="sere", select_top_k=s, threshold=rho, min_batch=min_batch)
    new_ids, new_w, stats = reroute(*args, cfg)
  return np.asarray(new_ids), np.asarray(new_w), _stats(stats)


@functools.lru_cache(maxsize=None)
def _jitted_sere(s, rho, min_batch):
  cfg = RerouteConfig(policy="sere", select_top_k=s, threshold=rho, min_batch=min_batch)
  return jax.jit(lambda ids, w, valid, sim: reroute(ids, w, valid, sim, cfg))


def _check_against_oracle(ids, weights, valid, sim, s, rho, min_batch=1):
  got_ids, got_w, got_stats = _sere(ids, weights, valid, sim, s, rho, min_batch, jit=True)
  want = sere_oracle(ids, weights, valid, sim, s, rho, min_batch)
  np.testing.assert_array_equal(got_ids, want.ids)
  assert np.issubdtype(got_ids.dtype, np.integer)
  np.testing.assert_array_equal(got_w, np.asarray(weights, np.float32))
  assert got_stats == tuple(want.stats)
  return want


# ---------------------------------------------------------------------------
# Random cases.

LEVEL_COUNTS = (2, 3, 4, 5, 9)


@st.composite
def sere_cases(draw):
  # Hypothesis draws a seed; the case is built from it with explicit weights, because
  # hypothesis' own integer draws lean heavily to the smallest values (K=1, T=1), where
  # SERE has nothing to do.
  seed = draw(st.integers(0, 2**32 - 1))
  rng = np.random.default_rng(seed)
  k = int(rng.integers(1, 7))
  if k >= 2 and rng.random() < 0.7:
    s = int(rng.integers(1, k))  # active
  else:
    s = int(rng.integers(-1, k + 2))  # anything in -1..K+1
  t = int(rng.integers(1, T_PHYS + 1))
  e = int(rng.integers(k, E_PHYS + 1))
  n_levels = int(rng.choice(LEVEL_COUNTS))
  levels = np.array([np.float32(i / (n_levels - 1)) for i in range(n_levels)], np.float32)
  rho_mode = rng.choice(["zero", "one", "level", "float"], p=[.25, .15, .3, .3])
  if rho_mode == "zero":
    rho = 0.0
  elif rho_mode == "one":
    rho = 1.0
  elif rho_mode == "level":
    rho = float(rng.choice(levels))
  else:
    rho = float(np.float32(rng.random()))  # exactly representable in float32
  symmetric = bool(rng.random() < 0.5)
  distinct_rows = bool(rng.random() < 0.5)
  valid_mode = rng.choice(["all", "random", "none", "one"], p=[.4, .4, .1, .1])
  min_batch_mode = rng.random()
  if min_batch_mode < 0.6:
    min_batch = 1
  elif min_batch_mode < 0.8:
    min_batch = 0
  else:
    min_batch = int(rng.integers(0, t + 3))

  sim = levels[rng.integers(0, n_levels, (E_PHYS, E_PHYS))]
  if symmetric:
    sim = np.triu(sim) + np.triu(sim, 1).T
  np.fill_diagonal(sim, 1.0)
  if distinct_rows:
    ids = np.stack([rng.permutation(e)[:k] for _ in range(T_PHYS)])
  else:
    ids = rng.integers(0, e, (T_PHYS, k))
  ids = ids.astype(np.int32)
  weights = rng.random((T_PHYS, k)).astype(np.float32)
  valid = random_valid_mask(rng, valid_mode, t)
  return dict(t=t, k=k, e=e, s=s, rho=rho, min_batch=min_batch, sim=sim, ids=ids,
              weights=weights, valid=valid)


@SETTINGS
@given(sere_cases())
def test_sere_matches_oracle(case):
  t, e, s, rho = case["t"], case["e"], case["s"], case["rho"]
  if s < 0:
    with pytest.raises(ValueError, match="select_top_k"):
      RerouteConfig(policy="sere", select_top_k=s, threshold=rho)
    return
  # The drawn (logical) case: t tokens, e experts.
  ids, weights, valid = case["ids"][:t], case["weights"][:t], case["valid"]
  sim = case["sim"][:e, :e]
  want = sere_oracle(ids, weights, valid, sim, s, rho, case["min_batch"])
  # Run it padded to the physical shape: invalid extra tokens, unused extra experts.
  valid_phys = np.zeros(T_PHYS, bool)
  valid_phys[:t] = valid
  got_ids, got_w, got_stats = _sere(case["ids"], case["weights"], valid_phys, case["sim"],
                                    s, rho, case["min_batch"])
  np.testing.assert_array_equal(got_ids[:t], want.ids)
  np.testing.assert_array_equal(got_w, case["weights"])
  assert got_stats == tuple(want.stats)
  # Padding rows are invalid but still follow the per-expert targets (step 4).
  want_phys = sere_oracle(case["ids"], case["weights"], valid_phys, case["sim"], s, rho,
                          case["min_batch"])
  np.testing.assert_array_equal(got_ids, want_phys.ids)


# Exact (unpadded) shapes, jitted once per (config, shape) bucket.
EXACT_BUCKETS = [
    # (T, K, E, S, rho, min_batch)
    (1, 2, 2, 1, 0.0, 1),
    (1, 4, 4, 2, 1.0, 1),
    (3, 4, 5, 2, 0.5, 1),
    (7, 6, 16, 1, 0.25, 1),
    (12, 3, 3, 1, 1.0, 1),
    (5, 5, 9, 3, 0.0, 3),
    (4, 2, 16, 1, 0.75, 2),
]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(EXACT_BUCKETS), st.integers(0, 2**32 - 1), st.booleans())
def test_sere_matches_oracle_exact_shapes_jit(bucket, seed, distinct_rows):
  t, k, e, s, rho, min_batch = bucket
  rng = np.random.default_rng(seed)
  sim = (rng.integers(0, 5, (e, e)) / 4).astype(np.float32)
  np.fill_diagonal(sim, 1.0)
  if distinct_rows:
    ids = np.stack([rng.permutation(e)[:k] for _ in range(t)]).astype(np.int32)
  else:
    ids = rng.integers(0, e, (t, k)).astype(np.int32)
  weights = rng.random((t, k)).astype(np.float32)
  valid = rng.random(t) < 0.75
  new_ids, new_w, stats = _jitted_sere(s, rho, min_batch)(ids, weights, valid, sim)
  want = sere_oracle(ids, weights, valid, sim, s, rho, min_batch)
  np.testing.assert_array_equal(np.asarray(new_ids), want.ids)
  np.testing.assert_array_equal(np.asarray(new_w), weights)
  assert _stats(stats) == tuple(want.stats)


# ---------------------------------------------------------------------------
# Explicit edge cases (T=4, K=3, E=6 unless the case needs otherwise).


def _sim(e, off=0.0):
  sim = np.full((e, e), off, np.float32)
  np.fill_diagonal(sim, 1.0)
  return sim


IDS = np.array([[0, 1, 2], [1, 3, 4], [0, 5, 2], [3, 1, 5]], np.int32)
W = np.array([[.5, .3, .2], [.6, .3, .1], [.4, .4, .2], [.7, .2, .1]], np.float32)
ALL = np.ones(4, bool)


@pytest.mark.parametrize("s", [0, 3, 4, 7])
def test_select_top_k_out_of_range_is_identity(s):
  sim = _sim(6, 0.5)
  got_ids, got_w, stats = _sere(IDS, W, ALL, sim, s, 0.0, jit=True)
  np.testing.assert_array_equal(got_ids, IDS)
  np.testing.assert_array_equal(got_w, W)
  assert stats == (6, 6, 0, 0)


def test_negative_select_top_k_rejected():
  with pytest.raises(ValueError, match="select_top_k"):
    RerouteConfig(select_top_k=-1)


def test_no_valid_token_is_identity():
  sim = _sim(6, 0.5)
  got_ids, got_w, stats = _sere(IDS, W, np.zeros(4, bool), sim, 1, 0.0, jit=True)
  np.testing.assert_array_equal(got_ids, IDS)
  np.testing.assert_array_equal(got_w, W)
  assert stats == (0, 0, 0, 0)


def test_rho_zero_reroutes_everything_even_with_zero_similarity():
  # P = {0, 1, 3}; with all off-diagonal similarities 0 every secondary expert goes to
  # the lowest primary index (a tie), none is critical.
  sim = _sim(6, 0.0)
  got_ids, got_w, stats = _sere(IDS, W, ALL, sim, 1, 0.0, jit=True)
  want = np.array([[0, 1, 0], [1, 3, 0], [0, 0, 0], [3, 1, 0]], np.int32)
  np.testing.assert_array_equal(got_ids, want)
  np.testing.assert_array_equal(got_w, W)
  # before {0..5} = 6; after {0, 1, 3} = 3; rerouted: (0,2), (1,2), (2,1), (2,2), (3,2).
  assert stats == (6, 3, 0, 5)


def test_rho_one_keeps_every_expert_below_similarity_one():
  sim = _sim(6, 0.99)
  sim[4, 3] = 1.0  # expert 4 is a perfect copy of primary 3 -> still re-routed
  got_ids, _, stats = _sere(IDS, W, ALL, sim, 1, 1.0, jit=True)
  want = IDS.copy()
  want[1, 2] = 3
  np.testing.assert_array_equal(got_ids, want)
  # Critical and used in a secondary slot: 2 and 5 (1 and 3 are primary).
  assert stats == (6, 5, 2, 1)


def test_threshold_is_strict():
  # Sim exactly rho -> not critical (re-routed); just below -> critical.
  ids = np.array([[0, 1], [2, 3]], np.int32)
  w = np.ones((2, 2), np.float32)
  sim = _sim(4, 0.0)
  sim[1, 0] = 0.5
  sim[3, 2] = np.nextafter(np.float32(0.5), np.float32(0.0))
  got_ids, _, stats = _sere(ids, w, np.ones(2, bool), sim, 1, 0.5, jit=True)
  np.testing.assert_array_equal(got_ids, [[0, 0], [2, 3]])
  assert stats == (4, 3, 1, 1)


def test_ties_go_to_lowest_index():
  # Primaries 5 and 2 (5 listed first); expert 0 is equally similar to both -> 2.
  ids = np.array([[5, 0], [2, 4]], np.int32)
  w = np.ones((2, 2), np.float32)
  sim = _sim(6, 0.0)
  sim[0, 5] = sim[0, 2] = 0.75
  sim[4, 5] = sim[4, 2] = 0.25
  got_ids, _, stats = _sere(ids, w, np.ones(2, bool), sim, 1, 0.0, jit=True)
  np.testing.assert_array_equal(got_ids, [[5, 2], [2, 2]])
  assert stats == (4, 2, 0, 2)


def test_similarity_is_read_row_expert_column_primary():
  # Asymmetric: Sim[e, p] decides, not Sim[p, e].
  ids = np.array([[0, 3], [1, 2]], np.int32)
  w = np.ones((2, 2), np.float32)
  sim = _sim(4, 0.0)
  sim[3, 1] = 0.9  # expert 3 -> primary 1
  sim[0, 3] = 0.95  # transpose direction: must be ignored
  sim[2, 0] = 0.6  # expert 2 -> primary 0
  sim[1, 2] = 0.99
  got_ids, _, _ = _sere(ids, w, np.ones(2, bool), sim, 1, 0.5, jit=True)
  np.testing.assert_array_equal(got_ids, [[0, 1], [1, 0]])


def test_secondary_expert_that_is_primary_elsewhere_stays():
  # Token 0's secondary expert 1 is token 1's primary: it stays, even though it is
  # very similar to token 0's own primary.
  ids = np.array([[0, 1], [1, 2]], np.int32)
  w = np.ones((2, 2), np.float32)
  sim = _sim(3, 0.0)
  sim[1, 0] = 1.0
  sim[2, 0] = 0.8
  got_ids, _, stats = _sere(ids, w, np.ones(2, bool), sim, 1, 0.0, jit=True)
  np.testing.assert_array_equal(got_ids, [[0, 1], [1, 0]])
  assert stats == (3, 2, 0, 1)


def test_duplicate_expert_after_rerouting():
  ids = np.array([[0, 3, 4], [1, 2, 3]], np.int32)
  w = np.array([[.5, .3, .2], [.6, .3, .1]], np.float32)
  sim = _sim(5, 0.1)
  sim[3, 0] = sim[4, 0] = sim[2, 0] = 0.9
  got_ids, got_w, stats = _sere(ids, w, np.ones(2, bool), sim, 1, 0.5, jit=True)
  np.testing.assert_array_equal(got_ids, [[0, 0, 0], [1, 0, 0]])
  np.testing.assert_array_equal(got_w, w)  # weights untouched; duplicates keep theirs
  assert stats == (5, 2, 0, 4)


def test_batch_of_one():
  ids = np.array([[2, 0, 1, 3]], np.int32)
  w = np.array([[.4, .3, .2, .1]], np.float32)
  sim = _sim(4, 0.0)
  sim[0, 2] = 0.6
  sim[1, 3] = 0.9  # 3 is secondary, not primary: irrelevant
  sim[1, 2] = 0.2
  sim[3, 2] = 0.5
  # S=1, rho=0.4: P={2}; 0 -> 2 (0.6), 1 is critical (0.2), 3 -> 2 (0.5).
  got_ids, got_w, stats = _sere(ids, w, np.ones(1, bool), sim, 1, 0.4, jit=True)
  np.testing.assert_array_equal(got_ids, [[2, 2, 1, 2]])
  np.testing.assert_array_equal(got_w, w)
  assert stats == (4, 2, 1, 2)
  _check_against_oracle(ids, w, np.ones(1, bool), sim, 1, 0.4)
  _check_against_oracle(ids, w, np.zeros(1, bool), sim, 1, 0.4)


def test_invalid_tokens_add_no_primary_and_no_stats():
  # Token 1 is invalid: its primary 4 is not in P, but its secondary row is remapped.
  ids = np.array([[0, 1], [4, 2], [0, 4]], np.int32)
  w = np.ones((3, 2), np.float32)
  valid = np.array([True, False, True])
  sim = _sim(5, 0.0)
  sim[1, 0] = 0.9
  sim[2, 0] = 0.9
  sim[4, 0] = 0.9
  got_ids, _, stats = _sere(ids, w, valid, sim, 1, 0.5, jit=True)
  np.testing.assert_array_equal(got_ids, [[0, 0], [4, 0], [0, 0]])
  # Valid slots before: {0, 1, 4} = 3; after {0} = 1; rerouted (0,1), (2,1) = 2.
  assert stats == (3, 1, 0, 2)


def test_critical_kept_counts_distinct_experts_used_by_valid_secondaries():
  ids = np.array([[0, 3], [1, 3], [0, 4], [1, 5]], np.int32)
  w = np.ones((4, 2), np.float32)
  valid = np.array([True, True, True, False])
  sim = _sim(6, 0.0)  # every non-primary expert is critical at rho > 0
  got_ids, _, stats = _sere(ids, w, valid, sim, 1, 0.3, jit=True)
  np.testing.assert_array_equal(got_ids, ids)
  # Critical experts: 2, 3, 4, 5. Used by valid secondaries: 3 (twice), 4 -> 2.
  # 5 is used only by an invalid token, 2 by nobody.
  assert stats == (4, 4, 2, 0)


@pytest.mark.parametrize("min_batch,applies", [(0, True), (1, True), (3, True), (4, False),
                                               (10, False)])
def test_min_batch(min_batch, applies):
  valid = np.array([True, True, False, True])  # 3 valid tokens
  sim = _sim(6, 0.5)
  sim[2, [0, 1, 3]] = 0.0  # expert 2 is critical at rho=0.25
  got_ids, got_w, stats = _sere(IDS, W, valid, sim, 1, 0.25, min_batch=min_batch, jit=True)
  want = sere_oracle(IDS, W, valid, sim, 1, 0.25, min_batch)
  np.testing.assert_array_equal(got_ids, want.ids)
  np.testing.assert_array_equal(got_w, W)
  assert stats == tuple(want.stats)
  if applies:
    assert not np.array_equal(got_ids, IDS)
    assert stats[2] == 1  # expert 2 critical, used by valid token 0
  else:
    np.testing.assert_array_equal(got_ids, IDS)
    assert stats[1] == stats[0] and stats[2:] == (0, 0)
