"""Expert parallelism: the routed experts of an MoE layer sharded over a mesh axis.

    mesh = expert_parallel.expert_mesh(8)          # one Auto axis named "expert"
    y = expert_parallel.ffn(x, ids, weights, valid, w_gate_up, w_down,
                            mesh=mesh, axis="expert", impl="auto")

Experts sit on the devices of `axis` in contiguous blocks (`sere_jax.placement`).
Re-routing has happened before: every device holds the whole decode batch and the
same re-routed `(ids, weights)` (the router and the policy are cheap and run
replicated, so every device agrees on them without a collective). Inside `shard_map`
each device runs `moe_ffn.routed_ffn` on the slots of its own experts, reading only
those of its experts that some slot uses, and one `psum` over `axis` adds the partial
outputs (float32, then cast). A decode batch is small (B x D activations, e.g. 64 x
4096 bf16 = 512 KiB), so the all-reduce of the output moves about what an all-to-all
dispatch would, in one collective; the step waits for the device that reads the most
experts (`RerouteStats.max_device_distinct`), which `sere_ep` bounds.

When the axis size does not divide the expert count, the weights are padded with
zero experts to a multiple of it inside the step (a copy of the expert weights per
call: give a dividing count for speed; `set_expert_parallel` says so).
"""

from __future__ import annotations

from absl import logging
from flax import nnx
import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from sere_jax import placement
from sere_jax.kernels import moe_ffn as moe_ffn_lib

# The variables of an MoE block that hold its routed experts, `[E, ...]` each.
EXPERT_PARAMS = ("w_gate_up", "w_down")


def expert_mesh(num_devices: int, axis: str = "expert") -> Mesh:
  """A one-axis mesh over the first `num_devices` devices; ValueError when there are
  fewer."""
  available = jax.devices()
  if isinstance(num_devices, bool) or not isinstance(num_devices, int) or num_devices < 1:
    raise ValueError(f"the expert-parallel device count must be an integer >= 1, got "
                     f"{num_devices!r}")
  if num_devices > len(available):
    hint = (" (on a CPU, XLA_FLAGS=--xla_force_host_platform_device_count="
            f"{num_devices} gives that many host devices)"
            if available[0].platform == "cpu" else "")
    raise ValueError(f"{num_devices} expert-parallel devices asked for, but this machine "
                     f"has {len(available)} {available[0].platform} device(s){hint}")
  return jax.make_mesh((num_devices,), (axis,), devices=available[:num_devices],
                       axis_types=(jax.sharding.AxisType.Auto,))


def check_mesh(mesh: Mesh, axis: str, num_experts: int) -> int:
  """The size of `axis` in `mesh`; ValueError when the axis is missing or the
  experts cannot be placed on it."""
  if not isinstance(mesh, Mesh):
    raise ValueError(f"expert parallelism needs a jax.sharding.Mesh, got {type(mesh)}")
  if axis not in mesh.shape:
    raise ValueError(f"the mesh has axes {tuple(mesh.shape)}, not the expert axis {axis!r}")
  if mesh.axis_types[mesh.axis_names.index(axis)] != jax.sharding.AxisType.Auto:
    raise ValueError(f"the expert axis {axis!r} must be of type AxisType.Auto (XLA places "
                     "the rest of the model): build the mesh with expert_mesh, or with "
                     "jax.make_mesh(..., axis_types=(jax.sharding.AxisType.Auto,))")
  devices = mesh.shape[axis]
  placement.check_placement(num_experts, devices)
  return devices


def ffn(x: jax.Array, ids: jax.Array, weights: jax.Array, valid: jax.Array,
        w_gate_up: jax.Array, w_down: jax.Array, *, mesh: Mesh, axis: str,
        impl: str = "auto") -> jax.Array:
  """`y [T, D]` of already re-routed `ids [T, K]`, `weights [T, K]` over valid tokens
  `valid [T]`, with the experts of `w_gate_up [E, D, 2F]` and `w_down [E, F, D]`
  sharded over `mesh`'s `axis` (see the module docstring)."""
  num_experts = w_gate_up.shape[0]
  devices = check_mesh(mesh, axis, num_experts)
  per_device = placement.experts_per_device(num_experts, devices)
  pad = devices * per_device - num_experts
  if pad:
    w_gate_up = jnp.pad(w_gate_up, ((0, pad), (0, 0), (0, 0)))
    w_down = jnp.pad(w_down, ((0, pad), (0, 0), (0, 0)))
  resolved = moe_ffn_lib.resolve_impl(impl)

  def local(x, ids, weights, valid, w_gate_up, w_down):
    first = jax.lax.axis_index(axis) * per_device
    mine = (ids >= first) & (ids < first + per_device) & valid[:, None]
    local_ids = jnp.where(mine, ids - first, 0)
    y = moe_ffn_lib.routed_ffn(x, local_ids, weights, mine, w_gate_up, w_down,
                               impl=resolved, out_dtype=jnp.float32)
    return jax.lax.psum(y, axis)

  replicated, split = NamedSharding(mesh, P()), NamedSharding(mesh, P(axis))
  constrain = jax.lax.with_sharding_constraint
  args = [constrain(a, replicated) for a in (x, ids, weights, valid.astype(jnp.bool_))]
  args += [constrain(w, split) for w in (w_gate_up, w_down)]
  # Pallas kernels declare no varying-manual-axes types, so the check stays off.
  y = jax.shard_map(local, mesh=mesh, in_specs=(P(),) * 4 + (P(axis), P(axis)),
                    out_specs=P(), check_vma=False)(*args)
  return y.astype(x.dtype)


def shard_state(model: nnx.Module, mesh: Mesh, axis: str,
                expert_params: tuple[str, ...] = EXPERT_PARAMS) -> None:
  """Places `model`'s arrays on `mesh`: the routed experts' weights (variables named
  in `expert_params` of shape `[E, ...]` whose E the axis divides) split over `axis`,
  everything else replicated. Logs the layers whose expert count the axis does not
  divide (they stay replicated and are padded per step)."""
  devices = mesh.shape[axis]
  uneven = set()

  def place(path, value):
    if not isinstance(value, jax.Array):
      return value
    if path and path[-1] in expert_params and value.ndim == 3:
      if value.shape[0] % devices == 0:
        return jax.device_put(value, NamedSharding(mesh, P(axis)))
      uneven.add(value.shape[0])
    return jax.device_put(value, NamedSharding(mesh, P()))

  state = nnx.state(model)
  nnx.update(model, jax.tree.map_with_path(
      lambda path, v: place(tuple(k.key for k in path if hasattr(k, "key")), v), state))
  if uneven:
    logging.warning("expert counts %s are not multiples of the %d devices of axis %r: "
                    "those expert weights stay replicated and are padded each step",
                    sorted(uneven), devices, axis)
