"""Tests of the mixed corpus (sere_jax.corpus, sere_jax.tasks) and
scripts/build_corpus.py, at a small scale with fake Shakespeare works."""

from __future__ import annotations

import json
import lzma
import os
import re
import subprocess
import sys

from hypothesis import given, settings
from hypothesis import strategies as st
import numpy as np
import pytest

from sere_jax import corpus
from sere_jax import shakespeare
from sere_jax import tasks
from tests import corpus_fixtures

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECORDS = {"train": 3000, "validation": 300, "test": 300}
PYTHON_BYTES = 200_000


@pytest.fixture(scope="module")
def works_dir(tmp_path_factory) -> str:
  directory = str(tmp_path_factory.mktemp("shakespeare") / "texts")
  corpus_fixtures.write_fake_works(directory)
  return directory


@pytest.fixture(scope="module")
def small(works_dir) -> corpus.Corpus:
  return corpus.build_corpus(shakespeare_source=works_dir, python_bytes=PYTHON_BYTES,
                             task_records=RECORDS)


@pytest.fixture(scope="module")
def tokenizer(small):
  sample = [d for domain in corpus.DOMAINS for d in small.documents["train"][domain][:20]]
  return corpus.train_tokenizer(sample, vocab_size=500)


def _prompts(c: corpus.Corpus, split: str) -> set[str]:
  text = c.text(split, "tasks")
  return set(re.findall(r"Q: [^\n]*\nA:", text))


def test_splits_do_not_overlap(small):
  files = small.metadata["sources"]["python"]["files"]
  placed = [name for split in corpus.SPLITS for name in files[split]]
  assert len(placed) == len(set(placed))
  for split in corpus.SPLITS:
    assert files[split] and all(tasks.hash_split(n) == split for n in files[split])
  assert small.metadata["sources"]["shakespeare"]["works"]["test"] == list(shakespeare.TEST)
  prompts = {split: _prompts(small, split) for split in corpus.SPLITS}
  assert len(prompts["train"]) > 2000 and len(prompts["test"]) == RECORDS["test"]
  assert not prompts["test"] & prompts["train"]
  assert not prompts["validation"] & (prompts["train"] | prompts["test"])
  counts = {s: small.text(s, "tasks").count("\nA:") for s in corpus.SPLITS}
  assert counts == RECORDS


def test_python_domain(small, works_dir):
  files = small.metadata["sources"]["python"]["files"]
  sizes = small.metadata["splits"]
  for split in corpus.SPLITS:
    assert sizes[split]["python"]["bytes"] >= corpus.FRACTIONS[split] * PYTHON_BYTES
    assert files[split] == sorted(files[split])
    for name in files[split]:
      top, *dirs, base = name.split("/")
      assert top in ("stdlib",) + corpus.PYTHON_PACKAGES and base.endswith(".py")
      assert not set(dirs) & corpus.EXCLUDED_DIRS
    assert all(corpus.EOT not in d and d.strip()
               for d in small.documents[split]["python"])
  again = corpus.build_corpus(shakespeare_source=works_dir, python_bytes=PYTHON_BYTES,
                              task_records={"train": 10, "validation": 10, "test": 10},
                              seed=1)
  assert again.metadata["sources"]["python"]["files"] == files
  assert again.documents["test"]["python"] == small.documents["test"]["python"]


def _independent_answer(task: str, question: str) -> str:
  if task in ("add", "sub", "mul"):
    a, op, b = re.fullmatch(r"(\d+)([-+*])(\d+)", question).groups()
    return str({"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op])
  word, rest = question.split(" ", 1)
  assert word == {"sort": "sort", "reverse": "reverse", "brackets": "balanced",
                  "count": "count"}[task]
  if task == "sort":
    return " ".join(str(v) for v in sorted(int(v) for v in rest.split()))
  if task == "reverse":
    return "".join(reversed(rest))
  if task == "count":
    letter, text = re.fullmatch(r"([a-z]) in ([a-z]+)", rest).groups()
    return str(sum(ch == letter for ch in text))
  while "()" in rest or "[]" in rest:
    rest = rest.replace("()", "").replace("[]", "")
  return "yes" if not rest else "no"


@pytest.mark.parametrize("split", corpus.SPLITS)
def test_task_answers_are_right(split):
  examples = tasks.task_examples(split, 700, seed=3)
  assert [t for t, _, _ in examples] == list(tasks.TASKS) * 100
  for task, prompt, answer in examples:
    question = re.fullmatch(r"Q: (.*)\nA:", prompt).group(1)
    assert answer == _independent_answer(task, question), prompt
    assert re.match(r"[0-9a-z]", answer) and tasks.hash_split(prompt) == split
  assert {a for t, _, a in examples if t == "brackets"} == {"yes", "no"}
  if split != "train":
    assert len({p for _, p, _ in examples}) == len(examples)
  assert tasks.task_examples(split, 70, seed=3) == examples[:70]
  assert tasks.task_examples(split, 70, seed=4) != examples[:70]


def test_write_read_round_trip(small, tmp_path):
  out = str(tmp_path / "corpus")
  corpus.write_corpus(small, out, extra_files={"note.txt": "hi"})
  back = corpus.read_corpus(out)
  assert back.documents == small.documents
  assert back.metadata == json.loads(json.dumps(small.metadata))
  assert open(os.path.join(out, "note.txt")).read() == "hi"
  with pytest.raises(FileExistsError, match="corpus exists and is not empty"):
    corpus.write_corpus(small, out)
  corpus.write_corpus(small, out, overwrite=True)
  assert not os.path.exists(os.path.join(out, "note.txt"))
  assert sorted(os.listdir(tmp_path)) == ["corpus"]  # no temporary directory left


def test_a_split_file_may_be_stored_compressed(small, tmp_path):
  out = tmp_path / "corpus"
  corpus.write_corpus(small, str(out))
  plain = out / "test" / "python.txt"
  (out / "test" / "python.txt.xz").write_bytes(lzma.compress(plain.read_bytes()))
  plain.unlink()
  assert corpus.read_corpus(str(out)).documents == small.documents


@pytest.mark.parametrize("name, domain", [
    ("python.txt", "python"), ("checkpoints/x/python.txt.xz", "python"),
    ("tasks.txt.gz", "tasks"), ("corpus.json", None), ("tasks_test.jsonl", None),
    (".txt", None), (".txt.xz", None), ("python.txt.bz2", None), ("python.xz", None)])
def test_domain_of(name, domain):
  assert corpus.domain_of(name) == domain


def test_read_documents_takes_plain_and_compressed_files(tmp_path):
  eot = corpus.EOT
  (tmp_path / "python.txt").write_text(f"a = 1\r\n{eot}\n \n{eot}b = 2\n")
  (tmp_path / "shakespeare.txt.xz").write_bytes(
      lzma.compress(f"HAMLET.\nTo be{eot}OPHELIA.\nMy lord{eot}".encode("utf-8")))
  (tmp_path / "corpus.json").write_text("{}")
  (tmp_path / "validation").mkdir()
  (tmp_path / "validation" / "tasks.txt").write_text("2+2=4")
  documents = corpus.read_documents(str(tmp_path))
  assert list(documents) == ["python", "shakespeare"]
  assert documents == {"python": ["a = 1\n", "b = 2\n"],
                       "shakespeare": ["HAMLET.\nTo be", "OPHELIA.\nMy lord"]}
  (tmp_path / "python.txt.xz").write_bytes(lzma.compress(b"a = 1\n"))
  with pytest.raises(ValueError, match="two files of the domain 'python': python.txt "
                     "and python.txt.xz"):
    corpus.read_documents(str(tmp_path))
  (tmp_path / "empty").mkdir()
  with pytest.raises(FileNotFoundError, match="no <domain>.txt or <domain>.txt.xz files"):
    corpus.read_documents(str(tmp_path / "empty"))
  with pytest.raises(FileNotFoundError, match="no directory .*nowhere"):
    corpus.read_documents(str(tmp_path / "nowhere"))


@pytest.mark.parametrize("split", ["", "validation"])
def test_shipped_quality_heldout_data_reads_back(split):
  """The quality study's held-out data: every domain, stored xz-compressed."""
  directory = os.path.join(REPO, "checkpoints", "quality_heldout", split)
  files = corpus.domain_files(directory)
  assert list(files) == list(corpus.DOMAINS)
  assert all(path.endswith(".txt.xz") for path in files.values())
  documents = corpus.read_documents(directory)
  assert all(len(documents[d]) >= 3 for d in corpus.DOMAINS)


def test_read_errors_name_the_file(small, tmp_path):
  with pytest.raises(FileNotFoundError, match="no corpus directory .*nowhere"):
    corpus.read_corpus(str(tmp_path / "nowhere"))
  out = tmp_path / "c"
  corpus.write_corpus(small, str(out))
  (out / "test" / "tasks.txt").write_bytes(b"ok \xff\xfe")
  with pytest.raises(ValueError, match="test/tasks.txt is not UTF-8"):
    corpus.read_corpus(str(out))
  (out / "test" / "tasks.txt").write_text(f" {corpus.EOT}\n")
  with pytest.raises(ValueError, match="the test split of tasks is empty"):
    corpus.read_corpus(str(out))
  (out / "validation" / "python.txt").unlink()
  with pytest.raises(FileNotFoundError, match="validation/python.txt is missing"):
    corpus.read_corpus(str(out))
  (out / "corpus.json").unlink()
  with pytest.raises(FileNotFoundError, match="corpus.json is missing"):
    corpus.read_corpus(str(out))


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_tokenizer_round_trips(tokenizer, text):
  ids = tokenizer.encode(text).ids
  if corpus.EOT in text:  # the special token: encoded as one id, dropped by decode
    assert 0 in ids
  else:
    assert tokenizer.decode(ids) == text


def test_tokenizer_and_stream(tokenizer):
  eot = tokenizer.token_to_id(corpus.EOT)
  assert eot == 0 and tokenizer.get_vocab_size() == 500
  text = "def f(x):\n\treturn x  # ’tis naïve — 数字 42 🙂\r\n"
  assert tokenizer.decode(tokenizer.encode(text).ids) == text
  for _, prompt, answer in tasks.task_examples("validation", 140):
    ids = tokenizer.encode(prompt + answer + "\n").ids
    assert ids[:len(tokenizer.encode(prompt).ids)] == tokenizer.encode(prompt).ids
  docs = ["first doc", "second", "third one 123"]
  stream = corpus.encode_stream(tokenizer, iter(docs), batch_size=2)
  assert stream.dtype == np.uint16 and list(stream).count(eot) == 3 and stream[-1] == eot
  assert list(stream) == tokenizer.encode(corpus.EOT.join(docs) + corpus.EOT).ids
  assert corpus.encode_stream(tokenizer, []).shape == (0,)


def test_mixture_windows():
  streams = {"python": np.arange(0, 3000, 3, dtype=np.uint16),  # rows step by 3
             "shakespeare": np.ones(1000, np.uint16), "tasks": np.full(1000, 2, np.uint16)}
  weights = {"python": 0.5, "shakespeare": 0.0, "tasks": 1.5}
  x, y = corpus.mixture_windows(streams, weights, 4000, 16, seed=0, step=7)
  x2, y2 = corpus.mixture_windows(streams, weights, 4000, 16, seed=0, step=7)
  assert x.dtype == np.int32 and x.shape == y.shape == (4000, 16)
  assert np.array_equal(x, x2) and np.array_equal(y, y2)
  assert not np.array_equal(x, corpus.mixture_windows(streams, weights, 4000, 16, 0, 8)[0])
  assert np.array_equal(y[:, :-1], x[:, 1:])
  tasks_rows = np.all(x == 2, axis=1)
  assert np.all(np.diff(x[~tasks_rows], axis=1) == 3)  # python windows; no shakespeare
  assert abs((~tasks_rows).mean() - 0.25) < 0.03
  with pytest.raises(ValueError, match="without a stream"):
    corpus.mixture_windows(streams, {"other": 1.0}, 2, 16, 0, 0)
  with pytest.raises(ValueError, match="positive sum"):
    corpus.mixture_windows(streams, {"python": 0.0}, 2, 16, 0, 0)
  with pytest.raises(ValueError, match="tasks stream has 1000 tokens"):
    corpus.mixture_windows(streams, {"tasks": 1.0}, 2, 999, 0, 0)


def _script(*args: str) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-m", "sere_jax.scripts.build_corpus", *args],
                        cwd=REPO, capture_output=True, text=True, timeout=120, check=False)


def test_build_corpus_script(works_dir, tmp_path):
  assert _script("--help").returncode == 0
  out = tmp_path / "out"
  args = [f"--out_dir={out}", f"--shakespeare={works_dir}", "--python_bytes=100000",
          "--train_task_records=500", "--heldout_task_records=100",
          "--eval_examples_per_task=3", "--vocab_size=400",
          "--tokenizer_sample_bytes=100000"]
  proc = _script(*args)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "train      python" in proc.stdout
  names = {os.path.relpath(os.path.join(d, f), out) for d, _, fs in os.walk(out) for f in fs}
  assert names == ({f"{s}/{d}.txt" for s in corpus.SPLITS for d in corpus.DOMAINS}
                   | {"corpus.json", "tokenizer.json", "tasks_validation.jsonl",
                      "tasks_test.jsonl"})
  meta = json.loads((out / "corpus.json").read_text())
  assert meta["vocab_size"] == 400 and meta["eos_token_id"] == 0
  assert all(meta["splits"][s][d]["tokens"] > 0 for s in corpus.SPLITS for d in corpus.DOMAINS)
  rows = [json.loads(line) for line in (out / "tasks_test.jsonl").read_text().splitlines()]
  assert [(r["task"], r["prompt"], r["answer"]) for r in rows] == tasks.task_examples("test", 21)
  assert corpus.read_corpus(str(out)).documents["test"]["tasks"]
  proc = _script(*args)
  assert proc.returncode != 0 and "pass --overwrite" in proc.stderr
  assert _script(*args, "--overwrite").returncode == 0
