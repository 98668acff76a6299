"""Times the Triton schedule kernel alone over its launch options on a GPU.

  python tools/schedule_sweep.py OUT.json [BATCH ...]

Qwen3-30B-A3B routing shapes (E = 128, K = 8), natural routing, policies `none` and
`sere` S=2 rho=0.3; µs per call inside one jit over 8 layers (chain update
subtracted). Writes one JSON row per (batch, policy, max_chunk, max_scan_chunk,
max_place_chunk, num_warps); max_scan_chunk 64 runs the marking and re-routing passes
in 64-slot steps and max_place_chunk 64 the placing pass in 64-slot steps (the
kernel's earlier, slower settings, kept for comparison).
"""

import sys

import jax.numpy as jnp
import numpy as np

from sere_jax import benchmarking
from sere_jax import fileio
from sere_jax import routing
from sere_jax.config import RerouteConfig
from sere_jax.kernels.schedule.triton import schedule_triton

# (max_chunk, max_scan_chunk, max_place_chunk, num_warps)
OPTIONS = [(64, 2048, 512, 4), (64, 2048, 64, 4), (64, 2048, 256, 4), (64, 2048, 1024, 4),
           (64, 2048, 512, 8), (128, 2048, 512, 4), (128, 2048, 512, 8)]
POLICIES = {"none": RerouteConfig(policy="none"),
            "sere2": RerouteConfig(select_top_k=2, threshold=0.3)}


def main():
  out = sys.argv[1]
  batches = [int(b) for b in sys.argv[2:]] or [1, 16, 64, 128, 256]
  experts, top_k, layers = 128, 8, 8
  rng = np.random.default_rng(0)
  sims = [jnp.asarray(rng.random((experts, experts)), jnp.float32) for _ in range(layers)]
  rows = []
  for batch in batches:
    x = jnp.ones((batch, 256), jnp.bfloat16)
    overhead = benchmarking.chain_overhead(x, layers)
    ids = [routing.route(jnp.asarray(rng.normal(size=(batch, experts)), jnp.float32),
                         top_k)[0] for _ in range(layers)]
    valid = jnp.ones((batch,), bool)
    for name, config in POLICIES.items():
      for max_chunk, max_scan_chunk, max_place_chunk, num_warps in OPTIONS:
        options = dict(max_chunk=max_chunk, max_scan_chunk=max_scan_chunk,
                       max_place_chunk=max_place_chunk, num_warps=num_warps)

        def step(x, ids, sim, config=config, options=options):
          sched = schedule_triton(ids, valid, sim, config, num_experts=experts, **options)
          return jnp.broadcast_to(sched.stats[1].astype(x.dtype) * 1e-9, x.shape)
        t = benchmarking.LayerChain(step).seconds_per_layer(
            x, list(zip(ids, sims))) - overhead
        rows.append(dict(batch=batch, policy=name, **options, us=t * 1e6))
        print(rows[-1], flush=True)
  command = "python tools/schedule_sweep.py " + " ".join(sys.argv[1:])
  fileio.write_json_atomic(out, dict(suite="schedule_sweep", command=command,
                                     env=benchmarking.environment(), rows=rows))


if __name__ == "__main__":
  main()
