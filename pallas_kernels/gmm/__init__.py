"""The expert-skipping grouped-matmul op (see `api`)."""

from sere_jax.kernels.gmm.api import IMPLEMENTATIONS, REGISTRY, gmm
from sere_jax.kernels.gmm.reference import gmm_reference, row_experts
from sere_jax.kernels.gmm.tiles import TILES

__all__ = ["IMPLEMENTATIONS", "REGISTRY", "TILES", "gmm", "gmm_reference", "row_experts"]
