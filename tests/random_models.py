"""Models with NumPy-random weights for the tests (jax.random init compiles per shape,
which is slow on CPU)."""

from __future__ import annotations

from flax import nnx
import jax.numpy as jnp
import numpy as np

from sere_jax.models import qwen_moe


def random_qwen(hf: dict, seed: int = 0, **options) -> qwen_moe.QwenMoeForCausalLM:
  """A Qwen MoE model of HF config `hf` (MoE impl `xla_dense` unless `options` say
  otherwise); the same `seed` gives the same weights whatever the options."""
  config = qwen_moe.QwenMoeConfig.from_hf(hf)
  options = {"impl": "xla_dense", **options}
  model = nnx.eval_shape(lambda: qwen_moe.QwenMoeForCausalLM(
      config, rngs=nnx.Rngs(0), **options))
  rng = np.random.default_rng(seed)
  for _, var in nnx.iter_graph(model):
    if isinstance(var, nnx.Variable):
      var.set_value(jnp.asarray(rng.normal(0.0, 0.3, var.shape), var.dtype))
  return model
