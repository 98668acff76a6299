"""The control policies inside MoeBlock (oracle, expert_pool, keep_active), and the
expert_pool statistics' calibration, side file and checkpointing on a real model."""

from __future__ import annotations

import os

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sere_jax import RerouteConfig, calibration, checkpoint, moe, policies, similarity

EXPERTS, DIM, TOP_K = 16, 32, 4
FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "parity", "qwen3_moe")
CHUNKS = dict(expert_chunk=4, token_chunk=4)


@pytest.fixture(scope="module")
def block_template() -> moe.MoeBlock:
  block = moe.MoeBlock(DIM, 16, EXPERTS, TOP_K, impl="xla_dense", rngs=nnx.Rngs(0))
  sim = np.random.default_rng(0).random((EXPERTS, EXPERTS))
  np.fill_diagonal(sim, 1.0)
  block.similarity[...] = jnp.asarray(sim, jnp.float32)
  return block


@pytest.fixture
def block(block_template) -> moe.MoeBlock:
  return nnx.clone(block_template)


@nnx.jit
def _call(block, x, valid):
  return block(x, valid, decode=True)


def _with(block, config):
  block.reroute = config
  return block


def _routing(block, x):
  logits = x @ block.router_kernel[...]
  ids, weights, _ = block.route(logits)
  return ids, weights


def _x(tokens=8, seed=1):
  return jax.random.normal(jax.random.key(seed), (tokens, DIM))


def test_oracle_substitutes_are_no_worse_than_sere_per_slot(block):
  _with(block, RerouteConfig("oracle", select_top_k=1))
  x, valid = _x(), jnp.ones(8, bool)
  ids, weights = _routing(block, x)
  out = np.asarray(block.expert_outputs(x), np.float64)  # [T, E, D]
  sere_ids, _, _ = policies.reroute(ids, weights, valid, block.similarity[...],
                                    RerouteConfig("sere", select_top_k=1))
  oracle_ids = np.asarray(policies.oracle_ids(ids, valid, jnp.asarray(out), 1))
  t = np.arange(8)[:, None]
  original = out[t, np.asarray(ids)]
  err_oracle = np.linalg.norm(out[t, oracle_ids] - original, axis=-1)
  err_sere = np.linalg.norm(out[t, np.asarray(sere_ids)] - original, axis=-1)
  assert np.all(err_oracle <= err_sere + 1e-5)
  assert np.sum(err_oracle < err_sere - 1e-5) > 0  # a real improvement somewhere

  # The block's output is the re-routed mixture of those expert outputs.
  y, stats = _call(block, x, valid)
  want = np.einsum("tk,tkd->td", np.asarray(weights), out[t, oracle_ids])
  np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-5)
  assert int(stats.distinct_after) == len(set(np.asarray(ids)[:, 0].tolist()))
  assert int(stats.distinct_before) == len(set(np.asarray(ids).ravel().tolist()))
  # Closer to `none` than SERE's output, token by token in total.
  y_none, _ = _call(_with(block, RerouteConfig("none")), x, valid)
  y_sere, _ = _call(_with(block, RerouteConfig("sere", select_top_k=1)), x, valid)
  assert (np.linalg.norm(y - y_none) <= np.linalg.norm(y_sere - y_none) + 1e-5)


def test_expert_pool_in_the_block_uses_the_pool_stats(block):
  _with(block, RerouteConfig("expert_pool", pool_size=3))
  x, valid = _x(), jnp.ones(8, bool)
  ids, weights = _routing(block, x)
  rng = np.random.default_rng(2)
  norm = jnp.asarray(rng.random(EXPERTS) + 0.5, jnp.float32)
  scale = jnp.asarray(rng.random((EXPERTS, EXPERTS)) * 2, jnp.float32)
  block.set_pool_stats(norm, scale)
  y, stats = _call(block, x, valid)
  new_ids, new_w, want = policies.reroute(
      ids, weights, valid, block.similarity[...], block.reroute,
      output_norm=norm, pool_scale=scale)
  out = block.expert_outputs(x)
  np.testing.assert_allclose(
      y, np.einsum("tk,tkd->td", new_w, np.asarray(out)[np.arange(8)[:, None], new_ids]),
      rtol=1e-4, atol=1e-5)
  assert [int(s) for s in stats] == [int(s) for s in want] and int(stats[1]) <= 3
  with pytest.raises(ValueError, match="pool stats must be"):
    block.set_pool_stats(norm[:3], scale)


@pytest.mark.parametrize("config", [
    RerouteConfig("oracle", select_top_k=1), RerouteConfig("expert_pool", pool_size=4),
    RerouteConfig("keep_active", select_top_k=2, renormalize=True)],
    ids=lambda c: c.policy)
def test_sequence_input_reroutes_each_position_as_one_step(block, config):
  _with(block, config)
  x = jax.random.normal(jax.random.key(3), (6, 3, DIM))
  valid = jnp.ones((6, 3), bool).at[2, 1].set(False)
  y, stats = _call(block, x, valid)
  assert stats.distinct_after.shape == (3, 1)
  for pos in range(3):
    y_step, s_step = _call(block, x[:, pos], valid[:, pos])
    np.testing.assert_allclose(y[:, pos], y_step, atol=1e-5)
    assert int(s_step.distinct_after) == int(stats.distinct_after[pos, 0])


# ---------------------------------------------------------------------------
# Calibration and storage on the tiny parity model.


@pytest.fixture(scope="module")
def model():
  return checkpoint.load_model(FIXTURE, impl="xla_dense")


def _tokens(seed, shape=(2, 8)):
  return np.random.default_rng(seed).integers(0, 128, shape).astype(np.int32)


def test_calibrate_pool_streams_and_skips_padding(model):
  # Two batches, the second left-padded (pad id 77 must not count), against the stats
  # of every expert's outputs on all valid tokens at once.
  a = _tokens(0, (1, 8))
  padded = np.full((1, 8), 77, np.int32)
  padded[0, 3:] = _tokens(1, (1, 5))[0]
  valid = np.arange(8)[None] >= 3
  batches = [(a, np.ones((1, 8), bool)), (padded, valid)]
  got = calibration.calibrate_pool(model, batches, token_budget=100, **CHUNKS)
  graphdef, state = nnx.split(model)
  captured = [calibration.capture_moe_inputs(graphdef, state, jnp.asarray(t),
                                             jnp.asarray(v), cache_dtype=jnp.float32)
              for t, v in batches]
  for i, ((norm, scale), block) in enumerate(zip(got, moe.moe_blocks(model))):
    x = jnp.concatenate([c[i][0][np.asarray(c[i][1])] for c in captured])
    assert x.shape[0] == 13
    outputs = similarity.expert_outputs(x, block.w_gate_up[...], block.w_down[...])
    want_norm, want_scale = similarity.pool_stats(outputs)
    np.testing.assert_allclose(norm, want_norm, rtol=1e-5)
    np.testing.assert_allclose(scale, want_scale, rtol=1e-4, atol=1e-6)


def test_pool_stats_side_file_and_checkpoint(model, tmp_path):
  num_experts = moe.moe_blocks(model)[0].num_experts
  rng = np.random.default_rng(0)
  stats = [(rng.random(num_experts).astype(np.float32),
            rng.random((num_experts, num_experts)).astype(np.float32)) for _ in range(2)]
  directory = tmp_path / "model"
  directory.mkdir()
  for name in os.listdir(FIXTURE):
    os.symlink(os.path.join(FIXTURE, name), directory / name)
  path = calibration.save_pool_stats(str(directory), stats,
                                     {"tokens": 16, "data_source": "random"})
  assert os.path.basename(path) == calibration.POOL_STATS_FILE
  loaded, meta = calibration.load_pool_stats(str(directory))
  assert meta["tokens"] == "16" and meta["created"].startswith("20")
  with pytest.raises(ValueError, match="lacks"):
    calibration.save_pool_stats(str(directory), stats, {"tokens": 1})
  with pytest.raises(ValueError, match=r"MoE layer 1: pool statistics have shapes"):
    calibration.apply_pool_stats(model, [stats[0], (stats[1][0][:3], stats[1][1])])

  # The HF directory picks the side file up; an Orbax checkpoint keeps the statistics
  # in its state, and one saved without them restores without them.
  with_stats = checkpoint.load_model(str(directory), impl="xla_dense")
  for block, (norm, scale), (l_norm, l_scale) in zip(moe.moe_blocks(with_stats), stats,
                                                     loaded):
    np.testing.assert_array_equal(block.output_norm[...], norm)
    np.testing.assert_array_equal(block.pool_scale[...], scale)
    np.testing.assert_array_equal(l_norm, norm)
    np.testing.assert_array_equal(l_scale, scale)
  checkpoint.save(with_stats, str(tmp_path / "ours"))
  restored = checkpoint.restore(str(tmp_path / "ours"))
  np.testing.assert_array_equal(moe.moe_blocks(restored)[1].pool_scale[...], stats[1][1])
  checkpoint.save(model, str(tmp_path / "plain"))
  assert moe.moe_blocks(checkpoint.restore(str(tmp_path / "plain")))[0].output_norm is None
