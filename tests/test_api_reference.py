"""docs/api.md is generated from the docstrings: it must match them."""

import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_api_reference_is_current():
  tool = os.path.join(REPO, "tools", "api_reference.py")
  if not (os.path.isfile(tool) and os.path.isfile(os.path.join(REPO, "docs", "api.md"))):
    pytest.skip("tools/api_reference.py or docs/api.md is not in this tree")
  proc = subprocess.run([sys.executable, os.path.join(REPO, "tools", "api_reference.py"),
                         "--check"], cwd=REPO, capture_output=True, text=True, timeout=300,
                        check=False)
  assert proc.returncode == 0, ("docs/api.md is out of date; run "
                                f"`python tools/api_reference.py`\n{proc.stdout}{proc.stderr}")
