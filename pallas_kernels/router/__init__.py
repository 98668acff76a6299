"""The softmax top-K router op (see `api`)."""

from sere_jax.kernels.router.api import IMPLEMENTATIONS, REGISTRY, route
from sere_jax.kernels.router.reference import route_reference

__all__ = ["IMPLEMENTATIONS", "REGISTRY", "route", "route_reference"]
