"""The residual add + RMSNorm op (see `api`)."""

from sere_jax.kernels.residual_norm.api import IMPLEMENTATIONS, REGISTRY, residual_norm
from sere_jax.kernels.residual_norm.reference import residual_norm_reference

__all__ = ["IMPLEMENTATIONS", "REGISTRY", "residual_norm", "residual_norm_reference"]
