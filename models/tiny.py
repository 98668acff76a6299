"""The tiny fine-grained MoE that sere-jax trains on Shakespeare and ships.

A byte-level Qwen3-MoE (the same layers and MoE block as the large models): 4 decoder
layers, width 256, every layer an MoE of 32 routed experts of width 96 with top-4
routing (renormalised, as Qwen3), grouped-query attention with per-head q/k norm.
About 10.4 M parameters (21 MB in bfloat16).
"""

from __future__ import annotations

from sere_jax.models.qwen_moe import QwenMoeConfig

TINY_SHAKESPEARE = QwenMoeConfig(
    architecture="qwen3_moe", vocab_size=256, hidden_size=256, intermediate_size=512,
    num_layers=4, num_heads=4, num_kv_heads=2, head_dim=64, num_experts=32, top_k=4,
    moe_intermediate_size=96, norm_topk_prob=True, qk_norm=True, rope_theta=10000.0)

# The same shape of model, small enough for a CPU smoke run in tests.
SMOKE = QwenMoeConfig(
    architecture="qwen3_moe", vocab_size=256, hidden_size=32, intermediate_size=64,
    num_layers=2, num_heads=2, num_kv_heads=1, head_dim=16, num_experts=8, top_k=4,
    moe_intermediate_size=16, norm_topk_prob=True, qk_norm=True, rope_theta=10000.0)

CONFIGS = {"tiny": TINY_SHAKESPEARE, "smoke": SMOKE}
