"""Calibration over a real (tiny) model: capture, padding, streaming, budget, storage."""

import functools
import json
import os
import subprocess
import sys

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy

from sere_jax import calibration
from sere_jax import checkpoint
from sere_jax import generation
from sere_jax import moe
from sere_jax import similarity
from sere_jax.config import RerouteConfig

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "parity", "qwen3_moe")
CHUNKS = dict(expert_chunk=4, token_chunk=4)  # several chunks of each kind


@pytest.fixture(scope="module")
def model():
  return checkpoint.load_model(FIXTURE, impl="xla_dense")


def _tokens(seed, shape=(2, 8)):
  return np.random.default_rng(seed).integers(0, 128, shape).astype(np.int32)


@pytest.fixture(scope="module")
def direct_case(model):
  """A batch and each MoE layer's input tokens, recorded by wrapping MoeBlock.__call__
  in a plain jitted forward (independent of the nnx.capture path)."""
  tokens = _tokens(0)
  seen = []
  original = moe.MoeBlock.__call__

  def record(self, x, valid, *, decode):
    seen.append(x.reshape(-1, x.shape[-1]))
    return original(self, x, valid, decode=decode)

  graphdef, state = nnx.split(model)
  b, l = tokens.shape
  valid = jnp.ones((b, l), bool)
  positions = jnp.broadcast_to(jnp.arange(l, dtype=jnp.int32), (b, l))

  @jax.jit
  def forward(state):
    m = nnx.merge(graphdef, state)
    m(jnp.asarray(tokens), positions, valid, m.init_cache(b, l), valid,
      jnp.asarray(0, jnp.int32), decode=False)
    return list(seen)

  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(moe.MoeBlock, "__call__", record)
    inputs = forward(state)
  return tokens, inputs


@functools.partial(jax.jit, static_argnames="metric")
def _direct(x, w_gate_up, w_down, *, metric):
  """The similarity of all experts' outputs on `x` in one piece (no chunks, no stream)."""
  outputs = similarity.expert_outputs(x, w_gate_up, w_down, expert_chunk=16)
  return similarity.similarity(outputs, metric)


@pytest.mark.parametrize("metric", ["cosine", "frobenius", "cka_linear"])
def test_matches_direct_similarity_of_captured_inputs(model, direct_case, metric):
  tokens, inputs = direct_case
  got = calibration.calibrate(model, [tokens], metric, token_budget=10_000, **CHUNKS)
  blocks = moe.moe_blocks(model)
  assert len(got) == len(inputs) == len(blocks) == 2
  for sim, x, block in zip(got, inputs, blocks):
    assert x.shape == (16, 64)
    want = _direct(x, block.w_gate_up[...], block.w_down[...], metric=metric)
    assert sim.shape == (16, 16)
    np.testing.assert_allclose(sim, want, atol=2e-5)


def test_padding_is_excluded(model):
  rows = [_tokens(1, (1, 8))[0], _tokens(2, (1, 5))[0]]
  padded = np.full((2, 8), 77, np.int32)  # pad id 77: it must not count
  padded[0], padded[1, 3:] = rows
  valid = np.zeros((2, 8), bool)
  valid[0], valid[1, 3:] = True, True
  got = calibration.calibrate(model, [(padded, valid)], "cosine", token_budget=100,
                              **CHUNKS)
  want = calibration.calibrate(model, [r[None] for r in rows], "cosine", token_budget=100,
                               **CHUNKS)
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, atol=2e-5)


def test_batches_stream_like_one_batch(model):
  a, b = _tokens(3, (1, 8)), _tokens(4, (1, 8))
  for metric in ("cosine", "frobenius"):
    streamed = calibration.calibrate(model, [a, b], metric, token_budget=100, **CHUNKS)
    whole = calibration.calibrate(model, [np.concatenate([a, b])], metric,
                                  token_budget=100, **CHUNKS)
    for s, w in zip(streamed, whole):
      np.testing.assert_allclose(s, w, atol=2e-5)


def test_token_budget(model):
  tokens = _tokens(5)
  read, reports = [], []

  def source():
    for i in range(3):
      read.append(i)
      yield tokens

  got = calibration.calibrate(model, source(), "cosine", token_budget=10,
                              progress=lambda n, total: reports.append((n, total)), **CHUNKS)
  assert reports == [(10, 10)] and read == [0]  # later batches are not even read
  first_ten = np.zeros(tokens.shape, bool)
  first_ten[0], first_ten[1, :2] = True, True  # row-major: row 0, then 2 of row 1
  want = calibration.calibrate(model, [(tokens, first_ten)], "cosine", token_budget=100,
                               **CHUNKS)
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, atol=2e-5)


def test_weights_metric_needs_no_data(model):
  got = calibration.calibrate(model, [], "weights", token_budget=1)
  for sim, block in zip(got, moe.moe_blocks(model)):
    np.testing.assert_allclose(
        sim, similarity.weight_similarity(block.w_gate_up[...], block.w_down[...]),
        atol=1e-6)
  with pytest.raises(ValueError, match="no valid"):
    calibration.calibrate(model, [], "cosine", token_budget=10)


def _fixture_copy(tmp_path):
  directory = tmp_path / "model"
  directory.mkdir()
  for name in os.listdir(FIXTURE):
    os.symlink(os.path.join(FIXTURE, name), directory / name)
  return str(directory)


def test_save_load_apply_and_generate(model, tmp_path):
  directory = _fixture_copy(tmp_path)
  matrices = calibration.calibrate(model, [_tokens(6)], "frobenius", token_budget=100,
                                   **CHUNKS)
  sere = RerouteConfig(policy="sere", select_top_k=1)
  uncalibrated = checkpoint.load_model(directory, reroute=sere, impl="xla_dense")
  with pytest.raises(ValueError, match="calibrated"):
    generation.generate(uncalibrated, [[1, 2, 3]], max_new_tokens=2)

  path = calibration.save_similarity(
      directory, matrices, {"metric": "frobenius", "tokens": 16, "data_source": "random"})
  assert path == os.path.join(directory, calibration.SIMILARITY_FILE)
  assert not [f for f in os.listdir(directory) if ".tmp" in f]
  loaded, meta = calibration.load_similarity(directory)
  assert {k: meta[k] for k in ("metric", "tokens", "data_source")} == {
      "metric": "frobenius", "tokens": "16", "data_source": "random"}
  assert meta["created"].startswith("20")
  for a, b in zip(loaded, matrices):
    np.testing.assert_array_equal(a, b)

  calibrated = checkpoint.load_model(directory, reroute=sere, impl="xla_dense")
  for block, m in zip(moe.moe_blocks(calibrated), matrices):
    np.testing.assert_array_equal(block.similarity[...], m)
  result = generation.generate(calibrated, [[1, 2, 3], [4, 5, 6, 7]], max_new_tokens=3)
  assert [len(t) for t in result.tokens] == [3, 3]
  assert result.decode_stats[..., 3].sum() > 0  # slots were re-routed

  # Our Orbax checkpoints pick the file up too (it overrides the saved similarity).
  ours = str(tmp_path / "ours")
  checkpoint.save(uncalibrated, ours)
  calibration.save_similarity(ours, matrices, dict(meta))
  restored = checkpoint.load_model(ours, impl="xla_dense")
  np.testing.assert_array_equal(moe.moe_blocks(restored)[1].similarity[...], matrices[1])


@pytest.mark.parametrize("bad,match", [
    (np.ones((15, 15), np.float32), r"MoE layer 1: similarity has shape \(15, 15\)"),
    (np.full((16, 16), np.nan, np.float32), "MoE layer 1: similarity holds NaN"),
])
def test_bad_matrices_are_rejected(model, tmp_path, bad, match):
  good = np.eye(16, dtype=np.float32)
  with pytest.raises(ValueError, match=match):
    calibration.apply_similarity(model, [good, bad])
  directory = _fixture_copy(tmp_path)
  calibration.save_similarity(directory, [good, bad],
                              {"metric": "cosine", "tokens": 1, "data_source": "x"})
  with pytest.raises(ValueError, match=match):
    checkpoint.load_model(directory, impl="xla_dense")
  with pytest.raises(ValueError, match="2 MoE layers"):
    calibration.apply_similarity(model, [good])


def test_load_rejects_gaps_in_layer_keys(tmp_path):
  safetensors.numpy.save_file({"layer_0": np.eye(2, dtype=np.float32),
                               "layer_2": np.eye(2, dtype=np.float32)},
                              str(tmp_path / calibration.SIMILARITY_FILE))
  with pytest.raises(ValueError, match="layer_0..layer_1"):
    calibration.load_similarity(str(tmp_path))


def test_layer_statistics():
  sim = np.array([[1.0, 0.2, 0.9], [0.2, 1.0, 0.1], [0.9, 0.1, 1.0]], np.float32)
  (stats,) = calibration.layer_statistics([sim], select_top_k=2, threshold=0.5)
  assert stats["layer"] == 0 and stats["select_top_k"] == 2
  assert stats["max"] == pytest.approx(0.9)
  assert stats["always_critical_fraction"] == pytest.approx(1 / 3)  # expert 1


def _run_script(*args):
  return subprocess.run([sys.executable, "-m", "sere_jax.scripts.calibrate", *args],
                        capture_output=True, text=True, timeout=120, check=False)


def test_script_end_to_end(tmp_path):
  data = tmp_path / "data.jsonl"
  rng = np.random.default_rng(7)
  data.write_text("".join(json.dumps({"tokens": rng.integers(0, 128, n).tolist()}) + "\n"
                          for n in (12, 5, 9)))
  out = tmp_path / "out"
  proc = _run_script(f"--model_dir={FIXTURE}", f"--data={data}", "--metric=cosine",
                     "--token_budget=20", "--seq_len=8", "--batch_size=2", "--plot",
                     f"--output={out}", "--expert_chunk=4", "--token_chunk=8",
                     "--impl=xla_dense")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert sorted(os.listdir(out)) == ["sere_similarity.png", "sere_similarity.safetensors",
                                     "sere_similarity_stats.json"]
  matrices, meta = calibration.load_similarity(str(out))
  assert meta["metric"] == "cosine" and meta["tokens"] == "20"  # 8 + 5 + 7 of budget 20
  assert [m.shape for m in matrices] == [(16, 16), (16, 16)]
  stats = json.loads((out / "sere_similarity_stats.json").read_text())
  assert [row["layer"] for row in stats["layers"]] == [0, 1] and stats["tokens"] == 20
  assert (out / "sere_similarity.png").read_bytes()[:4] == b"\x89PNG"
  assert "always_critical_fraction" in proc.stdout

  text = tmp_path / "data.txt"
  text.write_text("some text\n")
  proc = _run_script(f"--model_dir={FIXTURE}", f"--data={text}", f"--output={out}")
  assert proc.returncode != 0 and "pass --overwrite" in proc.stderr  # checked first
  proc = _run_script(f"--model_dir={FIXTURE}", f"--data={text}", f"--output={out}",
                     "--overwrite")
  assert proc.returncode != 0 and "no tokenizer.json" in proc.stderr
