"""Synthetic tasks with exact answers, for training and for scoring greedy decoding.

    examples = task_examples("test", 700)   # [(task, prompt, answer), ...]
    # ("add", "Q: 4821+937\\nA:", "5758"); the training record is prompt + answer + "\\n"

A completion is right when it starts with `answer + "\\n"`. Prompts end in `A:` and
answers start with a digit or a letter, so a tokenizer that splits text at those
boundaries (`corpus.train_tokenizer`) tokenizes a prompt as a prefix of its record.

Each split draws from its own seeded generator and keeps only the prompts that
`hash_split` assigns to it, so no prompt (and no pair of operands in the same order)
is in two splits. Held-out splits hold no duplicate prompt.
"""

from __future__ import annotations

import hashlib
import string
from typing import Callable

import numpy as np

SPLITS = ("train", "validation", "test")
TASKS = ("add", "sub", "mul", "sort", "reverse", "brackets", "count")
BRACKETS = {")": "(", "]": "["}
COUNT_LETTERS = "abcde"


def hash_split(name: str) -> str:
  """`train` / `validation` / `test` (90 / 5 / 5 %) by a hash of `name` (a python file
  or task prompt): a pure function of the name."""
  digest = hashlib.sha256(f"split:{name}".encode()).digest()
  bucket = int.from_bytes(digest[:8], "big") % 20
  return "test" if bucket == 0 else "validation" if bucket == 1 else "train"


def balanced(text: str) -> bool:
  """Whether the brackets `()[]` of `text` are balanced."""
  stack = []
  for char in text:
    if char in "([":
      stack.append(char)
    elif not stack or stack.pop() != BRACKETS[char]:
      return False
  return not stack


def _number(rng: np.random.Generator, min_digits: int, max_digits: int) -> int:
  digits = int(rng.integers(min_digits, max_digits + 1))
  return int(rng.integers(10 ** (digits - 1) if digits > 1 else 0, 10 ** digits))


def _letters(rng: np.random.Generator, alphabet: str, low: int, high: int) -> str:
  return "".join(alphabet[i] for i in rng.integers(0, len(alphabet), rng.integers(low, high + 1)))


def _add(rng: np.random.Generator) -> tuple[str, str]:
  a, b = _number(rng, 1, 5), _number(rng, 1, 5)
  return f"{a}+{b}", str(a + b)


def _sub(rng: np.random.Generator) -> tuple[str, str]:
  a, b = sorted((_number(rng, 1, 5), _number(rng, 1, 5)), reverse=True)
  return f"{a}-{b}", str(a - b)


def _mul(rng: np.random.Generator) -> tuple[str, str]:
  a, b = _number(rng, 2, 3), _number(rng, 1, 2)
  return f"{a}*{b}", str(a * b)


def _sort(rng: np.random.Generator) -> tuple[str, str]:
  values = [int(v) for v in rng.integers(0, 100, rng.integers(3, 9))]
  return "sort " + " ".join(map(str, values)), " ".join(map(str, sorted(values)))


def _reverse(rng: np.random.Generator) -> tuple[str, str]:
  text = _letters(rng, string.ascii_lowercase, 3, 10)
  return f"reverse {text}", text[::-1]


def _brackets(rng: np.random.Generator) -> tuple[str, str]:
  """A random balanced string of 1-6 pairs, in half the cases with one bracket
  replaced."""
  pairs, stack, chars = int(rng.integers(1, 7)), [], []
  opened = 0
  while len(chars) < 2 * pairs:
    if opened < pairs and (not stack or rng.random() < 0.5):
      stack.append("([" [int(rng.integers(2))])
      chars.append(stack[-1])
      opened += 1
    else:
      chars.append(")" if stack.pop() == "(" else "]")
  if rng.random() < 0.5:
    chars[int(rng.integers(len(chars)))] = "()[]"[int(rng.integers(4))]
  text = "".join(chars)
  return f"balanced {text}", "yes" if balanced(text) else "no"


def _count(rng: np.random.Generator) -> tuple[str, str]:
  text = _letters(rng, COUNT_LETTERS, 5, 16)
  letter = COUNT_LETTERS[int(rng.integers(len(COUNT_LETTERS)))]
  return f"count {letter} in {text}", str(text.count(letter))


GENERATORS: dict[str, Callable[[np.random.Generator], tuple[str, str]]] = {
    "add": _add, "sub": _sub, "mul": _mul, "sort": _sort, "reverse": _reverse,
    "brackets": _brackets, "count": _count}


def prompt(question: str) -> str:
  """The prompt of a question: `Q: <question>\\nA:`."""
  return f"Q: {question}\nA:"


def task_examples(split: str, count: int, seed: int = 0) -> list[tuple[str, str, str]]:
  """`count` examples `(task, prompt, answer)` of `split`, the tasks in turn (`TASKS`
  order), a pure function of `(split, count, seed)`; a shorter list is a prefix of a
  longer one."""
  if split not in SPLITS:
    raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
  rng = np.random.default_rng([seed, SPLITS.index(split)])
  examples, seen = [], set()
  for i in range(count):
    task = TASKS[i % len(TASKS)]
    while True:
      question, answer = GENERATORS[task](rng)
      text = prompt(question)
      if hash_split(text) == split and (split == "train" or text not in seen):
        break
    if split != "train":
      seen.add(text)
    examples.append((task, text, answer))
  return examples
