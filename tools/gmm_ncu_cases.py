"""Launches the Triton grouped matmul once per case, twice, for a kernel profiler.

    ncu --kernel-name regex:'.*gmm.*' --launch-count 2N [SECTIONS] \\
        python tools/gmm_ncu_cases.py K:N:DISTINCT [K:N:DISTINCT ...]

Each case is a weight `[128, K, N]` with the tuned tiles (`tiles.TILES`) and 16 tokens
of 8 expert-sorted rows routed to exactly DISTINCT experts
(`gmm_sweep.forced_schedules`, one draw per case in order from one generator). The
kernel is jitted and called twice per case (the first call compiles), so a profiler that
skips nothing sees 2 launches per case, in the order given. Weights and rows are
constant arrays: the values do not change a memory-bound kernel's traffic. Run it with
XLA's command buffers off (`XLA_FLAGS=--xla_gpu_enable_command_buffer=`), or the kernels
are graph nodes the profiler does not see one by one. Only a GPU runs the Triton kernel.
"""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import numpy as np

from sere_jax.benchmarking import gmm_sweep
from sere_jax.kernels.gmm import tiles
from sere_jax.kernels.gmm.triton import gmm_triton

EXPERTS, TOP_K, BATCH = 128, 8, 16


def parse_case(text: str) -> tuple[int, int, int]:
  """`K:N:DISTINCT` -> `(K, N, DISTINCT)`; ValueError names a malformed case."""
  parts = text.split(":")
  if len(parts) != 3 or not all(p.isdigit() and int(p) > 0 for p in parts):
    raise ValueError(f"a case is K:N:DISTINCT (positive integers), got {text!r}")
  contract, width, distinct = map(int, parts)
  if distinct > EXPERTS:
    raise ValueError(f"DISTINCT must be at most {EXPERTS}, got {distinct} in {text!r}")
  return contract, width, distinct


def main(argv: list[str]) -> None:
  if len(argv) < 2:
    raise SystemExit(__doc__)
  cases = [parse_case(text) for text in argv[1:]]
  kernel = jax.jit(lambda lhs, w, offsets: gmm_triton(lhs, w, offsets, None,
                                                      **tiles.TILES))
  rng = np.random.default_rng(0)
  for contract, width, distinct in cases:
    (schedule,) = gmm_sweep.forced_schedules(rng, BATCH, TOP_K, EXPERTS, distinct, 1)
    w = jnp.ones((EXPERTS, contract, width), jnp.bfloat16)
    lhs = jnp.ones((BATCH * TOP_K, contract), jnp.bfloat16)
    for _ in range(2):
      jax.block_until_ready(kernel(lhs, w, schedule.group_offsets))
    print(f"K={contract} N={width} distinct={distinct}: launched twice", flush=True)


if __name__ == "__main__":
  main(sys.argv)
