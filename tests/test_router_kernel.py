"""The softmax top-K router op (`sere_jax.kernels.router`): every kernel backend that
runs here (interpret mode on a CPU) against `routing.route`, and the Triton kernel's
CUDA lowering."""

from __future__ import annotations

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sere_jax import moe
from sere_jax import routing
from sere_jax.kernels import router as router_op
from sere_jax.kernels.lowering_check import export_for
from sere_jax.kernels.router import reference as router_reference
from sere_jax.kernels.router.triton import route_triton
from tests import kernel_backends

_TRITON_CALL = "__gpu$xla.gpu.triton"


@pytest.mark.parametrize("tokens,experts,top_k,normalize", [
    (5, 8, 2, False),      # one block, fewer tokens than it holds
    (37, 60, 4, True),     # three blocks, a partial one; E not a power of two (Qwen1.5)
    (16, 128, 8, True),    # Qwen3-30B-A3B decode at B = 16
    (3, 16, 16, False),    # K = E: every expert, in score order
])
@kernel_backends.over_implementations(router_op.REGISTRY)
def test_router_matches_reference(tokens, experts, top_k, normalize, implementation):
  rng = np.random.default_rng(tokens * experts + top_k)
  logits = jnp.asarray(rng.normal(size=(tokens, experts)) * 3, jnp.float32)
  ids, weights = router_op.route(logits, top_k, normalize=normalize,
                                 implementation=implementation)
  want_ids, want_weights = routing.route(logits, top_k, normalize=normalize)
  assert ids.dtype == jnp.int32 and weights.dtype == jnp.float32
  np.testing.assert_array_equal(np.asarray(ids), np.asarray(want_ids))
  np.testing.assert_allclose(np.asarray(weights), np.asarray(want_weights),
                             rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("partials,tokens,experts,top_k", [
    (1, 5, 8, 2), (4, 16, 128, 8), (32, 3, 60, 4)])
@kernel_backends.over_implementations(router_op.REGISTRY)
def test_router_sums_split_k_partials(partials, tokens, experts, top_k, implementation):
  # Integer partials: exact sums in any order, and ties among the summed logits.
  rng = np.random.default_rng(partials * tokens + experts)
  parts = jnp.asarray(rng.integers(-2, 3, (partials, tokens, experts)), jnp.float32)
  ids, weights = router_op.route(parts, top_k, normalize=True,
                                 implementation=implementation)
  want_ids, want_weights = routing.route(parts.sum(0), top_k, normalize=True)
  np.testing.assert_array_equal(np.asarray(ids), np.asarray(want_ids))
  np.testing.assert_allclose(np.asarray(weights), np.asarray(want_weights),
                             rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("partials", [1, 3])
def test_summed_logits_is_two_dimensional(partials):
  parts = jnp.arange(partials * 4 * 6, dtype=jnp.float32).reshape(partials, 4, 6)
  summed = router_reference.summed_logits(parts)
  assert summed.shape == (4, 6)
  np.testing.assert_array_equal(np.asarray(summed), np.asarray(parts.sum(0)))
  assert router_reference.summed_logits(summed) is summed


@pytest.mark.parametrize("impl", ["interpret", "xla_dense"])
def test_softmax_router_scores_are_two_dimensional(impl):
  """The scores the router hands back (for `oea`) are `[T, E]` whether or not the block
  computes split-K partials for the fused top-K kernel, also with one partial."""
  block = moe.MoeBlock(16, 8, 6, 2, impl=impl, rngs=nnx.Rngs(0))
  assert block.router_sums_partials == (impl == "interpret")
  logits = jnp.ones((1, 5, 6), jnp.float32)  # one partial
  ids, weights, scores = block.route(logits if block.router_sums_partials else logits[0])
  assert ids.shape == weights.shape == (5, 2) and scores.shape == (5, 6)


@kernel_backends.over_implementations(router_op.REGISTRY)
def test_router_breaks_ties_towards_the_lower_expert(implementation):
  # Integer logits in {0, 1, 2}: many exact ties, resolved as lax.top_k does.
  logits = jnp.asarray(np.random.default_rng(1).integers(0, 3, (20, 16)), jnp.float32)
  ids, weights = router_op.route(logits, 5, implementation=implementation)
  want_ids, want_weights = routing.route(logits, 5)
  np.testing.assert_array_equal(np.asarray(ids), np.asarray(want_ids))
  np.testing.assert_allclose(np.asarray(weights), np.asarray(want_weights), rtol=1e-6)


@pytest.mark.parametrize("block_t", [1, 4, 8, 16])
@pytest.mark.parametrize("experts,top_k,dtype,normalize", [
    (60, 8, jnp.float32, True),     # E not a power of two, ties at the K-th place
    (12, 12, jnp.bfloat16, False),  # K = E, bf16
])
@kernel_backends.over_implementations(router_op.REGISTRY)
def test_router_block_sizes_with_ties(block_t, experts, top_k, dtype, normalize,
                                      implementation):
  # block_t + 3 tokens: a partial last block (but for block_t = 1). Logits on a coarse
  # grid of 8 values, exact in bf16: ties at every place; row 0 is all one value.
  tokens = block_t + 3
  levels = np.random.default_rng(block_t + experts).integers(0, 8, (tokens, experts))
  levels[0] = 3
  logits = jnp.asarray(levels * 0.5 - 2, dtype)
  if top_k < experts:
    ordered = -np.sort(-levels, axis=1)
    assert np.any(ordered[1:, top_k - 1] == ordered[1:, top_k])  # a tie across the cut
  ids, weights = router_op.route(logits, top_k, normalize=normalize, block_t=block_t,
                                 implementation=implementation)
  want_ids, want_weights = routing.route(logits, top_k, normalize=normalize)
  np.testing.assert_array_equal(np.asarray(ids), np.asarray(want_ids))
  np.testing.assert_allclose(np.asarray(weights), np.asarray(want_weights),
                             rtol=1e-6, atol=1e-7)


@kernel_backends.over_implementations(router_op.REGISTRY)
def test_router_takes_bf16_logits(implementation):
  logits = jnp.asarray(np.random.default_rng(2).normal(size=(9, 32)), jnp.bfloat16)
  ids, weights = router_op.route(logits, 3, normalize=True, implementation=implementation)
  want_ids, want_weights = routing.route(logits, 3, normalize=True)
  np.testing.assert_array_equal(np.asarray(ids), np.asarray(want_ids))
  np.testing.assert_allclose(np.asarray(weights), np.asarray(want_weights), rtol=1e-6)


def test_softmax_router_uses_the_kernel_for_triton_impls():
  logits = jnp.asarray(np.random.default_rng(3).normal(size=(6, 16)), jnp.float32)
  jaxpr = str(jax.make_jaxpr(moe.softmax_router(4, True, "interpret"))(logits))
  assert "sere_router" in jaxpr
  assert "sere_router" not in str(jax.make_jaxpr(moe.softmax_router(4, True,
                                                                    "xla_dense"))(logits))
  ids, weights, scores = moe.softmax_router(4, True, "interpret")(logits)
  want_ids, want_weights = routing.route(logits, 4, normalize=True)
  np.testing.assert_array_equal(np.asarray(ids), np.asarray(want_ids))
  np.testing.assert_allclose(np.asarray(weights), np.asarray(want_weights), rtol=1e-6)
  np.testing.assert_allclose(np.asarray(scores), np.asarray(jax.nn.softmax(logits)),
                             rtol=1e-6)


@pytest.mark.parametrize("args,match", [
    ((jnp.zeros((4,)), 2), r"\[T, E\]"),
    ((jnp.zeros((2, 4, 8), jnp.bfloat16), 2), r"float32 \[P, T, E\] partials"),
    ((jnp.zeros((1, 2, 4, 8)), 2), r"\[T, E\] logits or"),
    ((jnp.zeros((4, 8)), 9), "top_k must be in"),
    ((jnp.zeros((4, 8)), 0), "top_k must be in"),
])
def test_router_rejects_bad_input(args, match):
  with pytest.raises(ValueError, match=match):
    route_triton(*args, interpret=True)


@pytest.mark.parametrize("block_t", [0, 3, 12])
def test_router_rejects_block_t_not_a_power_of_two(block_t):
  with pytest.raises(ValueError, match="block_t must be a power of two"):
    route_triton(jnp.zeros((4, 8)), 2, block_t=block_t, interpret=True)


@pytest.mark.parametrize("tokens", [1, 16, 256])
def test_router_lowers_for_cuda(tokens):
  exported = export_for("cuda", lambda lg: route_triton(lg, 8, normalize=True),
                        jax.ShapeDtypeStruct((tokens, 128), jnp.float32))
  assert _TRITON_CALL in exported.mlir_module()
  assert [a.shape for a in exported.out_avals] == [(tokens, 8), (tokens, 8)]


def test_router_lowers_split_k_partials_for_cuda():
  exported = export_for("cuda", lambda lg: route_triton(lg, 8, normalize=True),
                        jax.ShapeDtypeStruct((32, 16, 128), jnp.float32))
  assert _TRITON_CALL in exported.mlir_module()
  assert [a.shape for a in exported.out_avals] == [(16, 8), (16, 8)]


@pytest.mark.parametrize("block_t", [1, 2, 4, 8])
@pytest.mark.parametrize("num_warps", [2, 8])
def test_router_small_blocks_lower_for_cuda(block_t, num_warps):
  exported = export_for(
      "cuda", lambda lg: route_triton(lg, 8, normalize=True, block_t=block_t,
                                      num_warps=num_warps),
      jax.ShapeDtypeStruct((13, 60), jnp.bfloat16))
  assert _TRITON_CALL in exported.mlir_module()
  assert [a.shape for a in exported.out_avals] == [(13, 8), (13, 8)]
