"""Similarity metrics against direct NumPy computations, streaming and invariances."""

import jax.numpy as jnp
import numpy as np
import pytest

from sere_jax import similarity as sim_lib

E, T, H = 5, 24, 6


@pytest.fixture(name="outputs")
def _outputs():
  rng = np.random.default_rng(0)
  base = rng.normal(size=(2, T, H))
  # Experts in two families so that similarities spread over the range.
  return np.stack([base[i % 2] + 0.7 * rng.normal(size=(T, H)) for i in range(E)])


def _np_cosine(a):
  unit = a / np.linalg.norm(a, axis=-1, keepdims=True)
  cos = np.einsum("pth,qth->pqt", unit, unit).mean(-1)
  s = (cos + 1) / 2
  np.fill_diagonal(s, 1)
  return s


def _np_frobenius(a):
  d = np.array([[np.linalg.norm(a[p] - a[q]) for q in range(E)] for p in range(E)])
  s = 1 - d / d.max()
  np.fill_diagonal(s, 1)
  return s


def _np_linear_cka(a):
  def hsic(x, y):
    x = x - x.mean(0)
    y = y - y.mean(0)
    return np.linalg.norm(y.T @ x) ** 2
  s = np.array([[hsic(a[p], a[q]) / np.sqrt(hsic(a[p], a[p]) * hsic(a[q], a[q]))
                 for q in range(E)] for p in range(E)])
  np.fill_diagonal(s, 1)
  return s


@pytest.mark.parametrize("metric,oracle", [("cosine", _np_cosine),
                                           ("frobenius", _np_frobenius),
                                           ("cka_linear", _np_linear_cka)])
def test_metric_matches_numpy(outputs, metric, oracle):
  got = np.asarray(sim_lib.similarity(jnp.asarray(outputs, jnp.float32), metric,
                                      gram_tokens=T))
  np.testing.assert_allclose(got, oracle(outputs), atol=2e-5)


@pytest.mark.parametrize("metric", sim_lib.METRICS)
def test_symmetric_unit_diagonal_in_range(outputs, metric):
  s = np.asarray(sim_lib.similarity(jnp.asarray(outputs, jnp.float32), metric,
                                    gram_tokens=T))
  np.testing.assert_allclose(s, s.T, atol=1e-6)
  np.testing.assert_array_equal(np.diag(s), 1.0)
  assert s.min() >= 0 and s.max() <= 1
  assert s[~np.eye(E, dtype=bool)].std() > 1e-3  # not a constant matrix


@pytest.mark.parametrize("metric", ["cosine", "frobenius", "cka_linear", "cka_rbf",
                                    "cka_poly"])
def test_streamed_equals_whole(outputs, metric):
  x = jnp.asarray(outputs, jnp.float32)
  whole = sim_lib.similarity(x, metric, gram_tokens=T)
  state = sim_lib.init_state(metric, E, H, gram_tokens=T)
  for start in range(0, T, 7):  # uneven chunks
    state = sim_lib.update(state, x[:, start:start + 7], metric)
  np.testing.assert_allclose(sim_lib.finalize(state, metric), whole, atol=1e-5)


def test_linear_cka_invariant_to_rotation_and_scale(outputs):
  q, _ = np.linalg.qr(np.random.default_rng(1).normal(size=(H, H)))
  changed = outputs.copy()
  changed[2] = 3.5 * outputs[2] @ q
  a = sim_lib.similarity(jnp.asarray(outputs, jnp.float32), "cka_linear", gram_tokens=T)
  b = sim_lib.similarity(jnp.asarray(changed, jnp.float32), "cka_linear", gram_tokens=T)
  np.testing.assert_allclose(a, b, atol=1e-5)
  # The cosine metric is not rotation invariant: the test would notice a no-op.
  c = sim_lib.similarity(jnp.asarray(changed, jnp.float32), "cosine")
  assert np.abs(np.asarray(c) - np.asarray(sim_lib.similarity(
      jnp.asarray(outputs, jnp.float32), "cosine"))).max() > 1e-3


def test_cka_prefix_only_uses_gram_tokens(outputs):
  x = jnp.asarray(outputs, jnp.float32)
  prefix = sim_lib.similarity(x[:, :10], "cka_linear", gram_tokens=10)
  state = sim_lib.init_state("cka_linear", E, H, gram_tokens=10)
  state = sim_lib.update(state, x, "cka_linear")
  np.testing.assert_allclose(sim_lib.finalize(state, "cka_linear"), prefix, atol=1e-5)


def test_expert_outputs_chunked_equals_direct():
  rng = np.random.default_rng(2)
  x = jnp.asarray(rng.normal(size=(7, 8)), jnp.float32)
  wgu = jnp.asarray(rng.normal(size=(4, 8, 10)), jnp.float32)
  wd = jnp.asarray(rng.normal(size=(4, 5, 8)), jnp.float32)
  got = sim_lib.expert_outputs(x, wgu, wd, expert_chunk=2)
  h = np.einsum("td,edf->etf", x, wgu)
  gate, up = h[..., :5], h[..., 5:]
  want = np.einsum("etf,efd->etd", gate / (1 + np.exp(-gate)) * up, wd)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_weight_similarity_finds_copies():
  rng = np.random.default_rng(3)
  wgu = rng.normal(size=(4, 8, 12))
  wd = rng.normal(size=(4, 6, 8))
  wgu[3], wd[3] = wgu[1] * 1.01, wd[1]  # expert 3 is (almost) a copy of expert 1
  s = np.asarray(sim_lib.weight_similarity(jnp.asarray(wgu, jnp.float32),
                                           jnp.asarray(wd, jnp.float32), probe_tokens=64,
                                           expert_chunk=2))
  assert s[3, 1] > 0.99 and np.argmax(np.where(np.eye(4, dtype=bool), -1, s)[3]) == 1


def test_summary_statistics():
  s = np.array([[1.0, 0.2, 0.6], [0.2, 1.0, 0.4], [0.6, 0.4, 1.0]])
  stats = sim_lib.summary(s, select_top_k=2, threshold=0.5)
  assert stats["max"] == 0.6 and stats["min"] == 0.2
  assert np.isclose(stats["mean"], 0.4) and stats["median"] == 0.4
  assert np.isclose(stats["always_critical_fraction"], 1 / 3)  # expert 1: best 0.4


def test_bad_inputs():
  with pytest.raises(ValueError, match="metric"):
    sim_lib.init_state("euclid", 4, 3)
  state = sim_lib.init_state("cosine", 4, 3)
  with pytest.raises(ValueError, match="experts"):
    sim_lib.update(state, jnp.zeros((5, 2, 3)), "cosine")
  with pytest.raises(ValueError, match="expert_chunk"):
    sim_lib.expert_outputs(jnp.zeros((2, 3)), jnp.zeros((5, 3, 4)), jnp.zeros((5, 2, 3)),
                           expert_chunk=2)


def test_expected_critical_exact_cases():
  s = np.array([[1.0, 0.2, 0.6, 0.4], [0.2, 1.0, 0.3, 0.5],
                [0.6, 0.3, 1.0, 0.7], [0.4, 0.5, 0.7, 1.0]])
  # B = 1, K = 2, S = 1: one primary, one secondary expert per step.
  assert sim_lib.expected_critical(s, 1, 0.9, top_k=2, batch=1) == 1.0
  assert sim_lib.expected_critical(s, 1, 0.1, top_k=2, batch=1) == 0.0
  assert sim_lib.expected_critical(s, 0, 0.9, top_k=2, batch=1) == 0.0  # S = 0: off
  assert sim_lib.expected_critical(s, 1, 0.0, top_k=2, batch=1) == 0.0  # rho = 0: off


def test_expected_critical_matches_enumeration():
  s = np.array([[1.0, 0.2, 0.6, 0.4], [0.2, 1.0, 0.3, 0.5],
                [0.6, 0.3, 1.0, 0.7], [0.4, 0.5, 0.7, 1.0]])
  # B = 1, K = 2, S = 1: the ordered pair (primary a, secondary b) is uniform over the
  # 12 pairs a != b; b is critical iff s[b, a] < rho.
  rho = 0.45
  exact = np.mean([s[b, a] < rho for a in range(4) for b in range(4) if a != b])
  got = sim_lib.expected_critical(s, 1, rho, top_k=2, batch=1, samples=20000)
  assert abs(got - exact) < 0.02, (got, exact)
  stats = sim_lib.summary(s, select_top_k=1, threshold=rho, top_k=2, batch=1)
  assert abs(stats["expected_critical"] - exact) < 0.05 and stats["batch"] == 1
