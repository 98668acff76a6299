"""Bad inputs are caught on every MoE path, with errors that name the problem.

Eager calls raise ValueError; inside `jit` a NaN similarity is flagged
(`RerouteStats.invalid_similarity`, and a checkify error for checkified callers) and
routed as `sere_jax.validation` documents, never silently. Every `moe_ffn`
implementation that runs here and `MoeBlock` (`interpret`, `xla_dense`) are covered,
and so are the model-level checks: a layer whose config cannot re-route, and the prompt
length against `max_position_embeddings`.
"""

from __future__ import annotations

import functools

from flax import nnx
import jax
from jax.experimental import checkify
import jax.numpy as jnp
import numpy as np
import pytest

from sere_jax import RerouteConfig, generation, moe, reroute
from sere_jax.kernels.moe_ffn import REGISTRY, kernel_schedule, moe_ffn
from sere_jax.kernels.schedule import REGISTRY as SCHEDULE
from sere_jax.models import qwen_moe
from tests import kernel_backends
from tests.random_models import HF_QWEN3, random_qwen


T, K, E, D, F = 6, 4, 16, 16, 8
FFN_IMPLS = ("xla_dense", "ragged_dot", *kernel_backends.implementations(REGISTRY))
BLOCK_IMPLS = ("interpret", "xla_dense")
CONFIGS = {
    "sere": RerouteConfig("sere", select_top_k=1, threshold=0.25),
    "sere_hybrid": RerouteConfig("sere_hybrid", select_top_k=1, threshold=0.25),
    "expert_pool": RerouteConfig("expert_pool", pool_size=3),
}
LOWEST = np.finfo(np.float32).min


def _similarity(nan_at=None) -> np.ndarray:
  sim = (np.random.default_rng(1).integers(0, 5, (E, E)) / 4).astype(np.float32)
  np.fill_diagonal(sim, 1.0)
  if nan_at is not None:
    sim[nan_at] = np.nan
  return sim


@functools.lru_cache(maxsize=None)
def _problem() -> dict[str, np.ndarray]:
  rng = np.random.default_rng(0)
  scores = rng.dirichlet(np.ones(E), T).astype(np.float32)
  ids = np.argsort(-scores, axis=1)[:, :K].astype(np.int32)
  return dict(x=rng.normal(size=(T, D)).astype(np.float32), ids=ids,
              weights=np.take_along_axis(scores, ids, axis=1), valid=np.ones(T, bool),
              w_gate_up=(rng.normal(size=(E, D, 2 * F)) / 4).astype(np.float32),
              w_down=(rng.normal(size=(E, F, D)) / 3).astype(np.float32),
              router_scores=scores, similarity=_similarity())


def _ffn(impl, config=CONFIGS["sere"], **change):
  p = {**_problem(), **change}
  return moe_ffn(jnp.asarray(p["x"]), p["ids"], p["weights"], p["w_gate_up"], p["w_down"],
                 valid=p["valid"], similarity=p["similarity"], config=config,
                 router_scores=p["router_scores"], impl=impl)


# ---------------------------------------------------------------- moe_ffn, eager

BAD_SIMILARITY = {
    "nan": (_similarity(nan_at=(3, 5)), r"non-finite values \(NaN"),
    "inf": (np.where(np.eye(E, dtype=bool), np.inf, _similarity()), "non-finite"),
    "uncalibrated": (np.full((E, E), np.nan, np.float32), "calibrated similarity"),
    "too_many_experts": (np.eye(E + 1, dtype=np.float32), "17x17 but the layer has 16"),
    "not_square": (np.ones((E, E + 1), np.float32), r"square \[E, E\]"),
    "vector": (np.ones(E, np.float32), r"square \[E, E\]"),
    "missing": (None, "needs a similarity matrix"),
}


@pytest.mark.parametrize("bad", BAD_SIMILARITY)
@pytest.mark.parametrize("policy", CONFIGS)
@pytest.mark.parametrize("impl", FFN_IMPLS)
def test_moe_ffn_rejects_bad_similarity(impl, policy, bad):
  similarity, message = BAD_SIMILARITY[bad]
  with pytest.raises(ValueError, match=message):
    _ffn(impl, CONFIGS[policy], similarity=similarity)


BAD_FFN_INPUTS = {
    "hidden_size": (dict(x=np.ones((T, D + 1), np.float32)), "hidden size D=17"),
    "x_rank": (dict(x=np.ones((1, T, D), np.float32)), r"x must be \[T, D\]"),
    "batch": (dict(ids=np.zeros((T + 1, K), np.int32), weights=np.ones((T + 1, K)),
                   valid=np.ones(T + 1, bool)), "batch of 7 tokens but x holds 6"),
    "valid": (dict(valid=np.ones(T + 1, bool)), r"valid must be \[T\]"),
    "weights": (dict(weights=np.ones((T, K - 1), np.float32)), "weights shape"),
    "id_too_big": (dict(ids=np.full((T, K), E, np.int32)), r"ids must lie in \[0, 16\)"),
    "id_negative": (dict(ids=np.full((T, K), -1, np.int32)), r"ids must lie in \[0, 16\)"),
    "float_ids": (dict(ids=np.zeros((T, K), np.float32)), "ids must be integers"),
}


@pytest.mark.parametrize("bad", BAD_FFN_INPUTS)
@pytest.mark.parametrize("impl", FFN_IMPLS)
def test_moe_ffn_rejects_bad_inputs(impl, bad):
  change, message = BAD_FFN_INPUTS[bad]
  with pytest.raises(ValueError, match=message):
    _ffn(impl, **change)


@pytest.mark.parametrize("impl", ("xla_dense", "ragged_dot"))
def test_select_top_k_of_k_stays_a_no_op_in_the_op(impl):
  # As in the paper: S <= 0 or S >= K changes nothing (the similarity is not read).
  out = _ffn(impl, RerouteConfig("sere", select_top_k=K), similarity=None)
  np.testing.assert_array_equal(out.ids, _problem()["ids"])
  assert int(out.stats.slots_rerouted) == 0


@pytest.mark.parametrize("implementation", kernel_backends.implementations(SCHEDULE))
def test_select_top_k_zero_stays_a_no_op_in_the_kernels(implementation):
  p = _problem()
  sched = kernel_schedule(implementation, jnp.asarray(p["ids"]), jnp.asarray(p["valid"]),
                          None, RerouteConfig("sere", select_top_k=0), E)
  np.testing.assert_array_equal(sched.ids, p["ids"])
  assert int(sched.stats[3]) == 0  # slots re-routed


# ---------------------------------------------------------------- moe_ffn, under jit

# Every similarity to a primary expert NaN: read as it is, argmax would pick that one.
NAN_SIM = _similarity(nan_at=(slice(None), int(_problem()["ids"][0, 0])))


@functools.lru_cache(maxsize=None)
def _jitted_ffn(impl: str, policy: str, checked: bool):
  fn = jax.jit(lambda sim: _ffn(impl, CONFIGS[policy], similarity=sim))
  return checkify.checkify(fn) if checked else fn


# `sere` runs in each impl's own schedule; the other policies re-route in
# `sere_jax.reroute` whatever the impl.
JIT_CASES = [(impl, "sere") for impl in FFN_IMPLS] + [
    (impl, policy) for impl in ("xla_dense", "interpret")
    for policy in ("sere_hybrid", "expert_pool")]


@pytest.mark.parametrize("impl,policy", JIT_CASES)
def test_nan_similarity_under_jit_is_flagged(impl, policy):
  fn = _jitted_ffn(impl, policy, checked=False)
  assert int(fn(_similarity()).stats.invalid_similarity) == 0
  out = fn(NAN_SIM)
  assert int(out.stats.invalid_similarity) == 1
  # Documented routing: a non-finite entry counts as the least similar value.
  want = fn(np.where(np.isnan(NAN_SIM), LOWEST, NAN_SIM))
  assert int(want.stats.invalid_similarity) == 0
  np.testing.assert_array_equal(out.ids, want.ids)
  np.testing.assert_array_equal(out.y, want.y)


@pytest.mark.parametrize("impl", ("xla_dense", "interpret"))
def test_nan_similarity_under_jit_is_a_checkify_error(impl):
  err, out = _jitted_ffn(impl, "sere", checked=True)(NAN_SIM)
  with pytest.raises(checkify.JaxRuntimeError, match="similarity holds non-finite"):
    err.throw()
  assert int(out.stats.invalid_similarity) == 1
  err, _ = _jitted_ffn(impl, "sere", checked=True)(_similarity())
  err.throw()  # a finite similarity passes


def test_reroute_under_jit_flags_inf_and_checkify_sees_bad_ids():
  p, config = _problem(), CONFIGS["sere"]
  fn = jax.jit(lambda ids, sim: reroute(ids, p["weights"], p["valid"], sim, config))
  inf_sim = np.where(np.eye(E, dtype=bool), _similarity(), -np.inf).astype(np.float32)
  assert int(fn(p["ids"], inf_sim)[2].invalid_similarity) == 1
  err, _ = checkify.checkify(fn)(np.full((T, K), E, np.int32), _similarity())
  with pytest.raises(checkify.JaxRuntimeError, match=r"ids must lie in \[0, 16\)"):
    err.throw()


# ---------------------------------------------------------------- MoeBlock


def _block(impl, config=CONFIGS["sere"], top_k=K, similarity=_similarity()):
  block = moe.MoeBlock(D, F, E, top_k, reroute=config, impl=impl, rngs=nnx.Rngs(0))
  if similarity is not None:
    block.similarity[...] = jnp.asarray(similarity)
  return block


X, VALID = jnp.asarray(_problem()["x"]), jnp.ones(T, bool)


@pytest.mark.parametrize("bad", ["nan", "inf", "uncalibrated", "too_many_experts"])
@pytest.mark.parametrize("impl", BLOCK_IMPLS)
def test_block_rejects_bad_similarity(impl, bad):
  similarity, message = BAD_SIMILARITY[bad]
  block = _block(impl)
  block.similarity.set_value(jnp.asarray(similarity))
  with pytest.raises(ValueError, match=message):
    block(X, VALID, decode=True)
  with pytest.raises(ValueError, match=message):  # per position of [B, L, D]
    block(X.reshape(2, 3, D), VALID.reshape(2, 3), decode=True)


@pytest.mark.parametrize("impl", BLOCK_IMPLS)
def test_block_default_similarity_is_uncalibrated(impl):
  with pytest.raises(ValueError, match="calibrated similarity"):
    _block(impl, similarity=None)(X, VALID, decode=True)
  moe.check_calibrated(_block(impl))  # a calibrated one passes
  with pytest.raises(ValueError, match="MoE layer 0: policy 'sere'.*calibrated"):
    moe.check_calibrated(_block(impl, similarity=None))


@pytest.mark.parametrize("impl", BLOCK_IMPLS)
def test_block_rejects_bad_inputs(impl):
  block = _block(impl)
  with pytest.raises(ValueError, match="hidden size D=17 but the block has D=16"):
    block(jnp.ones((T, D + 1)), VALID, decode=True)
  with pytest.raises(ValueError, match="valid must have shape"):
    block(X, jnp.ones(T + 1, bool), decode=True)
  with pytest.raises(ValueError, match=r"x must be \[T, D\] or \[B, L, D\]"):
    block(X.reshape(1, 2, 3, D), VALID.reshape(1, 2, 3), decode=True)


@pytest.mark.parametrize("impl", BLOCK_IMPLS)
def test_block_flags_nan_similarity_under_jit(impl):
  block = _block(impl, similarity=NAN_SIM)
  graphdef, state = nnx.split(block)

  @jax.jit
  def stats(state, x, valid):
    return nnx.merge(graphdef, state)(x, valid, decode=True)[1]

  assert int(stats(state, X, VALID).invalid_similarity) == 1
  steps = stats(state, X.reshape(2, 3, D), VALID.reshape(2, 3))  # [L, G] per position
  np.testing.assert_array_equal(steps.invalid_similarity, np.ones((3, 1)))
  err, out = checkify.checkify(stats)(state, X, VALID)
  with pytest.raises(checkify.JaxRuntimeError, match="similarity holds non-finite"):
    err.throw()
  assert int(out.invalid_similarity) == 1


# ---------------------------------------------------------------- S, pool size per layer

S_POLICIES = ("sere", "sere_hybrid", "topk_truncate", "keep_active", "oea", "random",
              "oracle")
NO_OP_CONFIGS = [RerouteConfig(policy, select_top_k=s)
                 for policy in S_POLICIES for s in (0, K, K + 3)]


@pytest.mark.parametrize("config", NO_OP_CONFIGS,
                         ids=[f"{c.policy}-S{c.select_top_k}" for c in NO_OP_CONFIGS])
def test_block_rejects_select_top_k_that_cannot_reroute(config):
  message = (rf"policy '{config.policy}' needs 1 <= select_top_k < top_k, got "
             rf"select_top_k={config.select_top_k} with top_k={K}")
  with pytest.raises(ValueError, match=message):
    _block("xla_dense", config)


@pytest.mark.parametrize("impl", BLOCK_IMPLS)
def test_block_config_checked_on_every_way_in(impl):
  _block(impl, RerouteConfig("none", select_top_k=0))
  _block(impl, RerouteConfig("none", select_top_k=K + 1))
  _block(impl, RerouteConfig("expert_pool", pool_size=E))
  with pytest.raises(ValueError, match="pool_size=17, more than the layer's 16 experts"):
    _block(impl, RerouteConfig("expert_pool", pool_size=E + 1))
  block = _block(impl)
  with pytest.raises(ValueError, match="select_top_k=4 with top_k=4"):
    moe.set_reroute(block, RerouteConfig("sere", select_top_k=K))
  assert block.reroute == CONFIGS["sere"]  # unchanged
  block.reroute = RerouteConfig("topk_truncate", select_top_k=K)  # set directly
  with pytest.raises(ValueError, match="select_top_k=4 with top_k=4"):
    block(X, VALID, decode=True)


# ---------------------------------------------------------------- models


def test_model_rejects_select_top_k_of_its_top_k():
  # HF_QWEN3 routes each token to its top 3 experts.
  with pytest.raises(ValueError, match="select_top_k=3 with top_k=3"):
    random_qwen(HF_QWEN3, reroute=RerouteConfig("sere", select_top_k=3))


def test_qwen_config_reads_max_position_embeddings():
  assert qwen_moe.QwenMoeConfig.from_hf(HF_QWEN3).max_position_embeddings is None
  config = qwen_moe.QwenMoeConfig.from_hf({**HF_QWEN3, "max_position_embeddings": 32})
  assert config.max_position_embeddings == 32
  for bad in (0, -1, 2.5, True, "32"):
    with pytest.raises(ValueError, match="max_position_embeddings"):
      qwen_moe.QwenMoeConfig.from_hf({**HF_QWEN3, "max_position_embeddings": bad})


class _Compiled(Exception):
  """Raised instead of compiling the prefill: the checks before it passed."""


def test_generate_checks_prompt_length_before_compiling(monkeypatch):
  model = random_qwen({**HF_QWEN3, "max_position_embeddings": 12})

  def prefill(*args, **kwargs):
    raise _Compiled

  monkeypatch.setattr(generation, "model_step", prefill)
  prompts = [[1] * 8, [2] * 3]
  with pytest.raises(ValueError, match=r"longest prompt \(8 tokens\) \+ max_new_tokens "
                                       r"\(5\).*max_position_embeddings=12"):
    generation.generate(model, prompts, max_new_tokens=5)
  with pytest.raises(_Compiled):  # 8 + 4 tokens fit
    generation.generate(model, prompts, max_new_tokens=4)
