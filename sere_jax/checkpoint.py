"""Saving and restoring sere-jax models (weights + expert similarity) with Orbax.

    checkpoint.save(model, "/tmp/ckpt")        # config.json + state/ (Orbax)
    model = checkpoint.restore("/tmp/ckpt")    # same class, same weights, same similarity
    model = checkpoint.load_model(path, param_dtype=jnp.bfloat16,
                                  reroute=RerouteConfig(), impl="auto")
                                               # our checkpoint or a Hugging Face directory,
                                               # + sere_similarity.safetensors and
                                               # sere_pool_stats.safetensors if present

Layout of a checkpoint directory:
  config.json  {"sere_jax_architecture": ..., "config": dataclasses.asdict(config),
                "param_dtype": ..., "reroute": {...}, "impl": ..., "pool_stats": bool}
               written to a temporary name and renamed, after the state is complete.
  state/       the NNX state (every variable, including each layer's ExpertSimilarity
               and, when `pool_stats` is true, its ExpertPoolStats), written by
               `orbax.checkpoint.StandardCheckpointer`.

`restore` builds an abstract model with `nnx.eval_shape` from the architecture
registry (no weights allocated) and restores the state into its shapes and dtypes.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import shutil
from typing import Any

from flax import nnx
import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from sere_jax import calibration
from sere_jax import fileio
from sere_jax import moe
from sere_jax.config import RerouteConfig
from sere_jax.models import base as model_base

CONFIG_FILE = "config.json"
STATE_DIR = "state"
ARCH_KEY = "sere_jax_architecture"

# architecture -> (config class, model class), or (module, config name, model name)
# for models imported on first use.
_REGISTRY: dict[str, tuple[Any, Any] | tuple[str, str, str]] = {
    "qwen2_moe": ("sere_jax.models.qwen_moe", "QwenMoeConfig", "QwenMoeForCausalLM"),
    "qwen3_moe": ("sere_jax.models.qwen_moe", "QwenMoeConfig", "QwenMoeForCausalLM"),
    "deepseek_v2": ("sere_jax.models.deepseek_v2", "DeepseekV2Config",
                    "DeepseekV2ForCausalLM"),
}
# Hugging Face `model_type` -> module with `load_hf(directory, ...)`.
HF_MODULES = {
    "qwen2_moe": "sere_jax.models.qwen_moe",
    "qwen3_moe": "sere_jax.models.qwen_moe",
    "deepseek_v2": "sere_jax.models.deepseek_v2",
}


def register_architecture(name: str, config_cls: type, model_cls: type) -> None:
  """Makes `restore` able to rebuild models whose `config.architecture == name`."""
  if not dataclasses.is_dataclass(config_cls):
    raise ValueError(f"config class {config_cls!r} must be a dataclass")
  _REGISTRY[name] = (config_cls, model_cls)


def architectures() -> list[str]:
  return sorted(_REGISTRY)


def lookup(name: str) -> tuple[type, type]:
  """`(config class, model class)` of an architecture (imported lazily)."""
  if name not in _REGISTRY:
    raise ValueError(f"unknown architecture {name!r}; known: {architectures()} "
                     "(add one with register_architecture)")
  entry = _REGISTRY[name]
  if len(entry) == 3:
    module = importlib.import_module(entry[0])
    entry = (getattr(module, entry[1]), getattr(module, entry[2]))
    _REGISTRY[name] = entry
  return entry


def _tuples(value):
  """JSON lists back to tuples (frozen configs hold tuples)."""
  if isinstance(value, list):
    return tuple(_tuples(v) for v in value)
  if isinstance(value, dict):
    return {k: _tuples(v) for k, v in value.items()}
  return value


def config_from_dict(config_cls: type, data: dict[str, Any]):
  """Rebuilds a config from `dataclasses.asdict` output (uses `from_dict` if defined)."""
  if hasattr(config_cls, "from_dict"):
    return config_cls.from_dict(data)
  names = {f.name for f in dataclasses.fields(config_cls) if f.init}
  unknown = set(data) - names
  if unknown:
    raise ValueError(f"config.json has fields {sorted(unknown)} that "
                     f"{config_cls.__name__} does not know")
  return config_cls(**{k: _tuples(v) for k, v in data.items()})


def _model_reroute_impl(model) -> tuple[RerouteConfig | None, str | None]:
  blocks = moe.moe_blocks(model)
  if not blocks:
    return None, None
  return blocks[0].reroute, blocks[0].impl


def save(model: nnx.Module, directory: str, *, overwrite: bool = False) -> None:
  """Writes `model`'s config and full NNX state (incl. expert similarity) to `directory`."""
  config = model.config
  if not dataclasses.is_dataclass(config):
    raise ValueError("model.config must be a dataclass")
  directory = os.path.abspath(directory)
  state_dir = os.path.join(directory, STATE_DIR)
  config_path = os.path.join(directory, CONFIG_FILE)
  if os.path.exists(state_dir) or os.path.exists(config_path):
    if not overwrite:
      raise ValueError(f"{directory} already holds a checkpoint (pass overwrite=True)")
    if os.path.exists(config_path):
      os.remove(config_path)  # the directory is not a valid checkpoint until we finish
    shutil.rmtree(state_dir, ignore_errors=True)
  os.makedirs(directory, exist_ok=True)
  _, state = nnx.split(model)
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(state_dir, state)
    checkpointer.wait_until_finished()
  reroute, impl = _model_reroute_impl(model)
  meta = {
      ARCH_KEY: config.architecture,
      "config": dataclasses.asdict(config),
      "param_dtype": model_base.param_dtype(model).name,
      "reroute": dataclasses.asdict(reroute) if reroute is not None else None,
      "impl": impl,
      "pool_stats": any(b.output_norm is not None for b in moe.moe_blocks(model)),
  }
  fileio.write_json_atomic(config_path, meta)


def _read_config(directory: str) -> dict[str, Any]:
  path = os.path.join(directory, CONFIG_FILE)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"no {CONFIG_FILE} in {directory}")
  with open(path) as fh:
    return json.load(fh)


def restore(directory: str, *, param_dtype=None, reroute: RerouteConfig | None = None,
            impl: str | None = None) -> nnx.Module:
  """Rebuilds a model saved by `save`. `param_dtype`, `reroute` and `impl` default to
  the saved ones."""
  directory = os.path.abspath(directory)
  meta = _read_config(directory)
  if ARCH_KEY not in meta:
    raise ValueError(f"{directory}/{CONFIG_FILE} is not a sere-jax checkpoint "
                     f"(no {ARCH_KEY!r} key)")
  config_cls, model_cls = lookup(meta[ARCH_KEY])
  config = config_from_dict(config_cls, meta["config"])
  if param_dtype is None:
    param_dtype = jnp.dtype(meta.get("param_dtype") or "float32")
  if reroute is None:
    saved = meta.get("reroute")
    reroute = RerouteConfig(**saved) if saved else moe.NO_REROUTE
  if impl is None:
    impl = meta.get("impl") or "auto"
  def build():
    model = model_cls(config, reroute=reroute, impl=impl, param_dtype=param_dtype,
                      rngs=nnx.Rngs(0))
    if meta.get("pool_stats"):  # saved with ExpertPoolStats: restore them too
      for block in moe.moe_blocks(model):
        e = block.num_experts
        block.set_pool_stats(jnp.ones((e,)), jnp.ones((e, e)))
    return model

  abstract = nnx.eval_shape(build)
  graphdef, abstract_state = nnx.split(abstract)
  # Restore onto this process's first device, whatever device saved the checkpoint
  # (the shipped tiny model was saved on a GPU and loads on CPUs).
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  abstract_state = jax.tree.map(
      lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device), abstract_state)
  with ocp.StandardCheckpointer() as checkpointer:
    state = checkpointer.restore(os.path.join(directory, STATE_DIR), abstract_state)
  return nnx.merge(graphdef, state)


def load_model(directory: str, *, param_dtype=jnp.float32,
               reroute: RerouteConfig | None = None, impl: str = "auto") -> nnx.Module:
  """A sere-jax checkpoint (`restore`) or a Hugging Face directory (the model's `load_hf`).

  A `sere_similarity.safetensors` in the directory (`calibration.save_similarity`)
  replaces the model's expert similarity, and a `sere_pool_stats.safetensors`
  (`calibration.save_pool_stats`) its `expert_pool` statistics (ValueError if one
  does not fit the model).
  """
  model = _load_weights(directory, param_dtype=param_dtype, reroute=reroute, impl=impl)
  if os.path.isfile(os.path.join(directory, calibration.SIMILARITY_FILE)):
    matrices, _ = calibration.load_similarity(directory)
    calibration.apply_similarity(model, matrices)
  if os.path.isfile(os.path.join(directory, calibration.POOL_STATS_FILE)):
    stats, _ = calibration.load_pool_stats(directory)
    calibration.apply_pool_stats(model, stats)
  return model


def _load_weights(directory: str, *, param_dtype, reroute: RerouteConfig | None,
                  impl: str) -> nnx.Module:
  meta = _read_config(directory)
  if ARCH_KEY in meta:
    return restore(directory, param_dtype=param_dtype, reroute=reroute, impl=impl)
  model_type = meta.get("model_type")
  if model_type not in HF_MODULES:
    raise ValueError(f"unsupported model_type {model_type!r} in {directory}/{CONFIG_FILE}; "
                     f"supported: {sorted(HF_MODULES)} (or a sere-jax checkpoint)")
  module = importlib.import_module(HF_MODULES[model_type])
  return module.load_hf(directory, param_dtype=param_dtype,
                        reroute=reroute if reroute is not None else moe.NO_REROUTE,
                        impl=impl)
