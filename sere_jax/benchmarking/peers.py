"""The PyTorch peers of the benchmarks, run as child processes from the repository's
tools/ folder: `tools/hf_peer.py` times transformers' `generate()` on the decode suite's
model (same Hugging Face config, random bf16 weights) and `tools/torch_peer.py` times
`torch._grouped_mm` on the kernels suite's routings. They import torch and never JAX,
so a torch-only Python can run them, and they are not part of the installed package:
run the benchmarks from a checkout to use them. The decode peer runs before the JAX
side touches the accelerator, so the two never hold a copy of the weights at once.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from typing import Any, Sequence

TOOLS_DIR = os.path.join(
    os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "tools")


def tool_path(name: str) -> str:
  """The path of `tools/<name>` in the checkout this package runs from."""
  path = os.path.join(TOOLS_DIR, name)
  if not os.path.isfile(path):
    raise FileNotFoundError(
        f"the torch peer lives in the repository's tools/ ({name} not found in "
        f"{TOOLS_DIR}); run from a checkout")
  return path


def run_hf_peer(python: str, device: str, hf: dict[str, Any], batches: Sequence[int],
                prompt_len: int, new_tokens: int, repeats: int,
                timeout_s: float) -> dict[str, Any]:
  """Runs `tools/hf_peer.py` with `python`; returns its result (`rows`, `env`, and
  `partial` when it ran past `timeout_s`) or `{"skipped": reason}`."""
  try:
    script = tool_path("hf_peer.py")
  except FileNotFoundError as err:
    return dict(skipped=str(err))
  probe = subprocess.run(
      [python, "-c", "import torch, transformers; print(torch.cuda.is_available())"],
      capture_output=True, text=True, check=False)
  if probe.returncode != 0:
    return dict(skipped=f"torch/transformers not importable by {python}: "
                        f"{probe.stderr.strip().splitlines()[-1:]}")
  if device == "cuda" and probe.stdout.strip() != "True":
    return dict(skipped="torch sees no CUDA device")
  with tempfile.TemporaryDirectory() as tmp:
    spec_path, out_path = os.path.join(tmp, "spec.json"), os.path.join(tmp, "out.json")
    with open(spec_path, "w") as fh:
      json.dump(dict(hf_config=hf, batches=list(batches), prompt_len=prompt_len,
                     new_tokens=new_tokens, repeats=repeats, device=device, seed=0), fh)
    try:
      proc = subprocess.run([python, script, spec_path, out_path], capture_output=True,
                            text=True, check=False, timeout=timeout_s)
    except subprocess.TimeoutExpired:
      reason = f"transformers peer ran past {timeout_s:.0f} s"
      if not os.path.isfile(out_path):
        return dict(skipped=reason)
      with open(out_path) as fh:
        done = json.load(fh)
      return dict(done, partial=f"{reason}; batches after the last row not timed")
    sys.stderr.write(proc.stdout[-4000:])
    if proc.returncode != 0:
      return dict(skipped="transformers peer failed: "
                          + " | ".join(proc.stderr.strip().splitlines()[-3:]))
    with open(out_path) as fh:
      return json.load(fh)


def run_torch_peer(python: str, shape: dict[str, Any], layers: int,
                   cases: Sequence[dict[str, Any]], min_seconds: float
                   ) -> tuple[list[float], dict[str, Any]]:
  """Runs `tools/torch_peer.py` with `python` on the kernels suite's routings; returns
  `(µs per layer per case, environment)`. Raises `subprocess.CalledProcessError` if it
  fails."""
  script = tool_path("torch_peer.py")
  with tempfile.TemporaryDirectory() as tmp:
    spec, out = os.path.join(tmp, "cases.json"), os.path.join(tmp, "torch.json")
    with open(spec, "w") as fh:
      json.dump(dict(shape=shape, layers=layers, cases=list(cases),
                     min_seconds=min_seconds), fh)
    subprocess.run([python, script, spec, out], check=True)
    with open(out) as fh:
      result = json.load(fh)
  return result["times_us"], result["env"]
