"""The latent-attention op of multi-head latent attention's decode step (see `api`)."""

from sere_jax.kernels.latent_attention.api import (IMPLEMENTATIONS, REGISTRY,
                                                   latent_attention)
from sere_jax.kernels.latent_attention.reference import latent_attention_reference

__all__ = ["IMPLEMENTATIONS", "REGISTRY", "latent_attention", "latent_attention_reference"]
