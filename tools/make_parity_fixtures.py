r"""Builds the Hugging Face parity fixtures under tests/fixtures/parity/.

One file on purpose: it runs in a separate torch environment, outside the package, and
keeps the four models' configs, the reference runs and the fixture writer together so
that the fixtures can be rebuilt from this file alone.

  /tmp/hfenv/bin/python tools/make_parity_fixtures.py [--out_dir=tests/fixtures/parity --seed=0]

Needs `torch`, `transformers`, `safetensors`, `numpy` and `absl-py` (not JAX; the
project's own venv has no torch, so run it from a separate one, see
tests/fixtures/parity/README.md). For each of four tiny random-weight float32 models,
built with transformers' own classes,

  qwen2_moe        Qwen2MoeForCausalLM   (Qwen1.5-MoE style)
  qwen3_moe        Qwen3MoeForCausalLM   (saved sharded on purpose)
  deepseek_v2      DeepseekV2ForCausalLM (q LoRA, group-limited greedy, yarn)
  deepseek_v2_lite DeepseekV2ForCausalLM (V2-Lite style: no q LoRA, greedy, yarn)

it writes a Hugging Face directory `<out_dir>/<name>/` (config.json, safetensors
weights) plus `reference.safetensors` and `reference.json`: a left-padded batch of three
prompts, the masked prefill logits, and a KV-cached greedy decode (token ids and the
logits behind each of them). See `reference.json` "tensors" for the exact meaning.

Weights are HF's own initialization with `initializer_range` raised to 0.1 (so logits
are O(1)), biases drawn at random and RMSNorm scales drawn around 1 (so a dropped bias
or norm weight shows). A seed is accepted only when every routing decision and every
greedy argmax of the reference run has a clear margin (see `_MIN_*`), so a faithful
float32 re-implementation picks the same experts and tokens; otherwise the next seed
is tried and the seed used is recorded.
"""

from __future__ import annotations

import dataclasses
import glob
import inspect
import json
import os
import shutil

from absl import app
from absl import flags
from absl import logging
import numpy as np
import safetensors
import safetensors.numpy
import torch
import transformers

_OUT_DIR = flags.DEFINE_string("out_dir", "tests/fixtures/parity", "Folder the fixtures go to.")
_SEED = flags.DEFINE_integer("seed", 0, "Base random seed (weights and prompts).")
_MAX_TRIES = flags.DEFINE_integer(
    "max_tries", 50, "Seeds tried per model (seed, seed+1, ...) to get clear margins."
)

PROMPT_LENS = (5, 9, 3)
NEW_TOKENS = 6
PAD_ID = 0
FIRST_TOKEN_ID = 3  # prompt ids are drawn from [3, vocab): 0 is the pad id, 1/2 are bos/eos.
INIT_STD = 0.1
# Smallest accepted gaps: top-1 vs top-2 logit of every greedy step, and (in
# probability units) between the last selected and first unselected expert (or group).
_MIN_ARGMAX_MARGIN = 2e-3
_MIN_ROUTING_MARGIN = 2e-5
SHARD_SIZE = {"qwen3_moe": "200KB"}

_COMMON = dict(
    vocab_size=128,
    hidden_size=64,
    num_attention_heads=4,
    hidden_act="silu",
    rms_norm_eps=1e-6,
    initializer_range=INIT_STD,
    tie_word_embeddings=False,
    use_cache=True,
)

MODELS = {
    # Qwen1.5-MoE-A2.7B style: qkv bias, a shared expert behind a sigmoid gate, softmax
    # top-k without renormalization, GQA.
    "qwen2_moe": (
        "Qwen2MoeConfig",
        "Qwen2MoeForCausalLM",
        dict(
            _COMMON,
            num_hidden_layers=2,
            num_key_value_heads=2,
            intermediate_size=64,
            max_position_embeddings=256,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
            qkv_bias=True,
            use_sliding_window=False,
            decoder_sparse_step=1,
            mlp_only_layers=[],
            num_experts=16,
            num_experts_per_tok=4,
            moe_intermediate_size=8,
            shared_expert_intermediate_size=32,
            norm_topk_prob=False,
        ),
    ),
    # Qwen3-30B-A3B style: per-head q/k RMSNorm, no biases, renormalized top-k, GQA;
    # layer 1 is a dense MLP through mlp_only_layers.
    "qwen3_moe": (
        "Qwen3MoeConfig",
        "Qwen3MoeForCausalLM",
        dict(
            _COMMON,
            num_hidden_layers=3,
            num_key_value_heads=2,
            head_dim=16,
            intermediate_size=64,
            max_position_embeddings=256,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
            attention_bias=False,
            use_sliding_window=False,
            decoder_sparse_step=1,
            mlp_only_layers=[1],
            num_experts=16,
            num_experts_per_tok=4,
            moe_intermediate_size=8,
            norm_topk_prob=True,
        ),
    ),
    # DeepSeek-V2 style: MLA with q LoRA, group-limited greedy routing, scaled routed
    # weights, one shared expert, layer 0 dense, yarn with mscale != mscale_all_dim and
    # beta_fast/beta_slow left at their defaults (absent from the config).
    "deepseek_v2": (
        "DeepseekV2Config",
        "DeepseekV2ForCausalLM",
        dict(
            _COMMON,
            num_hidden_layers=3,
            num_key_value_heads=4,
            intermediate_size=64,
            max_position_embeddings=256,
            rope_parameters={
                "rope_type": "yarn",
                "rope_theta": 10000.0,
                "factor": 4.0,
                "original_max_position_embeddings": 64,
                "mscale": 1.0,
                "mscale_all_dim": 0.8,
            },
            attention_bias=False,
            mlp_bias=False,
            q_lora_rank=32,
            kv_lora_rank=32,
            qk_nope_head_dim=16,
            qk_rope_head_dim=8,
            v_head_dim=16,
            n_routed_experts=16,
            num_experts_per_tok=4,
            moe_intermediate_size=8,
            n_shared_experts=1,
            first_k_dense_replace=1,
            topk_method="group_limited_greedy",
            n_group=4,
            topk_group=2,
            routed_scaling_factor=2.5,
            norm_topk_prob=False,  # the HF router ignores it (as does real V2: False)
            bos_token_id=1,
            eos_token_id=2,
        ),
    ),
    # DeepSeek-V2-Lite style: no q LoRA, plain greedy top-6, two shared experts, yarn
    # as in V2-Lite's config (factor 40, mscale == mscale_all_dim = 0.707, explicit betas).
    "deepseek_v2_lite": (
        "DeepseekV2Config",
        "DeepseekV2ForCausalLM",
        dict(
            _COMMON,
            num_hidden_layers=3,
            num_key_value_heads=4,
            intermediate_size=64,
            max_position_embeddings=163840,
            rope_parameters={
                "rope_type": "yarn",
                "rope_theta": 10000.0,
                "factor": 40.0,
                "original_max_position_embeddings": 4096,
                "mscale": 0.707,
                "mscale_all_dim": 0.707,
                "beta_fast": 32,
                "beta_slow": 1,
            },
            attention_bias=False,
            mlp_bias=False,
            q_lora_rank=None,
            kv_lora_rank=32,
            qk_nope_head_dim=16,
            qk_rope_head_dim=8,
            v_head_dim=16,
            n_routed_experts=16,
            num_experts_per_tok=6,
            moe_intermediate_size=8,
            n_shared_experts=2,
            first_k_dense_replace=1,
            topk_method="greedy",
            n_group=1,
            topk_group=1,
            routed_scaling_factor=1.0,
            norm_topk_prob=False,
            bos_token_id=1,
            eos_token_id=2,
        ),
    ),
}

# Keys set above that the config class does not declare as a field but that the
# modeling code reads with getattr (checked in `_make_config`).
_UNDECLARED_OK = {"Qwen3MoeConfig": {"head_dim"}}


def _make_config(config_cls_name: str, kwargs: dict) -> transformers.PretrainedConfig:
  cls = getattr(transformers, config_cls_name)
  declared = {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else None
  if declared is None:  # transformers < 5: plain __init__ arguments
    declared = set(inspect.signature(cls.__init__).parameters)
  declared |= set(getattr(cls, "attribute_map", {}))
  if "rope_parameters" not in declared and "rope_parameters" in kwargs:
    # transformers 4.x spelling: rope_theta + rope_scaling={"type": ...}
    kwargs = dict(kwargs)
    rope = dict(kwargs.pop("rope_parameters"))
    kwargs["rope_theta"] = rope.pop("rope_theta")
    rope_type = rope.pop("rope_type")
    kwargs["rope_scaling"] = None if rope_type == "default" else {"type": rope_type, **rope}
  unknown = set(kwargs) - declared - _UNDECLARED_OK.get(config_cls_name, set())
  if unknown:
    raise ValueError(f"{config_cls_name} does not know {sorted(unknown)}")
  config = cls(**kwargs)
  for key, value in kwargs.items():
    if key == "rope_parameters":
      continue
    if getattr(config, key) != value:
      raise ValueError(f"{config_cls_name}.{key} = {getattr(config, key)!r}, wanted {value!r}")
  if "dtype" in declared:
    config.dtype = torch.float32
  else:  # transformers < 5
    config.torch_dtype = torch.float32
  return config


def _randomize(model: torch.nn.Module) -> None:
  """Random biases and norm scales on top of HF's init (which makes them 0 / 1)."""
  with torch.no_grad():
    for name, param in model.named_parameters():
      if name.endswith(".bias"):
        param.normal_(0.0, INIT_STD)
      elif "norm" in name.split(".")[-2]:
        param.copy_(1.0 + 0.2 * torch.randn_like(param))


def _prompts(vocab: int, gen: torch.Generator) -> list[list[int]]:
  return [
      torch.randint(FIRST_TOKEN_ID, vocab, (n,), generator=gen).tolist() for n in PROMPT_LENS
  ]


def _left_pad(prompts: list[list[int]]):
  length = max(len(p) for p in prompts)
  ids = torch.full((len(prompts), length), PAD_ID, dtype=torch.long)
  mask = torch.zeros((len(prompts), length), dtype=torch.long)
  for b, p in enumerate(prompts):
    ids[b, length - len(p):] = torch.tensor(p)
    mask[b, length - len(p):] = 1
  # Count from 0 at each prompt's first real token; pads get 0 (as HF generate does).
  positions = (mask.cumsum(-1) - 1).clamp(min=0)
  return ids, mask, positions


class _RouterTap:
  """Records every router's logits (forward hook), to measure routing margins."""

  def __init__(self, model: torch.nn.Module):
    self.calls: list[tuple[torch.nn.Module, torch.Tensor]] = []
    self.handles = [
        m.register_forward_hook(self._hook)
        for m in model.modules()
        if type(m).__name__.endswith(("TopKRouter", "TopkRouter"))
    ]
    if not self.handles:
      raise ValueError("no router modules found")

  def _hook(self, module, args, output):
    del args
    self.calls.append((module, output[0].detach().float().clone()))

  def take(self):
    calls, self.calls = self.calls, []
    return calls

  def close(self):
    for h in self.handles:
      h.remove()


def _routing_margin(module: torch.nn.Module, logits: torch.Tensor) -> float:
  """Smallest gap between chosen and rejected experts/groups, in probability units."""
  scores = logits.softmax(-1)
  k = module.top_k

  def gap(x: torch.Tensor, kk: int) -> torch.Tensor:
    s = x.sort(-1, descending=True).values
    return s[:, kk - 1] - s[:, kk]

  method = getattr(module, "topk_method", "greedy")
  if method == "greedy":
    return gap(scores, k).min().item()
  assert method == "group_limited_greedy", method
  n_group, topk_group = module.num_group, module.topk_group
  grouped = scores.view(scores.shape[0], n_group, -1)
  group_scores = grouped.max(-1).values
  margins = [gap(group_scores, topk_group)] if topk_group < n_group else []
  keep = torch.zeros_like(group_scores, dtype=torch.bool)
  keep.scatter_(1, group_scores.topk(topk_group, -1).indices, True)
  masked = scores.masked_fill(~keep[:, :, None].expand_as(grouped).reshape_as(scores), 0.0)
  margins.append(gap(masked, k))
  return torch.stack(margins).min().item()


def _forward(model, ids, mask, positions, cache):
  kw = dict(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True)
  if cache is not None:
    params = inspect.signature(model.forward).parameters
    kw["cache" if "cache" in params else "past_key_values"] = cache
  out = model(**kw)
  new_cache = getattr(out, "cache", None)
  if new_cache is None:
    new_cache = out.past_key_values
  return out.logits.float(), new_cache


def _run_reference(model, ids, mask, positions, tap: _RouterTap):
  """Masked prefill, then greedy decode with the KV cache; returns arrays and margins."""
  routing_margins = []

  def note_routing(valid: torch.Tensor):
    flat = valid.reshape(-1).bool()
    for module, logits in tap.take():
      routing_margins.append(_routing_margin(module, logits[flat]))

  with torch.no_grad():
    logits, cache = _forward(model, ids, mask, positions, None)
    note_routing(mask)
    prefill_logits = logits
    step_logits = [logits[:, -1]]
    generated = []
    mask_t, next_pos = mask, positions[:, -1:] + 1
    for t in range(NEW_TOKENS):
      token = step_logits[-1].argmax(-1, keepdim=True)
      generated.append(token)
      if t == NEW_TOKENS - 1:
        break
      mask_t = torch.cat([mask_t, torch.ones_like(token)], dim=1)
      logits, cache = _forward(model, token, mask_t, next_pos, cache)
      note_routing(torch.ones_like(token))
      step_logits.append(logits[:, -1])
      next_pos = next_pos + 1
  decode_logits = torch.stack(step_logits, dim=1)
  top2 = decode_logits.topk(2, dim=-1).values
  argmax_margin = (top2[..., 0] - top2[..., 1]).min().item()
  return (
      prefill_logits,
      torch.cat(generated, dim=1),
      decode_logits,
      argmax_margin,
      min(routing_margins),
  )


def _check_against_hf(model, prompts, ids, mask, prefill_logits, generated, decode_logits):
  """Cross-checks: each prompt alone (no padding, no cache) and HF's own `generate`."""
  with torch.no_grad():
    for b, p in enumerate(prompts):
      alone = model(input_ids=torch.tensor([p]), use_cache=False).logits[0].float()
      padded = prefill_logits[b, ids.shape[1] - len(p):]
      err = (alone - padded).abs().max().item()
      if err > 1e-4:
        raise AssertionError(f"prompt {b}: padded vs unpadded prefill differ by {err}")
      # KV-cached decode vs a full uncached forward over prompt + generated tokens.
      full = torch.tensor([p + generated[b, :-1].tolist()])
      full_logits = model(input_ids=full, use_cache=False).logits[0, len(p) - 1:].float()
      err = (full_logits - decode_logits[b]).abs().max().item()
      if err > 1e-4:
        raise AssertionError(f"prompt {b}: cached decode vs full forward differ by {err}")
    out = model.generate(
        input_ids=ids,
        attention_mask=mask,
        do_sample=False,
        max_new_tokens=NEW_TOKENS,
        min_new_tokens=NEW_TOKENS,
        output_logits=True,
        return_dict_in_generate=True,
        pad_token_id=PAD_ID,
    )
  hf_tokens = out.sequences[:, ids.shape[1]:]
  if not torch.equal(hf_tokens, generated):
    raise AssertionError(f"generate() gave {hf_tokens.tolist()}, own loop {generated.tolist()}")
  hf_logits = torch.stack(out.logits, dim=1).float()
  err = (hf_logits - decode_logits).abs().max().item()
  if err > 1e-4:
    raise AssertionError(f"generate() logits differ from own loop by {err}")
  return err


def _tensor_table(model_dir: str) -> dict[str, list[int]]:
  shapes = {}
  for path in sorted(glob.glob(os.path.join(model_dir, "*.safetensors"))):
    if os.path.basename(path) == "reference.safetensors":
      continue
    with safetensors.safe_open(path, framework="numpy") as f:
      for key in f.keys():
        shapes[key] = list(f.get_slice(key).get_shape())
  return shapes


def build(name: str, out_dir: str, base_seed: int) -> dict:
  config_cls, model_cls, kwargs = MODELS[name]
  config = _make_config(config_cls, kwargs)
  for attempt in range(_MAX_TRIES.value):
    seed = base_seed + attempt
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)._from_config(config, attn_implementation="eager")
    model.to(torch.float32)
    _randomize(model)
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    prompts = _prompts(config.vocab_size, gen)
    ids, mask, positions = _left_pad(prompts)
    tap = _RouterTap(model)
    prefill, generated, decode, argmax_margin, routing_margin = _run_reference(
        model, ids, mask, positions, tap
    )
    tap.close()
    logging.info(
        "%s seed %d: argmax margin %.2e, routing margin %.2e",
        name, seed, argmax_margin, routing_margin,
    )
    if argmax_margin >= _MIN_ARGMAX_MARGIN and routing_margin >= _MIN_ROUTING_MARGIN:
      break
  else:
    raise RuntimeError(f"{name}: no seed with clear margins in {_MAX_TRIES.value} tries")

  gen_err = _check_against_hf(model, prompts, ids, mask, prefill, generated, decode)

  model_dir = os.path.join(out_dir, name)
  if os.path.isdir(model_dir):
    shutil.rmtree(model_dir)
  save_kw = {}
  if "safe_serialization" in inspect.signature(model.save_pretrained).parameters:
    save_kw["safe_serialization"] = True
  if name in SHARD_SIZE:
    save_kw["max_shard_size"] = SHARD_SIZE[name]
  model.save_pretrained(model_dir, **save_kw)
  if not glob.glob(os.path.join(model_dir, "*.safetensors")):
    raise AssertionError(f"{model_dir}: no safetensors written")

  # Reload through from_pretrained: the saved checkpoint must reproduce the logits.
  reloaded = getattr(transformers, model_cls).from_pretrained(model_dir, attn_implementation="eager")
  reloaded.eval()
  with torch.no_grad():
    err = (reloaded(input_ids=ids, attention_mask=mask, position_ids=positions).logits - prefill)
  reload_err = err.abs().max().item()
  if reload_err > 1e-5:
    raise AssertionError(f"{name}: reloaded checkpoint differs by {reload_err}")

  arrays = {
      "input_ids": ids.numpy().astype(np.int32),
      "attention_mask": mask.numpy().astype(np.int32),
      "position_ids": positions.numpy().astype(np.int32),
      "prefill_logits": prefill.numpy().astype(np.float32),
      "generated_ids": generated.numpy().astype(np.int32),
      "decode_logits": decode.numpy().astype(np.float32),
  }
  safetensors.numpy.save_file(
      arrays, os.path.join(model_dir, "reference.safetensors"), metadata={"model": name}
  )
  B, L = ids.shape
  meta = {
      "model": name,
      "hf_class": model_cls,
      "transformers_version": transformers.__version__,
      "torch_version": torch.__version__,
      "seed": seed,
      "dtype": "float32",
      "attn_implementation": "eager",
      "pad_token_id": PAD_ID,
      "prompts": prompts,
      "prompt_lengths": [len(p) for p in prompts],
      "padding": "left",
      "new_tokens": NEW_TOKENS,
      "tensors": {
          "input_ids": {"shape": [B, L], "dtype": "int32",
                        "meaning": f"prompts left-padded with {PAD_ID} to the longest"},
          "attention_mask": {"shape": [B, L], "dtype": "int32", "meaning": "1 = real token, 0 = pad"},
          "position_ids": {
              "shape": [B, L], "dtype": "int32",
              "meaning": "cumsum(attention_mask) - 1, clamped at 0: 0 at each prompt's first real "
                         "token, pads get 0; passed explicitly to the model",
          },
          "prefill_logits": {
              "shape": [B, L, config.vocab_size], "dtype": "float32",
              "meaning": "logits of the one masked forward over input_ids; only positions with "
                         "attention_mask == 1 are meaningful (pad rows attend to nothing)",
          },
          "generated_ids": {
              "shape": [B, NEW_TOKENS], "dtype": "int32",
              "meaning": "greedy tokens; generated_ids[:, t] = argmax(decode_logits[:, t])",
          },
          "decode_logits": {
              "shape": [B, NEW_TOKENS, config.vocab_size], "dtype": "float32",
              "meaning": "decode_logits[:, 0] = prefill_logits[:, -1]; decode_logits[:, t] for t >= 1 "
                         "are the logits of the KV-cached one-token step that fed generated_ids[:, t-1] "
                         "at position prompt_length + t - 1 (attention mask extended by ones)",
          },
      },
      "margins": {
          "min_top1_minus_top2_logit": argmax_margin,
          "min_routing_gap_probability": routing_margin,
          "note": "smallest gaps over all real tokens (prefill + decode) and MoE layers",
      },
      "checks": {
          "generate_matches_own_loop": True,
          "generate_logits_max_abs_diff": gen_err,
          "padded_prefill_matches_unpadded": True,
          "cached_decode_matches_uncached_forward": True,
          "reload_max_abs_diff": reload_err,
      },
      "weights": _tensor_table(model_dir),
  }
  with open(os.path.join(model_dir, "reference.json"), "w") as f:
    json.dump(meta, f, indent=1)
    f.write("\n")
  return meta


def main(argv):
  del argv
  torch.use_deterministic_algorithms(True)
  torch.set_num_threads(1)
  for cls in ("Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM", "DeepseekV2ForCausalLM"):
    if not hasattr(transformers, cls):
      raise SystemExit(f"transformers {transformers.__version__} has no {cls}")
  os.makedirs(_OUT_DIR.value, exist_ok=True)
  for name in MODELS:
    meta = build(name, _OUT_DIR.value, _SEED.value)
    print(
        f"{name}: seed {meta['seed']}, generated {meta['tensors']['generated_ids']['shape']}, "
        f"margins {meta['margins']['min_top1_minus_top2_logit']:.3g} / "
        f"{meta['margins']['min_routing_gap_probability']:.3g}"
    )


if __name__ == "__main__":
  app.run(main)
