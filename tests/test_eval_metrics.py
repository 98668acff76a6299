"""Bootstrap intervals of sere_jax.evaluation.metrics: deterministic per seed, around
the point estimate, narrow for large samples, exact for identical paired samples."""

import numpy as np
import pytest

from sere_jax.evaluation import metrics


def _nll(seed: int, n: int = 24, length: int = 16) -> np.ndarray:
  rng = np.random.default_rng(seed)
  return rng.gamma(2.0, 1.0, (n, 1)) + rng.normal(0.0, 0.3, (n, length))


def test_bootstrap_ci_is_deterministic_per_seed():
  values = np.random.default_rng(0).normal(size=50)
  assert metrics.bootstrap_ci(values, seed=3) == metrics.bootstrap_ci(values, seed=3)
  assert metrics.bootstrap_ci(values, seed=3) != metrics.bootstrap_ci(values, seed=4)


def test_bootstrap_ci_contains_the_point_estimate():
  values = np.random.default_rng(1).exponential(size=40)
  low, high = metrics.bootstrap_ci(values)
  assert low < np.mean(values) < high
  low, high = metrics.bootstrap_ci(values, stat=np.median, level=0.9)
  assert low <= np.median(values) <= high


def test_bootstrap_ci_narrows_with_more_sequences():
  rng = np.random.default_rng(2)
  small, large = rng.normal(size=20), rng.normal(size=20_000)
  width = lambda ci: ci[1] - ci[0]
  assert width(metrics.bootstrap_ci(large, num_resamples=200)) < 0.1
  assert width(metrics.bootstrap_ci(large, num_resamples=200)) < width(
      metrics.bootstrap_ci(small, num_resamples=200)) / 10
  assert metrics.bootstrap_ci(np.full(1000, 2.5)) == (2.5, 2.5)  # identical values


def test_bootstrap_ci_rejects_bad_arguments():
  for kwargs, match in [({"values_per_sequence": []}, "at least one"),
                        ({"values_per_sequence": [1.0], "level": 1.0}, "level"),
                        ({"values_per_sequence": [1.0], "num_resamples": 0},
                         "num_resamples")]:
    with pytest.raises(ValueError, match=match):
      metrics.bootstrap_ci(**kwargs)


def test_paired_delta_ppl_ci():
  nll = _nll(0)
  assert metrics.paired_bootstrap_delta_ppl_ci(nll, nll) == (0.0, 0.0)
  worse = nll + np.random.default_rng(5).normal(0.05, 0.02, nll.shape)
  delta = 100.0 * (np.exp(worse.mean()) / np.exp(nll.mean()) - 1.0)
  low, high = metrics.paired_bootstrap_delta_ppl_ci(worse, nll, seed=1)
  assert 0.0 < low < delta < high
  assert (low, high) == metrics.paired_bootstrap_delta_ppl_ci(worse, nll, seed=1)
  # Pairing: the shared per-sequence difficulty does not widen the interval.
  unpaired = metrics.bootstrap_ci(worse.mean(axis=1))
  assert high - low < 100.0 * (np.exp(unpaired[1] - unpaired[0]) - 1.0)
  with pytest.raises(ValueError, match="shape"):
    metrics.paired_bootstrap_delta_ppl_ci(nll, nll[:-1])


def test_paired_accuracy_delta_ci():
  rng = np.random.default_rng(7)
  ref = rng.random(200) < 0.6
  assert metrics.paired_bootstrap_accuracy_delta_ci(ref, ref) == (0.0, 0.0)
  policy = ref & (rng.random(200) < 0.9)  # loses about a tenth of the right answers
  delta = policy.mean() - ref.mean()
  low, high = metrics.paired_bootstrap_accuracy_delta_ci(policy, ref)
  assert low < delta < high <= 0.0


def test_score_answers():
  assert metrics.score_answers(["x 42", "7"], ["#### 42", "8"], "gsm8k").tolist() == [
      True, False]
  with pytest.raises(ValueError, match="scoring"):
    metrics.score_answers(["a"], ["a"], "bleu")
