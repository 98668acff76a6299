"""The README's main command on the shipped model (short settings)."""

import json
import os
import subprocess
import sys

from sere_jax import fileio
from sere_jax import shakespeare

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = os.path.join(ROOT, "checkpoints", "tiny_shakespeare_moe")


def test_speech_openings_are_speaker_and_first_line():
  text = fileio.read_text(os.path.join(MODEL, "heldout_test.txt.xz"))
  openings = shakespeare.speech_openings(text, 8)
  assert len(openings) == 8
  for opening in openings:
    speaker, line, rest = opening.split("\n")
    assert speaker.isupper() and speaker.endswith(".") and len(line) > 20 and rest == ""


def test_demo_runs_on_the_shipped_model(tmp_path):
  out = tmp_path / "demo.json"
  proc = subprocess.run(
      [sys.executable, "-m", "sere_jax.scripts.demo", "--batch=4", "--new_tokens=6",
       "--perplexity_sequences=4", "--seq_len=64", "--policies=sere:1", "--show=1",
       f"--json_out={out}"],
      cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "distinct/layer" in proc.stdout and "sere S=1 rho=0" in proc.stdout
  rows = {r["policy"]: r for r in json.loads(out.read_text())["rows"]}
  none, sere = rows["none"], rows["sere S=1 rho=0"]
  assert none["agreement_with_none"] == 1.0 and none["same_prefix_bytes"] == 6.0
  # Top-1 of 32 experts per token at batch 4: SERE reads fewer experts than top-4.
  assert sere["distinct_per_layer"] < none["distinct_per_layer"]
  assert sere["distinct_per_layer"] <= 4.0
  assert 1.0 < none["test_perplexity"] < 10.0
