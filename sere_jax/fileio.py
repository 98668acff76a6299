"""File helpers: writes that a reader never sees half of (a temporary file beside the
target, then a rename), an up-front check that an output path can be written, and reads
whose errors name the file and what was wrong with it. Reads decompress `.xz` and `.gz`
files transparently."""

from __future__ import annotations

import gzip
import json
import lzma
import os
import tempfile
import zlib
from typing import Any, Callable, Mapping

# Suffix -> (format name, decompressor) of the files the reads decompress.
_DECOMPRESSORS: dict[str, tuple[str, Callable[[bytes], bytes]]] = {
    ".xz": ("xz", lzma.decompress), ".gz": ("gzip", gzip.decompress)}
COMPRESSED_SUFFIXES = tuple(_DECOMPRESSORS)


def write_atomic(path: str, data: str | bytes) -> None:
  """Writes `data` (text or bytes) to `path` through a temporary file and a rename;
  creates the parent directory."""
  write_all_atomic({path: data})


def write_all_atomic(files: Mapping[str, str | bytes]) -> None:
  """Writes every `{path: data}` through a temporary file, and renames them into place
  only once all were written: if one fails, none of the targets changes."""
  written: list[tuple[str, str]] = []
  try:
    for path, data in files.items():
      os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
      tmp = f"{path}.tmp-{os.getpid()}"
      written.append((tmp, path))
      with open(tmp, "wb" if isinstance(data, bytes) else "w") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
  except BaseException:
    for tmp, _ in written:
      if os.path.exists(tmp):
        os.remove(tmp)
    raise
  for tmp, path in written:
    os.replace(tmp, path)


def compact_json(data: Any) -> str:
  """`data` as one line of JSON, for result files whose `.md` beside them is the human
  view (half the bytes of indented JSON)."""
  return json.dumps(data, separators=(",", ":")) + "\n"


def write_json_atomic(path: str, data: Any, *, compact: bool = False) -> None:
  """`write_atomic` of `data` as indented JSON, or as `compact_json` with `compact`."""
  write_atomic(path, compact_json(data) if compact else json.dumps(data, indent=2) + "\n")


def check_writable(path: str, *, overwrite: bool = False, directory: bool = False
                   ) -> None:
  """Raises unless `path` can be written (as a file, or with `directory` as a directory)
  without losing data.

  FileExistsError if `path` exists and not `overwrite` (an empty directory is no loss
  when a directory is asked for); IsADirectoryError / NotADirectoryError if `path` or
  an ancestor is of the other kind; PermissionError if the nearest existing ancestor
  directory does not take a new file (tried, so that read-only file systems and root's
  permissions are judged correctly).
  """
  path = os.path.abspath(path)
  if os.path.isdir(path) and not directory:
    raise IsADirectoryError(f"{path} is a directory, not a file")
  if os.path.lexists(path) and directory and not os.path.isdir(path):
    raise NotADirectoryError(f"{path} exists and is not a directory")
  if os.path.lexists(path) and not overwrite and not (directory and not os.listdir(path)):
    raise FileExistsError(f"{path} exists")
  parent = os.path.dirname(path)
  while not os.path.lexists(parent):
    parent = os.path.dirname(parent)
  if not os.path.isdir(parent):
    raise NotADirectoryError(f"cannot write {path}: {parent} is not a directory")
  try:
    with tempfile.TemporaryFile(dir=parent):
      pass
  except OSError as e:
    raise PermissionError(f"cannot write {path}: {parent} is not writable "
                          f"({e.strerror})") from None


def uncompressed_name(path: str) -> str:
  """`path` without a compression suffix the reads decompress (`a.txt.xz` -> `a.txt`,
  `a.jsonl.gz` -> `a.jsonl`); other paths unchanged."""
  stem, suffix = os.path.splitext(path)
  return stem if suffix.lower() in _DECOMPRESSORS else path


def read_text(path: str) -> str:
  """The UTF-8 text of `path` with universal newlines (`\\r\\n` and `\\r` read as
  `\\n`, as text-mode `open` does); a `.xz` or `.gz` file is decompressed first
  (`read_bytes`). Errors name the file, and for text that is not UTF-8 the offset of the
  first bad byte (in the decompressed data)."""
  data = read_bytes(path)
  try:
    text = data.decode("utf-8")
  except UnicodeDecodeError as e:
    raise ValueError(f"{path} is not UTF-8 text: byte 0x{data[e.start]:02x} at offset "
                     f"{e.start} ({e.reason})") from None
  return text.replace("\r\n", "\n").replace("\r", "\n")


def read_bytes(path: str) -> bytes:
  """The contents of `path`, decompressed when its name ends in `.xz` (lzma) or `.gz`
  (gzip); FileNotFoundError / IsADirectoryError name the file, and ValueError names a
  compressed file that is corrupt or truncated."""
  if os.path.isdir(path):
    raise IsADirectoryError(f"{path} is a directory, not a file")
  if not os.path.exists(path):
    raise FileNotFoundError(f"no file {path}")
  with open(path, "rb") as fh:
    data = fh.read()
  suffix = os.path.splitext(path)[1].lower()
  if suffix not in _DECOMPRESSORS:
    return data
  kind, decompress = _DECOMPRESSORS[suffix]
  try:
    return decompress(data)
  except (lzma.LZMAError, zlib.error, EOFError, OSError) as e:
    raise ValueError(f"{path} is not a valid {kind} file (corrupt or truncated: {e})"
                     ) from None


def read_json(path: str) -> Any:
  """The JSON value of `path`; errors name the file and the line and column of a
  syntax error."""
  text = read_text(path)
  try:
    return json.loads(text)
  except json.JSONDecodeError as e:
    raise ValueError(f"{path} is not valid JSON: {e}") from None
