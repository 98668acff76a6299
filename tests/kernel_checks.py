"""Checks shared by the Triton and TPU kernel tests: schedules against the reference."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from sere_jax.kernels.schedule import reference_schedule


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
