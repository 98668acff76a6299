"""The git-tracked tree stays under 48 MiB: the sum of the sizes of every file
`git ls-files` lists (as in the working tree), so that a clone stays small. Large text
data ships xz-compressed (`sere_jax.fileio.read_text` reads it back)."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LIMIT_BYTES = 48 * 2**20


def _tracked_files() -> list[str] | None:
  """Paths of the tracked files, relative to the repository root; None when this tree
  is not a git checkout (a Bazel sandbox, an unpacked archive)."""
  if shutil.which("git") is None:
    return None
  top = subprocess.run(["git", "rev-parse", "--show-toplevel"], cwd=REPO,
                       capture_output=True, text=True, check=False)
  if top.returncode != 0 or os.path.realpath(top.stdout.strip()) != os.path.realpath(REPO):
    return None
  listed = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True,
                          check=True)
  return [p for p in listed.stdout.decode("utf-8", "surrogateescape").split("\0") if p]


def test_tracked_tree_is_under_48_mib():
  files = _tracked_files()
  if files is None:
    pytest.skip(f"{REPO} is not a git checkout: no tracked files to measure")
  sizes = {}
  for rel in files:
    path = os.path.join(REPO, rel)
    if os.path.lexists(path) and not os.path.isdir(path):  # skip a deleted file
      sizes[rel] = os.lstat(path).st_size
  total = sum(sizes.values())
  largest = sorted(sizes.items(), key=lambda item: -item[1])[:10]
  assert total < LIMIT_BYTES, (
      f"the tracked tree is {total / 2**20:.2f} MiB ({total} bytes), at or over the "
      f"{LIMIT_BYTES / 2**20:.0f} MiB limit; largest files:\n" +
      "\n".join(f"  {size / 2**20:7.2f} MiB  {rel}" for rel, size in largest))
