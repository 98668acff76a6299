"""Tuned block sizes of the grouped-matmul kernels.

`TILES` holds the Triton kernel's options (`triton.gmm_triton`); `api.gmm` passes
them for `triton` and `interpret`. `SWIGLU_TILES` holds its options for the gate/up
projection with the SwiGLU epilogue in the kernel (`swiglu=True`, no K split); None
means the op runs the plain kernel and applies the activation in XLA.
`MOSAIC_GPU_TILES` holds the Mosaic GPU kernel's (`mosaic_gpu.gmm_mosaic_gpu`), passed
for `mosaic_gpu` and `mosaic_gpu_interpret`. The TPU kernel runs with its function's
defaults (`tpu.gmm_tpu`; not yet swept on a TPU). `parse_overrides` reads the tilings
a sweep of the Triton or Mosaic GPU kernel times (`benchmark --suite=gmm_sweep
--impl=... --gmm_variants=...`).
"""

from __future__ import annotations

import json
from typing import Any

# Tiles from sweeps on an H200 (docs/benchmarks/gmm_sweep_h200.md): experts with few
# rows (the common decode case) are fastest with 16-row blocks (less wasted work, more
# programs in flight); experts with many rows with 64-row blocks, which read each
# weight tile once per 64 rows; experts with 17-32 rows with 32-row blocks (at B = 64
# over 16 experts, 32 rows each, gate+up 34.7 and down 19.5 us against 39.3 and 25.3
# with 64-row blocks). At most 2112 programs launch (16 per SM; 3 fit on an SM at a
# time, docs/benchmarks/experiments/gmm_ncu_h100.md), each looping over work items:
# one program per possible item launched thousands that exit at once when few experts
# have rows (the down projection at 8 experts took 13.6 instead of 10.7 us).
TILES = dict(row_tiles=(16, 32, 64), block_n=128, block_k=64, k_splits=2, num_warps=4,
             num_stages=3, max_programs=2112)

# The fused SwiGLU epilogue: each program accumulates a gate and an up block side by
# side over the whole contraction. Timed against the plain kernel followed by XLA's
# split-K sum and activation on an H100 (docs/benchmarks/moe_layer_variants_h100.json,
# one MoE layer, B = 1, 16, 64 at 8, 32, 128 experts): with 64-column blocks 0.96-1.04x
# the plain path's time, with 32-column blocks 1.02-1.28x. The kernel it saves is paid
# back in fewer programs per expert (no K split), so the op keeps the plain kernel.
SWIGLU_TILES = None

# Mosaic GPU kernel: 64x128 output tiles over 64-deep contraction steps, a six-deep TMA
# pipeline (24 KiB of operands per stage). From a sweep on an H100
# (docs/benchmarks/gmm_sweep_mosaic_h100.md; B = 1, 16, 64 at 8, 32, 128 experts, both
# projections): six stages took 0.97-1.04x the time of four (geometric mean 0.988),
# the other tilings were slower (64-column blocks 1.17x, K splits 1.07-1.14x, two stages
# 1.26x, 128-deep steps 1.07x). Even so, the MoE layer with this kernel took 1.04-1.17x
# the time with the Triton kernel at every measured shape
# (docs/benchmarks/moe_layer_variants_h100.json; 1.06-1.31x over the 20 cases of the
# H100 standard suite's MoE-layer table), so `auto` runs the Triton kernel.
MOSAIC_GPU_TILES = dict(block_n=128, block_k=64, k_splits=1, max_concurrent_steps=6)

# The tilings a sweep times when none are named: the tuned table, then around it other
# row tiles, one program per possible item (no item loop), other K splits, narrower N
# blocks (twice the work items, each half as long), longer K steps, fewer warps per
# program, a deeper software pipeline.
DEFAULT_OVERRIDES = (
    {}, dict(row_tiles=(16, 64)), dict(row_tiles=(16,)), dict(max_programs=None),
    dict(k_splits=1), dict(k_splits=4), dict(block_n=64), dict(block_k=128),
    dict(num_warps=2), dict(num_stages=4))


# The Mosaic GPU tilings a sweep times when none are named: the table, then narrower N
# blocks, K splits (more work items when few experts have rows), shallower and deeper
# TMA pipelines, and 128-deep contraction steps with a pipeline that fits shared memory.
MOSAIC_GPU_DEFAULT_OVERRIDES = (
    {}, dict(block_n=64), dict(k_splits=2), dict(k_splits=4), dict(block_n=64, k_splits=2),
    dict(max_concurrent_steps=2), dict(max_concurrent_steps=6),
    dict(block_k=128, max_concurrent_steps=2))

# Per swept kernel: its tuned table and the tilings a sweep times by default.
SWEPT = {"triton": (TILES, DEFAULT_OVERRIDES),
         "mosaic_gpu": (MOSAIC_GPU_TILES, MOSAIC_GPU_DEFAULT_OVERRIDES)}


def parse_overrides(text: str, kernel: str = "triton") -> list[dict[str, Any]]:
  """Overrides of `kernel`'s table (`SWEPT`) from a JSON list of objects (lists become
  the tuples jit's static arguments need); its default tilings for an empty string. A
  ValueError names what is wrong."""
  table, defaults = SWEPT[kernel]
  if not text:
    return [dict(v) for v in defaults]
  try:
    variants = json.loads(text)
  except json.JSONDecodeError as err:
    raise ValueError(f"tile overrides are not JSON: {err}") from err
  if not isinstance(variants, list) or not all(isinstance(v, dict) for v in variants):
    raise ValueError("tile overrides must be a JSON list of objects, e.g. "
                     '\'[{}, {"k_splits": 4}]\'')
  unknown = sorted({k for v in variants for k in v} - set(table))
  if unknown:
    raise ValueError(f"unknown {kernel} tile options {unknown}; known: {sorted(table)}")
  return [{k: tuple(x) if isinstance(x, list) else x for k, x in v.items()}
          for v in variants]
