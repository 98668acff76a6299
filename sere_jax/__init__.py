"""sere-jax: Similarity-based Expert Re-routing (SERE) for batched MoE decoding in JAX."""

from sere_jax.config import POLICIES, RerouteConfig
from sere_jax.policies import RerouteStats, count_distinct, reroute
from sere_jax.routing import route

__all__ = ["POLICIES", "RerouteConfig", "RerouteStats", "count_distinct", "reroute",
           "route"]
__version__ = "0.1.0"
