"""Times the attention's output projection with the residual add and RMSNorm on a GPU.

    python tools/residual_norm_sweep.py OUT.json [BATCHES]

Qwen3-30B-A3B's shapes (a `[B, 4096] x [4096, 2048]` bf16 projection, a 2048-wide
residual stream) per batch size (default 1,16,64), µs per layer over 8 layers (the
chain's own update included, the same in every case): `xla`, the models' path without
the kernel (one XLA dot, the add, `rms_norm`), against `split_k_dot` partials summed
by the `residual_norm` Triton kernel at 4, 8 and 16 warps. Both outputs (the sum and
its norm) are used, as a decoder layer uses them.
"""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp

from sere_jax import benchmarking
from sere_jax import fileio
from sere_jax.kernels.decode_attention.reference import rms_norm
from sere_jax.kernels.residual_norm import triton as residual_norm_triton
from sere_jax.numerics import gemm_dot, split_k_count, split_k_dot

D, HEADS_DIM, LAYERS, EPS = 2048, 4096, 8, 1e-6
WARPS = (4, 8, 16)


def _xla(x, w, norm):
  total = x + gemm_dot(jnp.tile(x, (1, 2)), w)
  return total + rms_norm(total, norm, EPS)


def _kernel(x, w, norm, num_warps):
  parts = split_k_dot(jnp.tile(x, (1, 2)), w, split_k_count(*w.shape))
  total, normed = residual_norm_triton.residual_norm_triton(
      x, parts, norm, eps=EPS, num_warps=num_warps)
  return total + normed


def main(argv):
  out_path = argv[1]
  batches = [int(b) for b in (argv[2] if len(argv) > 2 else "1,16,64").split(",")]
  keys = jax.random.split(jax.random.PRNGKey(0), LAYERS)
  weights = [(jax.random.normal(k, (HEADS_DIM, D), jnp.bfloat16) * HEADS_DIM ** -0.5,
              jnp.ones((D,), jnp.bfloat16)) for k in keys]
  cases = {"xla": _xla}
  cases.update({f"kernel_num_warps{n}": (lambda x, w, g, n=n: _kernel(x, w, g, n))
                for n in WARPS})
  rows = []
  for batch in batches:
    x = jax.random.normal(jax.random.PRNGKey(batch), (batch, D), jnp.bfloat16)
    for name, step in cases.items():
      us = benchmarking.LayerChain(step).seconds_per_layer(x, weights) * 1e6
      rows.append(dict(batch=batch, case=name, us=us))
      print(rows[-1], flush=True)
  fileio.write_json_atomic(out_path, dict(
      command="python tools/residual_norm_sweep.py " + " ".join(argv[1:]),
      env=benchmarking.environment(), rows=rows))


if __name__ == "__main__":
  main(sys.argv)
