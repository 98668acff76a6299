"""Where does a Qwen3-30B-A3B decode step's fixed ~20 ms go? (B=1, none)"""
import time, sys, json, os
import jax, jax.numpy as jnp, numpy as np
from flax import nnx
from sere_jax import generation, moe
from sere_jax.config import RerouteConfig
from sere_jax.scripts import bench_decode
net, config, hf = bench_decode.build_model("qwen3_30b_a3b", "full", "auto")
res = {}
for batch in (1, 16):
  P, N = 128, 24
  total = P + N
  graphdef, state = nnx.split(net)
  cache = net.init_cache(batch, total, jnp.bfloat16)
  valid = jnp.zeros((batch, total), bool)
  prompts = jnp.asarray(np.random.default_rng(0).integers(3, 1000, (batch, P)), jnp.int32)
  pos = jnp.broadcast_to(jnp.arange(P, dtype=jnp.int32), (batch, P))
  sampling = generation.SamplingConfig()
  tok, cache, valid, _ = generation._model_step(graphdef, state, prompts, pos, jnp.ones((batch, P), bool), cache, valid, jnp.asarray(0, jnp.int32), jax.random.PRNGKey(0), sampling=sampling, decode=False)
  ones = jnp.ones((batch, 1), bool)
  def run(steps, block):
    global tok, cache, valid
    t0 = time.perf_counter(); times = []
    for s in range(steps):
      t1 = time.perf_counter()
      tok, cache, valid, st = generation._model_step(graphdef, state, tok[:, None], jnp.full((batch, 1), P + s % N, jnp.int32), ones, cache, valid, jnp.asarray(P + s % N, jnp.int32), jax.random.PRNGKey(s), sampling=sampling, decode=True)
      if block: jax.block_until_ready(tok)
      times.append(time.perf_counter() - t1)
    jax.block_until_ready(tok)
    return (time.perf_counter() - t0) / steps, float(np.median(times))
  run(2, True)
  res[f"B{batch}_blocked"] = run(20, True)
  res[f"B{batch}_async"] = run(20, False)
  print(batch, res, flush=True)
leaves = jax.tree.leaves(state)
t0 = time.perf_counter(); [jax.tree.leaves(state) for _ in range(20)]; res["flatten_ms"] = (time.perf_counter() - t0) / 20 * 1e3
res["num_leaves"] = len(leaves)
f = jax.jit(lambda st: jax.tree.leaves(st)[0].sum())
jax.block_until_ready(f(state))
t0 = time.perf_counter()
for _ in range(20): r = f(state)
jax.block_until_ready(r); res["dispatch_state_ms"] = (time.perf_counter() - t0) / 20 * 1e3
# Trace one blocked step for the kernel list.
jax.profiler.start_trace(os.environ["OUT"] + "/trace")
run(3, True)
jax.profiler.stop_trace()
print(json.dumps(res, indent=1))
json.dump(res, open(os.environ["OUT"] + "/probe.json", "w"), indent=1)
