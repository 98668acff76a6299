"""The fused SERE re-routing + expert-skip schedule op (see `api`)."""

from sere_jax.kernels.schedule.api import IMPLEMENTATIONS, REGISTRY, schedule
from sere_jax.kernels.schedule.reference import (STAT_NAMES, Schedule,
                                                 active_experts_from_offsets,
                                                 build_schedule, reference_schedule,
                                                 sere_kernel_config)

__all__ = ["IMPLEMENTATIONS", "REGISTRY", "STAT_NAMES", "Schedule",
           "active_experts_from_offsets", "build_schedule", "reference_schedule",
           "schedule", "sere_kernel_config"]
