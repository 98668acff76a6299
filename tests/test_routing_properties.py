"""SERE at decode-batch scale against the NumPy oracle: T up to 256 tokens, E up to 160
experts, K up to 8, with tied and all-equal similarities and padded (invalid) rows;
the fused schedule (its reference and every kernel that runs here) against
`policies.reroute`."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sere_jax import RerouteConfig, reroute
from sere_jax.kernels.schedule import REGISTRY, schedule
from sere_jax.kernels.schedule.reference import reference_schedule
from tests import kernel_backends
from tests.oracle import random_valid_mask, sere_oracle

# Every drawn case of t <= 256 tokens and e <= 160 experts runs in a 256 x 160 batch:
# the rows past t are padding (invalid tokens), the experts past e are unused. Eager
# JAX then compiles each primitive once per (K, S).
T_PHYS, E_PHYS, K_MAX = 256, 160, 8
RHOS = (0.0, 0.25, 0.5, 1.0)  # exactly representable: equal to similarity levels
SIM_MODES = ("levels", "two_levels", "all_equal", "continuous")


@st.composite
def cases(draw, top_k: int | None = None):
  """One batch (of `top_k` slots if given): hypothesis draws the structure, a seeded
  generator the arrays."""
  k = top_k or draw(st.integers(1, K_MAX))
  s = draw(st.integers(0, k + 1))
  t = draw(st.sampled_from((1, 2, 7, 64, 200, T_PHYS)))
  e = draw(st.integers(k, E_PHYS) | st.sampled_from((k, E_PHYS)))
  rho = draw(st.sampled_from(RHOS))
  sim_mode = draw(st.sampled_from(SIM_MODES))
  valid_mode = draw(st.sampled_from(("all", "random", "none", "one")))
  distinct_rows = draw(st.booleans())
  min_batch = draw(st.sampled_from((0, 1, 1, 3, T_PHYS + 1)))
  rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))

  if sim_mode == "levels":  # many ties, values equal to rho
    sim = (rng.integers(0, 5, (E_PHYS, E_PHYS)) / 4).astype(np.float32)
  elif sim_mode == "two_levels":
    sim = rng.choice(np.float32([0.25, 0.75]), (E_PHYS, E_PHYS))
  elif sim_mode == "all_equal":
    sim = np.full((E_PHYS, E_PHYS), rng.choice(np.float32(RHOS)), np.float32)
  else:
    sim = rng.random((E_PHYS, E_PHYS)).astype(np.float32)
  if distinct_rows:  # as a top-K router gives them
    ids = np.argsort(rng.random((T_PHYS, e)), axis=1)[:, :k]
  else:
    ids = rng.integers(0, e, (T_PHYS, k))
  valid = np.zeros(T_PHYS, bool)
  valid[:t] = random_valid_mask(rng, valid_mode, t)
  weights = rng.random((T_PHYS, k)).astype(np.float32)
  return dict(t=t, e=e, s=s, rho=rho, min_batch=min_batch, sim=sim,
              ids=ids.astype(np.int32), weights=weights, valid=valid)


def _config(case) -> RerouteConfig:
  return RerouteConfig(policy="sere", select_top_k=case["s"], threshold=case["rho"],
                       min_batch=case["min_batch"])


def _reroute(case):
  ids, weights, stats = reroute(case["ids"], case["weights"], case["valid"], case["sim"],
                                _config(case))
  return np.asarray(ids), np.asarray(weights), tuple(int(x) for x in stats)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases())
def test_sere_matches_oracle_at_decode_batch_scale(case):
  t, e = case["t"], case["e"]
  got_ids, got_w, got_stats = _reroute(case)
  # The drawn batch alone: t tokens, e experts.
  want = sere_oracle(case["ids"][:t], case["weights"][:t], case["valid"][:t],
                     case["sim"][:e, :e], case["s"], case["rho"], case["min_batch"])
  np.testing.assert_array_equal(got_ids[:t], want.ids)
  # invalid_similarity 0; on one device the busiest device reads every distinct expert.
  assert got_stats == (*want.stats, 0, want.stats.distinct_after)
  np.testing.assert_array_equal(got_w, case["weights"])  # SERE never changes weights
  # The padded batch: padding rows add nothing, yet follow the per-expert targets.
  padded = sere_oracle(case["ids"], case["weights"], case["valid"], case["sim"],
                       case["s"], case["rho"], case["min_batch"])
  np.testing.assert_array_equal(got_ids, padded.ids)
  assert padded.stats == want.stats


def _expected_schedule(ids: np.ndarray, valid: np.ndarray, num_experts: int):
  """Group offsets and each valid slot's row of a stable sort of valid slots by expert."""
  slots = [(int(ids[t, j]), t * ids.shape[1] + j) for t in range(ids.shape[0]) if valid[t]
           for j in range(ids.shape[1])]
  counts = np.bincount([expert for expert, _ in slots], minlength=num_experts)
  rows = {slot: row for row, (_, slot) in enumerate(sorted(slots))}
  return np.concatenate([[0], np.cumsum(counts)]), rows


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases())
def test_reference_schedule_agrees_with_reroute(case):
  ids, _, stats = _reroute(case)
  sched = reference_schedule(case["ids"], case["weights"], case["valid"], case["sim"],
                             _config(case), E_PHYS)
  np.testing.assert_array_equal(np.asarray(sched.ids), ids)
  offsets, rows = _expected_schedule(ids, case["valid"], E_PHYS)
  np.testing.assert_array_equal(np.asarray(sched.group_offsets), offsets)
  slot_row = np.asarray(sched.slot_row).reshape(-1)
  assert {slot: int(slot_row[slot]) for slot in rows} == rows
  assert tuple(int(x) for x in sched.stats) == (*stats[:4], len(rows))


# Kernels compile once per config (Triton's S and rho are static): a few configs.
KERNEL_CONFIGS = ((2, 0.0), (1, 0.5))


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases(top_k=K_MAX), st.sampled_from(KERNEL_CONFIGS))
@kernel_backends.over_implementations(REGISTRY)
def test_schedule_kernels_agree_with_reroute(implementation, case, config):
  case = dict(case, s=config[0], rho=config[1], min_batch=1)
  want = reference_schedule(case["ids"], case["weights"], case["valid"], case["sim"],
                            _config(case), E_PHYS)
  got = schedule(jnp.asarray(case["ids"]), jnp.asarray(case["valid"]),
                 jnp.asarray(case["sim"]), _config(case), num_experts=E_PHYS,
                 implementation=implementation)
  kernel_backends.check_schedule(got, want, case["valid"], implementation)
