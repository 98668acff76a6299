"""Checks that Bazel tests run on the repository's .venv and see the sere_jax packages."""

import os
import sys


def test_runs_on_the_repository_venv():
    assert sys.version_info[:2] == (3, 12)
    assert sys.prefix != sys.base_prefix, "not running inside a virtual environment"
    assert os.path.basename(sys.prefix) == ".venv"


def test_packages_map_to_their_folders():
    import sere_jax
    import sere_jax.kernels
    import sere_jax.models
    import sere_jax.scripts

    folders = {
        sere_jax: "sere_jax",
        sere_jax.kernels: "pallas_kernels",
        sere_jax.models: "models",
        sere_jax.scripts: "scripts",
    }
    root = os.getcwd()  # the runfiles mirror of the repository root
    for module, folder in folders.items():
        assert module.__file__ == os.path.join(root, folder, "__init__.py"), module.__file__


def test_jax_is_importable():
    import jax.numpy as jnp

    assert int(jnp.arange(4).sum()) == 6
