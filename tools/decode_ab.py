"""Compares two code versions' decode results of one command at equal distinct experts.

    python tools/decode_ab.py OLD.json NEW.json [OUT.json]

OLD and NEW are `benchmark --suite=decode` results (run with `--profile_dir` to compare
GPU busy time too); prints `sere_jax.benchmarking.versions.markdown` of
`versions.compare_decode` and writes its rows to OUT.json when given. On a GPU machine
without git, run the two versions from exported trees (`tools/device_pythonpath.sh`).
"""

from __future__ import annotations

import json
import sys

from sere_jax import fileio
from sere_jax.benchmarking import versions


def main(argv: list[str]) -> int:
  if len(argv) not in (3, 4):
    print(__doc__, file=sys.stderr)
    return 2
  try:
    rows = versions.compare_decode(fileio.read_json(argv[1]), fileio.read_json(argv[2]))
  except (OSError, ValueError) as err:
    print(f"decode_ab: {err}", file=sys.stderr)
    return 1
  print(versions.markdown(rows), end="")
  if len(argv) == 4:
    fileio.write_atomic(argv[3], json.dumps(dict(old=argv[1], new=argv[2], rows=rows),
                                            indent=1))
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv))
