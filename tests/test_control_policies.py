"""keep_active, truncation's renormalize override, random's per-batch key, expert_pool
and the oracle, each against the plain NumPy references of tests/oracle.py."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sere_jax import RerouteConfig, policies, reroute, similarity
from tests import oracle

T, K, E = 12, 4, 16
SEEDS = range(15)


def _stats(stats) -> tuple[int, ...]:
  """The four routing counts; the similarity was valid."""
  assert int(stats.invalid_similarity) == 0
  return tuple(int(x) for x in stats[:4])


def _case(seed: int, num_tokens: int = T, valid_mode: str | None = None):
  """A routed batch with dyadic weights (exact sums in float32) and quantised
  similarity, output norms and scales (ties are frequent)."""
  rng = np.random.default_rng(seed)
  used = int(rng.integers(K, E + 1))
  ids = np.stack([rng.permutation(used)[:K] for _ in range(num_tokens)]).astype(np.int32)
  weights = -np.sort(-rng.integers(1, 9, (num_tokens, K)), axis=1).astype(np.float32) / 8
  mode = valid_mode or rng.choice(["all", "random", "one"])
  valid = oracle.random_valid_mask(rng, mode, num_tokens)
  sim = (rng.integers(0, 5, (E, E)) / 4).astype(np.float32)
  np.fill_diagonal(sim, 1.0)
  norm = (rng.integers(1, 5, E) / 2).astype(np.float32)
  scale = (rng.integers(-2, 11, (E, E)) / 4).astype(np.float32)  # some outside [0, 2]
  return dict(ids=ids, weights=weights, valid=valid, sim=sim, norm=norm, scale=scale)


@functools.lru_cache(maxsize=None)
def _jitted(config: RerouteConfig, renormalize: bool = False):
  return jax.jit(lambda ids, w, valid, sim, norm, scale, out: reroute(
      ids, w, valid, sim, config, num_experts=E, renormalize=renormalize,
      output_norm=norm, pool_scale=scale, expert_out=out))


def _run(config, case, renormalize=False, expert_out=None, pool=True):
  norm, scale = (case["norm"], case["scale"]) if pool else (None, None)
  new_ids, new_w, stats = _jitted(config, renormalize)(
      case["ids"], case["weights"], case["valid"], case["sim"], norm, scale, expert_out)
  return np.asarray(new_ids), np.asarray(new_w), _stats(stats)


def _check(got, want: oracle.PolicyResult):
  new_ids, new_w, stats = got
  np.testing.assert_array_equal(new_ids, want.ids)
  np.testing.assert_allclose(new_w, want.weights, rtol=1e-6, atol=0)
  assert stats == tuple(want.stats)


# ---------------------------------------------------------------------------
# keep_active and the renormalize override


@pytest.mark.parametrize("s", [1, 2, 3])
@pytest.mark.parametrize("config_renorm,model_renorm", [(None, False), (None, True),
                                                         (True, False), (False, True)])
def test_keep_active_matches_oracle(s, config_renorm, model_renorm):
  config = RerouteConfig("keep_active", select_top_k=s, renormalize=config_renorm)
  renorm = model_renorm if config_renorm is None else config_renorm
  for seed in SEEDS:
    case = _case(seed)
    want = oracle.keep_active_oracle(case["ids"], case["weights"], case["valid"], s,
                                     renorm)
    _check(_run(config, case, renormalize=model_renorm), want)


def test_keep_active_all_experts_primary_changes_nothing():
  # Every secondary expert is some token's primary: nothing is dropped.
  ids = np.array([[0, 1, 2], [1, 2, 0], [2, 0, 1]], np.int32)
  w = np.array([[.5, .3, .2]] * 3, np.float32)
  for renorm in (False, True):
    config = RerouteConfig("keep_active", select_top_k=1, renormalize=renorm)
    new_ids, new_w, stats = reroute(ids, w, np.ones(3, bool), None, config, num_experts=4)
    np.testing.assert_array_equal(new_ids, ids)
    np.testing.assert_allclose(new_w, w, rtol=1e-6)
    assert _stats(stats) == (3, 3, 0, 0)


def test_keep_active_single_token_and_padding():
  # T=1: the token's own primaries are the only active experts.
  config = RerouteConfig("keep_active", select_top_k=1, renormalize=True)
  ids = np.array([[3, 1, 2]], np.int32)
  w = np.array([[.5, .25, .25]], np.float32)
  new_ids, new_w, stats = reroute(ids, w, np.ones(1, bool), None, config, num_experts=4)
  np.testing.assert_array_equal(new_ids, [[3, 3, 3]])
  np.testing.assert_allclose(new_w, [[1., 0., 0.]])
  assert _stats(stats) == (3, 1, 0, 3)
  # An invalid token's primary (2) does not keep token 0's secondary expert 2.
  ids = np.array([[0, 2, 1], [2, 0, 1]], np.int32)
  w = np.full((2, 3), 1 / 3, np.float32)
  new_ids, _, stats = reroute(ids, w, np.array([True, False]), None, config, num_experts=4)
  np.testing.assert_array_equal(new_ids[0], [0, 0, 0])
  assert _stats(stats)[:2] == (3, 1)


@pytest.mark.parametrize("config_renorm,model_renorm,want_renorm",
                         [(None, True, True), (None, False, False), (True, False, True),
                          (False, True, False)])
def test_topk_truncate_renormalize_override(config_renorm, model_renorm, want_renorm):
  config = RerouteConfig("topk_truncate", select_top_k=2, renormalize=config_renorm)
  case = _case(0, valid_mode="all")
  new_ids, new_w, _ = _run(config, case, renormalize=model_renorm)
  w = case["weights"]
  np.testing.assert_array_equal(new_w[:, 2:], 0.0)
  if want_renorm:
    np.testing.assert_allclose(new_w.sum(1), w.sum(1), rtol=1e-6)
  else:
    np.testing.assert_array_equal(new_w[:, :2], w[:, :2])


# ---------------------------------------------------------------------------
# random: a fresh draw per batch, deterministic per input


def _random_ids(case, seed=0, key=None):
  config = RerouteConfig("random", select_top_k=1, seed=seed)
  return np.asarray(reroute(case["ids"], case["weights"], case["valid"], None, config,
                            num_experts=E, key=key)[0])


def test_random_default_key_is_seed_folded_with_routing_fingerprint():
  case = _case(3, valid_mode="all")
  key = jax.random.fold_in(jax.random.PRNGKey(7), policies.routing_fingerprint(
      case["ids"], case["weights"], case["valid"]))
  np.testing.assert_array_equal(_random_ids(case, 7), _random_ids(case, 7, key))
  np.testing.assert_array_equal(_random_ids(case, 7), _random_ids(case, 7))


def test_random_draws_differ_between_batches_and_seeds_and_stay_on_primaries():
  # Tokens 0..3 valid with primaries 0..3 and eight secondary experts 4..11.
  ids = np.zeros((T, 3), np.int32)
  ids[:4] = [[0, 4, 5], [1, 6, 7], [2, 8, 9], [3, 10, 11]]
  valid = np.arange(T) < 4
  base = dict(ids=ids, valid=valid)
  draws, by_seed = set(), set()
  for i in range(8):  # eight "layers": same experts, different router weights
    w = np.full((T, 3), 0.25 + i / 64, np.float32)
    got = _random_ids(dict(base, weights=w))
    assert set(got[:4, 1:].ravel()) <= {0, 1, 2, 3}
    np.testing.assert_array_equal(got[:, :1], ids[:, :1])
    draws.add(got[:4].tobytes())
    by_seed.add(_random_ids(dict(base, weights=np.full((T, 3), .25, np.float32)),
                            seed=i)[:4].tobytes())
  # 4^8 possible draws each: collisions are vanishingly rare.
  assert len(draws) == 8 and len(by_seed) == 8
  # Padding rows do not change the draw; a valid token's weight does.
  w = np.full((T, 3), .25, np.float32)
  other = w.copy()
  other[5:] = .5
  np.testing.assert_array_equal(_random_ids(dict(base, weights=w))[:4],
                                _random_ids(dict(base, weights=other))[:4])
  changed = w.copy()
  changed[0, 1] = .3
  assert (int(policies.routing_fingerprint(ids, w, valid))
          != int(policies.routing_fingerprint(ids, changed, valid)))


def test_random_key_differs_per_step_under_the_block_vmap():
  # Under jit and vmap (as MoeBlock re-routes each position), each step draws its own.
  ids = np.tile(np.array([[0, 4, 5], [1, 6, 7], [2, 8, 9], [3, 10, 11]], np.int32),
                (6, 1, 1))
  w = (np.arange(6, dtype=np.float32)[:, None, None] / 64 + np.full((6, 4, 3), .25)
       ).astype(np.float32)
  config = RerouteConfig("random", select_top_k=1)
  new_ids = jax.jit(jax.vmap(lambda i, x: reroute(i, x, jnp.ones(4, bool), None, config,
                                                  num_experts=E)[0]))(ids, w)
  assert len({np.asarray(n).tobytes() for n in new_ids}) > 1
  for step in range(6):
    np.testing.assert_array_equal(
        new_ids[step], reroute(ids[step], w[step], np.ones(4, bool), None, config,
                               num_experts=E)[0])


# ---------------------------------------------------------------------------
# expert_pool


@pytest.mark.parametrize("pool_size", [1, 3, 6, 40])
def test_expert_pool_matches_oracle(pool_size):
  config = RerouteConfig("expert_pool", pool_size=pool_size)
  for seed in SEEDS:
    case = _case(seed)
    for pool in (True, False):
      want = oracle.expert_pool_oracle(
          case["ids"], case["weights"], case["valid"], case["sim"], pool_size,
          case["norm"] if pool else None, case["scale"] if pool else None)
      got = _run(config, case, pool=pool)
      _check(got, want)
      assert got[2][1] <= pool_size


def test_expert_pool_larger_than_distinct_changes_no_valid_token():
  case = _case(1, valid_mode="random")
  config = RerouteConfig("expert_pool", pool_size=E)
  new_ids, new_w, stats = _run(config, case)
  v = case["valid"]
  np.testing.assert_array_equal(new_ids[v], case["ids"][v])
  np.testing.assert_array_equal(new_w[v], case["weights"][v])
  assert stats[0] == stats[1] and stats[3] == 0


def test_expert_pool_ties_and_equal_similarity():
  # Experts 0 and 2 tie on importance (.5 each): the pool of 1 is expert 0. All-equal
  # similarity: every other expert moves to the lowest pool member.
  ids = np.array([[2, 1], [0, 3]], np.int32)
  w = np.array([[.5, .25], [.5, .25]], np.float32)
  sim = np.full((4, 4), .5, np.float32)
  config = RerouteConfig("expert_pool", pool_size=1)
  new_ids, new_w, stats = reroute(ids, w, np.ones(2, bool), sim, config)
  np.testing.assert_array_equal(new_ids, [[0, 0], [0, 0]])
  np.testing.assert_array_equal(new_w, w)  # scale defaults to ones
  assert _stats(stats) == (4, 1, 0, 3)
  # The token's top expert is not protected, and the scale is clipped to [0, 2].
  scale = np.full((4, 4), 5.0, np.float32)
  _, new_w, _ = reroute(ids, w, np.ones(2, bool), sim, config, pool_scale=scale)
  np.testing.assert_allclose(new_w, [[1., .5], [.5, .5]])
  # A single valid token (T=1) with pool_size=2 keeps its two heaviest experts.
  ids1 = np.array([[2, 1, 3]], np.int32)
  w1 = np.array([[.5, .25, .25]], np.float32)
  got = reroute(ids1, w1, np.ones(1, bool), sim, RerouteConfig("expert_pool", pool_size=2))
  np.testing.assert_array_equal(got[0], [[2, 1, 1]])


def test_expert_pool_padding_adds_no_importance():
  # The invalid token would make expert 3 the most important.
  ids = np.array([[0, 1], [3, 1]], np.int32)
  w = np.array([[.75, .25], [1., 0.]], np.float32)
  sim = np.eye(4, dtype=np.float32)
  new_ids, _, stats = reroute(ids, w, np.array([True, False]), sim,
                              RerouteConfig("expert_pool", pool_size=1))
  np.testing.assert_array_equal(new_ids[0], [0, 0])
  assert _stats(stats)[:2] == (2, 1)


def test_expert_pool_input_checks():
  ids, w, valid = np.array([[0, 1]], np.int32), np.ones((1, 2), np.float32), np.ones(1, bool)
  config = RerouteConfig("expert_pool", pool_size=1)
  with pytest.raises(ValueError, match="needs a similarity"):
    reroute(ids, w, valid, None, config, num_experts=4)
  with pytest.raises(ValueError, match="output_norm must have shape"):
    reroute(ids, w, valid, np.eye(4, dtype=np.float32), config, output_norm=np.ones(3))
  with pytest.raises(ValueError, match="pool_scale must have shape"):
    reroute(ids, w, valid, np.eye(4, dtype=np.float32), config, pool_scale=np.ones(4))


# ---------------------------------------------------------------------------
# oracle


def _expert_out(seed, num_tokens=T, dim=6):
  return np.random.default_rng(seed + 1000).normal(size=(num_tokens, E, dim)).astype(
      np.float32)


@pytest.mark.parametrize("s", [1, 2, 3])
def test_oracle_matches_reference(s):
  config = RerouteConfig("oracle", select_top_k=s)
  for seed in SEEDS:
    case, out = _case(seed), _expert_out(seed)
    want = oracle.oracle_policy_oracle(case["ids"], case["weights"], case["valid"], out, s)
    _check(_run(config, case, expert_out=out), want)
    np.testing.assert_array_equal(
        policies.oracle_ids(case["ids"], case["valid"], out, s), want.ids)


def test_oracle_ties_all_primary_and_single_token():
  ids = np.array([[0, 3, 2], [1, 2, 3]], np.int32)
  valid = np.ones(2, bool)
  out = _expert_out(0, 2)
  out[:, 1] = out[:, 0]  # experts 0 and 1 give the same output: ties -> 0
  out[:, 3] = out[:, 0] + 1e-3  # expert 3 is closest to both
  got = np.asarray(policies.oracle_ids(ids, valid, out, 1))
  np.testing.assert_array_equal(got[:, 0], [0, 1])
  assert set(got[:, 1:].ravel()) <= {0, 1} and got[0, 1] == 0 and got[1, 2] == 0
  # Every secondary already a primary: unchanged.
  ids = np.array([[0, 1, 2], [1, 2, 0], [2, 0, 1]], np.int32)
  np.testing.assert_array_equal(policies.oracle_ids(ids, np.ones(3, bool),
                                                    _expert_out(1, 3), 1), ids)
  # T=1 and S=1: every secondary slot becomes the token's own top expert.
  got = policies.oracle_ids(np.array([[5, 2, 7]], np.int32), np.ones(1, bool),
                            _expert_out(2, 1), 1)
  np.testing.assert_array_equal(got, [[5, 5, 5]])


def test_oracle_padding_adds_no_primary():
  ids = np.array([[0, 2], [1, 3]], np.int32)
  got = policies.oracle_ids(ids, np.array([True, False]), _expert_out(3, 2), 1)
  np.testing.assert_array_equal(got, [[0, 0], [1, 0]])


def test_oracle_needs_expert_outputs():
  config = RerouteConfig("oracle", select_top_k=1)
  ids, w, valid = np.array([[0, 1]], np.int32), np.ones((1, 2), np.float32), np.ones(1, bool)
  with pytest.raises(ValueError, match="oracle.*expert_out.*MoeBlock.*oracle_ids"):
    reroute(ids, w, valid, None, config, num_experts=4)
  with pytest.raises(ValueError, match="expert_out must be"):
    reroute(ids, w, valid, None, config, num_experts=4, expert_out=np.ones((1, 3, 2)))


# ---------------------------------------------------------------------------
# min_batch and the no-valid-token case for the new policies


@pytest.mark.parametrize("policy", ["keep_active", "expert_pool", "oracle"])
def test_min_batch_and_no_valid_token(policy):
  config = RerouteConfig(policy, select_top_k=1, pool_size=1, min_batch=T + 1)
  case = _case(4, valid_mode="all")
  out = _expert_out(4)
  for c in (config, RerouteConfig(policy, select_top_k=1, pool_size=1)):
    if c is not config:
      case = dict(case, valid=np.zeros(T, bool))
    new_ids, new_w, stats = _run(c, case, expert_out=out)
    np.testing.assert_array_equal(new_ids, case["ids"])
    np.testing.assert_array_equal(new_w, case["weights"])
    assert stats[1] == stats[0] and stats[3] == 0


# ---------------------------------------------------------------------------
# expert_pool calibration statistics


def test_pool_stats_match_reference_and_stream():
  rng = np.random.default_rng(0)
  outputs = rng.normal(size=(5, 9, 4)).astype(np.float32)
  outputs[2] *= 3.0
  outputs[4] = 0.5 * outputs[1]  # an exact multiple: scale[4, 1] = 0.5
  norm, scale = similarity.pool_stats(jnp.asarray(outputs))
  want_norm, want_scale = oracle.pool_stats_oracle(outputs)
  np.testing.assert_allclose(norm, want_norm, rtol=1e-5)
  np.testing.assert_allclose(scale, want_scale, rtol=1e-4, atol=1e-6)
  assert abs(float(scale[4, 1]) - 0.5) < 1e-4 and np.all(np.diag(scale) == 1.0)
  state = similarity.init_pool_state(5)
  for part in (outputs[:, :4], outputs[:, 4:]):
    state = similarity.update_pool_state(state, jnp.asarray(part))
  streamed = similarity.finalize_pool_state(state)
  np.testing.assert_allclose(streamed[0], norm, rtol=1e-6)
  np.testing.assert_allclose(streamed[1], scale, rtol=1e-5, atol=1e-7)
