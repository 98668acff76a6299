"""Pallas kernels (installed as `sere_jax.kernels`), one folder per op.

Ops: `schedule` (fused re-routing + expert-skip schedule), `gmm` (expert-skipping
grouped matmul), `router` (softmax top-K), `decode_attention` and `moe_ffn` (the
MoE layer's routed experts, built from `schedule` and `gmm`). Each op folder holds
`api.py` (the public function, `implementation=`, and its `REGISTRY`), `reference.py`
(pure jnp) and one file per backend (`triton.py`, `tpu.py`). Shared: `registry`
(implementation names, `auto`, device checks) and `lowering_check`.
"""
