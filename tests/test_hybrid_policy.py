"""`reroute(policy='sere_hybrid')` against its brute-force oracle, and through moe_ffn."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sere_jax import RerouteConfig, policies, reroute
from sere_jax.kernels import moe_ffn as moe_ffn_lib
from tests.oracle import random_valid_mask, sere_hybrid_oracle

# Every case is drawn in the physical shape [T_PHYS, K] over E_PHYS experts, so eager
# JAX compiles each primitive once per K.
T_PHYS = 12
E_PHYS = 16
SETTINGS = settings(max_examples=30, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])
LAMBDAS = (0.0, 0.25, 0.5, 1.0)
RHOS = (0.0, 0.25, 0.5, 0.75)  # exactly representable in float32


def _stats(stats):
  """The four routing counts; the similarity was valid."""
  assert int(stats.invalid_similarity) == 0
  return tuple(int(x) for x in stats[:4])


def _hybrid(case, lam, rho=None, policy="sere_hybrid"):
  cfg = RerouteConfig(policy=policy, select_top_k=case["s"],
                      threshold=case["rho"] if rho is None else rho,
                      min_batch=case["min_batch"], score_weight=lam)
  new_ids, new_w, stats = reroute(case["ids"], case["weights"], case["valid"],
                                  case["sim"], cfg, router_scores=case["scores"])
  return np.asarray(new_ids), np.asarray(new_w), _stats(stats)


def _softmax(logits):
  z = np.exp(logits - logits.max(1, keepdims=True))
  return (z / z.sum(1, keepdims=True)).astype(np.float32)


@st.composite
def hybrid_cases(draw):
  # Built from a drawn seed with explicit weights (hypothesis' integer draws lean to
  # the smallest values, where re-routing has nothing to do).
  seed = draw(st.integers(0, 2**32 - 1))
  rng = np.random.default_rng(seed)
  k = int(rng.choice([2, 4]))
  s = int(rng.integers(1, k)) if rng.random() < 0.85 else int(rng.choice([0, k]))
  e = int(rng.integers(k, E_PHYS + 1))  # experts actually used
  if rng.random() < 0.5:  # quarter levels: similarity ties and values equal to rho
    sim = (rng.integers(0, 5, (E_PHYS, E_PHYS)) / 4).astype(np.float32)
  else:
    sim = rng.random((E_PHYS, E_PHYS)).astype(np.float32)
  sim = np.triu(sim) + np.triu(sim, 1).T
  np.fill_diagonal(sim, 1.0)
  if rng.random() < 0.3:  # quantised logits: router-score ties
    logits = rng.integers(0, 3, (T_PHYS, E_PHYS)).astype(np.float32)
  else:
    logits = (rng.normal(size=(T_PHYS, E_PHYS)) * 2).astype(np.float32)
  scores = _softmax(logits)
  if rng.random() < 0.5:
    ids = np.stack([rng.permutation(e)[:k] for _ in range(T_PHYS)])
  else:
    ids = rng.integers(0, e, (T_PHYS, k))  # duplicates allowed
  valid_mode = rng.choice(["all", "random", "none", "one"], p=[.4, .4, .1, .1])
  valid = random_valid_mask(rng, valid_mode, T_PHYS)
  lam = (float(rng.choice(LAMBDAS)) if rng.random() < 0.6
         else float(np.float32(rng.random())))
  return dict(k=k, s=s, ids=ids.astype(np.int32),
              weights=rng.random((T_PHYS, k)).astype(np.float32), valid=valid, sim=sim,
              scores=scores, lam=lam, rho=float(rng.choice(RHOS)),
              min_batch=1 if rng.random() < 0.8 else int(rng.integers(0, T_PHYS + 2)))


@SETTINGS
@given(hybrid_cases())
def test_hybrid_matches_oracle(case):
  got_ids, got_w, got_stats = _hybrid(case, case["lam"])
  want = sere_hybrid_oracle(case["ids"], case["weights"], case["valid"], case["sim"],
                            case["scores"], case["s"], case["rho"], case["lam"],
                            case["min_batch"])
  np.testing.assert_array_equal(got_ids, want.ids)  # every row, valid or not
  assert got_ids.dtype == np.int32
  np.testing.assert_array_equal(got_w, case["weights"])
  assert got_stats == tuple(want.stats)
  if case["lam"] == 1.0 and want.primary:
    # lam = 1: a re-routed slot takes the token's highest-scoring primary.
    primary = sorted(want.primary)
    for t in range(T_PHYS):
      for j in range(case["s"], case["k"]):
        e = int(case["ids"][t, j])
        if e not in want.primary and e not in want.critical:
          assert got_ids[t, j] == primary[int(np.argmax(case["scores"][t, primary]))]


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(hybrid_cases())
def test_lambda_zero_is_sere(case):
  hybrid = _hybrid(case, 0.0)
  sere = _hybrid(case, 0.0, policy="sere")
  np.testing.assert_array_equal(hybrid[0], sere[0])
  np.testing.assert_array_equal(hybrid[1], sere[1])
  assert hybrid[2] == sere[2]


# ---------------------------------------------------------------------------
# Hand-worked cases.

# P = {0, 1}. Expert 2 is similar to 0, expert 3 to 1; token 0 prefers 1, token 1
# prefers 0 by router score.
IDS = np.array([[0, 2, 3], [1, 3, 2]], np.int32)
W = np.array([[.5, .3, .2], [.6, .3, .1]], np.float32)
SIM = np.eye(4, dtype=np.float32)
SIM[2, 0] = SIM[0, 2] = 0.75
SIM[3, 1] = SIM[1, 3] = 0.75
SCORES = np.array([[.1, .6, .2, .1], [.6, .1, .2, .1]], np.float32)
ALL = np.ones(2, bool)


def _run(lam, rho=0.0, ids=IDS, valid=ALL, sim=SIM, scores=SCORES):
  cfg = RerouteConfig(policy="sere_hybrid", select_top_k=1, threshold=rho,
                      score_weight=lam)
  new_ids, new_w, stats = reroute(ids, W, valid, sim, cfg, router_scores=scores)
  return np.asarray(new_ids), np.asarray(new_w), _stats(stats)


def test_lambda_one_picks_highest_scoring_primary():
  new_ids, new_w, stats = _run(1.0)
  np.testing.assert_array_equal(new_ids, [[0, 1, 1], [1, 0, 0]])
  np.testing.assert_array_equal(new_w, W)
  assert stats == (4, 2, 0, 4)


def test_lambda_zero_picks_most_similar_primary():
  new_ids, _, stats = _run(0.0)
  np.testing.assert_array_equal(new_ids, [[0, 0, 1], [1, 1, 0]])
  assert stats == (4, 2, 0, 4)


def test_lambda_mixes_similarity_and_score():
  # Token 0, expert 2: to 0 -> .75 (1 - lam) + .1 lam, to 1 -> .6 lam. At lam = .5 the
  # similarity wins (.425 > .3); at lam = .75 the score wins (.2625 < .45).
  np.testing.assert_array_equal(_run(0.5)[0], [[0, 0, 1], [1, 1, 0]])
  np.testing.assert_array_equal(_run(0.75)[0], [[0, 1, 1], [1, 0, 0]])


def test_critical_decided_by_similarity_alone():
  # Expert 3's best similarity to P is .25 < rho = .5: critical and kept, however high
  # the router scores; expert 2 (.75) is re-routed by score at lam = 1.
  sim = SIM.copy()
  sim[3, 1] = sim[1, 3] = 0.25
  new_ids, _, stats = _run(1.0, rho=0.5, sim=sim)
  np.testing.assert_array_equal(new_ids, [[0, 1, 3], [1, 3, 0]])
  assert stats == (4, 3, 1, 2)


def test_ties_go_to_lowest_index():
  scores = np.full((2, 4), 0.25, np.float32)  # every primary scores the same
  new_ids, _, _ = _run(1.0, scores=scores)
  np.testing.assert_array_equal(new_ids, [[0, 0, 0], [1, 0, 0]])


def test_invalid_tokens_add_no_primary_and_no_stats():
  # Token 1 is invalid: P = {0}; its rows still follow the policy, stats skip it.
  new_ids, _, stats = _run(1.0, valid=np.array([True, False]))
  np.testing.assert_array_equal(new_ids[0], [0, 0, 0])
  assert stats == (3, 1, 0, 2)


def test_missing_inputs_raise():
  cfg = RerouteConfig(policy="sere_hybrid", select_top_k=1)
  with pytest.raises(ValueError, match="'sere_hybrid' needs router_scores"):
    reroute(IDS, W, ALL, SIM, cfg)
  with pytest.raises(ValueError, match=r"router_scores must be \[T, E\]"):
    reroute(IDS, W, ALL, SIM, cfg, router_scores=SCORES[:, :3])
  with pytest.raises(ValueError, match="'sere_hybrid' needs a similarity matrix"):
    reroute(IDS, W, ALL, None, cfg, router_scores=SCORES)
  with pytest.raises(ValueError, match="square"):
    reroute(IDS, W, ALL, SIM[:, :3], cfg, router_scores=SCORES, num_experts=4)


def test_jit_equals_eager():
  cfg = RerouteConfig(policy="sere_hybrid", select_top_k=1, threshold=0.5,
                      score_weight=0.25)
  jitted = jax.jit(lambda ids, w, valid, sim, scores: reroute(
      ids, w, valid, sim, cfg, router_scores=scores))
  valid = np.array([True, False])
  eager = reroute(IDS, W, valid, SIM, cfg, router_scores=SCORES)
  traced = jitted(IDS, W, valid, SIM, SCORES)
  for a, b in zip(traced[:2], eager[:2]):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert _stats(traced[2]) == _stats(eager[2])


# ---------------------------------------------------------------------------
# Through moe_ffn: not a fused-kernel policy, so every impl re-routes with reroute.

MT, MK, ME, MD, MF = 8, 4, 8, 16, 8


def test_moe_ffn_generic_path(monkeypatch):
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(MT, MD)), jnp.float32)
  w_gate_up = jnp.asarray(rng.normal(size=(ME, MD, 2 * MF)) / 4, jnp.float32)
  w_down = jnp.asarray(rng.normal(size=(ME, MF, MD)) / 3, jnp.float32)
  scores = _softmax(rng.normal(size=(MT, ME)) * 2)
  ids = np.argsort(-scores, axis=1)[:, :MK].astype(np.int32)
  weights = np.take_along_axis(scores, ids, axis=1)
  valid = np.ones(MT, bool)
  valid[3] = False
  sim = (rng.integers(0, 5, (ME, ME)) / 4).astype(np.float32)
  np.fill_diagonal(sim, 1.0)
  cfg = RerouteConfig(policy="sere_hybrid", select_top_k=1, threshold=0.25,
                      score_weight=0.5)
  sere_cfg = RerouteConfig(policy="sere", select_top_k=1, threshold=0.25)
  ref_ids, ref_w, ref_stats = jax.jit(functools.partial(policies.reroute, config=cfg))(
      ids, weights, valid, sim, router_scores=scores)
  sere_ids = jax.jit(functools.partial(policies.reroute, config=sere_cfg))(
      ids, weights, valid, sim)[0]
  assert not np.array_equal(np.asarray(ref_ids)[valid], np.asarray(sere_ids)[valid])

  def no_fused_kernel(*args, **kwargs):
    raise AssertionError("sere_hybrid must not take the fused schedule kernel")

  monkeypatch.setattr(moe_ffn_lib, "kernel_schedule", no_fused_kernel)
  outs = {}
  for impl in ("xla_dense", "interpret"):  # jitted: one compile instead of op by op
    run = jax.jit(functools.partial(moe_ffn_lib.moe_ffn, config=cfg, impl=impl))
    outs[impl] = run(x, ids, weights, w_gate_up, w_down, valid=valid, similarity=sim,
                     router_scores=scores)
  want = np.asarray(outs["xla_dense"].y)
  assert np.abs(want[valid]).max() > 0.1
  for impl, out in outs.items():
    np.testing.assert_array_equal(np.asarray(out.ids)[valid], np.asarray(ref_ids)[valid],
                                  err_msg=impl)
    np.testing.assert_array_equal(np.asarray(out.weights)[valid],
                                  np.asarray(ref_w)[valid], err_msg=impl)
    assert _stats(out.stats) == _stats(ref_stats), impl
    np.testing.assert_allclose(np.asarray(out.y), want, rtol=1e-5, atol=1e-5,
                               err_msg=impl)
