"""absl entry points (installed as `sere_jax.scripts`)."""
