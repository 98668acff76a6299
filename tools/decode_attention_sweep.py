"""Times the decode-attention kernel over long KV caches on a GPU, per layer.

    python tools/decode_attention_sweep.py OUT.json [BATCHES] [CACHE_LENGTHS] [BLOCKS]

Qwen3-30B-A3B's attention (32 query heads over 4 KV heads of 128, bf16, q/k norm) for
one new token per sequence at slot `length - 10` of a cache of `length` slots, per
batch size (default 1,16,64) and cache length (default 160,1024,4096,16384): the
Triton kernel with its cache shared among 1, 2, 4, ... 64 programs per sequence and
KV head (`splits`; up to 4096 programs and one block per split) and with
`default_splits`' choice, for each block size (`block_s`; default 64, the kernel's).
The caches are carried through the loop and updated in place as in decoding
(`benchmarking.LayerChain(..., carry_args=True)`). Times are µs per layer over 8
layers, the chain's own update (one small fusion per layer) included, with the
read-bandwidth roofline of the keys and values read. (The committed H100
sweep ran this tool's earlier loop of its own, which also carried the caches and added
one small fusion per layer.)
"""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp

from sere_jax import benchmarking
from sere_jax import fileio
from sere_jax.benchmarking import bandwidth
from sere_jax.kernels.decode_attention import triton as attention_triton
from sere_jax.models import layers

D, HEADS, KV_HEADS, HEAD_DIM, LAYERS = 2048, 32, 4, 128, 8
SPLITS = (1, 2, 4, 8, 16, 32, 64)


def _attend(x, k_cache, v_cache, index, splits, block_s):
  """One decode-attention call whose q, k, v are slices of `x [B, 2048]`: `(out [B,
  2048] (its first 16 heads), (k_cache, v_cache))`."""
  batch, length = x.shape[0], k_cache.shape[1]
  q = jnp.tile(x, (1, 2)).reshape(batch, HEADS, HEAD_DIM)
  kv = x.reshape(batch, D // HEAD_DIM, HEAD_DIM)[:, :KV_HEADS]
  visible = jnp.broadcast_to(jnp.arange(length) <= index, (batch, length))
  out, k_cache, v_cache = attention_triton.decode_attention_triton(
      jnp.concatenate([q, kv, kv], axis=1), k_cache, v_cache, visible, jnp.int32(index),
      jnp.full((batch,), index, jnp.int32), layers.rope_inv_freq(HEAD_DIM, 1e6),
      jnp.ones((HEAD_DIM,), jnp.float32), jnp.ones((HEAD_DIM,), jnp.float32), eps=1e-6,
      scale=HEAD_DIM ** -0.5, block_s=block_s, splits=splits)
  return out.reshape(batch, -1)[:, :D], (k_cache, v_cache)


def main(argv):
  out_path = argv[1]
  batches = [int(b) for b in (argv[2] if len(argv) > 2 else "1,16,64").split(",")]
  lengths = [int(n) for n in (argv[3] if len(argv) > 3 else "160,1024,4096,16384").split(",")]
  block_sizes = [int(n) for n in (argv[4] if len(argv) > 4 else "64").split(",")]
  read_bw = bandwidth.probe()["read"]["tbs"] * 1e12
  header = dict(command="python tools/decode_attention_sweep.py " + " ".join(argv[1:]),
                env=benchmarking.environment(), read_bandwidth_tbs=read_bw / 1e12,
                splits_table=attention_triton.SPLITS)
  rows = []
  for batch in batches:
    x = jax.random.normal(jax.random.PRNGKey(batch), (batch, D), jnp.bfloat16)
    for length in lengths:
      index = length - 10
      keys = jax.random.split(jax.random.PRNGKey(length), 2 * LAYERS)
      shape = (batch, length, KV_HEADS, HEAD_DIM)
      caches = tuple((jax.random.normal(keys[2 * i], shape, jnp.bfloat16),
                      jax.random.normal(keys[2 * i + 1], shape, jnp.bfloat16))
                     for i in range(LAYERS))
      roofline = 2 * batch * (index + 1) * KV_HEADS * HEAD_DIM * 2 / read_bw * 1e6
      default = attention_triton.default_splits(batch, KV_HEADS, length)
      for block_s in block_sizes:
        blocks = -(-(index + 1) // block_s)
        for splits in sorted({s for s in SPLITS
                              if s <= blocks and batch * KV_HEADS * s <= 4096} | {default}):
          chain = benchmarking.LayerChain(
              lambda x, kc, vc, s=splits, b=block_s: _attend(x, kc, vc, index, s, b),
              carry_args=True)
          us = chain.seconds_per_layer(x, caches) * 1e6
          caches = chain.layer_args  # the chain consumed the caches it was given
          rows.append(dict(batch=batch, cache_len=length, block_s=block_s, splits=splits,
                           default=splits == default, us=us, roofline_us=roofline,
                           ratio=us / roofline))
          print(rows[-1], flush=True)
      del caches
      # Rewritten after each cache length, so a run cut short keeps what it measured.
      fileio.write_json_atomic(out_path, dict(header, rows=rows), compact=True)


if __name__ == "__main__":
  main(sys.argv)
