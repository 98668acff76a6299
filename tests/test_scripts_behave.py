"""The command-line scripts behave as a user expects: `--help` exits 0, output paths are
checked (writable, nothing replaced without `--overwrite`) before any long work, writes
are atomic, third-party INFO logging is off unless `--verbosity` asks for it, and every
file-reading error names the file and what was wrong with it."""

from __future__ import annotations

import gzip
import json
import lzma
import os
import re
import shutil
import subprocess
import sys
import tempfile

import numpy as np
import pytest
import safetensors.numpy

from sere_jax import calibration
from sere_jax import checkpoint
from sere_jax import evaluation
from sere_jax import fileio
from sere_jax import textio
from sere_jax.models import hf_import

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = os.path.join(ROOT, "checkpoints", "tiny_shakespeare_moe")
SHIPPED_SIMILARITY = os.path.join(MODEL, calibration.SIMILARITY_FILE)
PARITY = os.path.join(ROOT, "tests", "fixtures", "parity", "qwen3_moe")
# Every script, with one of its own flags that its --help must list.
SCRIPTS = {"demo": "--json_out", "generate": "--stats_output", "evaluate": "--metrics_text",
           "calibrate": "--out_dir", "train_tiny": "--workdir", "train_moe": "--recipe",
           "benchmark": "--suite", "report": "--inputs", "build_corpus": "--vocab_size",
           "quality_study": "--heldout_dir", "diagnose": "--tolerance",
           "routing_realism": "--per_domain"}
NOT_UTF8 = b"HAMLET.\nTo be, or not to be\n\xff\xfe that is the question\n"
ENV = {**os.environ, "JAX_PLATFORMS": "cpu"}


def _script(name: str, *args: str) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-m", f"sere_jax.scripts.{name}", *args],
                        cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300,
                        check=False)


def _read_only_dir(tmp_path) -> str:
  """A directory that refuses new files, even to root (then a sysfs directory)."""
  path = tmp_path / "read_only"
  path.mkdir()
  path.chmod(0o555)
  for candidate in (str(path), "/sys"):
    try:
      with tempfile.TemporaryFile(dir=candidate):
        pass
    except OSError:
      return candidate
  pytest.skip("no directory here refuses new files")


# --------------------------------------------------------------------------- --help


def test_help_exits_zero_for_every_script():
  procs = {name: subprocess.Popen(
      [sys.executable, "-m", f"sere_jax.scripts.{name}", "--help"], cwd=ROOT, env=ENV,
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for name in SCRIPTS}
  for name, proc in procs.items():
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, (name, err[-2000:])
    assert "flags:" in out and SCRIPTS[name] in out, (name, out[-2000:])
    assert "--verbosity" in out, name


def test_helpfull_and_short_forms_exit_zero():
  for flag in ("--helpfull", "-h", "--helpshort"):
    proc = _script("report", flag)
    assert proc.returncode == 0, (flag, proc.stderr[-2000:])
    assert "--inputs" in proc.stdout
  assert "--verbosity" in _script("report", "--helpfull").stdout  # absl's flags too


# --------------------------------------------------------------------------- outputs


def test_calibrate_refuses_to_overwrite_the_shipped_similarity(tmp_path):
  before = open(SHIPPED_SIMILARITY, "rb").read()
  proc = _script("calibrate", f"--model_dir={MODEL}", "--metric=weights")
  assert proc.returncode != 0
  assert SHIPPED_SIMILARITY in proc.stderr and "--overwrite" in proc.stderr
  assert "--out_dir" in proc.stderr
  assert open(SHIPPED_SIMILARITY, "rb").read() == before
  # Another --out_dir works, and stays protected there too.
  out = tmp_path / "calibrated"
  proc = _script("calibrate", f"--model_dir={MODEL}", "--metric=weights", f"--out_dir={out}",
                 "--impl=xla_dense")
  assert proc.returncode == 0, proc.stderr[-3000:]
  matrices, meta = calibration.load_similarity(str(out))
  assert meta["metric"] == "weights" and len(matrices) == 4
  proc = _script("calibrate", f"--model_dir={MODEL}", "--metric=weights", f"--out_dir={out}")
  assert proc.returncode != 0 and "--overwrite" in proc.stderr


def test_generate_checks_outputs_before_loading_the_model(tmp_path):
  prompts = tmp_path / "prompts.txt"
  prompts.write_text("HAMLET.\nTo be\n")
  read_only = _read_only_dir(tmp_path)
  # No model directory at all: the output path is refused before anything is loaded.
  output = os.path.join(read_only, "out.jsonl")
  proc = _script("generate", f"--model_dir={tmp_path / 'no_model'}", f"--prompts={prompts}",
                 f"--output={output}")
  assert proc.returncode != 0 and output in proc.stderr, proc.stderr[-2000:]
  assert "not writable" in proc.stderr and "no_model" not in proc.stderr
  # A failing --stats_output is refused before --output is written.
  good, stats = tmp_path / "out.jsonl", os.path.join(read_only, "stats.json")
  proc = _script("generate", f"--model_dir={tmp_path / 'no_model'}", f"--prompts={prompts}",
                 f"--output={good}", f"--stats_output={stats}")
  assert proc.returncode != 0 and stats in proc.stderr and not good.exists()
  # An existing output is kept unless --overwrite.
  good.write_text("keep me\n")
  proc = _script("generate", f"--model_dir={tmp_path / 'no_model'}", f"--prompts={prompts}",
                 f"--output={good}")
  assert proc.returncode != 0 and "--overwrite" in proc.stderr
  assert good.read_text() == "keep me\n"


def test_generate_is_quiet_by_default_and_shows_progress(tmp_path):
  prompts, out = tmp_path / "prompts.txt", tmp_path / "out.jsonl"
  prompts.write_text("HAMLET.\nTo be\n")
  args = [f"--model_dir={MODEL}", f"--prompts={prompts}", "--max_new_tokens=2",
          "--length_multiple=8", "--impl=xla_dense", f"--output={out}"]
  proc = _script("generate", *args)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert len(out.read_text().splitlines()) == 2
  assert "generating" in proc.stderr and "prompt" in proc.stderr  # the progress bar
  info = re.compile(r"^I\d{4} ", re.M)  # absl's INFO line prefix
  assert not info.search(proc.stderr), proc.stderr[-3000:]
  assert "orbax" not in proc.stderr.lower()
  proc = _script("generate", *args, "--overwrite", "--verbosity=0")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert info.search(proc.stderr)


def test_check_writable(tmp_path):
  existing = tmp_path / "a.json"
  existing.write_text("{}")
  with pytest.raises(FileExistsError, match=re.escape(str(existing))):
    fileio.check_writable(str(existing))
  fileio.check_writable(str(existing), overwrite=True)
  fileio.check_writable(str(tmp_path / "new" / "deeper" / "b.json"))  # created later
  (tmp_path / "empty").mkdir()
  fileio.check_writable(str(tmp_path / "empty"), directory=True)  # nothing to lose
  with pytest.raises(FileExistsError):
    fileio.check_writable(str(tmp_path), directory=True)
  with pytest.raises(IsADirectoryError):
    fileio.check_writable(str(tmp_path / "empty"), overwrite=True)
  with pytest.raises(NotADirectoryError, match="a.json is not a directory"):
    fileio.check_writable(str(existing / "c.json"))
  read_only = _read_only_dir(tmp_path)
  with pytest.raises(PermissionError, match="not writable"):
    fileio.check_writable(os.path.join(read_only, "d.json"))


def test_write_all_atomic_changes_nothing_when_one_write_fails(tmp_path):
  first, blocker = tmp_path / "first.json", tmp_path / "blocker"
  first.write_text("old\n")
  blocker.write_text("")  # a file where the second output's directory would be
  with pytest.raises(OSError):
    fileio.write_all_atomic({str(first): "new\n", str(blocker / "second.json"): "x"})
  assert first.read_text() == "old\n"
  assert sorted(p.name for p in tmp_path.iterdir()) == ["blocker", "first.json"]


# --------------------------------------------------------------------------- reading


def _corrupt(path: str, how: str) -> None:
  data = open(path, "rb").read()
  with open(path, "wb") as fh:
    fh.write(data[:len(data) // 2] if how == "truncated" else b"not safetensors " * 8)


@pytest.mark.parametrize("how", ["truncated", "garbage"])
def test_corrupt_similarity_and_pool_stats_name_the_file(tmp_path, how):
  matrices = [np.eye(4, dtype=np.float32)] * 2
  calibration.save_similarity(str(tmp_path), matrices,
                              {"metric": "cosine", "tokens": 1, "data_source": "x"})
  calibration.save_pool_stats(str(tmp_path), [(np.ones(4, np.float32),) * 2] * 2,
                              {"tokens": 1, "data_source": "x"})
  for name, load in ((calibration.SIMILARITY_FILE, calibration.load_similarity),
                     (calibration.POOL_STATS_FILE, calibration.load_pool_stats)):
    path = str(tmp_path / name)
    _corrupt(path, how)
    with pytest.raises(ValueError, match=re.escape(path) + ".*not a readable safetensors"):
      load(str(tmp_path))
  with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "none" / name))):
    calibration.load_pool_stats(str(tmp_path / "none"))


@pytest.mark.parametrize("how", ["truncated", "garbage"])
def test_corrupt_checkpoint_shard_names_the_file(tmp_path, how):
  model_dir = tmp_path / "model"
  shutil.copytree(PARITY, model_dir)
  shard = str(model_dir / "model-00002-of-00003.safetensors")
  _corrupt(shard, how)
  with pytest.raises(ValueError, match=re.escape(shard) + ".*not a readable safetensors"):
    checkpoint.load_model(str(model_dir), impl="xla_dense")
  os.remove(shard)
  with pytest.raises(FileNotFoundError, match=re.escape(shard)):
    checkpoint.load_model(str(model_dir), impl="xla_dense")


def test_corrupt_single_file_checkpoint_and_index_name_the_file(tmp_path):
  path = tmp_path / hf_import.SINGLE_FILE
  safetensors.numpy.save_file({"w": np.ones((8, 8), np.float32)}, str(path))
  _corrupt(str(path), "truncated")
  with pytest.raises(ValueError, match=re.escape(str(path))):
    hf_import.CheckpointReader(str(tmp_path))
  index = tmp_path / hf_import.INDEX_FILE
  index.write_text('{"weight_map": ')
  with pytest.raises(ValueError, match=re.escape(str(index)) + " is not valid JSON"):
    hf_import.CheckpointReader(str(tmp_path))


def test_non_utf8_and_missing_text_files_name_the_file(tmp_path):
  bad = tmp_path / "prompts.txt"
  bad.write_bytes(NOT_UTF8)
  offset = NOT_UTF8.index(b"\xff")
  message = re.escape(f"{bad} is not UTF-8 text: byte 0xff at offset {offset}")
  with pytest.raises(ValueError, match=message):
    textio.read_records(str(bad), "prompt")
  with pytest.raises(ValueError, match=message):
    evaluation.read_stream(str(bad), None)
  bad_jsonl = tmp_path / "data.jsonl"
  bad_jsonl.write_bytes(b'{"text": "caf\xe9"}\n')
  with pytest.raises(ValueError, match=re.escape(f"{bad_jsonl} is not UTF-8")):
    textio.read_records(str(bad_jsonl), "text")
  missing = tmp_path / "missing.txt"
  with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
    textio.read_records(str(missing), "prompt")
  with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
    evaluation.read_stream(str(missing), None)
  crlf = tmp_path / "crlf.txt"
  crlf.write_bytes(b"one\r\ntwo\rthree\n")
  assert textio.read_records(str(crlf), "prompt") == [
      {"prompt": "one"}, {"prompt": "two"}, {"prompt": "three"}]


def test_scripts_name_a_bad_input_file(tmp_path):
  bad = tmp_path / "prompts.txt"
  bad.write_bytes(NOT_UTF8)
  proc = _script("generate", f"--model_dir={MODEL}", f"--prompts={bad}")
  assert proc.returncode != 0
  assert f"{bad} is not UTF-8 text" in proc.stderr, proc.stderr[-2000:]
  result = tmp_path / "result.json"
  result.write_text('{"suite": ')
  proc = _script("report", f"--inputs={result}", f"--out_dir={tmp_path / 'report'}")
  assert proc.returncode != 0
  assert f"{result} is not valid JSON" in proc.stderr, proc.stderr[-2000:]


def test_quality_study_checks_greedy_tokens_before_loading(tmp_path):
  proc = _script("quality_study", f"--model_dir={tmp_path / 'absent'}",
                 f"--heldout_dir={tmp_path}", "--seq_len=16", "--greedy_tokens=16")
  assert proc.returncode != 0
  assert "--greedy_tokens must be in [0, --seq_len=16), got 16" in proc.stderr, (
      proc.stderr[-2000:])


def test_json_errors_name_the_file(tmp_path):
  path = tmp_path / "config.json"
  path.write_text('{"a": 1,}')
  with pytest.raises(ValueError, match=re.escape(str(path)) + " is not valid JSON: .*line 1"):
    fileio.read_json(str(path))
  (tmp_path / "ok.json").write_text(json.dumps({"a": [1]}))
  assert fileio.read_json(str(tmp_path / "ok.json")) == {"a": [1]}


@pytest.mark.parametrize("suffix, kind, compress", [(".xz", "xz", lzma.compress),
                                                    (".gz", "gzip", gzip.compress)])
def test_compressed_files_read_transparently(tmp_path, suffix, kind, compress):
  text = "HAMLET.\r\nTo be, or not to be: naïve 🙂\n"
  path = tmp_path / f"doc.txt{suffix}"
  path.write_bytes(compress(text.encode("utf-8")))
  assert fileio.read_bytes(str(path)) == text.encode("utf-8")
  assert fileio.read_text(str(path)) == text.replace("\r\n", "\n")
  assert fileio.uncompressed_name(str(path)) == str(tmp_path / "doc.txt")
  records = tmp_path / f"prompts.jsonl{suffix}"
  records.write_bytes(compress(b'{"prompt": "a"}\n{"tokens": [1, 2]}\n'))
  assert textio.read_records(str(records), "prompt") == [{"prompt": "a"},
                                                        {"tokens": [1, 2]}]
  # A corrupt or truncated archive, and text inside that is not UTF-8, name the file.
  for data in (b"HAMLET. To be, or not to be", compress(text.encode("utf-8"))[:-8]):
    path.write_bytes(data)
    with pytest.raises(ValueError, match=re.escape(f"{path} is not a valid {kind} file")):
      fileio.read_text(str(path))
  path.write_bytes(compress(NOT_UTF8))
  with pytest.raises(ValueError, match=re.escape(f"{path} is not UTF-8 text: byte 0xff")):
    fileio.read_text(str(path))
  with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / f"no.txt{suffix}"))):
    fileio.read_text(str(tmp_path / f"no.txt{suffix}"))
