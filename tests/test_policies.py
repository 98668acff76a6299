"""Properties of the baseline policies (none, topk_truncate, oea, random) and jit of
every policy that needs no expert outputs. The controls (keep_active, expert_pool,
oracle) are checked against references in test_control_policies.py."""

from __future__ import annotations

import functools

import jax
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sere_jax import RerouteConfig, reroute

T_PHYS = 12
E_PHYS = 16
SETTINGS = settings(max_examples=100, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])


def _stats(stats):
  """The four routing counts; the similarity was valid."""
  assert int(stats.invalid_similarity) == 0
  return tuple(int(x) for x in stats[:4])


def _distinct(ids, valid):
  return len({int(e) for t in range(ids.shape[0]) if valid[t] for e in ids[t]})


def _changed_slots(ids, w, new_ids, new_w, valid):
  changed = (new_ids != ids) | (new_w != w)
  return int(np.sum(changed & np.asarray(valid)[:, None]))


def _primary(ids, valid, s):
  return {int(e) for t in range(ids.shape[0]) if valid[t] for e in ids[t, :s]}


@st.composite
def batches(draw, k_min=2):
  """A routed batch in the fixed physical shape [T_PHYS, K] over E_PHYS experts."""
  # Structure from a drawn seed with explicit weights (hypothesis' integer draws lean
  # to the smallest values, where most policies have nothing to do).
  seed = draw(st.integers(0, 2**32 - 1))
  rng = np.random.default_rng(seed)
  k = int(rng.integers(k_min, 7))
  s = int(rng.integers(1, k)) if k >= 2 and rng.random() < 0.75 else int(rng.integers(0, k + 1))
  e = int(rng.integers(k, E_PHYS + 1))  # experts actually used
  valid_mode = rng.choice(["all", "random", "none"], p=[.5, .4, .1])
  min_batch = 1 if rng.random() < 0.7 else int(rng.integers(0, T_PHYS + 2))
  renormalize = bool(rng.random() < 0.5)
  # Quantised logits so that router scores tie often; experts >= e are never chosen.
  logits = rng.integers(0, 4, (T_PHYS, E_PHYS)).astype(np.float32)
  logits[:, e:] = -1e9
  scores = np.exp(logits - logits.max(1, keepdims=True))
  scores = (scores / scores.sum(1, keepdims=True)).astype(np.float32)
  ids = np.argsort(-scores, axis=1, kind="stable")[:, :k].astype(np.int32)
  weights = np.take_along_axis(scores, ids, 1)
  if renormalize:
    weights = weights / weights.sum(1, keepdims=True)
  weights = weights.astype(np.float32)
  if valid_mode == "all":
    valid = np.ones(T_PHYS, bool)
  elif valid_mode == "none":
    valid = np.zeros(T_PHYS, bool)
  else:
    valid = rng.random(T_PHYS) < rng.random()
  return dict(k=k, s=s, ids=ids, weights=weights, scores=scores, valid=valid,
              min_batch=min_batch, renormalize=renormalize)


def _run(policy, case, **kwargs):
  cfg = RerouteConfig(policy=policy, select_top_k=case["s"], min_batch=case["min_batch"])
  new_ids, new_w, stats = reroute(case["ids"], case["weights"], case["valid"], None, cfg,
                                  num_experts=E_PHYS, **kwargs)
  return np.asarray(new_ids), np.asarray(new_w), _stats(stats)


def _applies(case):
  return (0 < case["s"] < case["k"]
          and int(np.sum(case["valid"])) >= max(case["min_batch"], 1))


def _check_identity(case, new_ids, new_w, stats):
  np.testing.assert_array_equal(new_ids, case["ids"])
  np.testing.assert_array_equal(new_w, case["weights"])
  d = _distinct(case["ids"], case["valid"])
  assert stats == (d, d, 0, 0)


def _check_common_stats(case, new_ids, new_w, stats):
  ids, w, valid = case["ids"], case["weights"], case["valid"]
  assert stats == (_distinct(ids, valid), _distinct(new_ids, valid), 0,
                   _changed_slots(ids, w, new_ids, new_w, valid))


# ---------------------------------------------------------------------------
# none


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batches(k_min=1))
def test_none_is_identity(case):
  new_ids, new_w, stats = _run("none", case)
  _check_identity(case, new_ids, new_w, stats)


# ---------------------------------------------------------------------------
# topk_truncate


@SETTINGS
@given(batches())
def test_topk_truncate(case):
  s, ids, w = case["s"], case["ids"], case["weights"]
  new_ids, new_w, stats = _run("topk_truncate", case, renormalize=case["renormalize"])
  if not _applies(case):
    _check_identity(case, new_ids, new_w, stats)
    return
  np.testing.assert_array_equal(new_ids[:, :s], ids[:, :s])
  np.testing.assert_array_equal(new_ids[:, s:], np.repeat(ids[:, :1], case["k"] - s, 1))
  np.testing.assert_array_equal(new_w[:, s:], 0.0)
  if case["renormalize"]:
    # Same row sum as before, same proportions among the kept slots.
    np.testing.assert_allclose(new_w.sum(1), w.sum(1), rtol=1e-5)
    np.testing.assert_allclose(new_w[:, :s] * w[:, :s].sum(1, keepdims=True),
                               w[:, :s] * w.sum(1, keepdims=True), rtol=1e-5)
    assert np.all(new_w[:, :s] >= w[:, :s])
  else:
    np.testing.assert_array_equal(new_w[:, :s], w[:, :s])
  _check_common_stats(case, new_ids, new_w, stats)
  # Distinct experts after: exactly the valid tokens' top-S experts.
  assert stats[1] == len(_primary(ids, case["valid"], s))


# ---------------------------------------------------------------------------
# oea


@SETTINGS
@given(batches())
def test_oea(case):
  s, k, ids, w, scores = case["s"], case["k"], case["ids"], case["weights"], case["scores"]
  new_ids, new_w, stats = _run("oea", case, router_scores=scores,
                               renormalize=case["renormalize"])
  if not _applies(case):
    _check_identity(case, new_ids, new_w, stats)
    return
  primary = _primary(ids, case["valid"], s)
  np.testing.assert_array_equal(new_ids[:, :s], ids[:, :s])
  for t in range(T_PHYS):
    own = {int(e) for e in ids[t, :s]}
    candidates = sorted(primary - own)
    n_found = min(k - s, len(candidates))
    picked = [int(e) for e in new_ids[t, s:s + n_found]]
    # Only active primaries, none of the token's own, no repeats.
    assert set(picked) <= primary - own
    assert len(set(picked)) == n_found
    # Greedy by descending router score: non-increasing, and nothing left out scores higher.
    picked_scores = [scores[t, e] for e in picked]
    assert picked_scores == sorted(picked_scores, reverse=True)
    rest = [scores[t, e] for e in candidates if e not in picked]
    if picked and rest:
      assert min(picked_scores) >= max(rest)
    # Slots without a candidate: the token's first expert with weight 0.
    np.testing.assert_array_equal(new_ids[t, s + n_found:], ids[t, 0])
    np.testing.assert_array_equal(new_w[t, s + n_found:], 0.0)
    # Kept and filled slots carry weights proportional to the router scores.
    used = s + n_found
    ratio = new_w[t, :used] / scores[t, new_ids[t, :used]]
    np.testing.assert_allclose(ratio, ratio[0], rtol=1e-5)
  if case["renormalize"]:
    np.testing.assert_allclose(new_w.sum(1), w.sum(1), rtol=1e-5)
  else:
    # Weights are the router scores here: kept slots keep their weights exactly-ish.
    np.testing.assert_allclose(new_w[:, :s], w[:, :s], rtol=1e-6)
  _check_common_stats(case, new_ids, new_w, stats)


# ---------------------------------------------------------------------------
# random


@SETTINGS
@given(batches(), st.integers(0, 2**31 - 1))
def test_random(case, key_seed):
  s, ids, w, valid = case["s"], case["ids"], case["weights"], case["valid"]
  key = jax.random.PRNGKey(key_seed)
  new_ids, new_w, stats = _run("random", case, key=key)
  primary = _primary(ids, valid, s)
  if not _applies(case) or not primary:
    _check_identity(case, new_ids, new_w, stats)
    return
  np.testing.assert_array_equal(new_ids[:, :s], ids[:, :s])
  np.testing.assert_array_equal(new_w, w)
  target = {}
  for t in range(T_PHYS):  # all rows, valid or not
    for j in range(s, case["k"]):
      e, new = int(ids[t, j]), int(new_ids[t, j])
      assert new in primary
      if e in primary:
        assert new == e
      assert target.setdefault(e, new) == new  # one decision per expert
  _check_common_stats(case, new_ids, new_w, stats)
  if valid.all():
    assert stats[1] == len(primary)
  # Deterministic given the key.
  again_ids, again_w, again_stats = _run("random", case, key=key)
  np.testing.assert_array_equal(again_ids, new_ids)
  assert again_stats == stats


def test_random_is_roughly_uniform_over_primaries():
  # One secondary expert (4) shared by four tokens with primaries 0..3.
  ids = np.array([[0, 4], [1, 4], [2, 4], [3, 4]], np.int32)
  w = np.ones((4, 2), np.float32)
  valid = np.ones(4, bool)
  cfg = RerouteConfig(policy="random", select_top_k=1)
  draw = jax.jit(lambda seed: reroute(ids, w, valid, None, cfg, num_experts=5,
                                      key=jax.random.PRNGKey(seed))[0])
  out = np.stack([np.asarray(draw(np.uint32(seed))) for seed in range(400)])
  assert np.all(out[:, :, 1] == out[:, :1, 1])  # all four tokens share the decision
  counts = np.bincount(out[:, 0, 1], minlength=5)
  assert counts[4] == 0
  assert np.all((counts[:4] > 50) & (counts[:4] < 150)), counts


# ---------------------------------------------------------------------------
# jit (config closed over) equals eager, for every policy.

JIT_T, JIT_K, JIT_E = T_PHYS, 4, E_PHYS  # shapes the eager tests above already compiled


def _jit_case(seed):
  rng = np.random.default_rng(seed)
  logits = rng.integers(0, 4, (JIT_T, JIT_E)).astype(np.float32)
  scores = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
  scores = scores.astype(np.float32)
  ids = np.argsort(-scores, 1, kind="stable")[:, :JIT_K].astype(np.int32)
  w = np.take_along_axis(scores, ids, 1)
  valid = rng.random(JIT_T) < 0.8
  sim = (rng.integers(0, 5, (JIT_E, JIT_E)) / 4).astype(np.float32)
  np.fill_diagonal(sim, 1.0)
  return ids, w, valid, sim, scores


JIT_CONFIGS = [
    # (config, renormalize)
    (RerouteConfig(policy="none", select_top_k=2), False),
    (RerouteConfig(policy="sere", select_top_k=1, threshold=0.0), False),
    (RerouteConfig(policy="sere", select_top_k=2, threshold=0.5), False),
    (RerouteConfig(policy="sere", select_top_k=2, threshold=0.5, min_batch=5), False),
    (RerouteConfig(policy="topk_truncate", select_top_k=2), False),
    (RerouteConfig(policy="topk_truncate", select_top_k=1), True),
    (RerouteConfig(policy="oea", select_top_k=1), False),
    (RerouteConfig(policy="oea", select_top_k=2), True),
    (RerouteConfig(policy="random", select_top_k=1, seed=3), False),
    (RerouteConfig(policy="sere_hybrid", select_top_k=1, score_weight=0.5), False),
    (RerouteConfig(policy="sere_hybrid", select_top_k=2, threshold=0.5, score_weight=1.0),
     False),
    (RerouteConfig(policy="keep_active", select_top_k=1), True),
    (RerouteConfig(policy="keep_active", select_top_k=2, renormalize=False), True),
    (RerouteConfig(policy="expert_pool", pool_size=3), False),
]


@pytest.mark.parametrize(
    "cfg,renormalize", JIT_CONFIGS,
    ids=[f"{c.policy}-S{c.select_top_k}-rho{c.threshold}-mb{c.min_batch}-renorm{r}"
         for c, r in JIT_CONFIGS])
def test_jit_equals_eager(cfg, renormalize):
  jitted = jax.jit(lambda ids, w, valid, sim, scores: reroute(
      ids, w, valid, sim, cfg, router_scores=scores, renormalize=renormalize))
  for seed in range(3):
    ids, w, valid, sim, scores = _jit_case(seed)
    if seed == 2:
      valid[:] = True
    eager = reroute(ids, w, valid, sim, cfg, router_scores=scores, renormalize=renormalize)
    traced = jitted(ids, w, valid, sim, scores)
    np.testing.assert_array_equal(np.asarray(traced[0]), np.asarray(eager[0]))
    np.testing.assert_allclose(np.asarray(traced[1]), np.asarray(eager[1]), rtol=1e-6)
    assert _stats(traced[2]) == _stats(eager[2])
    assert np.asarray(traced[0]).dtype == np.asarray(eager[0]).dtype
  # The jitted call really re-routed something where the policy is active.
  if cfg.policy != "none":
    ids, w, valid, sim, scores = _jit_case(2)
    valid[:] = True
    new_ids, new_w, _ = jitted(ids, w, valid, sim, scores)
    assert not (np.array_equal(new_ids, ids) and np.array_equal(new_w, w))


# ---------------------------------------------------------------------------
# oea, hand-worked cases.


@functools.lru_cache(maxsize=None)
def _jitted(policy, s, renormalize=False):
  cfg = RerouteConfig(policy=policy, select_top_k=s)
  return jax.jit(lambda ids, w, valid, scores: reroute(
      ids, w, valid, None, cfg, router_scores=scores, renormalize=renormalize))


def test_oea_more_primary_than_secondary_slots():
  # K=3, S=2 (S > K - S). P = {0, 1, 2, 3}.
  scores = np.array([[.30, .25, .10, .20, .10, .05],
                     [.10, .15, .30, .25, .20, .00],
                     [.30, .10, .05, .25, .00, .30]], np.float32)
  ids = np.array([[0, 1, 3], [2, 3, 4], [0, 3, 5]], np.int32)
  # Token 2's top-3 is really (0, 5, 3) by score; use its listed order anyway.
  w = np.take_along_axis(scores, ids, 1)
  new_ids, new_w, stats = _jitted("oea", 2)(ids, w, np.ones(3, bool), scores)
  # Token 0: candidates {2, 3} -> 3 (.20). Token 1: {0, 1} -> 1 (.15).
  # Token 2: {1, 2} -> 1 (.10).
  np.testing.assert_array_equal(new_ids, [[0, 1, 3], [2, 3, 1], [0, 3, 1]])
  np.testing.assert_allclose(new_w, np.take_along_axis(scores, np.asarray(new_ids), 1))
  assert _stats(stats) == (6, 4, 0, 2)


def test_oea_too_few_candidates_fill_with_first_expert_weight_zero():
  scores = np.array([[.4, .3, .2, .1, .0], [.3, .4, .2, .1, .0]], np.float32)
  ids = np.array([[0, 1, 2, 3], [1, 0, 2, 3]], np.int32)
  w = np.take_along_axis(scores, ids, 1)
  new_ids, new_w, stats = _jitted("oea", 1)(ids, w, np.ones(2, bool), scores)
  # P = {0, 1}: each token has exactly one candidate (the other token's primary).
  np.testing.assert_array_equal(new_ids, [[0, 1, 0, 0], [1, 0, 1, 1]])
  np.testing.assert_allclose(new_w, [[.4, .3, 0, 0], [.4, .3, 0, 0]])
  assert _stats(stats) == (4, 2, 0, 4)
  # Renormalised: the kept mass is rescaled to the original row sum.
  new_ids, new_w, _ = _jitted("oea", 1, True)(ids, w, np.ones(2, bool), scores)
  np.testing.assert_allclose(new_w, [[.4, .3, 0, 0], [.4, .3, 0, 0]] / np.float32(.7),
                             rtol=1e-6)


@pytest.mark.parametrize("min_batch", [0, 1])
@pytest.mark.parametrize("policy", ["sere", "sere_hybrid", "topk_truncate", "oea",
                                    "random", "keep_active", "expert_pool"])
def test_no_valid_token_changes_nothing(policy, min_batch):
  # Even with min_batch=0, a batch without a valid token is left exactly as it is.
  rng = np.random.default_rng(0)
  scores = rng.random((T_PHYS, E_PHYS)).astype(np.float32)
  ids = np.argsort(-scores, 1)[:, :3].astype(np.int32)
  w = np.take_along_axis(scores, ids, 1)
  sim = np.eye(E_PHYS, dtype=np.float32)
  cfg = RerouteConfig(policy=policy, select_top_k=1, min_batch=min_batch, pool_size=2)
  new_ids, new_w, stats = reroute(ids, w, np.zeros(T_PHYS, bool), sim, cfg,
                                  router_scores=scores)
  np.testing.assert_array_equal(new_ids, ids)
  np.testing.assert_array_equal(new_w, w)
  assert _stats(stats) == (0, 0, 0, 0)
