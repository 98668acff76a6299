"""Should this model be re-routed? A per-layer diagnosis from its own routing.

    report = diagnose(model, tokens, batch_size=16, select_top_k=(1, 2, 3),
                      threshold=0.0, tolerance=0.15)

Over `tokens [N, L]` (held-out text), every MoE layer's input is captured once under
top-K routing; the N sequences are then grouped into decode batches of `batch_size`
that re-route together at each position, as in decoding. Per layer and per S:

* `similarity`: the spread of the layer's stored expert similarity (off-diagonal);
* `distinct_none` / `distinct_sere`: mean distinct experts per batch under the model's
  own routing, before and after SERE at (S, rho);
* `substitute_share`: of the secondary slots whose expert is not a primary of the batch,
  the share whose best similarity to the primary set reaches rho (SERE moves them;
  the rest are critical and kept);
* `error_sere` / `error_oracle`: the layer output's relative error against top-K,
  `||y - y_topk|| / ||y_topk||` averaged over tokens, under SERE and under the
  per-token oracle (each secondary slot takes the primary whose output is nearest);
  `oracle_gap` is their difference, what a better similarity could still win.

`recommend` picks, per layer, the smallest S whose SERE error stays within `tolerance`,
or says not to re-route the layer. The default 0.15 comes from the quality study
(docs/results/README.md): on its upcycled model, SERE at S = 3 and B = 16 had per-layer
errors of 0.12-0.15 and cost +1.2 % perplexity; a layer error of 0.3 or more went with
perplexity losses of several percent.
"""

from __future__ import annotations

from typing import Any, Sequence

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from sere_jax import calibration
from sere_jax import moe
from sere_jax import policies
from sere_jax import similarity as similarity_lib
from sere_jax.config import RerouteConfig
from sere_jax.models import base as model_base


def _layer_batches(x: jax.Array, shape: tuple[int, int], batch_size: int) -> jax.Array:
  """`[N * L, D]` layer inputs -> `[L * N / B, B, D]` decode batches."""
  num, length = shape
  x = x.reshape(num // batch_size, batch_size, length, -1)
  return jnp.moveaxis(x, 2, 1).reshape(-1, batch_size, x.shape[-1])


def _combine(expert_out: jax.Array, ids: jax.Array, weights: jax.Array) -> jax.Array:
  picked = jnp.take_along_axis(expert_out, ids[..., None], axis=1)  # [T, K, D]
  return jnp.sum(picked * weights[..., None], axis=1)


def _one_batch(block: moe.MoeBlock, x: jax.Array, sim: jax.Array, select_top_k: int,
               threshold: float) -> dict[str, jax.Array]:
  """The measurements of one decode batch `x [B, D]` at one S."""
  logits = x.astype(jnp.float32) @ block.router_kernel[...].astype(jnp.float32)
  ids, weights, _ = block.route(logits)
  weights = weights.astype(jnp.float32)
  valid = jnp.ones(ids.shape[:1], jnp.bool_)
  out = block.expert_outputs(x)  # [B, E, D]
  config = RerouteConfig(policy="sere", select_top_k=select_top_k, threshold=threshold)
  sere_ids, _, stats = policies.reroute(ids, weights, valid, sim, config,
                                        num_experts=block.num_experts)
  is_primary = policies.primary_mask(ids, valid, select_top_k, block.num_experts)
  oracle = policies.oracle_ids(ids, valid, out, select_top_k)
  y0 = _combine(out, ids, weights)
  norm = jnp.linalg.norm(y0, axis=-1) + 1e-9

  def error(new_ids):
    return jnp.mean(jnp.linalg.norm(_combine(out, new_ids, weights) - y0, axis=-1) / norm)

  secondary = ids[:, select_top_k:]
  outside = ~is_primary[secondary]
  best = jnp.max(jnp.where(is_primary[None, :], sim, -jnp.inf), axis=1)[secondary]
  moved = outside & (best >= threshold)
  return {"distinct_none": stats.distinct_before, "distinct_sere": stats.distinct_after,
          "outside": jnp.sum(outside), "moved": jnp.sum(moved),
          "error_sere": error(sere_ids), "error_oracle": error(oracle)}


def diagnose(model: nnx.Module, tokens: np.ndarray, *, batch_size: int,
             select_top_k: Sequence[int], threshold: float = 0.0,
             tolerance: float = 0.15) -> dict[str, Any]:
  """The per-layer diagnosis (see the module docstring) as a JSON-ready dict."""
  tokens = np.asarray(tokens, np.int32)
  if tokens.ndim != 2 or tokens.shape[0] % batch_size:
    raise ValueError(f"tokens must be [N, L] with N a multiple of batch_size "
                     f"{batch_size}, got shape {tokens.shape}")
  blocks = moe.moe_blocks(model)
  if not blocks:
    raise ValueError("the model has no MoE layer")
  for s in select_top_k:
    if not 0 < s < blocks[0].top_k:
      raise ValueError(f"select_top_k {s} must be in [1, {blocks[0].top_k - 1}]")
  for index, block in enumerate(blocks):
    if not np.all(np.isfinite(np.asarray(block.similarity[...]))):
      raise ValueError(f"MoE layer {index} has no calibrated similarity (NaN); run "
                       "sere_jax.scripts.calibrate on the model first")
  graphdef, state = nnx.split(model)
  valid = jnp.ones(tokens.shape, jnp.bool_)
  captured = calibration.capture_moe_inputs(graphdef, state, jnp.asarray(tokens), valid,
                                            cache_dtype=model_base.param_dtype(model))
  layers = []
  for index, (block, (x, _)) in enumerate(zip(blocks, captured)):
    sim = jnp.asarray(block.similarity[...], jnp.float32)
    batches = _layer_batches(x, tokens.shape, batch_size)
    per_s = {}
    for s in select_top_k:
      fn = jax.jit(jax.vmap(lambda xb, s=s: _one_batch(block, xb, sim, s, threshold)))
      m = {k: np.asarray(v, np.float64) for k, v in fn(batches).items()}
      per_s[str(s)] = {
          "distinct_none": float(m["distinct_none"].mean()),
          "distinct_sere": float(m["distinct_sere"].mean()),
          "substitute_share": float(m["moved"].sum() / max(m["outside"].sum(), 1)),
          "error_sere": float(m["error_sere"].mean()),
          "error_oracle": float(m["error_oracle"].mean()),
          "oracle_gap": float(m["error_sere"].mean() - m["error_oracle"].mean())}
    layers.append({"layer": index, "similarity": similarity_lib.summary(block.similarity[...]),
                   "per_select_top_k": per_s,
                   "recommendation": recommend(per_s, threshold, tolerance)})
  return {"batch_size": batch_size, "threshold": threshold, "tolerance": tolerance,
          "tokens": list(tokens.shape), "layers": layers}


def recommend(per_s: dict[str, dict[str, float]], threshold: float,
              tolerance: float) -> dict[str, Any]:
  """The smallest S whose SERE layer-output error is within `tolerance`, or none."""
  for s in sorted(per_s, key=int):
    if per_s[s]["error_sere"] <= tolerance:
      return {"reroute": True, "select_top_k": int(s), "threshold": threshold}
  return {"reroute": False, "reason": f"SERE's layer-output error exceeds {tolerance} "
                                      f"at every S tried ({', '.join(sorted(per_s))})"}
