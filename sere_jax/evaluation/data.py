"""What an evaluation runs on: token streams read from text files, non-overlapping
windows cut from them (`token_windows`) in a number every decode batch size divides
(`divisible_count`), the sequences one forward takes (`chunk_sequences`), and tasks —
token prompts with reference answers and how to score them (`Task`, read from JSONL by
`load_task`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Sequence

import numpy as np

from sere_jax import fileio
from sere_jax import textio


@dataclasses.dataclass
class Task:
  """A task for `evaluate_grid`: token prompts, answers, and how to score them
  (`scoring` names one of `metrics.SCORERS`)."""
  prompts: list[list[int]]
  answers: list[str]
  decode: Callable[[list[int]], str]
  scoring: str = "exact"
  max_new_tokens: int = 256
  eos_ids: tuple[int, ...] = ()
  stop: tuple[str, ...] = ()


def read_stream(path: str, tokenizer: Any) -> list[int]:
  """The token ids of a text file: plain text encoded whole, or JSONL records
  ("tokens", or "text" encoded) concatenated; a `.xz` or `.gz` file is decompressed
  first. Errors name the file (missing, not UTF-8, a bad record)."""
  text = fileio.read_text(path)
  first = next((line for line in text.splitlines() if line.strip()), "")
  if fileio.uncompressed_name(path).endswith(".jsonl") or first.lstrip().startswith("{"):
    return [t for seq in textio.tokenize_records(textio.read_records(path, "text"), "text",
                                                 tokenizer) for t in seq]
  if tokenizer is None:
    raise ValueError(f"{path} is text but the model directory has no tokenizer.json; "
                     "give JSONL with \"tokens\" lists instead")
  return tokenizer.encode(text).ids


def load_task(path: str, tokenizer: Any, *, scoring: str, max_new_tokens: int,
              eos_ids: Sequence[int] = (), stop: Sequence[str] = ()) -> Task:
  """A `Task` from a JSONL file with "prompt" (or "tokens") and "answer" per line;
  without a tokenizer, generations are decoded as space-separated token ids."""
  rows = textio.read_records(path, "prompt")
  missing = [i for i, r in enumerate(rows) if "answer" not in r]
  if missing:
    raise ValueError(f"{path}: record {missing[0]} has no \"answer\"")
  prompts = textio.tokenize_records(rows, "prompt", tokenizer)
  decode = (tokenizer.decode if tokenizer is not None
            else lambda toks: " ".join(str(t) for t in toks))
  return Task(prompts, [str(r["answer"]) for r in rows], decode, scoring=scoring,
              max_new_tokens=max_new_tokens, eos_ids=tuple(eos_ids), stop=tuple(stop))


def token_windows(streams: Sequence[Sequence[int]], length: int, count: int
                  ) -> np.ndarray:
  """Up to `count` non-overlapping windows `[n, length]`, shared out round-robin over the
  token streams and spread evenly over each stream (not only its beginning)."""
  available = [len(s) // length for s in streams]
  share = [0] * len(streams)
  for _ in range(min(count, sum(available))):  # round-robin over streams with room
    i = min((i for i, n in enumerate(available) if share[i] < n), key=lambda i: share[i])
    share[i] += 1
  rows = []
  for s, n, k in zip(streams, available, share):
    for start in np.linspace(0, n - 1, k).round().astype(int) if k else []:
      rows.append(np.asarray(s[start * length:(start + 1) * length], np.int32))
  return np.stack(rows) if rows else np.zeros((0, length), np.int32)


def divisible_count(count: int, batch_sizes: Sequence[int]) -> int:
  """The largest n <= count divisible by every batch size."""
  lcm = math.lcm(*batch_sizes)
  return count // lcm * lcm


def chunk_sequences(num_sequences: int, length: int, group_size: int,
                    max_tokens: int) -> int:
  """Sequences per forward: the largest multiple of `group_size` that divides
  `num_sequences` with at most `max_tokens` tokens (at least `group_size`)."""
  g = max(group_size, 1)
  if num_sequences % g:
    raise ValueError(f"{num_sequences} sequences are not a multiple of group size {g}")
  best = g
  for n in range(g, num_sequences + 1, g):
    if num_sequences % n == 0 and n * length <= max_tokens:
      best = n
  return best
