"""The MoE FFN op (see `api`): `from sere_jax.kernels.moe_ffn import moe_ffn`."""

from sere_jax.kernels.moe_ffn.api import (BACKENDS, IMPLEMENTATIONS, IMPLS, REGISTRY,
                                          Backends, MoeOutput, check_expert_weights,
                                          kernel_schedule, moe_ffn, resolve_impl,
                                          routed_ffn)
from sere_jax.kernels.moe_ffn.reference import combine, dense_ffn, ragged_dot_ffn, swiglu

__all__ = ["BACKENDS", "Backends", "IMPLEMENTATIONS", "IMPLS", "REGISTRY", "MoeOutput",
           "check_expert_weights", "combine", "dense_ffn", "kernel_schedule", "moe_ffn",
           "ragged_dot_ffn", "resolve_impl", "routed_ffn", "swiglu"]
