"""Expert parallelism: the placement of experts on devices, the `sere_ep` policy against
the plain-loop reference of tests/oracle.py, `expert_parallel.ffn` and `MoeBlock` /
whole models on meshes of 2, 4 and 8 host CPU devices (tests/conftest.py) against the
same computation on one device, and the errors of a bad mesh or placement."""

from __future__ import annotations

import dataclasses
import functools

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, PartitionSpec as P

from sere_jax import RerouteConfig, expert_parallel, generation, moe, placement, reroute
from sere_jax import policy_spec
from sere_jax.kernels import moe_ffn as moe_ffn_lib
from tests import oracle
from tests.random_models import HF_QWEN3, random_qwen


def _mesh(n: int, axis: str = "expert") -> Mesh:
  # `Mesh` gives Auto axes (jax.make_mesh defaults to Explicit ones).
  return Mesh(np.array(jax.devices()[:n]), (axis,))


# The tests compile many tiny programs once each; XLA:CPU's LLVM optimisation would take
# most of their time. Both sides of every comparison compile this way.
FAST_COMPILE = {"xla_backend_optimization_level": 0,
                "xla_llvm_disable_expensive_passes": True}


def _run_fast(fn, module, *args):
  """`fn(module, *args)` jitted (the module split into its static graph and state) and
  compiled with `FAST_COMPILE`."""
  graphdef, state = nnx.split(module)
  run = lambda graphdef, state, *args: fn(nnx.merge(graphdef, state), *args)
  compiled = jax.jit(run, static_argnums=0).lower(graphdef, state, *args).compile(
      FAST_COMPILE)
  return compiled(state, *args)


def test_eight_host_devices():
  assert len(jax.devices()) >= 8


# ---------------------------------------------------------------------------
# placement


PLACEMENTS = [(12, 4), (10, 4), (12, 8), (60, 8), (7, 2), (6, 6), (7, 1), (1, 1)]


@pytest.mark.parametrize("num_experts,num_devices", PLACEMENTS)
def test_placement_matches_plain_loops(num_experts, num_devices):
  blocks = oracle.device_blocks(num_experts, num_devices)
  assert sorted(e for b in blocks for e in b) == list(range(num_experts))
  per_device = placement.experts_per_device(num_experts, num_devices)
  assert per_device == max(len(b) for b in blocks) == len(blocks[0])
  device = np.asarray(placement.device_of_expert(num_experts, num_devices))
  assert device.dtype == np.int32 and device.shape == (num_experts,)
  for d, block in enumerate(blocks):
    for e in block:
      assert device[e] == d

  rng = np.random.default_rng(num_experts * 10 + num_devices)
  for mode in ("all", "none", "one", "random", "random"):
    num_tokens, top_k = 9, min(3, num_experts)
    ids = rng.integers(0, num_experts, (num_tokens, top_k)).astype(np.int32)
    valid = oracle.random_valid_mask(rng, mode, num_tokens)
    got = np.asarray(placement.distinct_per_device(ids, valid, num_experts, num_devices))
    want = [len({int(e) for t in range(num_tokens) if valid[t] for e in ids[t] if e in b})
            for b in blocks]
    np.testing.assert_array_equal(got, want)
    assert int(placement.max_distinct_per_device(ids, valid, num_experts, num_devices)) == (
        oracle.max_distinct_per_device(ids, valid, num_experts, num_devices))


def test_uneven_placement_leaves_the_last_devices_short_or_empty():
  assert [len(b) for b in oracle.device_blocks(10, 4)] == [3, 3, 3, 1]
  assert [len(b) for b in oracle.device_blocks(12, 8)] == [2, 2, 2, 2, 2, 2, 0, 0]
  np.testing.assert_array_equal(placement.device_of_expert(10, 4),
                                [0, 0, 0, 1, 1, 1, 2, 2, 2, 3])


@pytest.mark.parametrize("num_devices,match", [
    (0, "integer >= 1, got 0"), (-2, "integer >= 1"), (2.0, "integer >= 1, got 2.0"),
    (True, "integer >= 1, got True"), ("4", "integer >= 1"),
    (9, "9 expert-parallel devices for 8 experts")])
def test_bad_placement_is_rejected(num_devices, match):
  for fn in (placement.check_placement, placement.experts_per_device,
             placement.device_of_expert):
    with pytest.raises(ValueError, match=match):
      fn(8, num_devices)


# ---------------------------------------------------------------------------
# sere_ep against the oracle


def _case(rng, num_tokens, top_k, num_experts, *, dyadic=True, used=None,
          sim_max=1.0, valid_mode=None):
  """A routed batch (distinct experts per token) with dyadic weights (exact sums, ties
  frequent) or continuous ones, and a similarity quantised to quarters (ties frequent)
  with unit diagonal."""
  used = used or int(rng.integers(top_k, num_experts + 1))
  pool = rng.permutation(num_experts)[:used]
  ids = np.stack([rng.permutation(pool)[:top_k] for _ in range(num_tokens)])
  ids = ids.astype(np.int32)
  if dyadic:
    weights = rng.integers(1, 9, (num_tokens, top_k)) / 8
  else:
    weights = rng.random((num_tokens, top_k))
  weights = -np.sort(-weights, axis=1).astype(np.float32)
  quarters = np.arange(int(4 * sim_max) + 1) / 4  # mostly low: critical experts occur
  chance = 0.5 ** np.arange(len(quarters))
  sim = rng.choice(quarters, (num_experts, num_experts), p=chance / chance.sum())
  sim = sim.astype(np.float32)
  np.fill_diagonal(sim, 1.0)
  mode = valid_mode or rng.choice(["all", "random", "random", "one", "none"])
  valid = oracle.random_valid_mask(rng, mode, num_tokens)
  return ids, weights, valid, sim


def _reroute(config, ids, weights, valid, sim):
  new_ids, new_w, stats = reroute(ids, weights, valid, sim, config)
  assert int(stats.invalid_similarity) == 0
  return np.asarray(new_ids), np.asarray(new_w), stats


def _budget(ids, valid, s, num_experts, num_devices):
  """The most primaries (top-S experts of valid tokens) on one device."""
  primary = {int(e) for t in range(ids.shape[0]) if valid[t] for e in ids[t, :s]}
  return max(len(primary & set(b)) for b in oracle.device_blocks(num_experts, num_devices))


def _check_sere_ep(ids, weights, valid, sim, s, rho, n, min_batch=1):
  """sere_ep == oracle, with the budget properties; returns the oracle result."""
  num_experts = sim.shape[0]
  config = RerouteConfig("sere_ep", select_top_k=s, threshold=rho, expert_devices=n,
                         min_batch=min_batch)
  new_ids, new_w, stats = _reroute(config, ids, weights, valid, sim)
  want = oracle.sere_ep_oracle(ids, weights, valid, sim, s, rho, n, min_batch)
  np.testing.assert_array_equal(new_ids, want.ids)
  np.testing.assert_array_equal(new_w, weights)
  assert tuple(int(x) for x in stats[:4]) == tuple(want.stats)
  per_device = oracle.max_distinct_per_device(want.ids, valid, num_experts, n)
  assert int(stats.max_device_distinct) == per_device

  sere_config = RerouteConfig("sere", select_top_k=s, threshold=rho, expert_devices=n,
                              min_batch=min_batch)
  sere_ids, _, sere_stats = _reroute(sere_config, ids, weights, valid, sim)
  applied = 0 < s < ids.shape[1] and int(valid.sum()) >= max(min_batch, 1)
  if applied:
    # The device with the most primaries reads exactly them; no other reads more.
    assert per_device == _budget(ids, valid, s, num_experts, n)
    assert per_device <= int(sere_stats.max_device_distinct)
  if rho == 0 or not applied:
    np.testing.assert_array_equal(new_ids, sere_ids)
    assert tuple(int(x) for x in stats) == tuple(int(x) for x in sere_stats)
  return want


# (T, K, E): a large batch (E = 60 on 8 devices: seven hold 8, one 4), a mid one
# (E = 12 on 8 devices: the last two hold none) and B = 1.
SHAPES = [(64, 8, 60), (16, 4, 12), (1, 4, 12)]
THRESHOLDS = (0.0, 0.25, 0.5, 0.625, 0.75, 1.0)


@pytest.mark.parametrize("shape", SHAPES)
def test_sere_ep_matches_oracle(shape):
  num_tokens, top_k, num_experts = shape
  rng = np.random.default_rng(num_tokens * 1000 + num_experts)
  kept = changed = 0
  for seed in range(18):
    n = (2, 4, 8)[seed % 3]
    ids, weights, valid, sim = _case(rng, num_tokens, top_k, num_experts,
                                     dyadic=seed % 4 != 3)
    s = int(rng.integers(1, top_k))
    rho = float(rng.choice(THRESHOLDS))
    min_batch = 1 if seed % 5 else int(rng.integers(0, num_tokens + 2))
    want = _check_sere_ep(ids, weights, valid, sim, s, rho, n, min_batch)
    kept += want.stats.critical_kept
    changed += want.stats.slots_rerouted
  if num_tokens > 1:  # the cases exercise both keeping and re-routing
    assert kept > 0 and changed > 0


@pytest.mark.parametrize("shape", SHAPES[:2])
def test_sere_ep_without_threshold_is_sere(shape):
  num_tokens, top_k, num_experts = shape
  rng = np.random.default_rng(7)
  for seed in range(6):
    ids, weights, valid, sim = _case(rng, num_tokens, top_k, num_experts,
                                     valid_mode="all")
    s = 1 + seed % (top_k - 1)
    for n in (2, 4, 8):
      want = _check_sere_ep(ids, weights, valid, sim, s, 0.0, n)
      sere = oracle.sere_oracle(ids, weights, valid, sim, s, 0.0)
      np.testing.assert_array_equal(want.ids, sere.ids)


def test_sere_ep_no_similar_expert_budget_binds():
  """rho = 1 with every off-diagonal similarity below 1: every non-primary expert is
  critical, and only the budget decides which are kept."""
  rng = np.random.default_rng(3)
  num_tokens, top_k, num_experts = 16, 4, 12
  binding = 0
  for seed in range(12):
    ids, weights, valid, sim = _case(rng, num_tokens, top_k, num_experts, sim_max=0.75,
                                     valid_mode="all")
    n = (2, 4, 8)[seed % 3]
    want = _check_sere_ep(ids, weights, valid, sim, 1, 1.0, n)
    sere = oracle.sere_oracle(ids, weights, valid, sim, 1, 1.0)
    secondary = {int(e) for e in ids[:, 1:].ravel()} - set(want.primary)
    assert set(sere.critical) >= secondary  # SERE would keep them all
    assert want.critical <= secondary
    binding += len(want.critical) < len(secondary)
  assert binding > 0


def _padded(ids, weights, num_tokens=16):
  """Rows past the given ones are padding (invalid) tokens on expert 11: every test
  here uses the shapes of `SHAPES[1]`, so the eager ops compile once."""
  rows = num_tokens - ids.shape[0]
  pad_ids = np.full((rows, ids.shape[1]), 11, np.int32)
  pad_ids[:, 1:] = np.arange(ids.shape[1] - 1)[None, :] + 8  # 8, 9, 10 after 11
  ids = np.concatenate([ids, pad_ids]).astype(np.int32)
  weights = np.concatenate([weights, np.full((rows, ids.shape[1]), 0.125)])
  weights = weights.astype(np.float32)
  valid = np.arange(num_tokens) < num_tokens - rows
  return ids, weights, valid


def test_sere_ep_primaries_on_one_device():
  """Top-S experts all on device 0 (budget 2); the other devices keep at most two
  critical experts each, those with the most secondary weight, ties to the lower id."""
  num_experts, n = 12, 4  # devices hold 0-2, 3-5, 6-8, 9-11
  ids, weights, valid = _padded(np.array([[0, 3, 4, 6],
                                          [1, 4, 5, 7],
                                          [0, 5, 3, 9],
                                          [1, 8, 6, 7]]),
                                np.array([[4, 2, 2, 1], [4, 3, 1, 1], [4, 2, 2, 1],
                                          [4, 2, 2, 1]]) / 8)
  sim = np.full((num_experts, num_experts), 0.25, np.float32)
  np.fill_diagonal(sim, 1.0)
  sim[5, 1] = 0.5  # expert 5's most similar primary is 1, the others' is 0 (a tie)
  want = _check_sere_ep(ids, weights, valid, sim, 1, 1.0, n)
  # Secondary weight: 3: 2+2=4, 4: 2+3=5, 5: 1+2=3 -> keep 4, 3; 5 -> 1.
  # 6: 1+2=3, 7: 1+1=2, 8: 2 -> keep 6, then 7 (tie with 8, lower id); 8 -> 0.
  # 9: 1 -> kept (room for two). Padding adds no weight: 10 is used by padding only.
  assert want.critical == {3, 4, 6, 7, 9}
  np.testing.assert_array_equal(want.ids[:4], [[0, 3, 4, 6], [1, 4, 1, 7], [0, 1, 3, 9],
                                               [1, 0, 6, 7]])
  np.testing.assert_array_equal(want.ids[4], [11, 0, 9, 0])  # padding re-routed too
  config = RerouteConfig("sere_ep", select_top_k=1, threshold=1.0, expert_devices=n)
  _, _, stats = _reroute(config, ids, weights, valid, sim)
  assert int(stats.max_device_distinct) == 2 and int(stats.critical_kept) == 5
  sere = RerouteConfig("sere", select_top_k=1, threshold=1.0, expert_devices=n)
  assert int(_reroute(sere, ids, weights, valid, sim)[2].max_device_distinct) == 3


def test_sere_ep_all_experts_primary_changes_nothing():
  ids = np.array([[e, (e + 1) % 12, (e + 3) % 12, (e + 5) % 12] for e in range(12)])
  ids, weights, valid = _padded(ids, np.full(ids.shape, 0.25))
  sim = np.zeros((12, 12), np.float32)
  np.fill_diagonal(sim, 1.0)
  for n in (2, 4, 8):
    want = _check_sere_ep(ids, weights, valid, sim, 1, 1.0, n)
    np.testing.assert_array_equal(want.ids, ids)
    assert want.stats == (12, 12, 0, 0)


def test_sere_ep_invalid_tokens_add_no_primary_and_no_weight():
  """A critical expert used only by a padding token's secondary slot is not kept (it
  goes to its nearest primary); padding's top-S experts are no primaries."""
  ids, weights, valid = _padded(np.array([[0, 4, 5, 6], [1, 6, 4, 7]]),
                                np.array([[4, 2, 1, 1], [4, 3, 2, 1]]) / 8)
  sim = np.zeros((12, 12), np.float32)
  np.fill_diagonal(sim, 1.0)
  sim[8, 1] = sim[9, 1] = 0.25
  # Secondary weight: 4: 4/8, 5: 1/8, 6: 4/8, 7: 1/8 (valid slots only).
  # 6 devices of 2 experts: budget 2 (device 0), room for both on devices 2 and 3.
  want = _check_sere_ep(ids, weights, valid, sim, 1, 0.5, 6)
  assert want.primary == {0, 1} and want.critical == {4, 5, 6, 7}
  np.testing.assert_array_equal(want.ids[:2], [[0, 4, 5, 6], [1, 6, 4, 7]])
  # Padding rows [11, 8, 9, 10]: 8 and 9 go to 1, 10 (critical, padding only) to 0.
  np.testing.assert_array_equal(want.ids[2], [11, 1, 1, 0])
  want = _check_sere_ep(ids, weights, valid, sim, 1, 0.5, 12)  # budget 1
  assert want.critical == {4, 5, 6, 7}
  want = _check_sere_ep(ids, weights, valid, sim, 1, 0.5, 4)  # devices of 3: budget 2
  # Device 1 (3-5): 4 (3/8), 5 (2/8); device 2 (6-8): 6 (4/8), 7 (1/8).
  assert want.critical == {4, 5, 6, 7}
  want = _check_sere_ep(ids, weights, valid, sim, 1, 0.5, 2)  # devices of 6: budget 2
  # Device 0 (0-5) holds both primaries: no room for 4 and 5; device 1 keeps 6, 7.
  assert want.critical == {6, 7}
  np.testing.assert_array_equal(want.ids[:2], [[0, 0, 0, 6], [1, 6, 0, 7]])
  sim[7, 0] = 0.5  # not below rho: 7 is no longer critical and goes to 0
  want = _check_sere_ep(ids, weights, valid, sim, 1, 0.5, 2)
  assert want.critical == {6}
  np.testing.assert_array_equal(want.ids[:2], [[0, 0, 0, 6], [1, 6, 0, 0]])


def test_max_device_distinct_of_other_policies():
  rng = np.random.default_rng(11)
  num_tokens, top_k, num_experts = 16, 4, 12
  fewer = 0
  for seed in range(6):
    ids, weights, valid, sim = _case(rng, num_tokens, top_k, num_experts,
                                     valid_mode="all" if seed < 3 else None)
    for text in ("sere:2:0.25:dev4", "sere:1:0.75:dev8", "none:dev4", "none:dev2",
                 "topk_truncate:2:dev8", "keep_active:1:dev4"):
      config = policy_spec.parse(text).config()
      new_ids, _, stats = _reroute(config, ids, weights, valid, sim)
      n = config.expert_devices
      assert int(stats.max_device_distinct) == oracle.max_distinct_per_device(
          new_ids, valid, num_experts, n), text
      if text.startswith("sere"):
        want = oracle.sere_oracle(ids, weights, valid, sim, config.select_top_k,
                                  config.threshold)
        np.testing.assert_array_equal(new_ids, want.ids)
      one_device = dataclasses.replace(config, expert_devices=0)
      got_ids, _, one = _reroute(one_device, ids, weights, valid, sim)
      np.testing.assert_array_equal(got_ids, new_ids)
      assert int(one.max_device_distinct) == int(one.distinct_after) == int(
          stats.distinct_after)
      fewer += int(stats.max_device_distinct) < int(stats.distinct_after)
  assert fewer > 0  # the placement count is not the total


def test_sere_ep_spec_and_config():
  config = policy_spec.parse("sere_ep:2:0.25:dev8").config()
  assert (config.policy, config.select_top_k, config.threshold, config.expert_devices) == (
      "sere_ep", 2, 0.25, 8)
  with pytest.raises(ValueError, match="sere_ep.*expert_devices >= 1.*dev"):
    RerouteConfig(policy="sere_ep", select_top_k=2)
  with pytest.raises(ValueError, match="sere_ep.*expert_devices >= 1"):
    policy_spec.parse("sere_ep:2:0.25").config()
  with pytest.raises(ValueError, match="expert_devices"):
    RerouteConfig(policy="sere", expert_devices=-1)
  # A placement on more devices than experts fails where the expert count is known.
  ids, weights = np.zeros((2, 3), np.int32), np.ones((2, 3), np.float32)
  with pytest.raises(ValueError, match="8 expert-parallel devices for 6 experts"):
    reroute(ids, weights, np.ones(2, bool), np.eye(6, dtype=np.float32), config)


# ---------------------------------------------------------------------------
# expert_parallel.ffn against one device

# 10 experts: 5 + 5 on 2 devices, 3 + 3 + 3 + 1 on 4, 2 x 5 + 0 x 3 on 8.
FFN_E, FFN_D, FFN_F, FFN_T, FFN_K = 10, 8, 4, 7, 3


def _compiled(fn, *args):
  return jax.jit(fn).lower(*args).compile(FAST_COMPILE)


@functools.lru_cache(maxsize=None)
def _sharded_ffn(impl: str, n: int, *args):
  mesh = _mesh(n)
  return _compiled(lambda x, ids, w, valid, wgu, wd: expert_parallel.ffn(
      x, ids, w, valid, wgu, wd, mesh=mesh, axis="expert", impl=impl), *args)


@functools.lru_cache(maxsize=None)
def _one_device_ffn(impl: str, *args):
  def run(x, ids, w, valid, wgu, wd):
    y = moe_ffn_lib.moe_ffn(x, ids, w, wgu, wd, valid=valid, impl=impl).y
    slots = jnp.broadcast_to(valid[:, None], ids.shape)
    return y, moe_ffn_lib.routed_ffn(x, ids, w, slots, wgu, wd, impl=impl)
  return _compiled(run, *args)


def _ffn_scenarios():
  """`(name, ids, weights, valid)`: random routings with repeated ids and padding; all
  tokens on device 0's experts (0, 1: under 2 devices 0-4, under 8 only 0-1), so the
  other devices get no slot; every slot on one expert; no valid token."""
  rng = np.random.default_rng(5)
  t, k = FFN_T, FFN_K
  weights = rng.normal(size=(t, k)).astype(np.float32)
  valid = np.array([1, 1, 0, 1, 1, 0, 1], bool)
  repeated = rng.integers(0, FFN_E, (t, k)).astype(np.int32)
  repeated[0] = [3, 3, 3]
  repeated[1] = [9, 2, 9]
  return [("random", rng.integers(0, FFN_E, (t, k)).astype(np.int32), weights,
           np.ones(t, bool)),
          ("repeated_ids_and_padding", repeated, weights, valid),
          ("device_0_only", rng.integers(0, 2, (t, k)).astype(np.int32), weights, valid),
          ("one_expert", np.full((t, k), FFN_E - 1, np.int32), weights, valid),
          ("no_valid_token", repeated, weights, np.zeros(t, bool))]


@pytest.fixture(scope="module")
def ffn_weights():
  rng = np.random.default_rng(6)
  x = rng.normal(size=(FFN_T, FFN_D)).astype(np.float32)
  wgu = (rng.normal(size=(FFN_E, FFN_D, 2 * FFN_F)) * 0.5).astype(np.float32)
  wd = (rng.normal(size=(FFN_E, FFN_F, FFN_D)) * 0.5).astype(np.float32)
  return x, wgu, wd


@pytest.mark.parametrize("impl", ["xla_dense", "ragged_dot", "interpret"])
@pytest.mark.parametrize("n", [2, 4, 8])
def test_ffn_matches_one_device(impl, n, ffn_weights):
  x, wgu, wd = ffn_weights
  shapes = tuple(jax.ShapeDtypeStruct(a.shape, a.dtype) for a in
                 (x, *_ffn_scenarios()[0][1:], wgu, wd))
  for name, ids, weights, valid in _ffn_scenarios():
    args = (x, ids, weights, valid, wgu, wd)
    want, want_routed = _one_device_ffn("xla_dense", *shapes)(*args)
    np.testing.assert_allclose(want_routed, want, rtol=1e-5, atol=1e-5, err_msg=name)
    if impl == "ragged_dot" and n == 2:  # one device: the slot-mask op of this impl
      got_one, got_routed = _one_device_ffn(impl, *shapes)(*args)
      np.testing.assert_allclose(got_one, want, rtol=1e-5, atol=1e-5, err_msg=name)
      np.testing.assert_allclose(got_routed, want, rtol=1e-5, atol=1e-5, err_msg=name)
    got = _sharded_ffn(impl, n, *shapes)(*args)
    assert got.shape == x.shape and got.dtype == x.dtype
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5, err_msg=name)
    assert np.all(np.asarray(got)[~valid] == 0), name
    if name != "no_valid_token":
      assert np.abs(np.asarray(got)[valid]).max() > 0.1, name


def test_fused_schedule_kernel_counts_devices(ffn_weights):
  """One device, `sere` placed on 4 devices: the fused schedule kernel's path of
  `moe_ffn` (interpret) counts max_device_distinct as the re-routing path does."""
  x, wgu, wd = ffn_weights
  config = RerouteConfig("sere", select_top_k=1, threshold=0.5, expert_devices=4)
  sim = np.random.default_rng(9).choice([0.0, 0.25, 0.5, 0.75], (FFN_E, FFN_E))
  np.fill_diagonal(sim, 1.0)
  sim = sim.astype(np.float32)

  def run(impl):
    return lambda x, ids, w, valid, sim, wgu, wd: moe_ffn_lib.moe_ffn(
        x, ids, w, wgu, wd, valid=valid, similarity=sim, config=config, impl=impl)
  scenarios = _ffn_scenarios()
  args = (x, *scenarios[0][1:], sim, wgu, wd)
  kernel, reference = (_compiled(run(impl), *args) for impl in ("interpret", "xla_dense"))
  fewer = 0
  for name, ids, weights, valid in scenarios:
    args = (x, ids, weights, valid, sim, wgu, wd)
    got, want = kernel(*args), reference(*args)
    np.testing.assert_array_equal(got.ids, want.ids, err_msg=name)
    np.testing.assert_allclose(got.y, want.y, rtol=1e-5, atol=1e-5, err_msg=name)
    assert [int(v) for v in got.stats] == [int(v) for v in want.stats], name
    count = oracle.max_distinct_per_device(got.ids, valid, FFN_E, 4)
    assert int(got.stats.max_device_distinct) == count, name
    fewer += count < int(got.stats.distinct_after)
  assert fewer > 0


def test_ffn_bad_mesh_is_rejected(ffn_weights):
  x, wgu, wd = ffn_weights
  ids, weights, valid = _ffn_scenarios()[0][1:]
  with pytest.raises(ValueError, match="not the expert axis 'expert'"):
    expert_parallel.ffn(x, ids, weights, valid, wgu, wd, mesh=_mesh(2, "data"),
                        axis="expert", impl="xla_dense")
  with pytest.raises(ValueError, match="8 expert-parallel devices for 6 experts"):
    expert_parallel.ffn(x, ids % 6, weights, valid, wgu[:6], wd[:6], mesh=_mesh(8),
                        axis="expert", impl="xla_dense")
  with pytest.raises(ValueError, match="Mesh"):
    expert_parallel.check_mesh(jax.devices()[:2], "expert", 6)


# ---------------------------------------------------------------------------
# MoeBlock on a mesh against the same block on one device

BLK_E, BLK_K, BLK_D, BLK_F, BLK_N = 10, 3, 8, 4, 4  # 4 devices hold 3, 3, 3, 1 experts


def _block_configs(n: int) -> dict[str, RerouteConfig]:
  return {
      "none": RerouteConfig("none"),
      "sere": RerouteConfig("sere", select_top_k=1, threshold=0.5),
      "sere_hybrid": RerouteConfig("sere_hybrid", select_top_k=1, threshold=0.25),
      "sere_ep": RerouteConfig("sere_ep", select_top_k=1, threshold=0.75,
                               expert_devices=n),
      "topk_truncate": RerouteConfig("topk_truncate", select_top_k=2),
      "keep_active": RerouteConfig("keep_active", select_top_k=1),
      "oea": RerouteConfig("oea", select_top_k=1),
      "random": RerouteConfig("random", select_top_k=1, seed=3),
      "expert_pool": RerouteConfig("expert_pool", pool_size=3),
      "oracle": RerouteConfig("oracle", select_top_k=2),
  }


def _make_block(config: RerouteConfig, impl: str = "xla_dense") -> moe.MoeBlock:
  """A block with NumPy-random weights (the same for every config and impl)."""
  block = nnx.eval_shape(lambda: moe.MoeBlock(
      BLK_D, BLK_F, BLK_E, BLK_K, reroute=config, normalize=True, impl=impl,
      rngs=nnx.Rngs(0)))
  rng = np.random.default_rng(2)
  for var in (block.router_kernel, block.w_gate_up, block.w_down):
    var.set_value(jnp.asarray(rng.normal(0.0, 0.5, var.shape), jnp.float32))
  sim = rng.choice([0.0, 0.25, 0.5, 0.75], (BLK_E, BLK_E))
  sim = (sim + sim.T) / 2
  np.fill_diagonal(sim, 1.0)
  block.similarity.set_value(jnp.asarray(sim, jnp.float32))
  block.set_pool_stats(jnp.asarray(rng.uniform(0.5, 2.0, BLK_E)),
                       jnp.asarray(rng.uniform(0.0, 2.5, (BLK_E, BLK_E))))
  return block


def _block_step_and_sequence(block, x_step, valid_step, x_seq, valid_seq):
  return block(x_step, valid_step, decode=True), block(x_seq, valid_seq, decode=True)


@pytest.fixture(scope="module")
def block_inputs():
  rng = np.random.default_rng(8)
  x_step = jnp.asarray(rng.normal(size=(12, BLK_D)), jnp.float32)
  valid_step = jnp.asarray(rng.random(12) < 0.8)
  x_seq = jnp.asarray(rng.normal(size=(6, 3, BLK_D)), jnp.float32)
  valid_seq = jnp.asarray(rng.random((6, 3)) < 0.8).at[:, 0].set(True)
  return x_step, valid_step, x_seq, valid_seq


def _top_k_ids(block, x):
  """The router's top-K ids of `x [T, D]`, in NumPy (no ties with random weights)."""
  logits = np.asarray(x, np.float64) @ np.asarray(block.router_kernel[...], np.float64)
  return np.argsort(-logits, axis=1)[:, :BLK_K]


@pytest.mark.parametrize("policy", list(_block_configs(BLK_N)))
def test_block_on_mesh_matches_one_device(policy, block_inputs):
  config = _block_configs(BLK_N)[policy]
  # The one-device block counts max_device_distinct over the same placement.
  reference = _make_block(dataclasses.replace(config, expert_devices=BLK_N))
  sharded = _make_block(config, impl="ragged_dot")
  moe.set_expert_parallel(sharded, _mesh(BLK_N))
  assert sharded.active_config(True).expert_devices == BLK_N
  assert sharded.w_gate_up[...].sharding.spec == P()  # 10 experts on 4: replicated
  graphdef, state = nnx.split(sharded)
  jaxpr = jax.make_jaxpr(lambda state, x, valid: nnx.merge(graphdef, state)(
      x, valid, decode=True))(state, *block_inputs[:2])
  assert "shard_map" in str(jaxpr)  # every policy runs the experts sharded

  (want_y, want_s), (want_yq, want_sq) = _run_fast(_block_step_and_sequence, reference,
                                                   *block_inputs)
  (got_y, got_s), (got_yq, got_sq) = _run_fast(_block_step_and_sequence, sharded,
                                               *block_inputs)
  np.testing.assert_allclose(got_y, want_y, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(got_yq, want_yq, rtol=1e-5, atol=1e-5)
  assert np.abs(np.asarray(got_y)).max() > 0.1
  for field in want_s._fields:
    np.testing.assert_array_equal(getattr(got_s, field), getattr(want_s, field), field)
    np.testing.assert_array_equal(getattr(got_sq, field), getattr(want_sq, field), field)
  assert got_sq.distinct_after.shape == (3, 1)

  # The placement count, independently where the re-routed ids are plain to see.
  x_step, valid_step, x_seq, valid_seq = block_inputs
  positions = [(x_step, valid_step, got_s, ())]
  positions += [(x_seq[:, p], valid_seq[:, p], got_sq, (p, 0)) for p in range(3)]
  for x, valid, stats, where in positions:
    ids, valid = _top_k_ids(reference, x), np.asarray(valid)
    got = int(stats.max_device_distinct[where])
    assert got <= int(stats.distinct_after[where])
    if policy == "none":
      assert got == oracle.max_distinct_per_device(ids, valid, BLK_E, BLK_N)
    elif policy == "topk_truncate":
      assert got == oracle.max_distinct_per_device(ids[:, :2], valid, BLK_E, BLK_N)
    elif policy == "sere_ep":  # exactly the budget: the most primaries on a device
      assert got == _budget(ids, valid, 1, BLK_E, BLK_N)


# ---------------------------------------------------------------------------
# A whole model: greedy generation on a mesh against one device

# Three MoE layers of 10 experts (2 devices: 5 + 5; 4: 3, 3, 3, 1; 8: 2 x 5, none on 3)
# under three policies: `none`, `sere` and `sere_ep`, so that one generation on a mesh
# checks all three (one compile per mesh instead of three).
HF_EP = dict(HF_QWEN3, num_local_experts=10, num_hidden_layers=3, decoder_sparse_step=1)
PROMPTS = [[1, 2, 3], [4, 5], [6, 7, 8, 9], [10], [11, 12, 13], [3, 3, 3]]
NEW_TOKENS = 4


def _layer_specs(n: int) -> tuple[str, ...]:
  return ("none", "sere:1:0.5", f"sere_ep:1:0.75:dev{n}")


def _model(specs: tuple[str, ...], mesh: Mesh | None = None):
  model = random_qwen(HF_EP, seed=0)
  rng = np.random.default_rng(4)
  blocks = moe.moe_blocks(model)
  assert len(blocks) == len(specs)
  for block in blocks:
    e = block.num_experts
    sim = rng.uniform(0.0, 1.0, (e, e))
    sim = (sim + sim.T) / 2
    np.fill_diagonal(sim, 1.0)
    block.similarity[...] = jnp.asarray(sim, jnp.float32)
  moe.set_reroute(model, policy_spec.parse(specs[-1]).config())
  for block, spec in zip(blocks[:-1], specs[:-1]):  # per-layer policies
    block.reroute = policy_spec.parse(spec).config()
  if mesh is not None:
    moe.set_expert_parallel(model, mesh)
  return model


def _teacher_forced_logits(model, tokens, token_valid):
  """Logits and stats of `tokens [B, L]` with every position a decode step."""
  b, l = tokens.shape
  positions = jnp.maximum(jnp.cumsum(token_valid, axis=1) - 1, 0)
  out = model(tokens, positions, token_valid, model.init_cache(b, l), token_valid,
              jnp.asarray(0, jnp.int32), decode=True)
  return out.logits, generation.stats_array(out.stats)


def _run_model(model):
  result = generation.generate(model, PROMPTS, max_new_tokens=NEW_TOKENS)
  tokens = np.zeros((len(PROMPTS), 4 + NEW_TOKENS), np.int32)
  valid = np.zeros(tokens.shape, bool)
  for i, (prompt, new) in enumerate(zip(PROMPTS, result.tokens)):
    seq = prompt + new
    tokens[i, -len(seq):], valid[i, -len(seq):] = seq, True
  logits, stats = _run_fast(_teacher_forced_logits, model, jnp.asarray(tokens),
                            jnp.asarray(valid))
  return result, np.asarray(logits), np.asarray(stats)


@pytest.mark.parametrize("n", [2, 4, 8])
def test_generation_on_mesh_matches_one_device(n):
  specs = _layer_specs(n)
  want, want_logits, want_stats = _run_model(_model(specs))
  model = _model(specs, _mesh(n))
  gate_up = moe.moe_blocks(model)[0].w_gate_up[...]
  # Experts split over the axis where it divides their count, else replicated.
  assert gate_up.sharding.spec == (P("expert") if HF_EP["num_local_experts"] % n == 0
                                   else P())
  assert model.embed[...].sharding.mesh.shape == {"expert": n}
  got, got_logits, got_stats = _run_model(model)

  assert got.tokens == want.tokens
  assert got.finish_reason == want.finish_reason == ["length"] * len(PROMPTS)
  assert got.decode_stats.shape == (NEW_TOKENS - 1, 3, 5)
  np.testing.assert_allclose(got_logits, want_logits, rtol=1e-5, atol=1e-5)
  # The routing counts agree; the per-device count is over n devices on the mesh.
  np.testing.assert_array_equal(got.decode_stats[..., :4], want.decode_stats[..., :4])
  np.testing.assert_array_equal(got.prefill_stats[:, :4], want.prefill_stats[:, :4])
  np.testing.assert_array_equal(got_stats[:, :4], want_stats[:, :4])
  assert np.all(got.prefill_stats[:, 4] < got.prefill_stats[:, 1])  # on n devices
  for layer, spec in enumerate(specs):
    got_layer, want_layer = got.decode_stats[:, layer], want.decode_stats[:, layer]
    assert np.all(got_layer[:, 4] <= got_layer[:, 1])
    if spec.startswith("sere_ep"):  # placed on n devices on one device too
      np.testing.assert_array_equal(got_layer, want_layer)
    else:
      assert np.any(got_layer[:, 4] < got_layer[:, 1]), spec
      np.testing.assert_array_equal(want_layer[:, 4], want_layer[:, 1])
    rerouted = got_layer[:, 3]
    assert np.all(rerouted == 0) if spec == "none" else np.any(rerouted > 0), spec


# ---------------------------------------------------------------------------
# Bad meshes and placements


def _shape_only_block(num_experts=BLK_E, config=RerouteConfig("none"), **kwargs):
  return nnx.eval_shape(lambda: moe.MoeBlock(BLK_D, BLK_F, num_experts, BLK_K,
                                             reroute=config, rngs=nnx.Rngs(0), **kwargs))


def test_bad_mesh_or_placement_is_rejected(block_inputs):
  x_step, valid_step = block_inputs[:2]
  # A mesh without the expert axis.
  with pytest.raises(ValueError, match=r"mesh has axes \('data',\), not the expert axis "
                                       "'expert'"):
    moe.set_expert_parallel(_shape_only_block(), _mesh(4, "data"))
  with pytest.raises(ValueError, match="not the expert axis 'experts'"):
    moe.set_expert_parallel(_shape_only_block(), _mesh(4), axis="experts")
  with pytest.raises(ValueError, match="not the expert axis 'expert'"):
    _shape_only_block(mesh=_mesh(2, "data"))
  # More devices than experts.
  with pytest.raises(ValueError, match="8 expert-parallel devices for 6 experts"):
    moe.set_expert_parallel(_shape_only_block(6), _mesh(8))
  with pytest.raises(ValueError, match="8 expert-parallel devices for 6 experts"):
    _shape_only_block(6, mesh=_mesh(8))
  with pytest.raises(ValueError, match="12 expert-parallel devices for 10 experts"):
    _shape_only_block(config=RerouteConfig("sere", select_top_k=1, expert_devices=12))
  # A config placed on 4 devices with an 8-device mesh: rejected before any change.
  dev4 = RerouteConfig("sere", select_top_k=1, threshold=0.5, expert_devices=4)
  block = _shape_only_block(config=dev4)
  with pytest.raises(ValueError, match="policy 'sere' places the experts on 4 devices, "
                                       "but the expert axis 'expert' has 8"):
    moe.set_expert_parallel(block, _mesh(8))
  assert block.mesh is None
  moe.set_expert_parallel(block, _mesh(4))  # the matching count is fine
  assert block.active_config(True).expert_devices == 4
  # ... and set on a block that is on a mesh already: its next call fails.
  block = _make_block(RerouteConfig("sere_ep", select_top_k=1, expert_devices=8))
  moe.set_expert_parallel(block, _mesh(8))
  moe.set_reroute(block, dataclasses.replace(block.reroute, expert_devices=4))
  with pytest.raises(ValueError, match="policy 'sere_ep' places the experts on 4 devices, "
                                       "but the expert axis 'expert' has 8"):
    block(x_step, valid_step, decode=True)
