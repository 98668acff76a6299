"""The end-to-end decode benchmark (`benchmark.py --suite=decode`); how speed is measured: docs/guides/benchmark.md.

A model of a real configuration (`decode_models.build_model`: random bf16 weights,
synthetic similarities). Per batch size: one prefill of `prompt_len` random tokens
(prefill never re-routes: `decode_only`), then per policy `repeats` timed runs (after
one warm-up run) of the `new_tokens - 1` decode steps as `generate` runs them: one call
of `generation.decode_loop` (a device-side `while_loop`), timed on the host until its
tokens are ready. Time per output token = that time / steps (the steps of one call
cannot be timed one by one from the host); the median over repeats is reported. Per
case: seconds per step (= time per output token), tokens/s, mean distinct experts per
MoE layer (the steps' RerouteStats), and the roofline of one step: every byte a step
must read (non-expert weights incl. LM head and router, the distinct experts' weights,
shared experts, the KV cache at the mean context length) over the copy bandwidth
measured in the same process. The transformers peer (`peers.run_hf_peer`) runs before
this, in a child process, and its times join the rows.

`DecodeBench` builds a model once and measures one batch size per `run_batch` call (the
standard suite's parts); `decode_suite` runs every batch size of the decode suite after
checking that they fit the device (`memory.check_fits`).

With `expert_devices` N > 1 the model's experts are sharded over N devices
(`sere_jax.expert_parallel`; attention and the rest replicated). A step then waits for
the device that reads the most experts: rows add `max_device_distinct` (per layer and
step, mean) and the roofline counts one device's bytes, the replicated weights, its
KV cache and the busiest device's experts, over one device's bandwidth.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import os
import statistics
import time
from typing import Any, Callable, Sequence

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from sere_jax import expert_parallel
from sere_jax import fileio
from sere_jax import generation
from sere_jax import moe
from sere_jax import profiling
from sere_jax.benchmarking import bandwidth
from sere_jax.benchmarking import memory
from sere_jax.benchmarking import timing
from sere_jax.benchmarking.decode_models import build_model, byte_budget
from sere_jax.benchmarking.report import add_speedups
from sere_jax.kernels import moe_ffn as moe_ffn_lib
from sere_jax.models import layers
from sere_jax.policy_spec import PolicySpec

DEFAULT_POLICIES = ("none", "sere:1:0", "sere:1:0.3", "sere:2:0", "sere:2:0.3",
                    "topk_truncate:1", "topk_truncate:2")
DEFAULT_BATCHES = (1, 8, 16, 32, 64, 128)


def _kv_bytes_per_token(cache) -> int:
  """Bytes of keys + values one cached token holds, summed over layers."""
  return sum(int(c.k[0, 0].nbytes + c.v[0, 0].nbytes) for c in cache)


class DecodeBench:
  """One model of `decode_models`, built on the device, measured per batch size
  (`run_batch`) with the protocol of the module docstring.

  Args:
    model, scale: the `decode_models` model and scale (`full`, `tiny`).
    impl: the MoE op's implementation (`moe_ffn.IMPLS`).
    attention_impl: the backend of a decode step's attention kernels
      (`layers.ATTENTION_IMPLS`).
    seed: weights, and with the batch size the prompts of each batch.
    expert_devices: devices the experts are sharded over (1: one device).
  """

  def __init__(self, *, model: str, scale: str, impl: str = "auto",
               attention_impl: str = "auto", seed: int = 0, expert_devices: int = 1):
    self.model, self.scale, self.seed = model, scale, seed
    self.expert_devices = expert_devices
    mesh = expert_parallel.expert_mesh(expert_devices) if expert_devices > 1 else None
    start = time.time()
    self.net, self.config, self.hf = build_model(model, scale, impl, seed, attention_impl)
    if mesh is not None:
      moe.set_expert_parallel(self.net, mesh)
    self.build_seconds = time.time() - start
    self.budget = byte_budget(self.net)
    self.impl = moe_ffn_lib.resolve_impl(impl)
    self.attention_impl = layers.resolve_attention_impl(attention_impl)

  def header(self) -> dict[str, Any]:
    """The model's part of a result: configs, implementations, build time, bytes."""
    return dict(model=self.model, scale=self.scale,
                model_config=dataclasses.asdict(self.config), hf_config=self.hf,
                impl=self.impl, attention_impl=self.attention_impl,
                expert_devices=self.expert_devices, build_seconds=self.build_seconds,
                bytes=self.budget)

  def run_batch(self, batch: int, *, policies: Sequence[PolicySpec], prompt_len: int,
                new_tokens: int, repeats: int, copy_bandwidth: float,
                read_bandwidth: float, peer_row: dict[str, Any] | None = None,
                profile_dir: str = "",
                on_row: Callable[[dict[str, Any]], None] | None = None,
                steps_per_check: int = 1) -> list[dict[str, Any]]:
    """One prefill of `batch` random prompts, then every policy's timed decode loops;
    one row per policy (`on_row(row)` after each). Rooflines use the given bandwidths
    (bytes/s); `peer_row` (the transformers peer's row of this batch) joins the rows.
    With `profile_dir`, see `decode_suite`."""
    net, budget, hf = self.net, self.budget, self.hf
    sampling = generation.SamplingConfig()  # greedy
    total = prompt_len + new_tokens - 1  # cache slots, as generate() allocates them
    rng = np.random.default_rng([self.seed, batch])
    prompts = rng.integers(3, hf["vocab_size"], (batch, prompt_len)).astype(np.int32)
    cache0 = net.init_cache(batch, total, jnp.bfloat16)
    kv_token_bytes = _kv_bytes_per_token(cache0)
    valid0 = jnp.zeros((batch, total), jnp.bool_)
    positions = np.broadcast_to(np.arange(prompt_len, dtype=np.int32), (batch, prompt_len))
    prefill_args = (jnp.asarray(prompts), jnp.asarray(positions),
                    jnp.ones((batch, prompt_len), bool), cache0, valid0,
                    jnp.asarray(0, jnp.int32), jax.random.PRNGKey(0))
    lengths = jnp.full((batch,), prompt_len, jnp.int32)
    first_slot, loop_key = jnp.asarray(prompt_len, jnp.int32), jax.random.PRNGKey(1)
    # The loops' first argument is the prefill's token: lowered from its shape.
    loop_args = (jax.ShapeDtypeStruct((batch,), jnp.int32), lengths, cache0, valid0,
                 first_slot, loop_key)
    tic = time.perf_counter()
    (prefill_state, prefill), loops = _compile_programs(
        net, policies, prefill_args, loop_args, sampling, new_tokens, steps_per_check)
    compile_s = time.perf_counter() - tic
    print(f"{self.model} B={batch}: compiled the prefill and {len(policies)} decode loops "
          f"in {compile_s:.0f} s", flush=True)
    first, cache0, valid0, _ = prefill(prefill_state, *prefill_args)
    jax.block_until_ready(first)
    rows = []
    for pol, (state, decode_loop) in zip(policies, loops):

      def one_pass():
        """Seconds for the `new_tokens - 1` decode steps (one `decode_loop` call, as
        `generate` runs them) and their stats."""
        cache, cache_valid = jax.tree.map(jnp.copy, (cache0, valid0))
        jax.block_until_ready((cache, cache_valid))
        tic = time.perf_counter()
        acc, steps, stats, _, _ = decode_loop(state, first, lengths, cache, cache_valid,
                                              first_slot, loop_key)
        jax.block_until_ready(acc)
        seconds = time.perf_counter() - tic
        assert int(steps) == new_tokens - 1, int(steps)
        return seconds, np.asarray(stats, np.float64)

      one_pass()  # warm up
      step_times, decode_stats = [], None
      for _ in range(repeats):
        seconds, decode_stats = one_pass()
        step_times.append(seconds / (new_tokens - 1))
      summary = generation.summarize_stats(decode_stats)
      distinct_per_layer = summary["distinct_after"]
      device_max_per_layer = summary["max_device_distinct"]
      # One device reads the replicated weights and the busiest device's experts.
      read_per_layer = (device_max_per_layer if self.expert_devices > 1
                        else distinct_per_layer)
      step_s = statistics.median(step_times)
      steps = new_tokens - 1
      mean_context = prompt_len + 1 + (steps - 1) / 2  # slots attended, averaged
      expert_bytes = sum(d * e for d, e in zip(read_per_layer,
                                               budget["expert_bytes_per_layer"]))
      kv_bytes = batch * mean_context * kv_token_bytes
      sim_bytes = budget["similarity_bytes"] if pol.uses_similarity else 0
      step_bytes = (budget["dense_bytes"] + batch * budget["embed_row_bytes"]
                    + expert_bytes + kv_bytes + sim_bytes)
      roofline_s = step_bytes / copy_bandwidth
      row = dict(
          batch=batch, policy=pol.policy, select_top_k=pol.select_top_k,
          threshold=pol.threshold, label=pol.text, compile_batch_s=compile_s,
          ms_per_token=step_s * 1e3, ms_per_token_mean=statistics.fmean(step_times) * 1e3,
          tokens_per_s=batch / step_s, steps_timed=steps * repeats,
          distinct_experts=float(np.mean(distinct_per_layer)) if distinct_per_layer else 0.0,
          distinct_before=(float(np.mean(summary["distinct_before"]))
                           if distinct_per_layer else 0.0),
          distinct_per_layer=distinct_per_layer, expert_devices=self.expert_devices,
          max_device_distinct=(float(np.mean(device_max_per_layer))
                               if device_max_per_layer else 0.0),
          step_gb=step_bytes / 1e9, expert_gb=expert_bytes / 1e9, kv_gb=kv_bytes / 1e9,
          dense_gb=budget["dense_bytes"] / 1e9,
          roofline_ms=roofline_s * 1e3, measured_over_roofline=step_s / roofline_s,
          roofline_read_ms=step_bytes / read_bandwidth * 1e3)
      if profile_dir:
        trace_dir = os.path.join(profile_dir, f"B{batch}_{pol.text.replace(':', '_')}")
        with profiling.trace(trace_dir):
          one_pass()
        row["profile"] = profiling.summarize_trace(trace_dir, steps=new_tokens - 1)
        fileio.write_atomic(trace_dir + ".hlo.txt", decode_loop.as_text())
      if peer_row is not None:
        row["hf_ms_per_token"] = peer_row["hf_ms_per_token"]
        row["speedup_over_hf"] = row["hf_ms_per_token"] / row["ms_per_token"]
      rows.append(row)
      if on_row is not None:
        on_row(row)
      per_device = (f" (max {row['max_device_distinct']:.1f} on one of "
                    f"{self.expert_devices} devices)" if self.expert_devices > 1 else "")
      print(f"{self.model} B={batch} {pol.text}: {row['ms_per_token']:.3f} ms/token, "
            f"distinct {row['distinct_experts']:.1f}{per_device}, roofline "
            f"{row['roofline_ms']:.3f} ms (x{row['measured_over_roofline']:.2f})",
            flush=True)
    add_speedups(rows)
    return rows


def decode_suite(*, model: str, scale: str, batches: Sequence[int],
                 policies: Sequence[PolicySpec], prompt_len: int, new_tokens: int,
                 impl: str, repeats: int, bandwidth_bytes: int,
                 peer: dict[str, Any] | None,
                 write_partial: Callable[[dict[str, Any]], None], seed: int = 0,
                 attention_impl: str = "auto", profile_dir: str = "",
                 expert_devices: int = 1,
                 bandwidth_probe: dict[str, Any] | None = None,
                 steps_per_check: int = 1) -> dict[str, Any]:
  """Runs the protocol (module docstring) on `model` at `scale` (`decode_models`);
  `peer` is `peers.run_hf_peer`'s result (or None); `write_partial(result)` is called
  after every case. The rooflines divide by `bandwidth_probe` (e.g. from
  `bandwidth.across_processes`) or, without it, by a `bandwidth.probe` of this process.
  `steps_per_check` goes to `generation.decode_loop` (with `new_tokens - 1` not a
  multiple of it, the padding steps at the end count in the timed steps).

  Before anything is built, `memory.check_fits` stops a batch size the device cannot
  hold (`memory.DoesNotFitError`, naming the bytes needed and the device's).

  With `profile_dir`, one more pass per case runs under `jax.profiler` (trace in
  `profile_dir/B<batch>_<policy>`), the row gets its per-step kernel list (`profile`,
  see `sere_jax.profiling`), and the compiled decode loop's optimised HLO is written
  next to the trace (`B<batch>_<policy>.hlo.txt`: which ops each profiled fusion holds)."""
  memory.check_fits(memory.decode_needs(model, scale, batches, prompt_len, new_tokens,
                                        expert_devices), memory.device_bytes_limit())
  env = timing.environment()
  probe = bandwidth_probe or bandwidth.probe(bandwidth_bytes)
  copy_bw, read_bw = probe["copy"]["tbs"] * 1e12, probe["read"]["tbs"] * 1e12
  bench = DecodeBench(model=model, scale=scale, impl=impl, attention_impl=attention_impl,
                      seed=seed, expert_devices=expert_devices)
  result = dict(suite="decode", env=env, **bench.header(),
                protocol=dict(prompt_len=prompt_len, new_tokens=new_tokens,
                              batches=list(batches), policies=[p.text for p in policies],
                              repeats=repeats, sampling="greedy", dtype="bfloat16",
                              seed=seed, steps_per_check=steps_per_check,
                              min_decode_rows=generation.MIN_DECODE_ROWS),
                copy_bandwidth_tbs=copy_bw / 1e12, read_bandwidth_tbs=read_bw / 1e12,
                bandwidth=probe,
                rows=[])
  if peer is not None:
    result["peer"] = {k: v for k, v in peer.items() if k != "rows"}
  peer_rows = {r["batch"]: r for r in (peer or {}).get("rows", [])}
  for batch in batches:

    def on_row(row):
      result["rows"].append(row)
      write_partial(dict(result, partial=True))

    bench.run_batch(batch, policies=policies, prompt_len=prompt_len,
                    new_tokens=new_tokens, repeats=repeats, copy_bandwidth=copy_bw,
                    read_bandwidth=read_bw, peer_row=peer_rows.get(batch),
                    profile_dir=profile_dir, on_row=on_row,
                    steps_per_check=steps_per_check)
  add_speedups(result["rows"])
  return result


def _compile_programs(net, policies, prefill_args, loop_args, sampling, new_tokens,
                      steps_per_check):
  """The prefill (policy `none`) and one `generation.decode_loop` per policy, each as `(state,
  compiled)`: traced one after another, compiled in parallel threads (XLA compilation
  releases the GIL; a 48-layer model's loop takes tens of seconds to compile). A
  compiled program takes its function's arguments without the static ones."""

  def split(spec=PolicySpec("none")):
    moe.set_reroute(net, spec.config())
    moe.check_calibrated(net)
    return nnx.split(net)

  graphdef, state = split()
  lowered = [(state, generation.model_step.lower(
      graphdef, state, *prefill_args, sampling=sampling, decode=False))]
  for pol in policies:
    graphdef, state = split(pol)
    lowered.append((state, generation.decode_loop.lower(
        graphdef, state, *loop_args, sampling=sampling, max_new_tokens=new_tokens,
        eos_ids=(), stop_sequences=(), pad_id=0, steps_per_check=steps_per_check)))
  with concurrent.futures.ThreadPoolExecutor(len(lowered)) as pool:
    compiled = list(pool.map(lambda item: item[1].compile(), lowered))
  programs = [(state, fn) for (state, _), fn in zip(lowered, compiled)]
  return programs[0], programs[1:]

