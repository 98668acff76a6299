"""Benchmarks on any backend: the timing helpers (`timing`, re-exported here: the
environment record, platform selection, `LayerChain`), the memory-bandwidth probe that
every roofline divides by (`bandwidth`), the MoE-layer sweep (`kernels`), the
grouped-matmul tile sweep (`gmm_sweep`), the end-to-end decode benchmark (`decode`, over
the models of `decode_models`; its targets summary `targets` and, from its profiles,
where each layer's time goes against its bytes, `layer_costs`), device memory (`memory`:
the memory fraction and the fit check), the standard suite of one device (`standard`),
the child-process PyTorch peers (`peers`, which run the repository's tools/) and the
reports of their results (`report`; standard-suite results of several devices:
`compare`).
"""

from sere_jax.benchmarking.timing import (LayerChain, chain_overhead, environment,
                                          select_platform)

__all__ = ["LayerChain", "chain_overhead", "environment", "select_platform"]
