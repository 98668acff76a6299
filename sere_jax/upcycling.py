"""Sparse upcycling: a trained dense Qwen model becomes an MoE model (Qwen1.5-MoE style).

    moe_model = upcycle(dense_model, moe_config, seed=0)

Every dense layer's SwiGLU of width `F_d` is cut into `shards = F_d // F` slices of
width F (the MoE config's `moe_intermediate_size`); expert e starts as slice
`e % shards`, so each slice is copied `E / shards` times. A copy's down projection is
multiplied by `shards`: with equal routing weights over K distinct slices, the MoE
output is then an unbiased estimate of the dense FFN's sum over all slices. Small
Gaussian noise (`noise` times each weight's standard deviation) breaks the symmetry
between copies. Attention, norms and embeddings are copied; the routers start random.
"""

from __future__ import annotations

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from sere_jax import moe
from sere_jax.models.qwen_moe import QwenMoeConfig, QwenMoeForCausalLM


def check_compatible(dense: QwenMoeConfig, target: QwenMoeConfig) -> int:
  """The number of slices per dense FFN; ValueError names a mismatch."""
  same = ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads",
          "head_dim", "qk_norm", "tie_word_embeddings", "architecture")
  diff = {k: (getattr(dense, k), getattr(target, k)) for k in same
          if getattr(dense, k) != getattr(target, k)}
  if diff:
    raise ValueError(f"dense and MoE configs differ in {diff} (dense, MoE)")
  if dense.num_experts:
    raise ValueError(f"the dense config has {dense.num_experts} experts; expected 0")
  width = target.moe_intermediate_size
  if width < 1 or dense.intermediate_size % width:
    raise ValueError(f"the dense FFN width {dense.intermediate_size} is not a multiple of "
                     f"the expert width {width}")
  shards = dense.intermediate_size // width
  if target.num_experts % shards:
    raise ValueError(f"{target.num_experts} experts are not a multiple of {shards} slices")
  return shards


def upcycle(dense: QwenMoeForCausalLM, config: QwenMoeConfig, *, seed: int = 0,
            noise: float = 0.01, impl: str = "auto") -> QwenMoeForCausalLM:
  """The MoE model of `config` initialised from the trained `dense` model."""
  shards = check_compatible(dense.config, config)
  dtype = jnp.dtype(dense.embed[...].dtype)
  model = QwenMoeForCausalLM(config, impl=impl, param_dtype=dtype, rngs=nnx.Rngs(seed))
  dense_state = nnx.state(dense, nnx.Param)
  model_state = nnx.state(model, nnx.Param)
  flat_dense = dict(nnx.to_flat_state(dense_state))
  updates = {path: flat_dense[path] for path, _ in nnx.to_flat_state(model_state)
             if path in flat_dense}
  nnx.update(model, nnx.from_flat_state(updates))
  rng = np.random.default_rng(seed)
  for layer, dense_layer in zip(model.layers, dense.layers):
    if isinstance(layer.mlp, moe.MoeBlock):
      _fill_experts(layer.mlp, dense_layer.mlp, shards, noise, rng)
  return model


def _fill_experts(block: moe.MoeBlock, mlp, shards: int, noise: float,
                  rng: np.random.Generator) -> None:
  gate = np.asarray(mlp.gate.kernel[...], np.float32)  # [D, F_d]
  up = np.asarray(mlp.up.kernel[...], np.float32)
  down = np.asarray(mlp.down.kernel[...], np.float32)  # [F_d, D]
  width = gate.shape[1] // shards
  gate_up, w_down = [], []
  for e in range(block.num_experts):
    cols = slice((e % shards) * width, (e % shards + 1) * width)
    gate_up.append(np.concatenate([gate[:, cols], up[:, cols]], axis=1))
    w_down.append(down[cols] * shards)
  gate_up, w_down = np.stack(gate_up), np.stack(w_down)
  gate_up += noise * gate_up.std() * rng.standard_normal(gate_up.shape)
  w_down += noise * w_down.std() * rng.standard_normal(w_down.shape)
  dtype = block.w_gate_up[...].dtype
  block.w_gate_up.set_value(jnp.asarray(gate_up, dtype))
  block.w_down.set_value(jnp.asarray(w_down, dtype))


def expert_cosine_to(block: moe.MoeBlock, w_gate_up: jax.Array, w_down: jax.Array
                     ) -> np.ndarray:
  """`[E]` cosine between each expert's weights (gate, up and down, flattened) and the
  given reference weights of the same shapes (e.g. the expert's initial weights)."""
  now = np.concatenate([np.asarray(block.w_gate_up[...], np.float32).reshape(
      block.num_experts, -1), np.asarray(block.w_down[...], np.float32).reshape(
          block.num_experts, -1)], axis=1)
  ref = np.concatenate([np.asarray(w_gate_up, np.float32).reshape(block.num_experts, -1),
                        np.asarray(w_down, np.float32).reshape(block.num_experts, -1)], axis=1)
  return np.sum(now * ref, axis=1) / (np.linalg.norm(now, axis=1) * np.linalg.norm(ref, axis=1))
