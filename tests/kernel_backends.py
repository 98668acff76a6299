"""The shared base of the kernel tests: every backend of an op against its reference.

`implementations(registry)` lists the kernel implementations of an op that run on
this machine: `interpret` and `tpu_interpret` everywhere, `triton` on a GPU, `tpu` on
a TPU. `over_implementations(registry)` parametrises a test over them (argument
`implementation`), so the same cases run against every backend through the op's
`api`. The routing scenarios and the schedule checks are shared by the op tests and
the backend-specific tests (options, lowering) in `test_triton_kernels.py` and
`test_tpu_kernels.py`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sere_jax.kernels import registry as registry_lib
from sere_jax.kernels.schedule.reference import build_schedule, reference_schedule


# float32 matmul tolerances against float32 references: exact products on a CPU; on a
# GPU the Triton and Mosaic GPU kernels, interpret mode and XLA's default-precision dots
# take float32 operands as TF32 (10-bit mantissa). On an H100 that put 0.009 absolute
# error on sums of 40 unit-normal products (TF32_TOLERANCE), 0.085 on SiLU(gate) * up of
# two such sums (TF32_SWIGLU_TOLERANCE) and 5e-4 on the order-one outputs of the MoE FFN
# and attention (TF32_UNIT_TOLERANCE).
TF32_TOLERANCE = dict(rtol=1e-2, atol=3e-2)
TF32_SWIGLU_TOLERANCE = dict(rtol=1e-2, atol=1e-1)
TF32_UNIT_TOLERANCE = dict(rtol=1e-2, atol=3e-3)


def f32_tolerance(rtol: float, atol: float, tf32: dict = TF32_TOLERANCE) -> dict:
  """A float32 comparison's tolerance: `rtol, atol` on a CPU, `tf32` on a GPU."""
  return dict(tf32) if jax.default_backend() == "gpu" else dict(rtol=rtol, atol=atol)


F32_TOLERANCE = f32_tolerance(rtol=1e-5, atol=1e-3)


def implementations(registry: registry_lib.Registry) -> list[str]:
  """The op's kernel implementations (not its references) that run on this machine."""
  return [name for name in registry.kernels if registry.runs_here(name)]


def over_implementations(registry: registry_lib.Registry):
  """`pytest.mark.parametrize("implementation", implementations(registry))`."""
  return pytest.mark.parametrize("implementation", implementations(registry))


# ---------------------------------------------------------------- routing scenarios

SCENARIOS = ("random", "duplicates", "one_expert", "all_active", "big_group", "odd_rows",
             "no_valid")


def routing(kind: str, rng: np.random.Generator, num_tokens: int, top_k: int,
            num_experts: int) -> tuple[np.ndarray, np.ndarray]:
  """`ids [T, K]` int32 and `valid [T]` bool of one routing scenario (E >= 7)."""
  t, k, e = num_tokens, top_k, num_experts
  valid = np.ones(t, bool)
  if kind == "random":  # duplicate (token, expert) slots, invalid tokens, empty experts
    ids = rng.integers(1, e - 2, (t, k))
    valid = rng.random(t) < 0.75
  elif kind == "duplicates":  # every token sends all its slots to one expert
    ids = np.repeat(rng.integers(0, e, (t, 1)), k, axis=1)
  elif kind == "one_expert":  # every row in a single active expert (the last one)
    ids = np.full((t, k), e - 1)
  elif kind == "all_active":
    ids = (np.arange(t * k).reshape(t, k) * 5) % e
  elif kind == "big_group":  # 5/6 of the rows in expert 2 (T*K = 48: 40 rows)
    big = t * k * 5 // 6
    flat = np.concatenate([np.full(big, 2), rng.choice([0, 4, 6], t * k - big)])
    ids = rng.permutation(flat).reshape(t, k)
  elif kind == "odd_rows":  # 3 invalid tokens at the end: not a block multiple of rows
    ids = rng.integers(0, e, (t, k))
    valid = np.arange(t) < t - 3
  elif kind == "no_valid":
    ids, valid = rng.integers(0, e, (t, k)), np.zeros(t, bool)
  else:
    raise ValueError(kind)
  return ids.astype(np.int32), valid


def gmm_case(kind: str, rng: np.random.Generator, num_tokens: int, top_k: int,
             num_experts: int, dim: int, dtype, gather: bool):
  """`(sched, x, row_token, options)` of one grouped-matmul case: the reference
  schedule of a routing scenario and its left-hand side, either tokens gathered by
  `row_token`, or rows already in expert order followed by 5 extra rows the matmul must
  ignore (`options = {"num_rows": T * K}`, `row_token` None)."""
  ids, valid = routing(kind, rng, num_tokens, top_k, num_experts)
  sched = build_schedule(jnp.asarray(ids), jnp.asarray(valid), num_experts)
  assert int(sched.stats[4]) == int(valid.sum()) * top_k  # every valid slot has a row
  if gather:
    return sched, jnp.asarray(rng.normal(size=(num_tokens, dim)), dtype), sched.row_token, {}
  x = jnp.asarray(rng.normal(size=(num_tokens * top_k + 5, dim)), dtype)
  return sched, x, None, dict(num_rows=num_tokens * top_k)


def schedule_case(rng: np.random.Generator, num_tokens: int, top_k: int,
                  num_experts: int, case: int, few: int = 6):
  """`(ids, valid, similarity)` of one schedule-test case: a third of the cases have
  no valid token; odd cases route to distinct experts per token (as a router does),
  even ones repeat experts within a token and use only `few` experts. Similarities
  are quarter steps: ties, and values equal to the thresholds."""
  valid = rng.random(num_tokens) < (0.0, 0.6, 1.0)[case % 3]
  if case % 2:
    ids = np.argsort(rng.random((num_tokens, num_experts)), axis=1)[:, :top_k]
  else:
    ids = rng.integers(0, min(num_experts, few), (num_tokens, top_k))
  sim = rng.integers(0, 5, (num_experts, num_experts)).astype(np.float32) / 4
  np.fill_diagonal(sim, 1.0)
  return jnp.asarray(ids, jnp.int32), jnp.asarray(valid), jnp.asarray(sim)


# ---------------------------------------------------------------- schedule checks


@functools.lru_cache(maxsize=None)
def jitted_reference_schedule(config, num_experts):
  """`reference_schedule` jitted once per (config, E): `(ids, valid, sim) -> Schedule`."""
  return jax.jit(lambda ids, valid, sim: reference_schedule(
      ids, jnp.ones(ids.shape, jnp.float32), valid, sim, config, num_experts))


def check_schedule(got, want, valid, msg=""):
  """A kernel's schedule equals the reference on every field that is defined."""
  rows = int(want.stats[4])
  np.testing.assert_array_equal(got.ids, want.ids, err_msg=f"ids {msg}")
  np.testing.assert_array_equal(got.group_offsets, want.group_offsets,
                                err_msg=f"group_offsets {msg}")
  np.testing.assert_array_equal(got.active_experts, want.active_experts,
                                err_msg=f"active_experts {msg}")
  np.testing.assert_array_equal(got.stats, want.stats, err_msg=f"stats {msg}")
  np.testing.assert_array_equal(got.row_token[:rows], want.row_token[:rows],
                                err_msg=f"row_token {msg}")
  np.testing.assert_array_equal(np.asarray(got.slot_row)[valid],
                                np.asarray(want.slot_row)[valid], err_msg=f"slot_row {msg}")
