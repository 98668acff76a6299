"""A model of one expert-parallel decode step, from single-GPU measurements.

Until a machine with several GPUs measures it, this states what expert parallelism
(`sere_jax.expert_parallel`) should give on 8 H200s at Qwen3-235B-A22B shapes, so that
the measurement can check it. Per decode step, every device runs every layer:

    t_layer = t_glue + t_attention + max_device_distinct * t_expert + t_all_reduce(B)
    t_step  = layers * t_layer + t_lm_head

- `max_device_distinct`: the most distinct experts one device reads in a layer, from
  routing B tokens with the router of random weights (softmax of Gaussian logits,
  top-K; as the decode benchmark's random-weight models route) and the policy, with
  experts in contiguous blocks (`sere_jax.placement`); the mean over `trials` draws.
- `t_expert`: one expert's bytes over the bandwidth, times the grouped matmul's
  measured ratio to its roofline (`MEASURED`).
- `t_glue`: the measured non-expert kernels of one layer besides the attention
  projections (router, schedule, norms, SwiGLU, combine, attention itself).
- `t_attention`: the attention projections' bytes (replicated on every device, as
  `expert_parallel` runs them) over the bandwidth, times their measured ratio.
- `t_all_reduce(B)`: the output all-reduce of `B x D` float32 values over NVLink,
  a latency plus a ring's bytes over the link bandwidth (`ASSUMED`).
Every constant names its source; `ASSUMED` ones are not measured by this project.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from sere_jax import policies
from sere_jax import routing
from sere_jax.policy_spec import PolicySpec

# Qwen3-235B-A22B's shapes (its Hugging Face config.json).
QWEN3_235B = dict(hidden_size=4096, num_hidden_layers=94, num_attention_heads=64,
                  num_key_value_heads=4, head_dim=128, num_experts=128,
                  num_experts_per_tok=8, moe_intermediate_size=1536, vocab_size=151936)

# Measured on one H200 with Qwen3-30B-A3B shapes (docs/benchmarks/decode_profile_h200.json,
# summarised in docs/benchmarks/README.md): the grouped matmuls read an expert at
# 2.41-2.64 us against a 2.25 us roofline; the attention projections run at 1.9x their
# roofline at B = 16; the other 11 non-expert kernels of a layer take 33 us (50 us of
# non-expert time per layer, less 17 us of attention projections).
MEASURED = dict(bandwidth_bytes_per_s=4.19e12, expert_over_roofline=2.53 / 2.25,
                attention_over_roofline=1.9, glue_us_per_layer=33.0)
# Not measured here: NVLink 4 gives an H200 SXM 900 GB/s (both directions; NVIDIA's
# H200 datasheet), so a ring moves 450 GB/s each way; NCCL's all-reduce of small
# messages on 8 GPUs behind NVSwitch costs about 20 us of latency (order of magnitude
# of published nccl-tests runs).
ASSUMED = dict(link_bytes_per_s=450e9, all_reduce_latency_us=20.0)


def expert_bytes(shape: dict[str, Any]) -> int:
  """Bytes of one routed expert (gate, up and down projections, bf16)."""
  return 3 * shape["hidden_size"] * shape["moe_intermediate_size"] * 2


def attention_bytes(shape: dict[str, Any]) -> int:
  """Bytes of one layer's attention projections (q, k, v, o; bf16)."""
  d, h = shape["hidden_size"], shape["head_dim"]
  q = shape["num_attention_heads"] * h
  kv = shape["num_key_value_heads"] * h
  return (d * q + 2 * d * kv + q * d) * 2


def routed_experts(shape: dict[str, Any], spec: PolicySpec, batch: int, devices: int,
                   trials: int, seed: int = 0) -> dict[str, float]:
  """Mean distinct experts per layer and the mean of the busiest device's count, under
  `spec` for `batch` tokens routed by random-weight logits (see the module docstring)."""
  e, k = shape["num_experts"], shape["num_experts_per_tok"]
  config = dataclasses.replace(spec.config(), expert_devices=devices)
  similarity = jnp.eye(e, dtype=jnp.float32)  # S-only policies at rho = 0 ignore it

  @jax.jit
  def one(key):
    logits = jax.random.normal(key, (batch, e))
    ids, weights = routing.route(logits, k, normalize=True)
    _, _, stats = policies.reroute(ids, weights, jnp.ones((batch,), bool), similarity,
                                   config, num_experts=e)
    return stats.distinct_after, stats.max_device_distinct

  keys = jax.random.split(jax.random.PRNGKey(seed), trials)
  distinct, device_max = jax.vmap(one)(keys)
  return dict(distinct=float(np.mean(distinct)), max_device=float(np.mean(device_max)))


def step_model(shape: dict[str, Any], spec: PolicySpec, batch: int, devices: int,
               trials: int = 256) -> dict[str, Any]:
  """The modelled step of the module docstring for one policy, B and device count."""
  bw = MEASURED["bandwidth_bytes_per_s"]
  experts = routed_experts(shape, spec, batch, devices, trials)
  t_expert = expert_bytes(shape) / bw * MEASURED["expert_over_roofline"] * 1e6
  t_attention = attention_bytes(shape) / bw * MEASURED["attention_over_roofline"] * 1e6
  reduce_bytes = batch * shape["hidden_size"] * 4
  t_reduce = 0.0
  if devices > 1:
    ring = 2 * (devices - 1) / devices * reduce_bytes / ASSUMED["link_bytes_per_s"]
    t_reduce = ASSUMED["all_reduce_latency_us"] + ring * 1e6
  t_layer = (MEASURED["glue_us_per_layer"] + t_attention
             + experts["max_device"] * t_expert + t_reduce)
  t_lm_head = shape["hidden_size"] * shape["vocab_size"] * 2 / bw * 1e6
  step_us = shape["num_hidden_layers"] * t_layer + t_lm_head
  return dict(policy=spec.text, batch=batch, devices=devices,
              distinct_per_layer=experts["distinct"],
              max_device_distinct=experts["max_device"], expert_us=t_expert,
              attention_us=t_attention, glue_us=MEASURED["glue_us_per_layer"],
              all_reduce_us=t_reduce, layer_us=t_layer, step_ms=step_us / 1e3)


def ep_table(specs: Sequence[PolicySpec], batches: Sequence[int], devices: int,
             shape: dict[str, Any] = QWEN3_235B, trials: int = 256) -> dict[str, Any]:
  """`step_model` for every policy and batch size, with speedups over `none` at the
  same B, and the constants used."""
  rows = [step_model(shape, spec, b, devices, trials) for b in batches for spec in specs]
  base = {r["batch"]: r["step_ms"] for r in rows if r["policy"] == "none"}
  for r in rows:
    r["speedup_over_none"] = base[r["batch"]] / r["step_ms"] if r["batch"] in base else None
  return dict(model="qwen3_235b_a22b", shape=shape, devices=devices, trials=trials,
              measured=MEASURED, assumed=ASSUMED, expert_mb=expert_bytes(shape) / 1e6,
              attention_mb=attention_bytes(shape) / 1e6, rows=rows)


def markdown(result: dict[str, Any], command: str) -> str:
  """The modelled table with its constants and the command that made it."""
  m, a = result["measured"], result["assumed"]
  lines = [
      f"# Expert-parallel decode step, modelled: {result['model']} on "
      f"{result['devices']} H200s", "",
      "A model, not a measurement (no machine with several GPUs has run it yet): "
      "`sere_jax.benchmarking.ep_model` states the arithmetic. Per layer, every device "
      "runs the glue kernels and the replicated attention projections, reads the experts "
      "of its own that the batch uses, and joins one all-reduce of the output; the step "
      "waits for the busiest device.", "",
      "```", command, "```", "",
      f"- one expert: {result['expert_mb']:.1f} MB, read at {m['expert_over_roofline']:.2f}x "
      f"its roofline at {m['bandwidth_bytes_per_s'] / 1e12:.2f} TB/s (measured, one H200)",
      f"- attention projections: {result['attention_mb']:.1f} MB per layer at "
      f"{m['attention_over_roofline']}x their roofline (measured); other non-expert "
      f"kernels {m['glue_us_per_layer']:.0f} us per layer (measured)",
      f"- all-reduce: {a['all_reduce_latency_us']:.0f} us latency + a ring over "
      f"{a['link_bytes_per_s'] / 1e9:.0f} GB/s per direction (assumed, not measured)",
      f"- routing: random-weight router, mean of {result['trials']} draws per case", "",
      "| B | policy | distinct/layer | max/device | expert us | all-reduce us | layer us "
      "| step ms | speedup over none |", "|---|---|---|---|---|---|---|---|---|"]
  for r in result["rows"]:
    lines.append(
        f"| {r['batch']} | `{r['policy']}` | {r['distinct_per_layer']:.1f} | "
        f"{r['max_device_distinct']:.2f} | {r['expert_us']:.2f} | {r['all_reduce_us']:.1f} | "
        f"{r['layer_us']:.1f} | {r['step_ms']:.2f} | {r['speedup_over_none']:.2f} |")
  return "\n".join(lines) + "\n"
