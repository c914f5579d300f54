"""effjax.resolve: every `auto` fixed from the target devices' platform (issue 12, item 3)."""

import dataclasses
import re

import jax
import jax.numpy as jnp
import pytest

from effjax import config as C
from effjax import models
from effjax.resolve import changes, resolve
from tests.conftest import TINY, run_module


@dataclasses.dataclass(frozen=True)
class FakeDevice:
  """Stands in for a device of another platform (a TPU topology's, without libtpu)."""
  platform: str


def _cfg(*overrides):
  return C.load(["--config=" + TINY, *overrides])[0]


MOE = ("--config.model.moe.num_experts=4", "--config.model.moe.top_k=2")


@pytest.mark.parametrize("platform, want", [
    ("cpu", {"model.compute_dtype": "float32", "model.attention.impl": "xla",
             "model.moe.dispatch": "blocks", "model.moe.renormalize": "true"}),
    ("tpu", {"model.compute_dtype": "bfloat16", "model.attention.impl": "auto:tpu",
             "model.moe.dispatch": "ragged_dot", "model.moe.renormalize": "true"}),
    ("gpu", {"model.compute_dtype": "bfloat16", "model.attention.impl": "auto:gpu",
             "model.moe.dispatch": "ragged_dot", "model.moe.renormalize": "true"}),
])
def test_auto_values_come_from_the_target_platform(platform, want):
  cfg = _cfg(*MOE)
  resolved = resolve(cfg, [FakeDevice(platform)] * 4)
  assert changes(cfg, resolved) == want
  assert resolve(resolved, jax.devices()) == resolved  # idempotent, whatever the host
  assert cfg.model.compute_dtype == "auto"  # the user's config is not touched


def test_explicit_values_and_special_cases():
  cfg = _cfg(*MOE, "--config.model.compute_dtype=float32", "--config.model.moe.dispatch=blocks",
             "--config.model.attention.impl=interpret")
  assert changes(cfg, resolve(cfg, [FakeDevice("tpu")])) == {"model.moe.renormalize": "true"}
  # The log-n baseline and QKR run the XLA path on every platform.
  cfg = _cfg("--config.model.attention.log_n_scale=true")
  assert resolve(cfg, [FakeDevice("tpu")]).model.attention.impl == "xla"
  cfg = _cfg("--config.model.position=learned", "--config.quant.method=statsq",
             "--config.quant.qkr=true", "--config.quant.layers=qkv")
  assert resolve(cfg, [FakeDevice("gpu")]).model.attention.impl == "xla"
  # renormalize: false for softmax routers and k = 1; left to the layer (per-call k) under
  # a top-k schedule. A dense model's MoE section is left alone.
  softmax = _cfg(*MOE, "--config.model.moe.router=softmax")
  assert resolve(softmax, [FakeDevice("cpu")]).model.moe.renormalize == "false"
  top1 = _cfg("--config.model.moe.num_experts=4", "--config.model.moe.top_k=1")
  assert resolve(top1, [FakeDevice("cpu")]).model.moe.renormalize == "false"
  sched = _cfg("--config.model.moe.num_experts=4", "--config.model.moe.top_k=1",
               "--config.model.moe.topk_schedule=0.5:2:0.5")
  assert resolve(sched, [FakeDevice("cpu")]).model.moe.renormalize == "auto"
  dense = resolve(_cfg(), [FakeDevice("tpu")]).model.moe
  assert dense.dispatch == "auto" and dense.renormalize == "auto"
  with pytest.raises(ValueError, match="target devices"):
    resolve(_cfg(), [])


def test_tpu_program_is_built_on_a_cpu_host():
  """Resolved for a TPU, the model traced on this CPU host is the TPU program: bfloat16
  activations, the Mosaic attention kernels (forward, dq, dk/dv per layer) and ragged_dot
  MoE dispatch; exported for TPU (lowering only, no libtpu needed). Unresolved on CPU it is
  the float32 / XLA-attention / block-dispatch program."""
  cfg = _cfg(*MOE)

  def export(config):
    model = models.build(config, 256, batch_groups=1)

    def loss(params, buffers, ids):
      return jnp.mean(model.apply(params, buffers, ids)[0].astype(jnp.float32))

    ids = jax.ShapeDtypeStruct((2, cfg.train.seq_len), jnp.int32)
    return jax.export.export(jax.jit(jax.grad(loss)), platforms=["tpu"])(
        model.initial_params, model.initial_buffers, ids).mlir_module()

  tpu = export(resolve(cfg, [FakeDevice("tpu")]))
  assert re.search(r"tensor<2x32x32xbf16>", tpu), "no bfloat16 activations"
  assert tpu.count("tpu_custom_call") == 3 * cfg.model.n_layers
  assert "ragged_dot" in tpu
  host = export(cfg)  # models.build resolves for the local (CPU) devices
  assert "bf16" not in host and "tpu_custom_call" not in host and "ragged_dot" not in host


def test_compile_check_resolves_for_its_topology():
  """compile_check resolves for the topology's devices and says what auto became (here
  cpu:2; a TPU topology needs libtpu, and resolves as in the tests above)."""
  proc = run_module(["-m", "effjax.compile_check", "--config=" + TINY, "--topology=cpu:2",
                     *MOE], env_extra={"JAX_PLATFORMS": "cpu"})
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert ("resolved for cpu: model.compute_dtype=float32, model.attention.impl=xla, "
          "model.moe.renormalize=true, model.moe.dispatch=blocks") in proc.stderr
