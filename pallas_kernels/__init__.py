"""Pallas kernels (installed as `sere_jax.kernels`)."""
