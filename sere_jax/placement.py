"""Where experts live under expert parallelism: contiguous blocks over devices.

With E experts on n devices, device d holds experts `[d*c, min((d+1)*c, E))`, where
`c = ceil(E / n)` (`experts_per_device`). When n divides E every device holds E/n
experts; otherwise the last devices hold fewer (possibly none). A decode step under
expert parallelism waits for the device that reads the most distinct experts, so the
quantity re-routing must lower there is `max_distinct_per_device`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def check_placement(num_experts: int, num_devices: int) -> None:
  """Rejects a device count that cannot hold `num_experts` experts (ValueError)."""
  if isinstance(num_devices, bool) or not isinstance(num_devices, int) or num_devices < 1:
    raise ValueError(f"the number of expert-parallel devices must be an integer >= 1, "
                     f"got {num_devices!r}")
  if num_devices > num_experts:
    raise ValueError(f"{num_devices} expert-parallel devices for {num_experts} experts: "
                     "some devices would hold no expert at all; use at most "
                     f"{num_experts} devices")


def experts_per_device(num_experts: int, num_devices: int) -> int:
  """`c = ceil(E / n)`: the experts of one device's block (the last may hold fewer)."""
  check_placement(num_experts, num_devices)
  return -(-num_experts // num_devices)


def device_of_expert(num_experts: int, num_devices: int) -> jax.Array:
  """`[E]` int32: the device that holds each expert."""
  per_device = experts_per_device(num_experts, num_devices)
  return jnp.arange(num_experts, dtype=jnp.int32) // per_device


def distinct_per_device(ids: jax.Array, valid: jax.Array, num_experts: int,
                        num_devices: int) -> jax.Array:
  """`[n]` int32: distinct experts that valid tokens' slots `ids [T, K]` read on each
  device."""
  used = jnp.zeros((num_experts,), jnp.bool_).at[ids].max(
      jnp.broadcast_to(valid.astype(jnp.bool_)[:, None], ids.shape))
  return jnp.zeros((num_devices,), jnp.int32).at[
      device_of_expert(num_experts, num_devices)].add(used.astype(jnp.int32))


def max_distinct_per_device(ids: jax.Array, valid: jax.Array, num_experts: int,
                            num_devices: int) -> jax.Array:
  """The largest `distinct_per_device` (int32 scalar): what an expert-parallel step
  waits for."""
  return jnp.max(distinct_per_device(ids, valid, num_experts, num_devices))
