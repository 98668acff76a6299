"""Reading prompt / document files for the scripts: plain text or JSONL.

A plain-text file gives one record per non-empty line, `{field: line}`. A `.jsonl` file
(or one whose first line is a JSON object) gives one dict per line, which must hold
`field` (text) or `"tokens"` (a list of token ids). A `.xz` or `.gz` file is decompressed
first (`fileio.read_text`).
"""

from __future__ import annotations

import json
from typing import Any

from sere_jax.fileio import read_text
from sere_jax.fileio import uncompressed_name


def read_records(path: str, field: str) -> list[dict[str, Any]]:
  """The records of `path`; errors name the file: missing, not UTF-8, empty, or a bad
  line."""
  lines = [line for line in read_text(path).split("\n") if line.strip()]
  if not lines:
    raise ValueError(f"{path} holds no records")
  if not (uncompressed_name(path).endswith(".jsonl") or lines[0].lstrip().startswith("{")):
    return [{field: line} for line in lines]
  records = []
  for n, line in enumerate(lines, 1):
    try:
      row = json.loads(line)
    except json.JSONDecodeError as e:
      raise ValueError(f"{path}: line {n} is not JSON: {e}") from e
    if not isinstance(row, dict) or (field not in row and "tokens" not in row):
      raise ValueError(f"{path}: line {n} needs a \"{field}\" or \"tokens\" field")
    records.append(row)
  return records


def tokenize_records(records: list[dict[str, Any]], field: str, tokenizer
                     ) -> list[list[int]]:
  """Token ids of each record: its `"tokens"`, or its text encoded by `tokenizer`."""
  out = []
  for i, row in enumerate(records):
    if "tokens" in row:
      tokens = row["tokens"]
      if not isinstance(tokens, list) or not all(
          isinstance(t, int) and not isinstance(t, bool) for t in tokens):
        raise ValueError(f"record {i}: \"tokens\" must be a list of integers")
      out.append(list(tokens))
    elif tokenizer is None:
      raise ValueError(f"record {i} is text but the model directory has no "
                       "tokenizer.json; give JSONL with \"tokens\" lists instead")
    else:
      out.append(tokenizer.encode(row[field]).ids)
  return out
