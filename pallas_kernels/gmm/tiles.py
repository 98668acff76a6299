"""Tuned block sizes of the grouped-matmul kernels.

`TILES` holds the Triton kernel's options (`triton.gmm_triton`); `api.gmm` passes
them for `triton` and `interpret`. The TPU kernel runs with its function's defaults
(`tpu.gmm_tpu`; not yet swept on a TPU).
"""

# Tiles from sweeps on an H200 (docs/benchmarks/gmm_sweep_h200.md): experts with few
# rows (the common decode case) are fastest with 16-row blocks (less wasted work, more
# programs in flight); experts with many rows with 64-row blocks, which read each
# weight tile once per 64 rows; experts with 17-32 rows with 32-row blocks (at B = 64
# over 16 experts, 32 rows each, gate+up 34.7 and down 19.5 us against 39.3 and 25.3
# with 64-row blocks). At most 2112 programs (16 per SM), each looping over work
# items: one program per possible item launched thousands that exit at once when few
# experts have rows (the down projection at 8 experts took 13.6 instead of 10.7 us).
TILES = dict(row_tiles=(16, 32, 64), block_n=128, block_k=64, k_splits=2, num_warps=4,
             num_stages=3, max_programs=2112)
