"""Times the non-expert ops of a Qwen3-30B-A3B decode step on a GPU, per layer.

    python tools/decode_layer_sweep.py OUT.json [BATCHES]

Per batch size (default 16,64):
- dense projections, XLA vs the Triton grouped matmul with one "expert" (a split-K
  small-M matmul): q/k/v as three XLA dots (the model's layout), as one XLA dot of
  the concatenated weight, and as `gmm_triton` on it with several tilings; the output
  projection as an XLA dot and as `gmm_triton`; the LM head (once per step, two weight
  sets) as an XLA dot. The XLA dots also with their input padded to two rows
  (`*_two_rows`, `numerics.gemm_dot` as the models call it): at B = 1 XLA rewrites a
  vector-matrix dot as a multiply and a reduction, which a second row avoids; the
  same with the row padded by a copy of itself (`*_two_copies`: a broadcast, which
  XLA may fuse into the GEMM's operand instead of launching a pad kernel); and, on a
  GPU, compiled with XLA options (`XLA_VARIANTS`): cuBLAS instead of XLA's Triton
  GEMMs, and cuBLASLt. (jaxlib 0.11.2 has no compile option that switches the rewrite
  or split-K autotuning off.)
- the decode-attention kernel over a 160-slot cache (index 150) at several tilings;
- routing (router gemm + softmax top-8 of 128): XLA's, and the fused top-K kernel with
  1, 2, 4 and 16 tokens per program and 1, 2 and 4 warps.
Times are µs per layer over a chain of 8 weight sets (`benchmarking.LayerChain`,
chain update subtracted), with the read-bandwidth roofline of the bytes read.
"""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp

from sere_jax import benchmarking
from sere_jax.benchmarking import bandwidth
from sere_jax import fileio
from sere_jax import routing
from sere_jax.kernels.decode_attention.triton import decode_attention_triton
from sere_jax.kernels.gmm.triton import gmm_triton
from sere_jax.kernels.router.triton import route_triton
from sere_jax.models import layers
from sere_jax.numerics import gemm_dot

D, Q, KV, LAYERS, VOCAB = 2048, 32 * 128, 4 * 128, 8, 151936
TRITON_TILES = [dict(block_n=128, block_k=64, k_splits=s, num_warps=4, num_stages=3)
                for s in (2, 4, 8)] + [dict(block_n=64, block_k=64, k_splits=4, num_warps=4,
                                            num_stages=3),
                                       dict(block_n=128, block_k=128, k_splits=4,
                                            num_warps=4, num_stages=3)]


def _triton(x, w, **tiles):
  offsets = jnp.asarray([0, x.shape[0]], jnp.int32)
  return gmm_triton(x, w[None], offsets, **tiles).astype(x.dtype)


CACHE, INDEX = 160, 150
# XLA compiler options the dense projections and the router are also timed with (GPU).
XLA_VARIANTS = {
    "cublas": {"xla_gpu_enable_triton_gemm": False},
    "cublaslt": {"xla_gpu_enable_triton_gemm": False, "xla_gpu_enable_cublaslt": True},
}
EXPERTS, TOP_K = 128, 8


def _dot_two_copies(x, w):
  """`jnp.dot(x, w)`, a single row padded to two by a copy of itself."""
  if x.shape[0] != 1:
    return jnp.dot(x, w)
  return jnp.dot(jnp.broadcast_to(x, (2, x.shape[1])), w)[:1]


def _route(x, w_router, route):
  """Router logits (bf16 x bf16 -> f32, as `MoeBlock`) and a top-K `route`; the weights."""
  logits = jnp.dot(x, w_router, preferred_element_type=jnp.float32)
  _, weights = route(logits, TOP_K, normalize=True)
  return weights


def _attend(x, k_cache, v_cache, **tiles):
  """One decode-attention call whose q, k, v are slices of `x` (32 q heads, 4 KV)."""
  batch = x.shape[0]
  q = jnp.tile(x, (1, 2)).reshape(batch, 32, 128)
  kv = x.reshape(batch, 16, 128)[:, :4]
  visible = jnp.broadcast_to(jnp.arange(CACHE) <= INDEX, (batch, CACHE))
  out, _, _ = decode_attention_triton(
      jnp.concatenate([q, kv, kv], axis=1), k_cache, v_cache, visible, jnp.int32(INDEX),
      jnp.full((batch,), INDEX, jnp.int32), layers.rope_inv_freq(128, 1e6),
      jnp.ones((128,), jnp.float32), jnp.ones((128,), jnp.float32), eps=1e-6,
      scale=128 ** -0.5, **tiles)
  return out


def main(argv):
  out_path = argv[1]
  batches = [int(b) for b in (argv[2] if len(argv) > 2 else "16,64").split(",")]
  read_bw = bandwidth.probe()["read"]["tbs"] * 1e12
  keys = jax.random.split(jax.random.PRNGKey(0), 4 * LAYERS)

  def weight(i, shape):
    return jax.random.normal(keys[i], shape, jnp.bfloat16) * shape[0] ** -0.5

  qkv = [(weight(4 * i, (D, Q)), weight(4 * i + 1, (D, KV)), weight(4 * i + 2, (D, KV)))
         for i in range(LAYERS)]
  fused = [(jnp.concatenate(ws, axis=1),) for ws in qkv]
  o_proj = [(weight(4 * i + 3, (Q, D)),) for i in range(LAYERS)]
  cases = {
      "qkv_xla_three_dots": (lambda x, wq, wk, wv: jnp.concatenate(
          [jnp.dot(x, wq), jnp.dot(x, wk), jnp.dot(x, wv)], axis=1), qkv, D * (Q + 2 * KV)),
      "qkv_xla_fused": (jnp.dot, fused, D * (Q + 2 * KV)),
      "o_xla": (lambda x, w: jnp.dot(jnp.tile(x, (1, Q // D)), w), o_proj, Q * D),
  }
  lm_heads = [(weight(i, (D, VOCAB)),) for i in range(2)]
  cases["lm_head_xla"] = (jnp.dot, lm_heads, D * VOCAB)
  # The models' dot (`numerics.gemm_dot`): one row padded to two.
  cases["qkv_xla_fused_two_rows"] = (gemm_dot, fused, D * (Q + 2 * KV))
  cases["o_xla_two_rows"] = (lambda x, w: gemm_dot(jnp.tile(x, (1, Q // D)), w), o_proj,
                             Q * D)
  cases["lm_head_xla_two_rows"] = (gemm_dot, lm_heads, D * VOCAB)
  cases["qkv_xla_fused_two_copies"] = (_dot_two_copies, fused, D * (Q + 2 * KV))
  cases["o_xla_two_copies"] = (lambda x, w: _dot_two_copies(jnp.tile(x, (1, Q // D)), w),
                               o_proj, Q * D)
  cases["lm_head_xla_two_copies"] = (_dot_two_copies, lm_heads, D * VOCAB)
  routers = [(weight(4 * i + 3, (D, EXPERTS)),) for i in range(LAYERS)]
  cases["router_xla"] = (lambda x, w: _route(x, w, routing.route), routers, D * EXPERTS)
  if jax.default_backend() == "gpu":  # the option exists on GPU clients only
    for name in ("qkv_xla_three_dots", "o_xla", "lm_head_xla", "router_xla"):
      for variant, options in XLA_VARIANTS.items():
        cases[f"{name}_{variant}"] = (*cases[name], options)
  for block_t in (1, 2, 4, 16):
    for warps in (1, 2, 4):
      cases[f"router_triton_block_t{block_t}_num_warps{warps}"] = (
          lambda x, w, o=dict(block_t=block_t, num_warps=warps): _route(
              x, w, lambda lg, k, normalize: route_triton(lg, k, normalize=normalize,
                                                          **o)),
          routers, D * EXPERTS)
  for t in TRITON_TILES:
    name = "_".join(f"{k}{v}" for k, v in t.items())
    cases[f"qkv_triton_{name}"] = (lambda x, w, t=t: _triton(x, w, **t),
                                   fused, D * (Q + 2 * KV))
    cases[f"o_triton_{name}"] = (lambda x, w, t=t: _triton(jnp.tile(x, (1, Q // D)), w, **t),
                                 o_proj, Q * D)
  rows = []
  for batch in batches:
    x = jax.random.normal(jax.random.PRNGKey(batch), (batch, D), jnp.bfloat16)
    overhead = benchmarking.chain_overhead(x, LAYERS)
    caches = [(jax.random.normal(keys[i], (batch, CACHE, 4, 128), jnp.bfloat16),
               jax.random.normal(keys[i + 1], (batch, CACHE, 4, 128), jnp.bfloat16))
              for i in range(LAYERS)]
    cache_elements = 2 * batch * (INDEX + 1) * 4 * 128  # keys and values read, bf16
    for block_s, num_warps in ((16, 4), (32, 4), (64, 4), (64, 2), (128, 4), (32, 2)):
      cases[f"attention_block_s{block_s}_num_warps{num_warps}"] = (
          lambda x, kc, vc, o=dict(block_s=block_s, num_warps=num_warps): _attend(
              x, kc, vc, **o), caches, cache_elements)
    # elements: bf16 values read; options: the chain's XLA compiler options, if any
    for name, (fn, layer_args, elements, *options) in cases.items():
      def step(x, *w, fn=fn):
        y = fn(x, *w)
        return x + jnp.sum(y, dtype=jnp.float32).astype(x.dtype) * 0  # all of y is used
      chain = benchmarking.LayerChain(step, *options)
      try:
        us = (chain.seconds_per_layer(x, layer_args) - overhead) * 1e6
      except jax.errors.JaxRuntimeError as err:  # an XLA option this build refuses
        if not options:
          raise
        rows.append(dict(batch=batch, case=name, error=str(err).splitlines()[0]))
        print(rows[-1], flush=True)
        continue
      roofline = elements * 2 / read_bw * 1e6
      rows.append(dict(batch=batch, case=name, us=us, roofline_us=roofline,
                       ratio=us / roofline))
      print(rows[-1], flush=True)
  fileio.write_json_atomic(out_path, dict(
      command="python tools/decode_layer_sweep.py " + " ".join(argv[1:]),
      env=benchmarking.environment(), read_bandwidth_tbs=read_bw / 1e12, rows=rows))


if __name__ == "__main__":
  main(sys.argv)
