"""Writing files so that a reader never sees half of one: write a temporary file
beside the target, then rename it into place."""

from __future__ import annotations

import json
import os
from typing import Any


def write_atomic(path: str, data: str | bytes) -> None:
  """Writes `data` (text or bytes) to `path` through a temporary file and a rename;
  creates the parent directory."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = f"{path}.tmp-{os.getpid()}"
  with open(tmp, "wb" if isinstance(data, bytes) else "w") as fh:
    fh.write(data)
    fh.flush()
    os.fsync(fh.fileno())
  os.replace(tmp, path)


def write_json_atomic(path: str, data: Any) -> None:
  """`write_atomic` of `data` as indented JSON."""
  write_atomic(path, json.dumps(data, indent=2) + "\n")
