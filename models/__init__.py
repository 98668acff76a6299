"""Flax NNX model definitions (installed as `sere_jax.models`)."""
