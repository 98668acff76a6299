"""The schedule op (`sere_jax.kernels.schedule`): every backend that runs here, through
the op's api, against the pure-jnp reference. Backend options and lowering are tested
in test_triton_kernels.py and test_tpu_kernels.py."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sere_jax.config import RerouteConfig
from sere_jax.kernels import schedule as schedule_op
from tests import kernel_backends

CONFIGS = [
    RerouteConfig(policy="none"),
    RerouteConfig(select_top_k=0),  # S = 0: no re-routing
    RerouteConfig(select_top_k=4),  # S = K: no re-routing
    RerouteConfig(select_top_k=1, threshold=0.0),
    RerouteConfig(select_top_k=2, threshold=0.5),
    RerouteConfig(select_top_k=3, threshold=1.0),
    RerouteConfig(select_top_k=2, threshold=1.0),
    RerouteConfig(select_top_k=3, threshold=0.25, min_batch=6),
    RerouteConfig(select_top_k=2, threshold=0.5, min_batch=4),
]

# (T, K, E, configs, cases per config, experts of the repeating cases)
SHAPES = {
    "small": (12, 4, 16, CONFIGS, 4, 9),
    "batch_of_one": (1, 4, 16, [CONFIGS[i] for i in (0, 3, 8)], 3, 6),
}


@kernel_backends.over_implementations(schedule_op.REGISTRY)
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_reference(implementation, shape):
  num_tokens, top_k, num_experts, configs, cases, few = SHAPES[shape]
  rng = np.random.default_rng(num_tokens)
  for config in configs:
    for case in range(cases):
      ids, valid, sim = kernel_backends.schedule_case(rng, num_tokens, top_k, num_experts,
                                                      case, few)
      got = schedule_op.schedule(ids, valid, sim, config, num_experts=num_experts,
                                 implementation=implementation)
      want = kernel_backends.jitted_reference_schedule(config, num_experts)(ids, valid, sim)
      kernel_backends.check_schedule(got, want, np.asarray(valid), f"{config} case {case}")


@pytest.mark.parametrize("implementation", [
    *kernel_backends.implementations(schedule_op.REGISTRY), "xla"])
def test_reroutes_and_sorts(implementation):
  """A hand-checked case: the op really re-routes (not only matches a no-op)."""
  ids = jnp.asarray([[0, 1, 2], [0, 1, 3], [4, 1, 2]], jnp.int32)
  valid = jnp.asarray([True, True, False])
  sim = np.eye(8, dtype=np.float32)
  sim[2, 1] = sim[3, 0] = 0.9  # 2 -> 1, 3 -> 0; everything else below rho
  config = RerouteConfig(select_top_k=2, threshold=0.5)
  got = jax.jit(functools.partial(schedule_op.schedule, config=config, num_experts=8,
                                  implementation=implementation))(ids, valid, jnp.asarray(sim))
  np.testing.assert_array_equal(np.asarray(got.ids)[:2], [[0, 1, 1], [0, 1, 0]])
  # stable sort by expert: expert 0 <- slots 0, 3, 5; expert 1 <- slots 1, 2, 4
  np.testing.assert_array_equal(got.group_offsets, [0, 3, 6, 6, 6, 6, 6, 6, 6])
  np.testing.assert_array_equal(got.active_experts, [0, 1, 1, 1, 1, 1, 1, 1])
  np.testing.assert_array_equal(np.asarray(got.row_token)[:6], [0, 1, 1, 0, 0, 1])
  np.testing.assert_array_equal(np.asarray(got.slot_row)[:2], [[0, 3, 4], [1, 5, 2]])
  # distinct before (0, 1, 2, 3), after (0, 1), no critical, 2 slots re-routed, 6 rows
  np.testing.assert_array_equal(got.stats, [4, 2, 0, 2, 6])


@pytest.mark.parametrize("implementation", [
    *kernel_backends.implementations(schedule_op.REGISTRY), "xla"])
def test_rejects_unfused_policy(implementation):
  ids, valid = jnp.zeros((4, 2), jnp.int32), jnp.ones((4,), bool)
  with pytest.raises(ValueError, match="oea"):
    schedule_op.schedule(ids, valid, jnp.eye(8), RerouteConfig(policy="oea", select_top_k=1),
                         num_experts=8, implementation=implementation)


@pytest.mark.parametrize("implementation", [
    *kernel_backends.implementations(schedule_op.REGISTRY), "xla"])
def test_non_finite_similarity_is_least_similar(implementation):
  """A traced similarity with NaN, inf and -inf entries routes as if each were the
  dtype's minimum (the kernels apply that rule on load), at rho = 0 (an expert whose
  similarity to every primary is non-finite goes to the lowest-index primary) and
  rho > 0 (it is critical)."""
  num_tokens, top_k, num_experts = 12, 4, 16
  rng = np.random.default_rng(7)
  lowest = np.finfo(np.float32).min
  for config in (CONFIGS[3], CONFIGS[4]):
    for case in range(3):
      ids, valid, sim = kernel_backends.schedule_case(rng, num_tokens, top_k,
                                                      num_experts, case, 9)
      bad = np.array(sim, np.float32)
      bad[rng.random(bad.shape) < 0.3] = np.nan
      bad[rng.random(bad.shape) < 0.1] = np.inf
      bad[rng.random(bad.shape) < 0.1] = -np.inf
      bad[int(np.asarray(ids)[0, -1])] = -np.inf  # a secondary's row: all non-finite
      run = jax.jit(functools.partial(schedule_op.schedule, config=config,
                                      num_experts=num_experts,
                                      implementation=implementation))
      got = run(ids, valid, jnp.asarray(bad))
      want = kernel_backends.jitted_reference_schedule(config, num_experts)(
          ids, valid, jnp.asarray(np.where(np.isfinite(bad), bad, lowest)))
      kernel_backends.check_schedule(got, want, np.asarray(valid), f"{config} case {case}")
