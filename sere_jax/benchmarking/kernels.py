"""The MoE-layer benchmark (`benchmark.py --suite=kernels`, and the kernel part of the
standard suite): one MoE layer at Qwen3-30B-A3B shapes (`SCALES`), timed inside one jit
over a chain of layers with different weights (`timing.LayerChain`).

Per batch size (`KernelSweep.run_batch`): forced distinct-expert counts (exactly n
experts used, `forced_ids`) and natural (uniform) routing under `none`, `sere` S=1 and
S=2 (`NATURAL`). Per case: our op (`impl`), routing + schedule alone (the router
`MoeBlock` runs with `impl`, then the fused schedule kernel), the reference peers
(`jax.lax.ragged_dot`, the dense einsum) and the roofline, distinct experts × bytes per
expert / read bandwidth. Times are µs per layer with the chain's own update subtracted.
`kernels_suite` runs the sweep over batch sizes into one result, optionally with
PyTorch's grouped matmul timed on the same routings (`peers.run_torch_peer`).
"""

from __future__ import annotations

import subprocess
import sys
from typing import Any, Callable, Sequence

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from sere_jax import moe
from sere_jax import policies
from sere_jax import routing
from sere_jax.benchmarking import bandwidth
from sere_jax.benchmarking import peers as peers_lib
from sere_jax.benchmarking import timing
from sere_jax.config import RerouteConfig
from sere_jax.kernels import moe_ffn as moe_ffn_lib

SCALES: dict[str, dict[str, int]] = {
    "qwen3_30b": dict(dim=2048, ffn=768, experts=128, top_k=8, bandwidth_bytes=4 << 30),
    "tiny": dict(dim=64, ffn=48, experts=16, top_k=4, bandwidth_bytes=64 << 20),
}
SCALES["full"] = SCALES["qwen3_30b"]
# The natural-routing cases: (policy, S).
NATURAL = (("none", 0), ("sere", 1), ("sere", 2))
DEFAULT_DISTINCT = (8, 16, 32, 64, 128)


def forced_ids(rng: np.random.Generator, batch: int, top_k: int, experts: int,
               distinct: int) -> np.ndarray:
  """`[B, K]` ids using exactly `distinct` experts (each token K distinct ones)."""
  subset = rng.permutation(experts)[:distinct]
  slots = (np.arange(batch)[:, None] * top_k + np.arange(top_k)[None, :]) % distinct
  return subset[slots].astype(np.int32)


def synthetic_similarity(rng: np.random.Generator, experts: int) -> np.ndarray:
  """A symmetric `[E, E]` similarity, uniform in [0, 1), with a unit diagonal."""
  sim = rng.random((experts, experts)).astype(np.float32)
  sim = (sim + sim.T) / 2
  np.fill_diagonal(sim, 1.0)
  return sim


def make_weights(shape: dict[str, int], layers: int,
                 dtype: Any = jnp.bfloat16) -> list[tuple[jax.Array, jax.Array]]:
  """`layers` random `(w_gate_up [E, D, 2F], w_down [E, F, D])` weight sets."""
  keys = jax.random.split(jax.random.PRNGKey(0), 2 * layers)
  d, f, e = shape["dim"], shape["ffn"], shape["experts"]
  return [(jax.random.normal(keys[2 * i], (e, d, 2 * f), dtype) * d ** -0.5,
           jax.random.normal(keys[2 * i + 1], (e, f, d), dtype) * f ** -0.5)
          for i in range(layers)]


def forced_counts(shape: dict[str, int], batch: int, distinct: Sequence[int]) -> list[int]:
  """The forced distinct-expert counts a batch can use: K <= n <= min(E, B * K)."""
  k, e = shape["top_k"], shape["experts"]
  return [n for n in distinct if k <= n <= min(e, batch * k)]


class KernelSweep:
  """One MoE layer's weights, similarities and compiled chains, timed per batch size.

  Args:
    shape: a `SCALES` entry (dim, ffn, experts, top_k).
    layers: weight sets rotated through (defeats the L2 cache).
    impl: our op's implementation (`moe_ffn.IMPLS`; `auto` resolved here).
    min_seconds: the minimum timed span per repeat.
    seed: the routings' seed; each batch size draws from `(seed, batch)`, so a batch's
      routings do not depend on which batch sizes ran before it.
  """

  def __init__(self, shape: dict[str, int], *, layers: int, impl: str = "auto",
               min_seconds: float = 0.03, seed: int = 0):
    self.shape, self.layers, self.min_seconds, self.seed = shape, layers, min_seconds, seed
    self.impl = moe_ffn_lib.resolve_impl(impl)
    d, f, e, k = shape["dim"], shape["ffn"], shape["experts"], shape["top_k"]
    self.expert_bytes = 3 * d * f * 2
    self.weights = make_weights(shape, layers)
    rng = np.random.default_rng(seed)
    self.sims = [jnp.asarray(synthetic_similarity(rng, e)) for _ in range(layers)]
    self._route = moe.softmax_router(k, normalize=False, impl=self.impl)  # as MoeBlock
    self._chains: dict[tuple[str, RerouteConfig], timing.LayerChain] = {}

  def _chain(self, name: str, config: RerouteConfig) -> timing.LayerChain:
    key = (name, config)
    if key not in self._chains:
      impl, e = self.impl, self.shape["experts"]
      route = self._route
      if name == "schedule":
        def step(x, logits, sim):
          ids, _, _ = route(logits)
          sched = moe_ffn_lib.kernel_schedule(impl, ids, jnp.ones(ids.shape[:1], bool),
                                              sim, config, e)
          return jnp.broadcast_to(sched.stats[1].astype(x.dtype) * 1e-9, x.shape)
      else:
        def step(x, ids, w, wg, wd, sim):
          return moe_ffn_lib.moe_ffn(x, ids, w, wg, wd, similarity=sim, config=config,
                                     impl=name).y
      self._chains[key] = timing.LayerChain(step)
    return self._chains[key]

  def _time(self, name, config, x, layer_args) -> float:
    return self._chain(name, config).seconds_per_layer(x, layer_args,
                                                       min_seconds=self.min_seconds)

  def run_batch(self, batch: int, *, distinct: Sequence[int], peers: Sequence[str],
                read_bandwidth: float,
                natural: Sequence[tuple[str, int]] = NATURAL,
                log: Any = None) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The rows of one batch size (forced counts of `distinct` that fit, then the
    `natural` policies) and, per row, the final routing for the torch peer
    (`{"batch", "ids", "weights"}`). `log(row)` is called after each row."""
    d, e, k = self.shape["dim"], self.shape["experts"], self.shape["top_k"]
    impl, layers = self.impl, self.layers
    rng = np.random.default_rng([self.seed, batch])
    x = jax.random.normal(jax.random.PRNGKey(batch), (batch, d), jnp.bfloat16)
    overhead = timing.chain_overhead(x, layers, min_seconds=self.min_seconds)
    cases = [("forced", "none", 0, n) for n in forced_counts(self.shape, batch, distinct)]
    cases += [("natural", p, s, None) for p, s in natural]
    rows, torch_cases = [], []
    for mode, policy, s, n in cases:
      config = (RerouteConfig(policy=policy, select_top_k=s) if policy != "none"
                else RerouteConfig(policy="none"))
      logits = [jnp.asarray(rng.normal(size=(batch, e)), jnp.float32) for _ in range(layers)]
      routed = [routing.route(lg, k) for lg in logits]
      if mode == "forced":
        routed = [(jnp.asarray(forced_ids(rng, batch, k, e, n)), w) for _, w in routed]
      valid = jnp.ones((batch,), bool)
      final_ids, distinct_after = [], []
      for (ids, w), sim in zip(routed, self.sims):
        new_ids, _, st = policies.reroute(ids, w, valid, sim, config, num_experts=e)
        final_ids.append(np.asarray(new_ids))
        distinct_after.append(int(st.distinct_after))
      mean_distinct = float(np.mean(distinct_after))
      roofline = mean_distinct * self.expert_bytes / read_bandwidth
      layer_args = [(ids, w, wg, wd, sim) for (ids, w), (wg, wd), sim
                    in zip(routed, self.weights, self.sims)]
      row = dict(batch=batch, mode=mode, policy=policy, select_top_k=s,
                 distinct=mean_distinct, roofline_us=roofline * 1e6,
                 chain_overhead_us=overhead * 1e6)
      # The dense einsum's time does not depend on routing: timed for `none` only.
      timed = [impl] + [p for p in peers if p != impl and (p != "xla_dense"
                                                            or policy == "none")]
      for name in timed:
        row[f"{name}_us"] = (self._time(name, config, x, layer_args) - overhead) * 1e6
      t = self._time("schedule", config, x, [(lg, sim) for lg, sim in zip(logits, self.sims)])
      row["routing_schedule_us"] = (t - overhead) * 1e6
      row["ours_over_roofline"] = row[f"{impl}_us"] / row["roofline_us"]
      rows.append(row)
      torch_cases.append(dict(batch=batch, ids=[i.tolist() for i in final_ids],
                              weights=[np.asarray(w).tolist() for _, w in routed]))
      if log is not None:
        log(row)
    return rows, torch_cases


def kernels_suite(env: dict[str, Any], shape: dict[str, int], *, layers: int, impl: str,
                  min_seconds: float, batches: Sequence[int], distinct: Sequence[int],
                  peers: Sequence[str], torch_peer: bool,
                  write_partial: Callable[[dict[str, Any]], None] = lambda _: None
                  ) -> dict[str, Any]:
  """The kernels suite's result: the bandwidth probe, then `KernelSweep.run_batch` per
  batch size (`write_partial(result)` after each); with `torch_peer`, PyTorch's
  `torch._grouped_mm` on the same routings in a child process (a failure is recorded
  in `torch_error`, the JAX rows kept)."""
  probe = bandwidth.probe(shape["bandwidth_bytes"])
  read_bw, copy_bw = probe["read"]["tbs"] * 1e12, probe["copy"]["tbs"] * 1e12
  logging.info("read %.2f TB/s, copy %.2f TB/s", read_bw / 1e12, copy_bw / 1e12)
  sweep = KernelSweep(shape, layers=layers, impl=impl, min_seconds=min_seconds)

  def log(row):
    logging.info("B=%d %s %s S=%d distinct=%.1f roofline=%.1fus ours=%.1fus", row["batch"],
                 row["mode"], row["policy"], row["select_top_k"], row["distinct"],
                 row["roofline_us"], row[f"{sweep.impl}_us"])

  rows: list[dict[str, Any]] = []
  torch_cases = []
  result: dict[str, Any] = {}
  for batch in batches:
    batch_rows, cases = sweep.run_batch(batch, distinct=distinct, peers=peers,
                                        read_bandwidth=read_bw, log=log)
    torch_cases += [dict(case, row_index=len(rows) + i) for i, case in enumerate(cases)]
    rows += batch_rows
    result = dict(suite="kernels", env=env, shape=shape, impl=sweep.impl,
                  layers=sweep.layers, read_bandwidth_tbs=read_bw / 1e12,
                  copy_bandwidth_tbs=copy_bw / 1e12, bandwidth=probe,
                  expert_bytes=sweep.expert_bytes, rows=rows)
    write_partial(dict(result, partial=True))  # a long run keeps what it measured
  if torch_peer:
    try:
      torch_times, torch_env = peers_lib.run_torch_peer(sys.executable, shape, sweep.layers,
                                                        torch_cases, min_seconds)
    except subprocess.CalledProcessError as err:  # keep the JAX results; say why
      logging.error("torch peer failed: %s", err)
      result["torch_error"] = str(err)
    else:
      result["torch_env"] = torch_env
      for case, t in zip(torch_cases, torch_times):
        rows[case["row_index"]]["torch_grouped_mm_us"] = t
  return result
