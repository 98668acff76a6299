"""Benchmarks on any backend: the timing helpers (`timing`, re-exported here: the
environment record, read and copy bandwidths, `LayerChain`), the end-to-end decode
benchmark (`decode`, over the models of `decode_models`), the child-process PyTorch
peers (`peers`, which run the repository's tools/) and the reports of their results
(`report`).
"""

from sere_jax.benchmarking.timing import (LayerChain, chain_overhead, copy_bandwidth,
                                          environment, read_bandwidth)

__all__ = ["LayerChain", "chain_overhead", "copy_bandwidth", "environment",
           "read_bandwidth"]
