"""The decode-attention op (see `api`)."""

from sere_jax.kernels.decode_attention.api import (IMPLEMENTATIONS, REGISTRY,
                                                   decode_attention)
from sere_jax.kernels.decode_attention.reference import decode_attention_reference

__all__ = ["IMPLEMENTATIONS", "REGISTRY", "decode_attention",
           "decode_attention_reference"]
