"""Splits a Qwen3-30B-A3B decode step's time into host and device parts (GPU machine).

    python tools/decode_step_probe.py OUT.json [TRACE_DIR [BATCHES]]

Random bf16 weights (`decode_models.build_model`), policy `none`, a 128-token prompt.
Per batch size (BATCHES, default "1,16"), 20 decode steps of `generation.model_step`
timed two ways: `blocked` waits for every step's token (as a host-side loop does) and
`async` lets the host enqueue the next step before the previous one finishes (so its
per-step time is the larger of the host's and the device's); and `device_loop`: 20
steps in one `generation.decode_loop` call (as `generate` runs them), three times.
Also: the host cost of flattening the model state (`num_leaves` leaves), of
dispatching a trivial jitted function that takes it and of hashing the graph
definition (a static argument of every `model_step` call).
OUT.json holds `B{batch}_{blocked,async}: [mean, median]` and `B{batch}_device_loop:
[three runs]` seconds per step, and the host costs in ms.
With TRACE_DIR, one `decode_loop` call of three steps (the last batch size) is traced
with `jax.profiler` for the kernel list (`tools/trace_summary.py TRACE_DIR 3`).
"""

from __future__ import annotations

import json
import statistics
import sys
import time

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from sere_jax import benchmarking
from sere_jax import generation
from sere_jax.benchmarking import decode_models

PROMPT, STEPS = 128, 20


def _decoder(net, batch: int):
  """A function `run(steps, block) -> (mean s/step, median s/step)` over a primed cache."""
  graphdef, state = nnx.split(net)
  total = PROMPT + STEPS + 4
  sampling = generation.SamplingConfig()
  prompts = jnp.asarray(np.random.default_rng(0).integers(3, 1000, (batch, PROMPT)),
                        jnp.int32)
  positions = jnp.broadcast_to(jnp.arange(PROMPT, dtype=jnp.int32), (batch, PROMPT))
  carry = generation.model_step(
      graphdef, state, prompts, positions, jnp.ones((batch, PROMPT), bool),
      net.init_cache(batch, total, jnp.bfloat16), jnp.zeros((batch, total), bool),
      jnp.asarray(0, jnp.int32), jax.random.PRNGKey(0), sampling=sampling, decode=False)[:3]
  ones = jnp.ones((batch, 1), bool)

  def run(steps: int, block: bool) -> tuple[float, float]:
    nonlocal carry
    token, cache, valid = carry
    times, start = [], time.perf_counter()
    for s in range(steps):
      slot = PROMPT + s % STEPS
      tic = time.perf_counter()
      token, cache, valid, _ = generation.model_step(
          graphdef, state, token[:, None], jnp.full((batch, 1), slot, jnp.int32), ones,
          cache, valid, jnp.asarray(slot, jnp.int32), jax.random.PRNGKey(s),
          sampling=sampling, decode=True)
      if block:
        jax.block_until_ready(token)
      times.append(time.perf_counter() - tic)
    jax.block_until_ready(token)
    carry = (token, cache, valid)
    return (time.perf_counter() - start) / steps, statistics.median(times)

  def loop(steps: int) -> float:
    """Seconds per step of `steps` decode steps in one `generation.decode_loop` call."""
    nonlocal carry
    token, cache, valid = carry
    tic = time.perf_counter()
    acc, _, _, cache, valid = generation.decode_loop(
        graphdef, state, token, jnp.full((batch,), PROMPT, jnp.int32), cache, valid,
        jnp.asarray(PROMPT, jnp.int32), jax.random.PRNGKey(0), sampling=sampling,
        max_new_tokens=steps + 1, eos_ids=(), stop_sequences=(), pad_id=0)
    jax.block_until_ready(acc)
    carry = (token, cache, valid)
    return (time.perf_counter() - tic) / steps

  return run, loop, state


def main(argv: list[str]) -> None:
  out_path, trace_dir = argv[1], (argv[2] if len(argv) > 2 and argv[2] else None)
  batches = [int(b) for b in (argv[3] if len(argv) > 3 else "1,16").split(",")]
  net, _, _ = decode_models.build_model("qwen3_30b_a3b", "full", "auto")
  result = {"environment": benchmarking.environment()}
  for batch in batches:
    run, loop, state = _decoder(net, batch)
    run(2, True)  # compile
    result[f"B{batch}_blocked"] = run(STEPS, True)
    result[f"B{batch}_async"] = run(STEPS, False)
    loop(STEPS)  # compile
    result[f"B{batch}_device_loop"] = [loop(STEPS) for _ in range(3)]
    print(batch, result, flush=True)
  leaves = jax.tree.leaves(state)
  tic = time.perf_counter()
  for _ in range(20):
    jax.tree.leaves(state)
  result["flatten_ms"] = (time.perf_counter() - tic) / 20 * 1e3
  result["num_leaves"] = len(leaves)
  first_leaf = jax.jit(lambda st: jax.tree.leaves(st)[0].sum())
  jax.block_until_ready(first_leaf(state))
  tic = time.perf_counter()
  for _ in range(20):
    value = first_leaf(state)
  jax.block_until_ready(value)
  result["dispatch_state_ms"] = (time.perf_counter() - tic) / 20 * 1e3
  graphdef = nnx.graphdef(net)
  tic = time.perf_counter()
  for _ in range(20):
    hash(graphdef)
  result["hash_graphdef_ms"] = (time.perf_counter() - tic) / 20 * 1e3
  if trace_dir:
    loop(3)  # compile
    jax.profiler.start_trace(trace_dir, create_perfetto_trace=True)
    loop(3)
    jax.profiler.stop_trace()
  with open(out_path, "w") as fh:
    json.dump(result, fh, indent=1)
  print(json.dumps(result, indent=1))


if __name__ == "__main__":
  main(sys.argv)
