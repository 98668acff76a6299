"""RerouteConfig validation, reroute's input checks, and top-K routing."""

from __future__ import annotations

import dataclasses
import math

import jax
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sere_jax import POLICIES, RerouteConfig, reroute, route

# ---------------------------------------------------------------------------
# RerouteConfig

INVALID_FIELDS = [
    ("policy", "nope"),
    ("policy", "SERE"),
    ("policy", None),
    ("select_top_k", -1),
    ("select_top_k", 1.0),
    ("select_top_k", 1.5),
    ("select_top_k", "2"),
    ("select_top_k", None),
    ("select_top_k", True),
    ("select_top_k", False),
    ("threshold", -0.01),
    ("threshold", 1.01),
    ("threshold", -1),
    ("threshold", 2),
    ("threshold", math.nan),
    ("threshold", math.inf),
    ("threshold", "0.5"),
    ("threshold", None),
    ("threshold", True),
    ("decode_only", 1),
    ("decode_only", 0),
    ("decode_only", "yes"),
    ("decode_only", None),
    ("expert_devices", -1),
    ("expert_devices", 2.0),
    ("expert_devices", True),
    ("min_batch", -1),
    ("min_batch", 2.0),
    ("min_batch", "1"),
    ("min_batch", True),
    ("seed", -1),
    ("seed", 2**32),
    ("seed", 0.0),
    ("seed", None),
    ("seed", False),
    ("score_weight", -0.01),
    ("score_weight", 1.01),
    ("score_weight", -1),
    ("score_weight", 2),
    ("score_weight", math.nan),
    ("score_weight", "0.5"),
    ("score_weight", None),
    ("score_weight", True),
    ("score_weight", False),
    ("renormalize", 1),
    ("renormalize", "yes"),
    ("pool_size", -1),
    ("pool_size", 2.5),
]


@pytest.mark.parametrize("field,value", INVALID_FIELDS,
                         ids=[f"{f}={v!r}" for f, v in INVALID_FIELDS])
def test_invalid_config_field_raises_naming_the_field(field, value):
  with pytest.raises(ValueError, match=field):
    RerouteConfig(**{field: value})


def test_expert_pool_needs_a_pool_size():
  with pytest.raises(ValueError, match="pool_size"):
    RerouteConfig(policy="expert_pool")


@pytest.mark.parametrize("kwargs", [
    {},
    {"threshold": 0},
    {"threshold": 1},
    {"threshold": 0.0},
    {"threshold": 1.0},
    {"threshold": 0.3},
    {"select_top_k": 0},
    {"select_top_k": 100},
    {"decode_only": False},
    {"min_batch": 0},
    {"seed": 0},
    {"seed": 2**32 - 1},
    {"score_weight": 0},
    {"score_weight": 1},
    {"score_weight": 0.0},
    {"score_weight": 0.25},
    {"score_weight": 1.0},
    {"policy": "keep_active", "renormalize": True},
    {"policy": "topk_truncate", "renormalize": False},
    {"policy": "expert_pool", "pool_size": 1},
    {"policy": "sere_ep", "expert_devices": 4},
    {"policy": "sere", "expert_devices": 8},
] + [{"policy": p} for p in POLICIES if p not in ("expert_pool", "sere_ep")])
def test_valid_config_accepted(kwargs):
  cfg = RerouteConfig(**kwargs)
  for name, value in kwargs.items():
    assert getattr(cfg, name) == value


def test_config_defaults_and_frozen():
  cfg = RerouteConfig()
  assert (cfg.policy, cfg.select_top_k, cfg.threshold, cfg.decode_only, cfg.min_batch,
          cfg.seed, cfg.score_weight) == ("sere", 2, 0.0, True, 1, 0, 0.5)
  with pytest.raises(dataclasses.FrozenInstanceError):
    cfg.threshold = 0.5
  # Hashable and compared by value (usable as a static jit argument).
  assert hash(cfg) == hash(RerouteConfig()) and cfg == RerouteConfig()
  assert cfg != RerouteConfig(threshold=0.5)


def test_policies_listed():
  assert set(POLICIES) == {"none", "sere", "sere_hybrid", "sere_ep", "topk_truncate",
                           "keep_active", "oea", "random", "expert_pool", "oracle"}


@pytest.mark.parametrize("policy,s,k,active", [
    ("sere", 2, 4, True), ("sere", 0, 4, False), ("sere", 4, 4, False),
    ("sere", 5, 4, False), ("sere", 3, 4, True), ("none", 2, 4, False),
    ("oea", 1, 2, True), ("random", 1, 1, False), ("topk_truncate", 1, 8, True),
    ("sere_hybrid", 2, 4, True), ("sere_hybrid", 0, 4, False),
])
def test_is_active(policy, s, k, active):
  assert RerouteConfig(policy=policy, select_top_k=s).is_active(k) is active


# ---------------------------------------------------------------------------
# reroute input checks. T=12, K=3, E=16 (shapes the other test files use).

T, K, E = 12, 3, 16
IDS = (np.arange(T * K).reshape(T, K) % E).astype(np.int32)
W = np.full((T, K), 1 / K, np.float32)
VALID = np.ones(T, bool)
SIM = np.eye(E, dtype=np.float32)
SERE = RerouteConfig(policy="sere", select_top_k=1, threshold=0.5)


def test_reference_inputs_are_accepted():
  new_ids, new_w, stats = reroute(IDS, W, VALID, SIM, SERE)
  assert np.asarray(new_ids).shape == (T, K) and np.asarray(new_w).shape == (T, K)
  assert int(stats.distinct_before) == E


@pytest.mark.parametrize("sim,match", [
    (np.ones(E, np.float32), "square"),
    (np.ones((1, E, E), np.float32), "square"),
    (np.ones((E, E + 1), np.float32), "square"),
    (np.ones((E + 1, E), np.float32), "square"),
    (np.eye(E - 1, dtype=np.float32), f"{E} experts"),
    (np.eye(E + 2, dtype=np.float32), f"{E} experts"),
])
def test_similarity_shape_rejected(sim, match):
  with pytest.raises(ValueError, match=match):
    reroute(IDS, W, VALID, sim, SERE, num_experts=E)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_similarity_non_finite_rejected(bad):
  sim = SIM.copy()
  sim[3, 5] = bad
  with pytest.raises(ValueError, match="non-finite"):
    reroute(IDS, W, VALID, sim, SERE)


def test_similarity_shape_checked_under_jit():
  fn = jax.jit(lambda ids, w, valid, sim: reroute(ids, w, valid, sim, SERE, num_experts=E))
  with pytest.raises(ValueError, match="square"):
    fn(IDS, W, VALID, np.ones((E, E + 1), np.float32))


def test_missing_similarity_for_sere():
  with pytest.raises(ValueError, match="similarity"):
    reroute(IDS, W, VALID, None, SERE, num_experts=E)
  with pytest.raises(ValueError, match="num_experts"):
    reroute(IDS, W, VALID, None, SERE)


def test_missing_or_misshaped_router_scores_for_oea():
  cfg = RerouteConfig(policy="oea", select_top_k=1)
  with pytest.raises(ValueError, match="router_scores"):
    reroute(IDS, W, VALID, None, cfg, num_experts=E)
  with pytest.raises(ValueError, match="router_scores"):
    reroute(IDS, W, VALID, None, cfg, num_experts=E,
            router_scores=np.ones((T, E + 1), np.float32))
  with pytest.raises(ValueError, match="router_scores"):
    reroute(IDS, W, VALID, None, cfg, num_experts=E,
            router_scores=np.ones((T + 1, E), np.float32))


@pytest.mark.parametrize("bad", [-1, E, E + 7])
@pytest.mark.parametrize("policy", ["sere", "none"])
def test_ids_out_of_range_rejected(bad, policy):
  ids = IDS.copy()
  ids[4, 2] = bad
  cfg = RerouteConfig(policy=policy, select_top_k=1)
  with pytest.raises(ValueError, match=r"ids must lie in \[0, 16\)"):
    reroute(ids, W, VALID, SIM, cfg)


def test_ids_must_be_integer_and_2d():
  with pytest.raises(ValueError, match="integer"):
    reroute(IDS.astype(np.float32), W, VALID, SIM, SERE)
  with pytest.raises(ValueError, match=r"ids must be \[T, K\]"):
    reroute(IDS[:, 0], W[:, 0], VALID, SIM, SERE)


@pytest.mark.parametrize("weights", [W[:, :2], W[:-1], W.T, W[None]])
def test_weights_shape_mismatch_rejected(weights):
  with pytest.raises(ValueError, match="weights"):
    reroute(IDS, weights, VALID, SIM, SERE)


@pytest.mark.parametrize("valid", [VALID[:-1], np.ones(T + 1, bool), np.ones((T, 1), bool),
                                   np.ones((T, K), bool)])
def test_valid_shape_mismatch_rejected(valid):
  with pytest.raises(ValueError, match="valid"):
    reroute(IDS, W, valid, SIM, SERE)


# ---------------------------------------------------------------------------
# route()

R_T, R_E = 8, 16


@settings(max_examples=60, deadline=None)
@given(st.sampled_from([1, 3, R_E]), st.booleans(), st.integers(0, 2**32 - 1),
       st.integers(2, 6))
def test_route_sorted_with_ties_to_lower_index(top_k, normalize, seed, n_levels):
  rng = np.random.default_rng(seed)
  # Integer logits from a few levels: ties are frequent, distinct levels never reorder.
  logits = rng.integers(0, n_levels, (R_T, R_E)).astype(np.float32)
  ids, weights = route(logits, top_k, normalize=normalize)
  ids, weights = np.asarray(ids), np.asarray(weights)
  assert ids.shape == weights.shape == (R_T, top_k)
  assert ids.dtype == np.int32 and weights.dtype == np.float32
  want_ids = np.argsort(-logits, axis=1, kind="stable")[:, :top_k]
  np.testing.assert_array_equal(ids, want_ids)
  probs = np.exp(logits.astype(np.float64))
  probs /= probs.sum(1, keepdims=True)
  want_w = np.take_along_axis(probs, want_ids, 1)
  if normalize:
    want_w /= want_w.sum(1, keepdims=True)
    np.testing.assert_allclose(weights.sum(1), 1.0, rtol=1e-6)
  np.testing.assert_allclose(weights, want_w, rtol=1e-5)
  assert np.all(np.diff(weights, axis=1) <= 0)


def test_route_tie_order_explicit():
  logits = np.zeros((1, 6), np.float32)
  logits[0, [4, 1, 5]] = 2.0
  ids, weights = route(logits, 4)
  np.testing.assert_array_equal(ids, [[1, 4, 5, 0]])
  assert float(weights[0, 0]) == float(weights[0, 2]) > float(weights[0, 3])


def test_route_normalize_changes_sum_only_when_asked():
  logits = np.array([[3.0, 1.0, 0.0, -1.0]], np.float32)
  _, raw = route(logits, 2)
  _, norm = route(logits, 2, normalize=True)
  assert float(np.sum(raw)) < 0.99
  np.testing.assert_allclose(np.sum(norm), 1.0, rtol=1e-6)
  np.testing.assert_allclose(np.asarray(norm) * float(np.sum(raw)), raw, rtol=1e-6)


@pytest.mark.parametrize("top_k", [0, -1, 5, 100])
def test_route_bad_top_k_rejected(top_k):
  with pytest.raises(ValueError, match="top_k"):
    route(np.zeros((3, 4), np.float32), top_k)


@pytest.mark.parametrize("shape", [(4,), (2, 3, 4), ()])
def test_route_bad_logits_rank_rejected(shape):
  with pytest.raises(ValueError, match="router_logits"):
    route(np.zeros(shape, np.float32), 1)
