"""The per-layer re-routing diagnosis on a small random model."""

from flax import nnx
import jax.numpy as jnp
import numpy as np
import pytest

from sere_jax import diagnosis
from sere_jax import moe
from sere_jax.models.qwen_moe import QwenMoeConfig, QwenMoeForCausalLM

CONFIG = QwenMoeConfig(
    architecture="qwen3_moe", vocab_size=40, hidden_size=16, intermediate_size=32,
    num_layers=2, num_heads=2, num_kv_heads=1, head_dim=8, num_experts=8, top_k=4,
    moe_intermediate_size=8, norm_topk_prob=True, qk_norm=True)


def _model(calibrated=True):
  model = QwenMoeForCausalLM(CONFIG, impl="xla_dense", attention_impl="xla",
                             rngs=nnx.Rngs(0))
  rng = np.random.default_rng(0)
  for block in moe.moe_blocks(model):
    sim = rng.uniform(0, 1, (8, 8))
    sim = (sim + sim.T) / 2
    np.fill_diagonal(sim, 1.0)
    if calibrated:
      block.similarity[...] = jnp.asarray(sim, jnp.float32)
  return model


def test_diagnosis_fields_and_bounds():
  tokens = np.random.default_rng(1).integers(0, 40, (8, 6))
  report = diagnosis.diagnose(_model(), tokens, batch_size=4, select_top_k=(1, 3),
                              threshold=0.5, tolerance=1e9)
  assert len(report["layers"]) == 2
  for layer in report["layers"]:
    one, three = layer["per_select_top_k"]["1"], layer["per_select_top_k"]["3"]
    assert one["distinct_sere"] <= three["distinct_sere"] <= one["distinct_none"] + 1e-9
    for m in (one, three):
      assert 0.0 <= m["substitute_share"] <= 1.0
      assert m["error_sere"] > 0 and m["error_oracle"] > 0
      assert m["oracle_gap"] == pytest.approx(m["error_sere"] - m["error_oracle"])
    assert one["error_sere"] > three["error_sere"]  # fewer primaries, more moved
    assert layer["recommendation"] == {"reroute": True, "select_top_k": 1,
                                       "threshold": 0.5}


def test_recommendation_can_say_no():
  per_s = {"1": {"error_sere": 0.3}, "2": {"error_sere": 0.2}}
  assert not diagnosis.recommend(per_s, 0.0, 0.1)["reroute"]
  assert diagnosis.recommend(per_s, 0.0, 0.25)["select_top_k"] == 2


def test_bad_inputs():
  tokens = np.zeros((6, 4), np.int32)
  with pytest.raises(ValueError, match="multiple of batch_size"):
    diagnosis.diagnose(_model(), tokens, batch_size=4, select_top_k=(1,))
  with pytest.raises(ValueError, match="select_top_k 4"):
    diagnosis.diagnose(_model(), tokens[:4], batch_size=4, select_top_k=(4,))
  with pytest.raises(ValueError, match="no calibrated similarity"):
    diagnosis.diagnose(_model(calibrated=False), tokens[:4], batch_size=4,
                       select_top_k=(1,))
