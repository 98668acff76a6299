"""Model recipes of the quality study: a fine-grained MoE and an upcycled one.

Both are Qwen3-MoE models (the same classes as imported checkpoints) over the mixed
corpus's byte-level BPE vocabulary, small enough to train on one GPU in minutes and to
ship in bf16 (about 6 M parameters, 12 MB each):

  fine_grained  4 layers, width 192, 64 routed experts of width 32, top-6 (DeepSeek /
                Qwen3 style, trained from scratch);
  upcycled      the same attention, first trained dense with a SwiGLU of width 512,
                then each layer's FFN split into 8 slices of 64 that are copied 4 times
                into 32 experts of width 64, top-4 (Qwen1.5-MoE style), trained on.

`smoke_*` are the same recipes at a size a CPU test trains in seconds.
"""

from __future__ import annotations

import dataclasses

from sere_jax.models.qwen_moe import QwenMoeConfig


@dataclasses.dataclass(frozen=True)
class Recipe:
  """A model to train: the MoE config and, for upcycling, the dense one before it."""

  name: str
  moe: QwenMoeConfig
  dense: QwenMoeConfig | None = None  # trained first, then upcycled into `moe`

  @property
  def upcycle_shards(self) -> int:
    """Slices each dense FFN is split into (each copied into several experts)."""
    if self.dense is None:
      return 0
    return self.dense.intermediate_size // self.moe.moe_intermediate_size


def _qwen3(vocab: int, width: int, heads: int, head_dim: int, layers: int, **kw
           ) -> QwenMoeConfig:
  return QwenMoeConfig(
      architecture="qwen3_moe", vocab_size=vocab, hidden_size=width, num_layers=layers,
      num_heads=heads, num_kv_heads=1, head_dim=head_dim, norm_topk_prob=True,
      qk_norm=True, rope_theta=10000.0, tie_word_embeddings=True, **kw)


def recipes(vocab_size: int) -> dict[str, Recipe]:
  """Every recipe for a tokenizer of `vocab_size` tokens."""
  big = dict(vocab=vocab_size, width=192, heads=3, head_dim=64, layers=4)
  small = dict(vocab=vocab_size, width=32, heads=2, head_dim=16, layers=2)
  return {
      "fine_grained": Recipe("fine_grained", _qwen3(
          **big, intermediate_size=512, num_experts=64, top_k=6, moe_intermediate_size=32)),
      "upcycled": Recipe(
          "upcycled",
          _qwen3(**big, intermediate_size=512, num_experts=32, top_k=4,
                 moe_intermediate_size=64),
          dense=_qwen3(**big, intermediate_size=512, num_experts=0, top_k=1,
                       moe_intermediate_size=0)),
      "smoke_fine_grained": Recipe("smoke_fine_grained", _qwen3(
          **small, intermediate_size=64, num_experts=16, top_k=4, moe_intermediate_size=8)),
      "smoke_upcycled": Recipe(
          "smoke_upcycled",
          _qwen3(**small, intermediate_size=64, num_experts=8, top_k=2,
                 moe_intermediate_size=16),
          dense=_qwen3(**small, intermediate_size=64, num_experts=0, top_k=1,
                       moe_intermediate_size=0)),
  }
