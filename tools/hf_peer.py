"""Transformers peer of the decode benchmark: times Hugging Face `generate()` per
output token.

  python tools/hf_peer.py SPEC OUT

Run by `sere_jax.benchmarking.peers.run_hf_peer` (`benchmark.py --suite=decode
--hf_peer`) with a Python that has torch and transformers (not JAX). SPEC (JSON) holds
the Hugging Face config dict of the decode benchmark's model, the batch sizes, prompt
length, new tokens, repeats, torch device and seed; the model is built from that config
with random bf16 weights. OUT gets `rows` (per batch size: the median decode step as
`hf_ms_per_token`, ...) and `env`, rewritten after every batch size so a peer stopped
by a timeout still reports what it did.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
import statistics
import sys
import time
from typing import Any

import torch
import transformers


def _hf_config_object(hf: dict[str, Any]) -> transformers.PretrainedConfig:
  """A transformers config from our dict (transformers 4.x or 5.x spelling of RoPE)."""
  kwargs = dict(hf)
  model_type = kwargs.pop("model_type")
  cls = transformers.AutoConfig.for_model(model_type).__class__
  declared = ({f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls)
              else set(inspect.signature(cls.__init__).parameters))
  if "rope_parameters" in declared:  # transformers 5
    rope = dict(kwargs.pop("rope_scaling") or {})
    rope_type = rope.pop("type", rope.pop("rope_type", "default"))
    kwargs["rope_parameters"] = dict(rope, rope_type=rope_type,
                                     rope_theta=kwargs.pop("rope_theta"))
  return cls(**kwargs)


def peer_main(spec_path: str, out_path: str) -> None:
  """Times HF `generate()` per output token for every batch size in SPEC."""
  with open(spec_path) as fh:
    spec = json.load(fh)
  device = torch.device(spec["device"])
  if device.type == "cuda" and not torch.cuda.is_available():
    raise RuntimeError("CUDA is not available to torch")
  torch.manual_seed(spec["seed"])
  config = _hf_config_object(spec["hf_config"])
  dtype = torch.bfloat16
  with torch.device(device):
    try:
      model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    except TypeError:  # transformers 4.x
      model = transformers.AutoModelForCausalLM.from_config(config, torch_dtype=dtype)
  model.to(device=device, dtype=dtype).eval()

  def sync():
    if device.type == "cuda":
      torch.cuda.synchronize()

  class StepClock(transformers.StoppingCriteria):
    """Called by generate() after every step: the time each step's token is ready."""

    def __init__(self):
      self.stamps = []

    def __call__(self, input_ids, scores, **kwargs):
      sync()
      self.stamps.append(time.perf_counter())
      return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

  def timed_generate(ids, new):
    clock = StepClock()
    sync()
    start = time.perf_counter()
    with torch.no_grad():
      out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new,
                           min_new_tokens=new, do_sample=False, eos_token_id=None,
                           pad_token_id=0,
                           stopping_criteria=transformers.StoppingCriteriaList([clock]))
    sync()
    assert out.shape[1] == ids.shape[1] + new, out.shape
    # The first stamp follows the prefill (and its token); then one per decode step.
    steps = [b - a for a, b in zip(clock.stamps, clock.stamps[1:])]
    return time.perf_counter() - start, clock.stamps[0] - start, steps

  env = dict(torch=torch.__version__, transformers=transformers.__version__,
             device=(torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu"),
             attn_implementation=getattr(model.config, "_attn_implementation", None),
             param_count=sum(p.numel() for p in model.parameters()))
  rows = []
  prompt_len, new = spec["prompt_len"], spec["new_tokens"]
  for batch in spec["batches"]:
    ids = torch.randint(3, config.vocab_size, (batch, prompt_len), device=device)
    timed_generate(ids, min(new, 2))  # warm-up
    totals, prefills, steps = [], [], []
    for _ in range(spec["repeats"]):
      total, prefill, step_times = timed_generate(ids, new)
      totals.append(total)
      prefills.append(prefill)
      steps += step_times
    # Time per output token: the median decode step, as on our side.
    per_token = statistics.median(steps)
    rows.append(dict(batch=batch, hf_ms_per_token=per_token * 1e3,
                     hf_ms_per_token_mean=statistics.fmean(steps) * 1e3,
                     hf_steps_timed=len(steps), hf_generate_s=statistics.median(totals),
                     hf_prefill_s=statistics.median(prefills)))
    print(f"transformers B={batch}: {per_token * 1e3:.2f} ms/token", flush=True)
    # After every batch, so a peer stopped by the timeout still reports what it did.
    with open(out_path + ".tmp", "w") as fh:
      json.dump(dict(rows=rows, env=env), fh)
    os.replace(out_path + ".tmp", out_path)


if __name__ == "__main__":
  peer_main(*sys.argv[1:3])
