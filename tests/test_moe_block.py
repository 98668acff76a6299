"""MoeBlock: per-position (teacher-forced) re-routing, re-routing groups, capture."""

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sere_jax import RerouteConfig
from sere_jax import moe

EXPERTS, DIM = 16, 32


def _block(policy="sere", select_top_k=1, group_size=0):
  config = RerouteConfig(policy, select_top_k=select_top_k)
  block = moe.MoeBlock(DIM, 16, EXPERTS, 4, reroute=config, impl="xla_dense",
                       group_size=group_size, rngs=nnx.Rngs(0))
  sim = np.random.default_rng(0).random((EXPERTS, EXPERTS))
  sim = (sim + sim.T) / 2
  np.fill_diagonal(sim, 1.0)
  block.similarity[...] = jnp.asarray(sim, jnp.float32)
  return block


def _inputs(batch=8, length=5):
  x = jax.random.normal(jax.random.key(1), (batch, length, DIM))
  valid = jnp.ones((batch, length), bool).at[3, 2].set(False)
  return x, valid


@pytest.mark.parametrize("policy", ["sere", "topk_truncate", "random", "oea", "none"])
def test_sequence_input_reroutes_each_position_as_one_decode_step(policy):
  block = _block(policy)
  x, valid = _inputs()
  y, stats = block(x, valid, decode=True)
  assert y.shape == x.shape and stats.distinct_after.shape == (5, 1)
  for pos in range(x.shape[1]):
    y_step, s_step = block(x[:, pos], valid[:, pos], decode=True)
    np.testing.assert_allclose(y[:, pos], y_step, atol=1e-5)
    assert int(s_step.distinct_after) == int(stats.distinct_after[pos, 0])
    assert int(s_step.distinct_before) == int(stats.distinct_before[pos, 0])


def test_groups_reroute_independently():
  block = _block(group_size=4)
  x, valid = _inputs()
  y, stats = block(x, valid, decode=True)
  assert stats.distinct_after.shape == (5, 2)
  alone = _block()  # whole batch = one group
  for pos in range(x.shape[1]):
    for g in range(2):
      rows = slice(4 * g, 4 * g + 4)
      y_group, s_group = alone(x[rows, pos], valid[rows, pos], decode=True)
      np.testing.assert_allclose(y[rows, pos], y_group, atol=1e-5)
      assert int(s_group.distinct_after) == int(stats.distinct_after[pos, g])


def test_prefill_reroutes_the_whole_batch_when_not_decode_only():
  block = _block()
  block.reroute = RerouteConfig("sere", select_top_k=1, decode_only=False)
  x, valid = _inputs()
  y, stats = block(x, valid, decode=False)
  flat_y, flat_stats = block(x.reshape(-1, DIM), valid.reshape(-1), decode=False)
  np.testing.assert_allclose(y.reshape(-1, DIM), flat_y, atol=1e-5)
  assert stats.distinct_after.shape == () and int(stats.distinct_after) == int(
      flat_stats.distinct_after)


def test_bad_group_size_and_valid_shape_are_rejected():
  x, valid = _inputs()
  with pytest.raises(ValueError, match="group_size 3 does not divide"):
    _block(group_size=3)(x, valid, decode=True)
  with pytest.raises(ValueError, match="valid must have shape"):
    _block()(x, valid[:, :2], decode=True)
  with pytest.raises(ValueError, match="group_size must be an integer"):
    moe.set_reroute(_block(), RerouteConfig("none"), group_size=-1)


def test_values_are_recorded_only_inside_capture():
  block = _block()
  x, valid = _inputs()
  block(x, valid, decode=True)
  assert not jax.tree.leaves(nnx.state(block, nnx.Intermediate))  # nothing stored
  _, sown = nnx.capture(lambda b: b(x, valid, decode=True), nnx.Intermediate)(block)
  names = {path[-1] for path, _ in nnx.to_flat_state(sown)}
  assert names == {moe.CAPTURE_INPUT, moe.CAPTURE_VALID, moe.CAPTURE_LOAD_BALANCE}
