"""The quality study's pieces on a small random model: data, grid, rows, merging; and
the study command end to end at a small size."""

import json
import os
import subprocess
import sys

from flax import nnx
import jax.numpy as jnp
import numpy as np
import pytest

from sere_jax import moe
from sere_jax import policy_spec
from sere_jax.evaluation import metrics as evaluation_metrics
from sere_jax.evaluation import runner
from sere_jax.evaluation import study
from sere_jax.evaluation import study_report
from sere_jax.evaluation.runner import reference
from sere_jax.models.qwen_moe import QwenMoeConfig, QwenMoeForCausalLM

CONFIG = QwenMoeConfig(
    architecture="qwen3_moe", vocab_size=300, hidden_size=16, intermediate_size=32,
    num_layers=2, num_heads=2, num_kv_heads=1, head_dim=8, num_experts=8, top_k=4,
    moe_intermediate_size=8, norm_topk_prob=True, qk_norm=True)


class _Encoding:
  def __init__(self, text):
    self.ids = [ord(c) % 300 for c in text]
    self.offsets = [(i, i + 1) for i in range(len(text))]


class _CharTokenizer:
  """One token per character: offsets are exact, so answer marks are easy to check."""

  def encode(self, text, add_special_tokens=False):
    return _Encoding(text)

  def encode_batch(self, texts, add_special_tokens=False):
    return [_Encoding(t) for t in texts]


DOCS = {
    "prose": ["the quick brown fox jumps over the lazy dog " * 8] * 2,
    "tasks": ["Q: 12+30\nA:42\n\nQ: 7+8\nA:15\n\nQ: 100+1\nA:101\n\n" * 3] * 4,
}


def test_study_data_marks_answers_and_interleaves():
  data = study.study_data(_CharTokenizer(), DOCS, seq_len=24, per_domain=4)
  assert data.tokens.shape == (8, 24)
  assert data.domains == ("prose", "tasks") * 4
  text = DOCS["tasks"][0][:24]
  marks = data.answer[1]
  # Target position p predicts character p + 1: "42" and the newline after it.
  first = text.index("42")
  assert list(np.nonzero(marks == 1)[0]) == [first - 1, first, first + 1]
  assert marks[: first - 1].sum() == 0
  with pytest.raises(ValueError, match="fewer than 9"):
    study.study_data(_CharTokenizer(), DOCS, seq_len=24, per_domain=9)


def _model_with_similarity(seed: int) -> QwenMoeForCausalLM:
  """The small model with a random symmetric similarity (unit diagonal) per layer."""
  model = QwenMoeForCausalLM(CONFIG, impl="xla_dense", attention_impl="xla",
                             rngs=nnx.Rngs(0))
  rng = np.random.default_rng(seed)
  for block in moe.moe_blocks(model):
    sim = rng.uniform(0, 1, (8, 8))
    np.fill_diagonal(sim, 1.0)
    block.similarity[...] = jnp.asarray((sim + sim.T) / 2, jnp.float32)
  return model


def test_grid_rows_against_none():
  model = _model_with_similarity(0)
  data = study.study_data(_CharTokenizer(), DOCS, seq_len=24, per_domain=4)
  ref = reference(model, data.tokens, max_tokens=data.tokens.size)
  specs = policy_spec.parse_list(["none", "sere:2", "keep_active:2:raw", "oracle:2"])
  outcomes = study.run_grid(model, specs, 4, data, jnp.asarray(ref.logp), threads=2)
  rows = [study.row(s, 4, o, outcomes[0], data) for s, o in zip(specs, outcomes)]
  assert rows[0]["ppl_delta_pct"] == 0.0 and rows[0]["ppl_delta_ci"] == [0.0, 0.0]
  assert rows[0]["agreement"] == 1.0
  np.testing.assert_allclose(outcomes[0].nll, ref.nll, rtol=1e-5, atol=1e-6)
  for r in rows[1:]:
    assert r["distinct_per_layer"] < rows[0]["distinct_per_layer"]
    low, high = r["ppl_delta_ci"]
    assert low <= r["ppl_delta_pct"] <= high
    assert set(r["per_domain"]) == {"prose", "tasks"}
  assert rows[0]["task_answers"] > 0
  result = {"model": "m", "rows": rows, "sere_vs_controls": [], "top_k": 4,
            "num_experts": 8, "data": {"seq_len": 24, "per_domain": 4,
                                       "domains": ["prose", "tasks"], "task_answers": 3},
            "command": "cmd"}
  assert "`sere:2:0`" in study_report.markdown(result)


def test_merge_takes_each_batch_size_from_the_first_run():
  def run(groups, tag):
    return {"model": "m", "command": tag, "device": tag, "sere_vs_controls": [],
            "rows": [{"batch_size": g, "spec": "none", "tag": tag} for g in groups]}
  merged = study_report.merge_runs([("a.json", run([8, 16], "a")),
                                   ("b.json", run([16, 32], "b"))])
  assert [(r["batch_size"], r["tag"]) for r in merged["rows"]] == [(8, "a"), (16, "a"),
                                                                    (32, "b")]
  assert [s["batch_sizes"] for s in merged["sources"]] == [[8, 16], [32]]


def test_each_spec_runs_with_its_own_similarity():
  """A grid mixing the stored similarity and a calibrated metric gives each spec its
  own matrices (the compiled programs must not see the last-configured one)."""
  model = QwenMoeForCausalLM(CONFIG, impl="xla_dense", attention_impl="xla",
                             rngs=nnx.Rngs(0))
  rng = np.random.default_rng(0)
  stored, other = [], []
  for block in moe.moe_blocks(model):
    a, b = rng.uniform(0, 1, (2, 8, 8))
    np.fill_diagonal(a, 1.0)
    np.fill_diagonal(b, 1.0)
    block.similarity[...] = jnp.asarray(a, jnp.float32)
    stored.append(a)
    other.append(b)
  data = study.study_data(_CharTokenizer(), DOCS, seq_len=24, per_domain=4)
  ref = jnp.asarray(reference(model, data.tokens, max_tokens=data.tokens.size).logp)
  both = study.run_grid(model, policy_spec.parse_list(["sere:1", "sere:1:0:frobenius"]),
                        4, data, ref, threads=2, metric_matrices={"frobenius": other})
  alone = study.run_grid(model, policy_spec.parse_list(["sere:1:0:frobenius"]), 4, data,
                         ref, threads=2, metric_matrices={"frobenius": other})
  np.testing.assert_allclose(both[1].nll, alone[0].nll, rtol=1e-6)
  assert not np.allclose(both[0].nll, both[1].nll)
  np.testing.assert_array_equal(np.asarray(moe.moe_blocks(model)[0].similarity[...]),
                                np.asarray(stored[0], np.float32))


def test_free_running_greedy_matches_generate():
  """The study's jitted greedy continuation equals `generation.generate`'s (through
  `runner.greedy`) under `none` and under a re-routing policy decoding in groups."""
  model = _model_with_similarity(1)
  data = study.study_data(_CharTokenizer(), DOCS, seq_len=24, per_domain=4)
  ref = jnp.asarray(reference(model, data.tokens, max_tokens=data.tokens.size).logp)
  specs = policy_spec.parse_list(["none", "sere:1"])
  outcomes = study.run_grid(model, specs, 4, data, ref, threads=2, greedy_tokens=6)
  stored = runner.stored_similarity(model)
  for spec, out in zip(specs, outcomes):
    assert out.continuation.shape == (8, 6)
    runner.configure(model, policy_spec.layer_configs(spec, stored, len(stored)), 4)
    expected = runner.greedy(model, data.tokens[:, :18], 6, 4, max_tokens=10_000)
    np.testing.assert_array_equal(out.continuation, expected)
  none_row = study.row(specs[0], 4, outcomes[0], outcomes[0], data)
  assert none_row["greedy_match"] == 1.0 and none_row["greedy_prefix"] == 6.0
  sere_row = study.row(specs[1], 4, outcomes[1], outcomes[0], data)
  prefix = np.asarray(evaluation_metrics.agreeing_prefix(outcomes[0].continuation,
                                                         outcomes[1].continuation))
  assert sere_row["greedy_prefix"] == pytest.approx(prefix.mean())
  low, high = sere_row["greedy_prefix_ci"]
  assert low <= sere_row["greedy_prefix"] <= high
  assert "greedy prefix" in study_report.markdown(
      {"model": "m", "rows": [none_row, sere_row], "sere_vs_controls": [], "top_k": 4,
       "num_experts": 8, "command": "cmd",
       "data": {"seq_len": 24, "per_domain": 4, "domains": ["prose", "tasks"],
                "task_answers": 3}})
  with pytest.raises(ValueError, match="greedy_tokens must be in"):
    study.run_grid(model, specs[:1], 4, data, ref, threads=1, greedy_tokens=24)


def test_agreeing_prefix():
  ref = np.array([[1, 2, 3], [1, 2, 3], [4, 5, 6]])
  got = np.array([[1, 2, 3], [1, 9, 3], [0, 5, 6]])
  np.testing.assert_array_equal(evaluation_metrics.agreeing_prefix(ref, got), [3, 1, 0])
  with pytest.raises(ValueError, match="equal"):
    evaluation_metrics.agreeing_prefix(ref, got[:, :2])


def test_script_compares_free_running_agreement_paired(tmp_path):
  """The study command end to end on the shipped upcycled model at a small size: each
  SERE-vs-control comparison carries the paired difference of greedy prefixes, the
  random substitute's as the mean over its seeds."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  proc = subprocess.run(
      [sys.executable, "-m", "sere_jax.scripts.quality_study",
       f"--model_dir={os.path.join(root, 'checkpoints', 'upcycled_moe')}",
       f"--heldout_dir={os.path.join(root, 'checkpoints', 'quality_heldout')}",
       f"--out_dir={tmp_path}", "--batch_sizes=4", "--per_domain=4", "--seq_len=32",
       "--greedy_tokens=8", "--compile_threads=2",
       "--specs=sere:1,keep_active:1:raw,random:1:seed0,random:1:seed1"],
      cwd=root, env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True,
      text=True, timeout=600, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads((tmp_path / "quality_upcycled_moe.json").read_text())
  rows = {r["spec"]: r for r in result["rows"]}
  versus = {v["control"]: v for v in result["sere_vs_controls"]}
  assert set(versus) == {"keep_active:1:raw", "random:1:mean2"}
  for control, v in versus.items():
    expected = rows["sere:1:0"]["greedy_prefix"] - rows[control]["greedy_prefix"]
    assert v["greedy_prefix_delta"] == pytest.approx(expected)
    low, high = v["greedy_prefix_delta_ci"]
    assert low <= v["greedy_prefix_delta"] <= high
  assert "greedy prefix Δ tokens" in (tmp_path / "quality_upcycled_moe.md").read_text()
