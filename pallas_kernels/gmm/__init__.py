"""The expert-skipping grouped-matmul op (see `api`)."""

from sere_jax.kernels.gmm.api import ACTIVATIONS, IMPLEMENTATIONS, REGISTRY, gmm
from sere_jax.kernels.gmm.reference import gmm_reference, row_experts, swiglu
from sere_jax.kernels.gmm.tiles import MOSAIC_GPU_TILES, SWIGLU_TILES, TILES

__all__ = ["ACTIVATIONS", "IMPLEMENTATIONS", "MOSAIC_GPU_TILES", "REGISTRY",
           "SWIGLU_TILES", "TILES", "gmm", "gmm_reference", "row_experts", "swiglu"]
