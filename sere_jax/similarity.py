"""Expert-similarity metrics of SERE's calibration (docs/concepts.md), streamed over batches.

Every MoE layer's routed experts are run on the same calibration tokens; `outputs
[E, T, H]` holds each expert's raw outputs for one batch of T tokens. An accumulator
gathers per-batch sufficient statistics, so calibrating on N batches gives the same
matrix as one batch of all tokens where that is possible:

  cosine     mean over tokens of cos(A_p[t], A_q[t]), mapped to (c + 1) / 2.
             Exact when streamed (a sum of per-token cosines and a count).
  frobenius  1 - ||A_p - A_q||_F / (largest such distance in the layer).
             Exact when streamed (the expert Gram matrix sum_t <A_p[t], A_q[t]>).
  cka_linear, cka_rbf, cka_poly
             centred kernel alignment in Gram space on the first `gram_tokens`
             tokens seen (linear, RBF with the median-distance bandwidth, polynomial
             (x.y / H + 1)^2). Not exact when streamed past `gram_tokens`: the
             statistic is computed on that prefix (a T x T Gram matrix per expert
             cannot be kept for the paper's 51,200 tokens).
  weights    data-free: the cosine metric on `probe_tokens` random Gaussian inputs
             (unit RMS, a fixed seed) instead of calibration text; it needs nothing
             but the expert weights (`weight_similarity`).

All results are symmetric `[E, E]` float32 matrices in [0, 1] with a unit diagonal.

The same outputs give the `expert_pool` policy's statistics (`PoolState`, exact when
streamed): each expert's mean output norm `[E]` and the least-squares weight scale
`[E, E]` of a route moved from expert e to expert p.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

METRICS = ("cosine", "frobenius", "cka_linear", "cka_rbf", "cka_poly", "weights")
_CKA_KERNELS = {"cka_linear": "linear", "cka_rbf": "rbf", "cka_poly": "poly"}


class SimilarityState(NamedTuple):
  """Sufficient statistics of one layer (fields unused by a metric stay empty)."""

  pair_sum: jax.Array  # [E, E] sum over tokens of cos (cosine) or <a_p, a_q> (frobenius)
  tokens: jax.Array  # int32 scalar, tokens seen
  gram_outputs: jax.Array  # [E, G, H] first G tokens' outputs (CKA)


def _unit_diag(sim: jax.Array) -> jax.Array:
  sim = jnp.clip((sim + sim.T) / 2, 0.0, 1.0)
  return sim.at[jnp.diag_indices(sim.shape[0])].set(1.0)


def init_state(metric: str, num_experts: int, hidden: int, *, gram_tokens: int = 1024
               ) -> SimilarityState:
  """Empty statistics for `metric` (see `METRICS`; `weights` streams like cosine)."""
  if metric not in METRICS:
    raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
  g = gram_tokens if metric in _CKA_KERNELS else 0
  return SimilarityState(jnp.zeros((num_experts, num_experts), jnp.float32),
                         jnp.zeros((), jnp.int32),
                         jnp.zeros((num_experts, g, hidden), jnp.float32))


def update(state: SimilarityState, outputs: jax.Array, metric: str) -> SimilarityState:
  """Adds one batch of expert outputs `[E, T, H]`."""
  num_experts, num_tokens, _ = outputs.shape
  if state.pair_sum.shape[0] != num_experts:
    raise ValueError(f"outputs hold {num_experts} experts, the state "
                     f"{state.pair_sum.shape[0]}")
  out = outputs.astype(jnp.float32)
  if metric in ("cosine", "weights"):
    unit = out / jnp.maximum(jnp.linalg.norm(out, axis=-1, keepdims=True), 1e-12)
    pair = jnp.einsum("pth,qth->pq", unit, unit, precision="highest")
  elif metric == "frobenius":
    pair = jnp.einsum("pth,qth->pq", out, out, precision="highest")
  else:
    pair = jnp.zeros_like(state.pair_sum)
  gram = state.gram_outputs
  if gram.shape[1]:
    # Fill the Gram prefix with this batch's tokens, in order, while room is left.
    slots = state.tokens + jnp.arange(num_tokens)
    gram = gram.at[:, slots].set(out, mode="drop")
  return SimilarityState(state.pair_sum + pair, state.tokens + num_tokens, gram)


def finalize(state: SimilarityState, metric: str) -> jax.Array:
  """The `[E, E]` similarity from accumulated statistics."""
  if metric in ("cosine", "weights"):
    mean_cos = state.pair_sum / jnp.maximum(state.tokens, 1)
    return _unit_diag((mean_cos + 1.0) / 2.0)
  if metric == "frobenius":
    norms = jnp.diag(state.pair_sum)
    dist = jnp.sqrt(jnp.maximum(norms[:, None] + norms[None, :] - 2 * state.pair_sum, 0.0))
    dist = dist.at[jnp.diag_indices(dist.shape[0])].set(0.0)
    largest = jnp.max(dist)
    return _unit_diag(jnp.where(largest > 0, 1.0 - dist / largest, 1.0))
  g = jnp.minimum(state.tokens, state.gram_outputs.shape[1])
  return cka(state.gram_outputs, _CKA_KERNELS[metric], num_tokens=g)


def _centred_gram(x: jax.Array, kernel: str, mask: jax.Array) -> jax.Array:
  """Centred Gram matrix `[G, G]` of one expert's outputs `x [G, H]` over masked tokens."""
  if kernel == "linear":
    k = x @ x.T
  elif kernel == "poly":
    k = (x @ x.T / x.shape[1] + 1.0) ** 2
  else:  # rbf, bandwidth = median pairwise distance over the valid tokens
    sq = jnp.sum(x * x, axis=1)
    d2 = jnp.maximum(sq[:, None] + sq[None, :] - 2 * x @ x.T, 0.0)
    valid_pair = mask[:, None] & mask[None, :] & ~jnp.eye(x.shape[0], dtype=bool)
    median = jnp.nanmedian(jnp.where(valid_pair, d2, jnp.nan))
    k = jnp.exp(-d2 / (2 * jnp.maximum(median, 1e-12)))
  m = mask.astype(k.dtype)
  n = jnp.maximum(jnp.sum(m), 1.0)
  k = k * m[:, None] * m[None, :]
  row_mean = jnp.sum(k, axis=1) / n
  total_mean = jnp.sum(row_mean * m) / n
  centred = k - row_mean[:, None] - row_mean[None, :] + total_mean
  return centred * m[:, None] * m[None, :]


def cka(outputs: jax.Array, kernel: str = "linear", *, num_tokens=None) -> jax.Array:
  """CKA between every pair of experts' outputs `[E, G, H]` (first `num_tokens` tokens)."""
  num_experts, g, _ = outputs.shape
  n = g if num_tokens is None else num_tokens
  mask = jnp.arange(g) < n
  grams = jax.vmap(lambda x: _centred_gram(x.astype(jnp.float32), kernel, mask))(outputs)
  flat = grams.reshape(num_experts, -1)
  hsic = jnp.einsum("pi,qi->pq", flat, flat, precision="highest")
  norm = jnp.sqrt(jnp.maximum(jnp.diag(hsic), 1e-30))
  return _unit_diag(hsic / (norm[:, None] * norm[None, :]))


def similarity(outputs: jax.Array, metric: str, *, gram_tokens: int = 1024) -> jax.Array:
  """Similarity of one batch of expert outputs `[E, T, H]` (no streaming)."""
  state = init_state(metric, outputs.shape[0], outputs.shape[2],
                     gram_tokens=gram_tokens if metric in _CKA_KERNELS else 0)
  return finalize(update(state, outputs, metric), metric)


class PoolState(NamedTuple):
  """Sufficient statistics of `expert_pool`'s output norms and weight scales."""

  norm_sum: jax.Array  # [E] sum over tokens of ||A_e[t]||
  cross: jax.Array  # [E, E] sum over tokens of ||A_e[t]|| <A_e[t], A_p[t]>
  energy: jax.Array  # [E, E] sum over tokens of ||A_e[t]|| ||A_p[t]||^2
  tokens: jax.Array  # int32 scalar, tokens seen


def init_pool_state(num_experts: int) -> PoolState:
  """Empty `PoolState` of a layer with `num_experts` experts."""
  pair = (num_experts, num_experts)
  return PoolState(jnp.zeros((num_experts,), jnp.float32), jnp.zeros(pair, jnp.float32),
                   jnp.zeros(pair, jnp.float32), jnp.zeros((), jnp.int32))


def update_pool_state(state: PoolState, outputs: jax.Array) -> PoolState:
  """Adds one batch of expert outputs `[E, T, H]` (all-zero rows add nothing but a
  token: callers that mask tokens set `tokens` themselves)."""
  if state.norm_sum.shape[0] != outputs.shape[0]:
    raise ValueError(f"outputs hold {outputs.shape[0]} experts, the state "
                     f"{state.norm_sum.shape[0]}")
  out = outputs.astype(jnp.float32)
  norm = jnp.linalg.norm(out, axis=-1)  # [E, T]
  cross = jnp.einsum("ph,qh->pq", (norm[:, :, None] * out).reshape(out.shape[0], -1),
                     out.reshape(out.shape[0], -1), precision="highest")
  energy = jnp.einsum("pt,qt->pq", norm, norm * norm, precision="highest")
  return PoolState(state.norm_sum + jnp.sum(norm, axis=1), state.cross + cross,
                   state.energy + energy, state.tokens + out.shape[1])


def finalize_pool_state(state: PoolState, ridge: float = 1e-6
                        ) -> tuple[jax.Array, jax.Array]:
  """`(output_norm [E], scale [E, E])` from accumulated statistics.

  `output_norm[e]` is the mean over tokens of `||A_e[t]||`. `scale[e, p]` minimises
  `sum_t ||u_t|| ||u_t - s v_t||^2` with `u = A_e`, `v = A_p`:
  `sum_t ||u|| <u, v> / (sum_t ||u|| ||v||^2 + lam)`, `lam = ridge` x the mean
  denominator; the diagonal is 1.
  """
  output_norm = state.norm_sum / jnp.maximum(state.tokens, 1)
  lam = jnp.maximum(ridge * jnp.mean(state.energy), 1e-30)
  scale = state.cross / (state.energy + lam)
  return output_norm, scale.at[jnp.diag_indices(scale.shape[0])].set(1.0)


def pool_stats(outputs: jax.Array, ridge: float = 1e-6) -> tuple[jax.Array, jax.Array]:
  """`expert_pool`'s `(output_norm [E], scale [E, E])` of one batch of outputs
  `[E, T, H]` (no streaming)."""
  state = update_pool_state(init_pool_state(outputs.shape[0]), outputs)
  return finalize_pool_state(state, ridge)


def expert_outputs(x: jax.Array, w_gate_up: jax.Array, w_down: jax.Array,
                   expert_chunk: int = 16) -> jax.Array:
  """Every expert's SwiGLU output on tokens `x [T, D]`: `[E, T, D]` float32.

  Experts are processed `expert_chunk` at a time to bound the `[E, T, 2F]` temporary.
  """
  def chunk(args):
    wgu, wd = args
    h = jnp.einsum("td,edf->etf", x.astype(jnp.float32), wgu.astype(jnp.float32))
    gate, up = jnp.split(h, 2, axis=-1)
    return jnp.einsum("etf,efd->etd", jax.nn.silu(gate) * up, wd.astype(jnp.float32))
  e = w_gate_up.shape[0]
  c = min(expert_chunk, e)
  if e % c:
    raise ValueError(f"expert_chunk {c} must divide the number of experts {e}")
  outs = jax.lax.map(chunk, (w_gate_up.reshape(e // c, c, *w_gate_up.shape[1:]),
                             w_down.reshape(e // c, c, *w_down.shape[1:])))
  return outs.reshape(e, x.shape[0], -1)


def weight_similarity(w_gate_up: jax.Array, w_down: jax.Array, *, probe_tokens: int = 512,
                      seed: int = 0, expert_chunk: int = 16) -> jax.Array:
  """Data-free similarity: output cosine on random unit-RMS Gaussian probe inputs."""
  probes = jax.random.normal(jax.random.PRNGKey(seed), (probe_tokens, w_gate_up.shape[1]))
  return similarity(expert_outputs(probes, w_gate_up, w_down, expert_chunk), "weights")


def expected_critical(sim: np.ndarray | jax.Array, select_top_k: int, threshold: float, *,
                      top_k: int, batch: int, samples: int = 256, seed: int = 0) -> float:
  """Mean number of critical experts per decode step (docs/concepts.md), by Monte Carlo.

  Routing is modelled as uniform: each of `batch` tokens picks `top_k` distinct experts
  at random, the first `select_top_k` of them primary. A critical expert is a secondary
  expert outside the primary set whose best similarity to it is below `threshold`.
  """
  sim = np.asarray(sim, np.float64)
  num_experts = sim.shape[0]
  if not 0 < select_top_k < top_k <= num_experts or threshold <= 0:
    return 0.0
  rng = np.random.default_rng(seed)
  ids = np.argsort(rng.random((samples, batch, num_experts)), axis=-1)[..., :top_k]
  onehot = np.zeros((samples, batch, top_k, num_experts), bool)
  np.put_along_axis(onehot, ids[..., None], True, axis=-1)
  primary = onehot[:, :, :select_top_k].any(axis=(1, 2))  # [samples, E]
  secondary = onehot[:, :, select_top_k:].any(axis=(1, 2)) & ~primary
  best = np.where(primary[:, None, :], sim[None], -np.inf).max(axis=-1)  # [samples, E]
  return float(np.mean(np.sum(secondary & (best < threshold), axis=-1)))


def summary(sim: np.ndarray | jax.Array, select_top_k: int | None = None,
            threshold: float | None = None, *, top_k: int | None = None,
            batch: int = 16) -> dict[str, float]:
  """Off-diagonal statistics of one layer's similarity.

  With `threshold`, also the fraction of experts whose best match among the others is
  below it (critical whatever the primary set); with `select_top_k` and `top_k` as
  well, the expected critical experts per step at `batch` tokens under uniform routing
  (`expected_critical`).
  """
  sim = np.asarray(sim, np.float64)
  off = sim[~np.eye(sim.shape[0], dtype=bool)]
  stats = dict(mean=float(off.mean()), std=float(off.std()), min=float(off.min()),
               max=float(off.max()), median=float(np.median(off)))
  if threshold is not None:
    best = np.where(np.eye(sim.shape[0], dtype=bool), -np.inf, sim).max(axis=1)
    stats["always_critical_fraction"] = float(np.mean(best < threshold))
    stats["threshold"] = float(threshold)
  if select_top_k is not None:
    stats["select_top_k"] = int(select_top_k)
  if threshold is not None and select_top_k is not None and top_k is not None:
    stats["expected_critical"] = expected_critical(
        sim, select_top_k, threshold, top_k=top_k, batch=batch)
    stats["batch"] = int(batch)
  return stats
