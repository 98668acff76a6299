"""The quality-study training path at CPU scale: upcycling, export and the script."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from flax import nnx
import jax.numpy as jnp
import numpy as np
import pytest

from sere_jax import checkpoint
from sere_jax import moe
from sere_jax import upcycling
from sere_jax.models import quality
from sere_jax.models.qwen_moe import QwenMoeForCausalLM
from tests import corpus_fixtures

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_upcycle_copies_slices_and_scales_down():
  recipe = quality.recipes(64)["smoke_upcycled"]
  dense = QwenMoeForCausalLM(recipe.dense, impl="xla_dense", rngs=nnx.Rngs(1))
  model = upcycling.upcycle(dense, recipe.moe, noise=0.0, impl="xla_dense")
  shards = recipe.upcycle_shards
  width = recipe.moe.moe_intermediate_size
  np.testing.assert_array_equal(np.asarray(model.embed[...]), np.asarray(dense.embed[...]))
  for block, layer in zip(moe.moe_blocks(model), dense.layers):
    gate, down = np.asarray(layer.mlp.gate.kernel[...]), np.asarray(layer.mlp.down.kernel[...])
    for e in range(block.num_experts):
      s = e % shards
      np.testing.assert_allclose(np.asarray(block.w_gate_up[...])[e, :, :width],
                                 gate[:, s * width:(s + 1) * width])
      np.testing.assert_allclose(np.asarray(block.w_down[...])[e],
                                 down[s * width:(s + 1) * width] * shards, rtol=1e-6)
    cos = upcycling.expert_cosine_to(block, block.w_gate_up[...], block.w_down[...])
    np.testing.assert_allclose(cos, 1.0, rtol=1e-5)


def test_upcycle_rejects_mismatched_configs():
  recipes = quality.recipes(64)
  dense = QwenMoeForCausalLM(recipes["smoke_upcycled"].dense, impl="xla_dense",
                             rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="differ in"):
    upcycling.upcycle(dense, recipes["fine_grained"].moe)


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory):
  return corpus_fixtures.small_corpus_dir(tmp_path_factory.mktemp("corpus"))


@pytest.mark.parametrize("recipe", ["smoke_fine_grained", "smoke_upcycled"])
def test_train_moe_script(corpus_dir, tmp_path, recipe):
  out = tmp_path / "model"
  args = [sys.executable, "-m", "sere_jax.scripts.train_moe", f"--recipe={recipe}",
          f"--corpus_dir={corpus_dir}", f"--workdir={tmp_path / 'wd'}", f"--out_dir={out}",
          "--steps=4", "--dense_steps=3", "--batch_size=4", "--seq_len=32",
          "--warmup_steps=1", "--log_every=2", "--checkpoint_every=2", "--eval_windows=2",
          "--calibration_tokens=256"]
  proc = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=600,
                        check=False)
  assert proc.returncode == 0, proc.stderr[-4000:]
  names = set(os.listdir(out))
  assert {"config.json", "model.safetensors", "tokenizer.json", "MODEL_CARD.md",
          "sere_similarity.safetensors", "training_summary.json"} <= names
  summary = json.loads((out / "training_summary.json").read_text())
  assert summary["tokens_seen"] == (4 + (3 if recipe == "smoke_upcycled" else 0)) * 4 * 32
  assert set(summary["similarity"]["spread"]) >= {"cosine", "frobenius"}
  model = checkpoint.load_model(str(out))
  sim = np.asarray(moe.moe_blocks(model)[0].similarity[...])
  assert np.all(np.isfinite(sim))
  # The run resumes: the same command with --overwrite finds its checkpoints.
  proc = subprocess.run(args + ["--overwrite"], cwd=REPO, capture_output=True, text=True,
                        timeout=600, check=False)
  assert proc.returncode == 0, proc.stderr[-4000:]
  # An existing output is refused before any work.
  proc = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=600,
                        check=False)
  assert proc.returncode != 0 and "--overwrite" in proc.stderr
