"""Streaming reads of Hugging Face checkpoint directories (safetensors only, no pickle).

`CheckpointReader(directory)` opens `model.safetensors` or the shards listed in
`model.safetensors.index.json` and hands out tensors one at a time as NumPy arrays
(bf16 arrives as `ml_dtypes.bfloat16`). It remembers which tensors were taken, so the
importer can reject checkpoints with tensors it did not expect.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
from safetensors import SafetensorError
from safetensors import safe_open

from sere_jax import fileio

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


def read_config(directory: str) -> dict[str, Any]:
  """The checkpoint's `config.json` as a dict."""
  path = os.path.join(directory, "config.json")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"no config.json in {directory}")
  return fileio.read_json(path)


def eos_token_ids(directory: str) -> tuple[int, ...]:
  """The `eos_token_id`(s) of `generation_config.json`, else of `config.json` (or ())."""
  for name in ("generation_config.json", "config.json"):
    path = os.path.join(directory, name)
    if not os.path.isfile(path):
      continue
    value = fileio.read_json(path).get("eos_token_id")
    if value is not None:
      return tuple(int(i) for i in (value if isinstance(value, list) else [value]))
  return ()


def load_tokenizer(directory: str):
  """A `tokenizers.Tokenizer` from `directory/tokenizer.json`, or None if absent."""
  path = os.path.join(directory, "tokenizer.json")
  if not os.path.isfile(path):
    return None
  import tokenizers  # pylint: disable=g-import-not-at-top  (loaded only when needed)
  try:
    return tokenizers.Tokenizer.from_file(path)
  except Exception as e:  # tokenizers raises a bare Exception for a bad file
    raise ValueError(f"{path} is not a readable tokenizer file: {e}") from None


def open_safetensors(path: str):
  """`safe_open(path)` for NumPy; FileNotFoundError / ValueError name the file and
  what is wrong (missing, truncated, not safetensors)."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"no file {path}")
  try:
    return safe_open(path, framework="numpy")
  except SafetensorError as e:
    raise ValueError(f"{path} is not a readable safetensors file (truncated or "
                     f"corrupt?): {e}") from None


class CheckpointReader:
  """Tensor-by-tensor access to a (possibly sharded) safetensors checkpoint."""

  def __init__(self, directory: str):
    self.directory = directory
    index_path = os.path.join(directory, INDEX_FILE)
    if os.path.isfile(index_path):
      index = fileio.read_json(index_path)
      if not isinstance(index, dict) or not isinstance(index.get("weight_map"), dict):
        raise ValueError(f"{index_path} has no \"weight_map\" object")
      weight_map = index["weight_map"]
    elif os.path.isfile(os.path.join(directory, SINGLE_FILE)):
      with open_safetensors(os.path.join(directory, SINGLE_FILE)) as f:
        weight_map = {name: SINGLE_FILE for name in f.keys()}
    else:
      raise FileNotFoundError(f"no {SINGLE_FILE} or {INDEX_FILE} in {directory}")
    self._file_of = dict(weight_map)
    self._handles: dict[str, Any] = {}
    self.taken: set[str] = set()

  def names(self) -> set[str]:
    return set(self._file_of)

  def __contains__(self, name: str) -> bool:
    return name in self._file_of

  def get(self, name: str, shape: tuple[int, ...] | None = None) -> np.ndarray:
    """Tensor `name`; raises KeyError / ValueError naming it if missing or mis-shaped."""
    if name not in self._file_of:
      raise KeyError(f"checkpoint {self.directory} has no tensor {name!r}")
    file = self._file_of[name]
    if file not in self._handles:
      path = os.path.join(self.directory, file)
      if not os.path.isfile(path):
        raise FileNotFoundError(f"shard {path} listed for {name!r} is missing")
      self._handles[file] = open_safetensors(path)
    try:
      array = self._handles[file].get_tensor(name)
    except SafetensorError as e:
      path = os.path.join(self.directory, file)
      raise ValueError(f"cannot read tensor {name!r} of {path}: {e}") from None
    if shape is not None and tuple(array.shape) != tuple(shape):
      raise ValueError(f"tensor {name!r} has shape {tuple(array.shape)}, expected "
                       f"{tuple(shape)}")
    self.taken.add(name)
    return array

  def stack(self, names: list[str], shape: tuple[int, ...] | None = None) -> np.ndarray:
    """Stacks tensors (e.g. one per expert) into `[len(names), ...]`."""
    return np.stack([self.get(n, shape) for n in names])

  def check_all_taken(self, ignore: tuple[str, ...] = ()) -> None:
    """Raises ValueError naming tensors that the importer did not use."""
    left = sorted(n for n in self.names() - self.taken
                  if not any(n.startswith(p) or n.endswith(p) for p in ignore))
    if left:
      shown = ", ".join(left[:8]) + (" ..." if len(left) > 8 else "")
      raise ValueError(f"unexpected tensors in {self.directory}: {shown}")


class WeightLoader:
  """Fills an (abstract) NNX model's variables from a `CheckpointReader`.

  HF stores linear weights `[out, in]`; ours are `[in, out]`. Experts are stored one
  tensor per expert and become the MoE block's `w_gate_up [E, D, 2F]` (gate then up)
  and `w_down [E, F, D]`. Every read checks the tensor's shape.
  """

  def __init__(self, reader: CheckpointReader, param_dtype):
    self.reader = reader
    self.param_dtype = param_dtype

  def put(self, var, array: np.ndarray) -> None:
    import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
    var.set_value(jnp.asarray(array, self.param_dtype))

  def tensor(self, var, name: str) -> None:
    """A tensor stored as is (embeddings, norm scales)."""
    self.put(var, self.reader.get(name, var.shape))

  def norm(self, module, name: str) -> None:
    """`models.layers.RMSNorm` from `{name}.weight`."""
    self.tensor(module.weight, f"{name}.weight")

  def linear(self, module, name: str) -> None:
    """`models.layers.Linear` from `{name}.weight` (and `{name}.bias`)."""
    d_in, d_out = module.kernel.shape
    self.put(module.kernel, self.reader.get(f"{name}.weight", (d_out, d_in)).T)
    if module.bias is not None:
      self.put(module.bias, self.reader.get(f"{name}.bias", (d_out,)))

  def swiglu(self, module, name: str) -> None:
    """`models.layers.SwiGLU` from `{name}.{gate,up,down}_proj`."""
    for part in ("gate", "up", "down"):
      self.linear(getattr(module, part), f"{name}.{part}_proj")

  def moe(self, block, name: str) -> None:
    """`sere_jax.moe.MoeBlock` from `{name}.gate` and `{name}.experts.{e}.*_proj`.

    The similarity is reset to NaN: an imported model is not calibrated.
    """
    import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
    num_experts, dim, two_f = block.w_gate_up.shape
    ffn = two_f // 2
    self.put(block.router_kernel,
             self.reader.get(f"{name}.gate.weight", (num_experts, dim)).T)
    experts = [f"{name}.experts.{e}" for e in range(num_experts)]
    gate = self.reader.stack([f"{x}.gate_proj.weight" for x in experts], (ffn, dim))
    up = self.reader.stack([f"{x}.up_proj.weight" for x in experts], (ffn, dim))
    down = self.reader.stack([f"{x}.down_proj.weight" for x in experts], (dim, ffn))
    self.put(block.w_gate_up, np.concatenate([gate, up], axis=1).transpose(0, 2, 1))
    self.put(block.w_down, down.transpose(0, 2, 1))
    block.similarity.set_value(jnp.full((num_experts, num_experts), jnp.nan, jnp.float32))
