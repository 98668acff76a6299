"""Times the latent-attention op on a GPU: the XLA reference against Triton kernel
configurations.

    python tools/latent_attention_sweep.py OUT.json [BATCHES] [SLOTS]

DeepSeek-V2-Lite's shapes (16 heads, a 512-wide latent, a 64-wide rotary key, bf16)
per batch size (default 1,16,64) over a cache of SLOTS slots (default 160, the
decode benchmark's prompt of 128 and 32 new tokens), the new token in the last slot:
µs per layer over 8 layers, each with its own cache (the chain's own update included,
the same in every case). Kernel cases are named `block_s{N}_warps{W}_splits{P}`;
`default` is the kernel with `triton.default_config`'s block and splits.
"""

from __future__ import annotations

import functools
import itertools
import sys

import jax
import jax.numpy as jnp

from sere_jax import benchmarking
from sere_jax import fileio
from sere_jax.kernels.latent_attention import reference
from sere_jax.kernels.latent_attention import triton

HEADS, RANK, ROPE, LAYERS, SCALE = 16, 512, 64, 8, 0.1
BLOCK_S, WARPS, SPLITS = (16, 32, 64), (4, 8), (1, 2, 4, 8)


def main(argv):
  out_path = argv[1]
  batches = [int(b) for b in (argv[2] if len(argv) > 2 else "1,16,64").split(",")]
  slots = int(argv[3]) if len(argv) > 3 else 160
  index = jnp.int32(slots - 1)
  cases = {"xla": reference.latent_attention_reference,
           "default": triton.latent_attention_triton}
  for block_s, warps, splits in itertools.product(BLOCK_S, WARPS, SPLITS):
    cases[f"block_s{block_s}_warps{warps}_splits{splits}"] = functools.partial(
        triton.latent_attention_triton, block_s=block_s, num_warps=warps, splits=splits)
  rows = []
  for batch in batches:
    keys = jax.random.split(jax.random.PRNGKey(batch), 2 + 2 * LAYERS)
    q_latent = jax.random.normal(keys[0], (batch, HEADS, RANK), jnp.bfloat16)
    q_pe = jax.random.normal(keys[1], (batch, HEADS, ROPE), jnp.bfloat16)
    visible = jnp.ones((batch, slots), bool)
    caches = [(q_pe, jax.random.normal(keys[2 + 2 * i], (batch, slots, RANK), jnp.bfloat16),
               jax.random.normal(keys[3 + 2 * i], (batch, slots, ROPE), jnp.bfloat16),
               visible) for i in range(LAYERS)]
    for name, fn in cases.items():
      step = lambda x, pe, latent, k_pe, vis, fn=fn: fn(x, pe, latent, k_pe, vis, index,
                                                        scale=SCALE)
      us = benchmarking.LayerChain(step).seconds_per_layer(q_latent, caches) * 1e6
      rows.append(dict(batch=batch, slots=slots, case=name, us=us))
      print(rows[-1], flush=True)
  fileio.write_json_atomic(out_path, dict(
      command="python tools/latent_attention_sweep.py " + " ".join(argv[1:]),
      env=benchmarking.environment(), rows=rows))


if __name__ == "__main__":
  main(sys.argv)
