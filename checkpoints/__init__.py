"""The model checkpoints shipped with sere-jax, as package data.

    from sere_jax import checkpoints
    checkpoints.path("tiny_shakespeare_moe")   # -> ".../sere_jax/checkpoints/tiny_shakespeare_moe"
    checkpoints.names()                        # -> ["tiny_shakespeare_moe", ...]

In the source tree this folder is `checkpoints/`; installed (`pip install .`, or the
editable install of `pip install -e .`), it is the `sere_jax.checkpoints` package
(pyproject.toml's package-dir), and every file of every subfolder ships with it
(package-data), so the shipped models are found from any working directory.
"""

from __future__ import annotations

import importlib.resources
import os

DEFAULT = "tiny_shakespeare_moe"


def _root() -> str:
  root = importlib.resources.files(__name__)
  # A regular install (wheel or editable) unpacks to the file system; Orbax and the
  # tokenizer readers need a real directory, so a zipped install is not supported.
  if not os.path.isdir(str(root)):
    raise RuntimeError(f"sere_jax.checkpoints is not installed on the file system ({root!r}); "
                       "install sere-jax with pip (not as a zip archive)")
  return str(root)


def names() -> list[str]:
  """The shipped checkpoints: the subfolders that hold a `config.json`."""
  root = _root()
  return sorted(n for n in os.listdir(root)
                if os.path.isfile(os.path.join(root, n, "config.json")))


def path(name: str = DEFAULT) -> str:
  """Directory of the shipped checkpoint `name` (default: the tiny Shakespeare MoE)."""
  directory = os.path.join(_root(), name)
  if not os.path.isfile(os.path.join(directory, "config.json")):
    raise FileNotFoundError(f"no shipped checkpoint {name!r} in {_root()} "
                            f"(shipped: {', '.join(names()) or 'none'})")
  return directory
