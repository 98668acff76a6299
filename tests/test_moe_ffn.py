"""The MoE FFN op: implementations agree with each other and with a NumPy FFN."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sere_jax import policies
from sere_jax.config import RerouteConfig
from sere_jax.kernels.moe_ffn import REGISTRY, moe_ffn, resolve_impl
from tests import kernel_backends

T, K, E, D, F = 8, 4, 8, 24, 20  # 32 rows; D and F are not powers of two
KERNELS = kernel_backends.implementations(REGISTRY)  # those that run here
F32_TOLERANCE = kernel_backends.f32_tolerance(rtol=1e-5, atol=1e-5,
                                              tf32=kernel_backends.TF32_UNIT_TOLERANCE)

CONFIGS = {
    "none": RerouteConfig(policy="none"),
    "sere_rho0": RerouteConfig(policy="sere", select_top_k=2, threshold=0.0),
    "sere_rho05": RerouteConfig(policy="sere", select_top_k=2, threshold=0.5),
    "topk_truncate": RerouteConfig(policy="topk_truncate", select_top_k=2),
    "oea": RerouteConfig(policy="oea", select_top_k=2),
    "random": RerouteConfig(policy="random", select_top_k=2, seed=3),
}


@functools.lru_cache(maxsize=None)
def _problem(dtype=jnp.float32, seed=0):
  """x, routing (top-K of a softmax router, 2 invalid tokens), weights, similarity."""
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(T, D)).astype(np.float32)
  w_gate_up = (rng.normal(size=(E, D, 2 * F)) / np.sqrt(D)).astype(np.float32)
  w_down = (rng.normal(size=(E, F, D)) / np.sqrt(F)).astype(np.float32)
  logits = rng.normal(size=(T, E)) * 2
  scores = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
  ids = np.argsort(-scores, axis=1)[:, :K].astype(np.int32)
  weights = np.take_along_axis(scores, ids, axis=1).astype(np.float32)
  valid = np.ones(T, bool)
  valid[[2, 5]] = False
  sim = rng.integers(0, 5, (E, E)).astype(np.float32) / 4  # ties, values equal to rho
  np.fill_diagonal(sim, 1.0)
  return dict(x=x.astype(dtype), ids=ids, weights=weights,
              w_gate_up=w_gate_up.astype(dtype), w_down=w_down.astype(dtype),
              valid=valid, similarity=sim, router_scores=scores.astype(np.float32))


def _run(problem, config, impl):
  """The op's output, awaited: the interpret modes' host callbacks run JAX ops, and one
  still running while this thread dispatches the next implementation's inputs can
  deadlock JAX's CPU client."""
  p = {k: jnp.asarray(v) for k, v in problem.items()}
  return jax.block_until_ready(moe_ffn(p["x"], p["ids"], p["weights"], p["w_gate_up"], p["w_down"],
                 valid=p["valid"], similarity=p["similarity"], config=config,
                 router_scores=p["router_scores"], impl=impl))


def _numpy_ffn(problem, ids, weights):
  """Independent float64 FFN: sum_j w[t, j] * (silu(x Wg) * (x Wu)) Wd of valid tokens."""
  x = np.asarray(problem["x"], np.float64)
  wgu = np.asarray(problem["w_gate_up"], np.float64)
  wd = np.asarray(problem["w_down"], np.float64)
  y = np.zeros_like(x)
  for t in range(T):
    if not problem["valid"][t]:
      continue
    for j in range(K):
      e = int(ids[t, j])
      gate, up = x[t] @ wgu[e, :, :F], x[t] @ wgu[e, :, F:]
      y[t] += float(weights[t, j]) * ((gate / (1 + np.exp(-gate)) * up) @ wd[e])
  return y


@pytest.mark.parametrize("policy", CONFIGS)
def test_impls_agree(policy):
  problem, config = _problem(), CONFIGS[policy]
  valid = problem["valid"]
  outs = {impl: _run(problem, config, impl)
          for impl in ("xla_dense", "ragged_dot", *KERNELS)}
  want = outs["xla_dense"]
  # The reference routing of every impl is `policies.reroute`.
  ref_ids, ref_w, ref_stats = policies.reroute(
      jnp.asarray(problem["ids"]), jnp.asarray(problem["weights"]), jnp.asarray(valid),
      jnp.asarray(problem["similarity"]), config, num_experts=E,
      router_scores=jnp.asarray(problem["router_scores"]))
  if config.is_active(K):  # the test is about a real re-routing
    assert np.any(np.asarray(ref_ids)[valid] != problem["ids"][valid]) or np.any(
        np.asarray(ref_w)[valid] != problem["weights"][valid]), policy
  assert np.any(np.asarray(want.y)[valid] != 0)
  for impl, out in outs.items():
    assert out.y.shape == (T, D) and out.y.dtype == jnp.float32, impl
    y = np.asarray(out.y)
    np.testing.assert_array_equal(y[~valid], 0.0, err_msg=impl)
    np.testing.assert_allclose(y, np.asarray(want.y), err_msg=impl, **F32_TOLERANCE)
    np.testing.assert_array_equal(np.asarray(out.ids)[valid], np.asarray(ref_ids)[valid],
                                  err_msg=impl)
    np.testing.assert_array_equal(np.asarray(out.weights)[valid],
                                  np.asarray(ref_w)[valid], err_msg=impl)
    for name, got, ref in zip(policies.RerouteStats._fields, out.stats, ref_stats):
      assert int(got) == int(ref), (impl, name, int(got), int(ref))


@pytest.mark.parametrize("policy", ["none", "sere_rho05"])
@pytest.mark.parametrize("impl", ["xla_dense", *KERNELS])
def test_matches_numpy_ffn(policy, impl):
  problem = _problem()
  out = _run(problem, CONFIGS[policy], impl)
  ids, weights = np.asarray(out.ids), np.asarray(out.weights)
  if policy == "none":
    np.testing.assert_array_equal(ids, problem["ids"])
    np.testing.assert_array_equal(weights, problem["weights"])
  want = _numpy_ffn(problem, ids, weights)
  assert np.abs(want).max() > 0.1
  np.testing.assert_allclose(np.asarray(out.y), want, **F32_TOLERANCE)


def test_bf16_output_dtype_and_agreement():
  problem = _problem(jnp.bfloat16)
  config = CONFIGS["sere_rho0"]
  want = _run(problem, config, "xla_dense")
  got = _run(problem, config, "interpret")
  assert want.y.dtype == got.y.dtype == jnp.bfloat16
  y, ref = np.asarray(got.y, np.float32), np.asarray(want.y, np.float32)
  valid = problem["valid"]
  np.testing.assert_array_equal(y[~valid], 0.0)
  assert np.all(np.isfinite(y))
  np.testing.assert_allclose(y, ref, rtol=2e-2, atol=2e-2 * np.abs(ref).max())
  # ...and both are close to the float64 FFN of the bf16 inputs.
  ffn = _numpy_ffn(problem, np.asarray(want.ids), np.asarray(want.weights))
  np.testing.assert_allclose(y, ffn, rtol=5e-2, atol=3e-2 * np.abs(ffn).max())


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="a CPU-only check")
def test_default_impl_on_cpu_is_interpret():
  assert resolve_impl("auto") == "interpret"
  for impl in ("triton", "tpu", "interpret", "xla_dense", "ragged_dot"):
    assert resolve_impl(impl) == impl
  problem = _problem()
  auto = _run(problem, CONFIGS["none"], "auto")
  np.testing.assert_array_equal(np.asarray(auto.y),
                                np.asarray(_run(problem, CONFIGS["none"], "interpret").y))


def test_all_tokens_invalid_gives_zeros():
  problem = dict(_problem(), valid=np.zeros(T, bool))
  for impl in ("xla_dense", "ragged_dot", *KERNELS):
    out = _run(problem, CONFIGS["sere_rho05"], impl)
    np.testing.assert_array_equal(np.asarray(out.y), 0.0, err_msg=impl)
    assert [int(s) for s in out.stats] == [0, 0, 0, 0, 0, 0], impl


def _bad(**changes):
  p = {k: jnp.asarray(v) for k, v in _problem().items()}
  p.update(changes)
  return moe_ffn(p["x"], p["ids"], p["weights"], p["w_gate_up"], p["w_down"],
                 impl=p.get("impl", "xla_dense"))


def test_rejects_bad_inputs():
  x = jnp.zeros((T, D))
  with pytest.raises(ValueError, match=r"x must be \[T, D\]"):
    _bad(x=x[None])
  with pytest.raises(ValueError, match="w_gate_up shape"):  # D mismatch
    _bad(w_gate_up=jnp.zeros((E, D + 1, 2 * F)))
  with pytest.raises(ValueError, match="w_gate_up shape"):  # odd 2F
    _bad(w_gate_up=jnp.zeros((E, D, 2 * F + 1)))
  with pytest.raises(ValueError, match="w_gate_up must be"):  # rank
    _bad(w_gate_up=jnp.zeros((D, 2 * F)))
  with pytest.raises(ValueError, match="w_down must be"):  # F mismatch
    _bad(w_down=jnp.zeros((E, F + 1, D)))
  with pytest.raises(ValueError, match="w_down must be"):  # E mismatch
    _bad(w_down=jnp.zeros((E - 1, F, D)))
  with pytest.raises(ValueError, match="impl must be one of"):
    _bad(impl="cuda")
  with pytest.raises(ValueError, match="impl must be one of"):
    resolve_impl("gpu")


def test_implementation_is_an_alias_of_impl():
  problem = _problem()
  p = {k: jnp.asarray(v) for k, v in problem.items()}
  args = (p["x"], p["ids"], p["weights"], p["w_gate_up"], p["w_down"])
  want = moe_ffn(*args, valid=p["valid"], impl="ragged_dot")
  got = moe_ffn(*args, valid=p["valid"], implementation="ragged_dot")
  np.testing.assert_array_equal(np.asarray(got.y), np.asarray(want.y))
  with pytest.raises(ValueError, match="disagree"):
    moe_ffn(*args, impl="xla_dense", implementation="ragged_dot")


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="a CPU-only check")
@pytest.mark.parametrize("impl", ["triton", "tpu"])
def test_device_backend_off_its_device_raises(impl):
  p = {k: jnp.asarray(v) for k, v in _problem().items()}
  with pytest.raises(ValueError, match=rf"moe_ffn: impl '{impl}' runs only on "
                                       rf"{'gpu' if impl == 'triton' else 'tpu'} devices, "
                                       "not on this 'cpu' device"):
    moe_ffn(p["x"], p["ids"], p["weights"], p["w_gate_up"], p["w_down"], impl=impl)
