"""PyTorch peer for the kernel benchmark: the MoE FFN with `torch._grouped_mm`.

Run by `benchmark.py --torch_peer` (`sere_jax.benchmarking.peers.run_torch_peer`) as
`python tools/torch_peer.py SPEC OUT` with a Python that has torch; SPEC holds the
shapes and the routings (ids, weights per layer) of every case. The 8-layer chain
(sort by expert, grouped gate+up, SwiGLU, grouped down, weighted combine, normalised
residual) is captured in a CUDA graph and replayed, mirroring the JAX harness; the
chain update alone is timed the same way and subtracted.
"""

from __future__ import annotations

import json
import statistics
import sys

import torch


def moe_ffn(x, ids, weights, w_gate_up, w_down):
  """Routed-expert FFN with grouped matmuls that skip experts without rows."""
  num_tokens, top_k = ids.shape
  num_experts = w_gate_up.shape[0]
  flat = ids.reshape(-1)
  order = torch.argsort(flat, stable=True)
  counts = torch.zeros(num_experts, dtype=torch.int32, device=x.device)
  counts.index_add_(0, flat, torch.ones_like(flat, dtype=torch.int32))
  offs = torch.cumsum(counts, 0, dtype=torch.int32)
  rows = x[order // top_k]
  gate_up = torch._grouped_mm(rows, w_gate_up, offs=offs)  # pylint: disable=protected-access
  gate, up = gate_up.chunk(2, dim=-1)
  hidden = (torch.nn.functional.silu(gate) * up).to(x.dtype)
  down = torch._grouped_mm(hidden, w_down, offs=offs)  # pylint: disable=protected-access
  scaled = down.float() * weights.reshape(-1)[order, None]
  out = torch.zeros(num_tokens, x.shape[1], dtype=torch.float32, device=x.device)
  out.index_add_(0, order // top_k, scaled)
  return out.to(x.dtype)


def _normalise(x):
  xf = x.float()
  return (xf * torch.rsqrt(xf.pow(2).mean() + 1e-6)).to(x.dtype)


def _graph_seconds_per_layer(step, x, layer_args, min_seconds, repeats=5):
  static_x = x.clone()

  def chain():
    h = static_x
    for args in layer_args:
      h = _normalise(h + step(h, *args))
    return h

  stream = torch.cuda.Stream()
  stream.wait_stream(torch.cuda.current_stream())
  with torch.cuda.stream(stream):
    for _ in range(2):
      chain()
  torch.cuda.current_stream().wait_stream(stream)
  graph = torch.cuda.CUDAGraph()
  with torch.cuda.graph(graph):
    chain()
  start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

  def replay(n):
    start.record()
    for _ in range(n):
      graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3

  once = replay(1)
  n = max(1, int(min_seconds / max(once, 1e-6)) + 1)
  return statistics.median(replay(n) / n for _ in range(repeats)) / len(layer_args)


def main(spec_path, out_path):
  with open(spec_path) as fh:
    spec = json.load(fh)
  shape, layers = spec["shape"], spec["layers"]
  d, f, e = shape["dim"], shape["ffn"], shape["experts"]
  dev = torch.device("cuda")
  gen = torch.Generator(device=dev).manual_seed(0)
  weights = [(torch.randn(e, d, 2 * f, device=dev, dtype=torch.bfloat16, generator=gen)
              * d ** -0.5,
              torch.randn(e, f, d, device=dev, dtype=torch.bfloat16, generator=gen)
              * f ** -0.5) for _ in range(layers)]
  times = []
  overheads = {}
  for case in spec["cases"]:
    batch = case["batch"]
    x = torch.randn(batch, d, device=dev, dtype=torch.bfloat16, generator=gen)
    if batch not in overheads:
      overheads[batch] = _graph_seconds_per_layer(
          lambda h: h, x, [()] * layers, spec["min_seconds"])
    layer_args = [(torch.tensor(ids, device=dev, dtype=torch.int64),
                   torch.tensor(w, device=dev, dtype=torch.float32), wg, wd)
                  for ids, w, (wg, wd) in zip(case["ids"], case["weights"], weights)]
    t = _graph_seconds_per_layer(moe_ffn, x, layer_args, spec["min_seconds"])
    times.append((t - overheads[batch]) * 1e6)
    print(f"torch B={batch}: {times[-1]:.1f} us", flush=True)
  env = dict(torch=torch.__version__, device=torch.cuda.get_device_name(0))
  with open(out_path, "w") as fh:
    json.dump(dict(times_us=times, env=env), fh)


if __name__ == "__main__":
  main(*sys.argv[1:3])
