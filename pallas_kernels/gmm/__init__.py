"""The expert-skipping grouped-matmul op (see `api`)."""

from sere_jax.kernels.gmm.api import IMPLEMENTATIONS, REGISTRY, gmm
from sere_jax.kernels.gmm.reference import gmm_reference, row_experts
from sere_jax.kernels.gmm.tiles import MOSAIC_GPU_TILES, TILES

__all__ = ["IMPLEMENTATIONS", "MOSAIC_GPU_TILES", "REGISTRY", "TILES", "gmm",
           "gmm_reference", "row_experts"]
