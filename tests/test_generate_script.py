"""`scripts/generate.py` on the shipped tiny model, checked against `generate` itself."""

import json
import os
import subprocess
import sys

import numpy as np

from sere_jax import checkpoint
from sere_jax import generation
from sere_jax.config import RerouteConfig
from sere_jax.models import hf_import

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = os.path.join(ROOT, "checkpoints", "tiny_shakespeare_moe")
# Three prompts of different lengths in two batches (2 + 1).
PROMPTS = ["HAMLET.\nTo be, or not", "KING.\nWhat say you", "ROMEO.\nBut soft! what light"]


def test_generate_script_matches_the_library(tmp_path):
  prompts_path, out, stats_path = (tmp_path / "prompts.jsonl", tmp_path / "out.jsonl",
                                   tmp_path / "stats.json")
  prompts_path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
  proc = subprocess.run(
      [sys.executable, "-m", "sere_jax.scripts.generate", f"--model_dir={MODEL}",
       f"--prompts={prompts_path}", "--batch_size=2", "--max_new_tokens=5",
       "--length_multiple=8", "--policy=sere:1",
       f"--output={out}", f"--stats_output={stats_path}"],
      cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  rows = [json.loads(line) for line in out.read_text().splitlines()]
  stats = json.loads(stats_path.read_text())
  assert [r["prompt"] for r in rows] == PROMPTS
  assert stats["num_prompts"] == 3 and stats["max_new_tokens"] == 5
  assert stats["mean"]["distinct_after"] < stats["mean"]["distinct_before"]

  # The same batches through the library: identical tokens and text.
  reroute = RerouteConfig(policy="sere", select_top_k=1)
  model = checkpoint.load_model(MODEL, reroute=reroute)
  tokenizer = hf_import.load_tokenizer(MODEL)
  ids = [tokenizer.encode(p).ids for p in PROMPTS]
  cache_length = generation.padded_prompt_length(ids, 8) + 5 - 1
  want = []
  for batch in (ids[:2], ids[2:]):
    want += generation.generate(model, batch, max_new_tokens=5, cache_length=cache_length,
                                length_multiple=8,
                                eos_ids=hf_import.eos_token_ids(MODEL)).tokens
  assert [r["tokens"] for r in rows] == want
  assert [r["text"] for r in rows] == [tokenizer.decode(t) for t in want]
  assert all(len(t) <= 5 for t in want) and any(len(t) == 5 for t in want)
  assert np.isfinite(stats["seconds"])
