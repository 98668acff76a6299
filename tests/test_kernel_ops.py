"""What every kernel op shares: the implementation registry (`auto`, device checks,
names) and the floor rule (kernels import only the re-routing core)."""

from __future__ import annotations

import ast
import pathlib

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import AbstractDevice, AbstractMesh

from sere_jax.config import RerouteConfig
from sere_jax.kernels import (decode_attention, gmm, latent_attention, moe_ffn, registry,
                              residual_norm, router, schedule)
from sere_jax.kernels.lowering_check import export_for

REGISTRIES = {"schedule": schedule.REGISTRY, "gmm": gmm.REGISTRY, "router": router.REGISTRY,
              "decode_attention": decode_attention.REGISTRY, "moe_ffn": moe_ffn.REGISTRY,
              "latent_attention": latent_attention.REGISTRY,
              "residual_norm": residual_norm.REGISTRY}
KERNELS_DIR = pathlib.Path(registry.__file__).parent


@pytest.mark.parametrize("op", REGISTRIES)
def test_auto_follows_the_default_backend(op, monkeypatch):
  reg = REGISTRIES[op]
  # The TPU kernel where the op has one, else the op's fallback (its reference).
  auto = {"cpu": "interpret", "gpu": "triton",
          "tpu": "tpu" if "tpu" in reg.implementations else "xla"}
  assert reg.resolve("auto") == auto[jax.default_backend()]  # this machine
  for backend in auto:
    monkeypatch.setattr(jax, "default_backend", lambda b=backend: b)
    assert reg.resolve("auto") == auto[backend], backend
  for name in reg.implementations:
    assert reg.resolve(name) == name


@pytest.mark.parametrize("op", REGISTRIES)
def test_names_are_auto_kernels_and_references(op):
  reg = REGISTRIES[op]
  assert reg.names[0] == "auto" and set(reg.names[1:]) == set(reg.implementations)
  assert {"triton", "interpret"} <= set(reg.kernels)
  assert reg.references and not set(reg.references) & set(reg.kernels)
  arg = "impl" if op == "moe_ffn" else "implementation"
  with pytest.raises(ValueError, match=f"{arg} must be one of"):
    reg.resolve("cuda")


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="a CPU-only check")
@pytest.mark.parametrize("op", REGISTRIES)
def test_device_backends_are_refused_off_their_device(op):
  reg = REGISTRIES[op]
  for name, device in (("triton", "gpu"), ("tpu", "tpu")):
    if name not in reg.implementations:
      continue
    assert not reg.runs_here(name)
    with pytest.raises(ValueError, match=f"{name!r} runs only on {device} devices, not on "
                                         "this 'cpu' device"):
      reg.get(name)
  for name in ("interpret", "tpu_interpret", *reg.references):
    if name in reg.implementations:
      assert reg.runs_here(name) and reg.get(name) is reg.implementations[name]


def test_api_refuses_triton_on_cpu_by_name():
  if jax.default_backend() != "cpu":
    pytest.skip("a CPU-only check")
  with pytest.raises(ValueError, match="route: implementation 'triton' runs only on gpu"):
    router.route(jnp.zeros((4, 8)), 2, implementation="triton")
  with pytest.raises(ValueError, match="gmm: implementation 'tpu' runs only on tpu"):
    gmm.gmm(jnp.zeros((4, 16)), jnp.zeros((2, 16, 16)), jnp.zeros((3,), jnp.int32),
            implementation="tpu")


def test_current_platform_follows_the_lowering_target():
  assert registry.current_platform() == jax.default_backend()
  h200 = AbstractDevice(device_kind="NVIDIA H200", num_cores=132, platform="gpu")
  with jax.sharding.use_abstract_mesh(AbstractMesh((1,), ("x",), abstract_device=h200)):
    assert registry.current_platform() == "gpu"
  seen = []

  def fn(x):
    seen.append(registry.current_platform())
    return x

  export_for("tpu", fn, jax.ShapeDtypeStruct((2,), jnp.float32))
  export_for("cuda", fn, jax.ShapeDtypeStruct((2,), jnp.float32))
  assert seen == ["tpu", "gpu"]
  assert registry.current_platform() == jax.default_backend()


def test_api_lowers_device_backends_for_their_target():
  """`export_for` lowers the device backends on any machine, through the ops' api."""
  logits = jax.ShapeDtypeStruct((16, 128), jnp.float32)
  exported = export_for("cuda", lambda lg: router.route(lg, 8, implementation="triton"),
                        logits)
  assert "__gpu$xla.gpu.triton" in exported.mlir_module()
  ids = jax.ShapeDtypeStruct((4, 2), jnp.int32)
  valid = jax.ShapeDtypeStruct((4,), jnp.bool_)
  exported = export_for("tpu", lambda i, v: schedule.schedule(
      i, v, None, RerouteConfig(policy="none"), num_experts=8,
      implementation="tpu").stats, ids, valid)
  assert "tpu_custom_call" in exported.mlir_module()


# ---------------------------------------------------------------- floors

# Kernels (floor 2) import only jax / numpy, the re-routing core (floor 1) and kernels.
_CORE = {"sere_jax.config", "sere_jax.policies", "sere_jax.validation",
         "sere_jax.numerics", "sere_jax.routing", "sere_jax.placement"}


def _sere_imports(path: pathlib.Path):
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      yield from (a.name for a in node.names if a.name.startswith("sere_jax"))
    elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("sere_jax"):
      if node.module == "sere_jax":
        yield from (f"sere_jax.{a.name}" for a in node.names)
      else:
        yield node.module


def test_kernels_import_only_the_core():
  files = sorted(KERNELS_DIR.rglob("*.py"))
  assert len(files) > 10
  upward = [(str(f.relative_to(KERNELS_DIR)), name) for f in files
            for name in _sere_imports(f)
            if name not in _CORE and not name.startswith("sere_jax.kernels")]
  assert not upward
