"""Writes a Qwen MoE model as a Hugging Face checkpoint directory (safetensors).

    hf_export.save_qwen(model, "/tmp/model", dtype=ml_dtypes.bfloat16,
                        max_shard_bytes=16 << 20)
    model = qwen_moe.load_hf("/tmp/model")        # the same weights back

The inverse of `qwen_moe.load_hf`: `config.json` in the Hugging Face spelling, weights
`[out, in]`, one tensor per expert, sharded into `model-0000i-of-0000n.safetensors`
files of at most `max_shard_bytes` with a `model.safetensors.index.json`. Files are
written into a temporary directory that is renamed into place at the end.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Any

import numpy as np
from safetensors.numpy import save_file

from sere_jax.models import hf_import


def qwen_hf_config(config) -> dict[str, Any]:
  """The Hugging Face `config.json` dict of a `QwenMoeConfig`."""
  c = config
  hf = {
      "model_type": c.architecture,
      "architectures": ["Qwen3MoeForCausalLM" if c.architecture == "qwen3_moe"
                        else "Qwen2MoeForCausalLM"],
      "vocab_size": c.vocab_size, "hidden_size": c.hidden_size,
      "intermediate_size": c.intermediate_size, "num_hidden_layers": c.num_layers,
      "num_attention_heads": c.num_heads, "num_key_value_heads": c.num_kv_heads,
      "head_dim": c.head_dim, "num_experts": c.num_experts,
      "num_experts_per_tok": c.top_k, "moe_intermediate_size": c.moe_intermediate_size,
      "norm_topk_prob": c.norm_topk_prob, "rms_norm_eps": c.rms_norm_eps,
      "rope_theta": c.rope_theta, "tie_word_embeddings": c.tie_word_embeddings,
      "decoder_sparse_step": c.decoder_sparse_step,
      "mlp_only_layers": list(c.mlp_only_layers), "hidden_act": "silu",
  }
  if c.max_position_embeddings is not None:
    hf["max_position_embeddings"] = c.max_position_embeddings
  if c.architecture == "qwen2_moe":
    hf.update(shared_expert_intermediate_size=c.shared_expert_size, qkv_bias=c.qkv_bias)
  else:
    hf.update(attention_bias=c.qkv_bias)
  return hf


class _Tensors:
  """Collects named tensors in the checkpoint's dtype."""

  def __init__(self, dtype):
    self.dtype = dtype
    self.named: dict[str, np.ndarray] = {}

  def put(self, name: str, value) -> None:
    self.named[name] = np.ascontiguousarray(np.asarray(value, np.float32).astype(self.dtype))

  def linear(self, module, name: str) -> None:
    self.put(f"{name}.weight", np.asarray(module.kernel[...], np.float32).T)
    if module.bias is not None:
      self.put(f"{name}.bias", module.bias[...])

  def swiglu(self, module, name: str) -> None:
    for part in ("gate", "up", "down"):
      self.linear(getattr(module, part), f"{name}.{part}_proj")

  def moe(self, block, name: str) -> None:
    gate_up = np.asarray(block.w_gate_up[...], np.float32)  # [E, D, 2F]
    down = np.asarray(block.w_down[...], np.float32)  # [E, F, D]
    ffn = down.shape[1]
    self.put(f"{name}.gate.weight", np.asarray(block.router_kernel[...], np.float32).T)
    for e in range(gate_up.shape[0]):
      expert = f"{name}.experts.{e}"
      self.put(f"{expert}.gate_proj.weight", gate_up[e, :, :ffn].T)
      self.put(f"{expert}.up_proj.weight", gate_up[e, :, ffn:].T)
      self.put(f"{expert}.down_proj.weight", down[e].T)


def _qwen_tensors(model, dtype) -> dict[str, np.ndarray]:
  from sere_jax.moe import MoeBlock  # pylint: disable=g-import-not-at-top
  out = _Tensors(dtype)
  out.put("model.embed_tokens.weight", model.embed[...])
  for i, layer in enumerate(model.layers):
    name = f"model.layers.{i}"
    out.put(f"{name}.input_layernorm.weight", layer.input_norm.weight[...])
    out.put(f"{name}.post_attention_layernorm.weight", layer.post_attn_norm.weight[...])
    for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
      out.linear(getattr(layer.attn, proj), f"{name}.self_attn.{proj}")
    if layer.attn.q_norm is not None:
      out.put(f"{name}.self_attn.q_norm.weight", layer.attn.q_norm.weight[...])
      out.put(f"{name}.self_attn.k_norm.weight", layer.attn.k_norm.weight[...])
    if isinstance(layer.mlp, MoeBlock):
      out.moe(layer.mlp, f"{name}.mlp")
    else:
      out.swiglu(layer.mlp, f"{name}.mlp")
    if layer.shared_expert is not None:
      out.swiglu(layer.shared_expert, f"{name}.mlp.shared_expert")
      out.linear(layer.shared_expert_gate, f"{name}.mlp.shared_expert_gate")
  out.put("model.norm.weight", model.norm.weight[...])
  if model.lm_head is not None:
    out.linear(model.lm_head, "lm_head")
  return out.named


def _shards(tensors: dict[str, np.ndarray], max_bytes: int) -> list[dict[str, np.ndarray]]:
  shards: list[dict[str, np.ndarray]] = [{}]
  size = 0
  for name, array in tensors.items():
    if array.nbytes > max_bytes:
      raise ValueError(f"tensor {name!r} ({array.nbytes} bytes) exceeds max_shard_bytes "
                       f"{max_bytes}")
    if size + array.nbytes > max_bytes and shards[-1]:
      shards.append({})
      size = 0
    shards[-1][name] = array
    size += array.nbytes
  return shards


def save_qwen(model, directory: str, *, dtype=np.float32, max_shard_bytes: int = 1 << 30,
              extra_files: dict[str, str] | None = None, overwrite: bool = False) -> None:
  """Writes `model` (a `QwenMoeForCausalLM`) to `directory` in the HF layout.

  `extra_files` maps file names to paths copied beside the weights (a tokenizer, the
  similarity file). Refuses an existing `directory` unless `overwrite`.
  """
  if os.path.exists(directory) and not overwrite:
    raise FileExistsError(f"{directory} exists; pass overwrite=True to replace it")
  tensors = _qwen_tensors(model, dtype)
  shards = _shards(tensors, max_shard_bytes)
  parent = os.path.dirname(os.path.abspath(directory))
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=".tmp-export-", dir=parent)
  try:
    weight_map = {}
    for i, shard in enumerate(shards):
      file = (hf_import.SINGLE_FILE if len(shards) == 1
              else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors")
      save_file(shard, os.path.join(tmp, file), metadata={"format": "pt"})
      weight_map.update({name: file for name in shard})
    if len(shards) > 1:
      index = {"metadata": {"total_size": sum(a.nbytes for a in tensors.values())},
               "weight_map": weight_map}
      with open(os.path.join(tmp, hf_import.INDEX_FILE), "w") as fh:
        json.dump(index, fh, indent=1)
    with open(os.path.join(tmp, "config.json"), "w") as fh:
      json.dump(qwen_hf_config(model.config), fh, indent=2)
    for name, path in (extra_files or {}).items():
      shutil.copyfile(path, os.path.join(tmp, name))
    if os.path.exists(directory):
      shutil.rmtree(directory)
    os.rename(tmp, directory)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise

