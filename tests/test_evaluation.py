"""Batch quality evaluation: spec parsing, teacher forcing vs step-by-step decoding,
groups, greedy exact match, task scoring and the evaluate script end to end."""

import functools
import json
import os
import re
import subprocess
import sys

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sere_jax import checkpoint
from sere_jax import evaluation
from sere_jax import moe
from sere_jax import policy_spec
from sere_jax.config import RerouteConfig
from sere_jax.models.qwen_moe import QwenMoeConfig, QwenMoeForCausalLM

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

MAX_TOKENS = 1 << 14
CONFIG = QwenMoeConfig(architecture="qwen3_moe", vocab_size=64, hidden_size=32,
                       intermediate_size=64, num_layers=2, num_heads=2, num_kv_heads=1,
                       head_dim=16, num_experts=8, top_k=4, moe_intermediate_size=16,
                       norm_topk_prob=True)


def _similarity(seed: int, n: int = 8) -> np.ndarray:
  a = np.random.default_rng(seed).uniform(0.0, 1.0, (n, n))
  sim = (a + a.T) / 2
  np.fill_diagonal(sim, 1.0)
  return sim.astype(np.float32)


@pytest.fixture(scope="module")
def model():
  m = QwenMoeForCausalLM(CONFIG, impl="xla_dense", rngs=nnx.Rngs(0))
  for i, block in enumerate(moe.moe_blocks(m)):
    block.similarity[...] = jnp.asarray(_similarity(i))
  return m


@pytest.fixture(scope="module")
def tokens():
  return np.random.default_rng(1).integers(0, 64, (8, 12)).astype(np.int32)


@pytest.fixture(scope="module")
def ref(model, tokens):
  return evaluation.reference(model, tokens, max_tokens=MAX_TOKENS)


def _evaluate(model, tokens, ref, spec_text, g):
  spec = policy_spec.parse(spec_text)
  mats = evaluation.stored_similarity(model)
  evaluation.configure(model, policy_spec.layer_configs(spec, mats, 2), g)
  return evaluation.teacher_forced(model, tokens, g, ref, max_tokens=MAX_TOKENS)


def test_per_layer_quantile_thresholds():
  mats = [_similarity(0), _similarity(1)]
  configs = policy_spec.layer_configs(policy_spec.parse("sere:2:q0.5"), mats, 2)
  for sim, config in zip(mats, configs):
    off = sim[~np.eye(8, dtype=bool)]
    assert config.threshold == pytest.approx(float(np.median(off)))
  with pytest.raises(ValueError, match="one similarity matrix per"):
    policy_spec.layer_configs(policy_spec.parse("sere:2:q0.5"), mats[:1], 2)


# --- Teacher forcing ----------------------------------------------------------------

def test_none_is_its_own_reference(model, tokens, ref):
  result = _evaluate(model, tokens, ref, "none", 4)
  assert result.kl == pytest.approx(0.0, abs=1e-6)
  assert result.agreement == 1.0
  np.testing.assert_allclose(result.nll, ref.nll, atol=1e-6)
  assert result.perplexity == pytest.approx(float(np.exp(ref.nll.mean())))


@functools.partial(jax.jit, static_argnames="graphdef")
def _decode_step(graphdef, state, token, position, cache, cache_valid, index):
  model = nnx.merge(graphdef, state)
  valid = jnp.ones(token.shape, jnp.bool_)
  out = model(token, position, valid, cache, cache_valid, index, decode=True)
  return jax.nn.log_softmax(out.logits[:, 0], axis=-1), out.cache


def _stepwise_nll(model, seqs, config):
  """NLL of each next token decoding `seqs [B, L]` one token at a time with the cache
  (the B tokens of a step re-route together)."""
  moe.set_reroute(model, config, group_size=0)
  graphdef, state = nnx.split(model)
  batch, length = seqs.shape
  cache = model.init_cache(batch, length, jnp.float32)
  cache_valid = jnp.zeros((batch, length), jnp.bool_)
  nll = np.zeros((batch, length - 1))
  for t in range(length - 1):
    cache_valid = cache_valid.at[:, t].set(True)
    logp, cache = _decode_step(graphdef, state, jnp.asarray(seqs[:, t:t + 1]),
                               jnp.full((batch, 1), t, jnp.int32), cache, cache_valid,
                               jnp.asarray(t, jnp.int32))
    nll[:, t] = -np.asarray(logp)[np.arange(batch), seqs[:, t + 1]]
  return nll


@pytest.mark.parametrize("spec_text", ["sere:2", "sere:1:0.5", "sere_hybrid:2:0:0.5"])
def test_teacher_forcing_equals_step_by_step_decode(model, tokens, ref, spec_text):
  result = _evaluate(model, tokens, ref, spec_text, 4)
  group = tokens[4:]
  expected = _stepwise_nll(model, group, policy_spec.parse(spec_text).config())
  np.testing.assert_allclose(result.nll[4:], expected, atol=1e-4)
  assert np.abs(result.nll - ref.nll).max() > 1e-4  # the policy does change something


def test_groups_equal_separate_evaluations(model, tokens, ref):
  whole = _evaluate(model, tokens, ref, "sere:2", 4)
  for lo in (0, 4):
    part = tokens[lo:lo + 4]
    part_ref = evaluation.reference(model, part, max_tokens=MAX_TOKENS)
    alone = _evaluate(model, part, part_ref, "sere:2", 0)
    np.testing.assert_allclose(whole.nll[lo:lo + 4], alone.nll, atol=1e-5)


def test_chunking_does_not_change_results(model, tokens, ref):
  big = _evaluate(model, tokens, ref, "sere:2", 2)
  spec = policy_spec.parse("sere:2")
  evaluation.configure(model, policy_spec.layer_configs(spec, None, 2), 2)
  small = evaluation.teacher_forced(model, tokens, 2, ref, max_tokens=2 * 12)
  np.testing.assert_allclose(small.nll, big.nll, atol=1e-5)
  assert small.kl == pytest.approx(big.kl, rel=1e-4)
  np.testing.assert_allclose(small.stats, big.stats, atol=1e-5)
  assert evaluation.chunk_sequences(8, 12, 2, 2 * 12) == 2
  assert evaluation.chunk_sequences(12, 10, 2, 85) == 6
  with pytest.raises(ValueError, match="multiple of group size 3"):
    evaluation.chunk_sequences(8, 12, 3, 100)


def test_distinct_experts(model, tokens, ref):
  none = _evaluate(model, tokens, ref, "none", 4)
  trunc = _evaluate(model, tokens, ref, "topk_truncate:1", 4)
  assert trunc.distinct <= none.distinct
  assert np.all(trunc.distinct_per_layer <= none.distinct_per_layer + 1e-9)
  assert none.distinct <= 8 and trunc.distinct >= 1
  assert trunc.kl > 0 and trunc.agreement < 1
  one = _evaluate(model, tokens, ref, "none", 1)
  assert one.distinct == pytest.approx(4.0)  # top-4 of one token


def test_uncalibrated_similarity_is_rejected(tokens):
  fresh = QwenMoeForCausalLM(CONFIG, impl="xla_dense", rngs=nnx.Rngs(0))
  ref = evaluation.reference(fresh, tokens, max_tokens=MAX_TOKENS)
  moe.set_reroute(fresh, RerouteConfig("sere", select_top_k=2))
  with pytest.raises(ValueError, match="calibrated similarity"):
    evaluation.teacher_forced(fresh, tokens, 4, ref, max_tokens=MAX_TOKENS)


# --- Greedy exact match and tasks ---------------------------------------------------

def test_greedy_exact_match(model, tokens):
  prompts = tokens[:, :6]
  moe.set_reroute(model, moe.NO_REROUTE)
  a = evaluation.greedy(model, prompts, 5, 4, max_tokens=MAX_TOKENS)
  b = evaluation.greedy(model, prompts, 5, 4, max_tokens=MAX_TOKENS)
  assert a.shape == (8, 5)
  assert evaluation.exact_match(a, b) == (1.0, 5.0)
  c = a.copy()
  c[0, 2] = (c[0, 2] + 1) % 64
  c[1, 0] = (c[1, 0] + 1) % 64
  assert evaluation.exact_match(a, c) == (0.75, (2 + 0 + 6 * 5) / 8)
  with pytest.raises(ValueError, match="shape"):
    evaluation.exact_match(a, c[:, :4])


@pytest.mark.parametrize("text, answer, ok", [
    ("so the answer is 42.", "#### 42", True),
    ("She pays 1,234 dollars", "Total: ... #### 1234", True),
    ("3 apples and 5 pears", "5", True),
    ("3 apples and 5 pears", "3", False),
    ("The result is -7.50", "#### -7.5", True),
    ("no number here", "#### 4", False),
    ("12", "no number", False),
])
def test_score_gsm8k(text, answer, ok):
  assert evaluation.score_gsm8k(text, answer) is ok


@pytest.mark.parametrize("text, answer, ok", [
    (" Paris\nQuestion: next", "Paris", True),
    ("Paris", " Paris ", True),
    ("Parisian", "Paris", True),  # a prefix match (documented)
    ("London", "Paris", False),
    ("anything", "  ", False),
])
def test_score_exact(text, answer, ok):
  assert evaluation.score_exact(text, answer) is ok


def test_task_accuracy(model):
  prompts = [[1, 2, 3], [4, 5], [6], [7, 8, 9, 10]]
  moe.set_reroute(model, moe.NO_REROUTE)
  decode = lambda toks: " ".join(str(t) for t in toks)  # pylint: disable=unnecessary-lambda-assignment
  _, texts = evaluation.task_accuracy(model, prompts, ["x"] * 4, decode, batch_size=2,
                                      max_new_tokens=3, scoring="exact")
  answers = [texts[0].split()[0], "nope", texts[2], "#### 5"]
  acc, _ = evaluation.task_accuracy(model, prompts, answers, decode, batch_size=2,
                                    max_new_tokens=3, scoring="exact")
  assert acc == 0.5
  assert evaluation.cut_at_stop("a b\n\nc", ["\n\n", "zz"]) == "a b"


def test_grid_rows_carry_paired_intervals(model, tokens):
  """`ppl_delta_ci` and `task_accuracy_delta_ci`: bootstrap intervals of the differences
  to `none` at the same batch size ([0, 0] for `none` itself)."""
  prompts = [[1, 2, 3], [4, 5], [6], [7, 8, 9, 10]]
  decode = lambda toks: " ".join(str(t) for t in toks)  # pylint: disable=unnecessary-lambda-assignment
  moe.set_reroute(model, moe.NO_REROUTE)
  _, texts = evaluation.task_accuracy(model, prompts, ["x"] * 4, decode, batch_size=4,
                                      max_new_tokens=3, scoring="exact")
  task = evaluation.Task(prompts, texts, decode, max_new_tokens=3)  # `none` is right
  rows = evaluation.evaluate_grid(model, policy_spec.parse_list(["sere:1"]), [4], tokens,
                                  max_tokens=MAX_TOKENS, task=task, log=lambda *a: None)
  none, sere = rows
  assert none["ppl_delta_ci"] == pytest.approx([0.0, 0.0], abs=1e-6)
  assert none["task_accuracy"] == 1.0 and none["task_accuracy_delta_ci"] == [0.0, 0.0]
  low, high = sere["ppl_delta_ci"]
  assert low <= sere["delta_ppl_pct"] <= high
  low, high = sere["task_accuracy_delta_ci"]
  assert low <= sere["task_accuracy"] - 1.0 <= high <= 0.0
  json.dumps(rows)  # JSON-ready


# --- Windows and comparisons --------------------------------------------------------

def test_token_windows():
  windows = evaluation.token_windows([list(range(10)), list(range(100, 104))], 3, 10)
  assert windows.tolist() == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [100, 101, 102]]
  spread = evaluation.token_windows([list(range(30))], 3, 3)  # 10 windows available
  assert spread.tolist() == [[0, 1, 2], [12, 13, 14], [27, 28, 29]]
  two = evaluation.token_windows([list(range(30)), list(range(100, 108))], 3, 4)
  assert two.tolist() == [[0, 1, 2], [27, 28, 29], [100, 101, 102], [103, 104, 105]]
  assert evaluation.divisible_count(70, [1, 4, 16]) == 64


def test_curves_and_interpolation():
  pts = [(4.0, 5.0), (2.0, 10.0), (3.0, 4.0), (3.0, 6.0), (5.0, float("nan"))]
  assert evaluation.curve(pts) == [(2.0, 10.0), (3.0, 5.0), (4.0, 5.0)]
  assert evaluation.best_at(pts, 3.5) == 4.0 and evaluation.best_at(pts, 1.0) is None
  assert evaluation.interpolate([(2.0, 10.0), (4.0, 0.0)], 3.0) == pytest.approx(5.0)
  assert evaluation.interpolate([(2.0, 10.0), (4.0, 0.0)], 5.0) is None
  rows = [{"comparison_family": f, "distinct": d, "delta_ppl_pct": y}
          for f, d, y in [("none", 6.0, 0.0), ("sere", 3.0, 2.0), ("topk_truncate", 3.0, 8.0),
                          ("sere", 4.0, -1.0), (None, 2.0, 0.0)]]
  out = evaluation.equal_distinct(rows, ["sere", "topk_truncate"], num_levels=4)
  assert out["levels"] == [3.0, 4.0, 5.0, 6.0]
  assert out["delta_ppl_pct"]["sere"] == [2.0, -1.0, -0.5, 0.0]
  assert out["best_delta_ppl_pct"]["sere"] == [2.0, -1.0, -1.0, -1.0]
  assert out["delta_ppl_pct"]["topk_truncate"] == pytest.approx([8.0, 16 / 3, 8 / 3, 0.0])


def test_comparisons_metrics_table():
  def row(spec, g, distinct, delta):
    p = policy_spec.parse(spec)
    return {"spec": p.text, "policy": p.policy, "batch_size": g,
            "comparison_family": evaluation.comparison_family(p), "metric": p.metric,
            "select_top_k": p.select_top_k, "threshold": p.threshold,
            "quantile": p.quantile, "min_batch": p.min_batch, "distinct": distinct,
            "delta_ppl_pct": delta, "agreement": 0.9}
  rows = [row("none", 4, 6.0, 0.0), row("sere:2", 4, 3.0, 1.0),
          row("sere:2:0:weights", 4, 3.0, 2.0), row("sere:2:0:cosine:min8", 4, 6.0, 0.0),
          row("sere:2:0.3", 4, 4.0, 0.5), row("random:2", 4, 3.5, 9.0)]
  out = evaluation.comparisons(rows, [4])
  assert [(m["metric"], m["delta_ppl_pct"]) for m in out["metrics"]["4"]] == [
      ("stored", 1.0), ("weights", 2.0)]
  eq = out["equal_distinct"]["4"]
  assert eq["points"]["sere"] == [[3.0, 1.0], [4.0, 0.5], [6.0, 0.0]]
  assert eq["delta_ppl_pct"]["random"][0] is None  # 3.0 is below random's range
  assert eq["sere_minus"]["random"][0] is None
  assert eq["sere_minus"]["random"][-1] == pytest.approx(0.0)  # both at none
  assert eq["sere_minus"]["random"][1] == pytest.approx(
      eq["delta_ppl_pct"]["sere"][1] - eq["delta_ppl_pct"]["random"][1])
  json.dumps(out)  # JSON-ready


# --- Script end to end --------------------------------------------------------------

def _run_script(args, tmp_path):
  """Runs scripts/evaluate.py in a child process (its absl flags stay out of this one)."""
  return subprocess.run([sys.executable, "-m", "sere_jax.scripts.evaluate", *args],
                        cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)


def test_script_end_to_end(model, tmp_path):
  model_dir = str(tmp_path / "model")
  checkpoint.save(model, model_dir)
  rng = np.random.default_rng(3)
  text = tmp_path / "test.jsonl"
  text.write_text("".join(json.dumps({"tokens": rng.integers(0, 64, 60).tolist()}) + "\n"
                          for _ in range(2)))
  out = str(tmp_path / "res" / "eval")
  proc = _run_script(
      [f"--model_dir={model_dir}", f"--text={text}", "--seq_len=12",
       "--num_sequences=8", "--batch_sizes=4", "--policies=none,sere:2",
       "--greedy_prompts=8", "--prompt_len=6", "--greedy_tokens=5", "--impl=xla_dense",
       f"--out={out}", "--plot", "--command=evaluate --test"], tmp_path)
  assert proc.returncode == 0, proc.stderr[-3000:]
  data = json.loads(open(out + ".json").read())
  assert data["command"] == "evaluate --test"
  assert data["settings"]["num_sequences"] == 8 and data["model"]["top_k"] == 4
  rows = data["results"]
  assert [(r["batch_size"], r["spec"]) for r in rows] == [
      (4, "none"), (4, "sere:2:0")]
  assert all(0 <= r["exact_match"] <= 1 and "task_accuracy" not in r for r in rows)
  assert rows[0]["delta_ppl_pct"] == pytest.approx(0.0, abs=1e-9) and rows[0]["kl"] < 1e-6
  assert rows[0]["exact_match"] == 1.0 and rows[0]["distinct_pct_of_none"] == 100.0
  assert rows[1]["distinct"] <= rows[0]["distinct"] and rows[1]["kl"] > 0
  assert set(data["comparisons"]["equal_distinct"]) == {"4"}
  assert [m["metric"] for m in data["comparisons"]["metrics"]["4"]] == ["stored"]
  md = open(out + ".md").read()
  assert "## Batch size 4" in md and "sere S=2 rho=0" in md and "equal distinct" in md
  assert open(out + "_pareto.png", "rb").read()[:4] == b"\x89PNG"
  assert not [f for f in os.listdir(tmp_path / "res") if ".tmp" in f]


def test_script_usage_errors(tmp_path):
  base = ["--model_dir=unused", "--text=unused"]
  for extra, match in [("--policies=sere:2:0:cosine", "--metrics_text"),
                       ("--policies=sere:x", "'x'"), ("--batch_sizes=0", "batch_sizes")]:
    proc = _run_script(base + [extra], tmp_path)
    assert proc.returncode != 0 and re.search(match, proc.stderr), (extra, proc.stderr[-2000:])
