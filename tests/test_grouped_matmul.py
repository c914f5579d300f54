"""Grouped-matmul kernels behind model.moe.dispatch=gmm (effjax/models/grouped_matmul.py):
the megablox kernels (TPU; interpret mode here) equal jax.lax.ragged_dot in value and in both
gradients, the MoE layer trains the same through them, resolve picks the kernel per platform
and refuses where there is none. The Mosaic GPU pair's CUDA lowering is checked from CPU in
tests/kernels/test_attention_mgpu.py (test_grouped_matmul_kernels_lower_to_mosaic_gpu)."""

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effjax import config as C
from effjax import resolve as resolve_lib
from effjax.models import grouped_matmul as gm


def _problem(n=200, k=64, m=96, sizes=(50, 0, 120, 30), dtype=jnp.float32):
  kx, kw = jax.random.split(jax.random.PRNGKey(0))
  x = jax.random.normal(kx, (n, k), dtype)
  w = jax.random.normal(kw, (len(sizes), k, m), dtype) / np.sqrt(k)
  return x, w, jnp.asarray(sizes, jnp.int32)


@pytest.mark.parametrize("n, sizes", [(200, (50, 0, 120, 30)),   # an empty group, n % 8 == 0
                                      (37, (0, 0, 37, 0)),          # one group, n odd
                                      (256, (64, 64, 64, 64))])     # whole tiles
def test_megablox_equals_ragged_dot_in_value_and_both_gradients(n, sizes):
  x, w, s = _problem(n=n, sizes=sizes)
  dy = jax.random.normal(jax.random.PRNGKey(3), (n, w.shape[2]))

  def run(fn):
    y, vjp = jax.vjp(fn, x, w)
    return (y, *vjp(dy))

  ref = run(lambda x, w: jax.lax.ragged_dot(x, w, s))
  got = run(lambda x, w: gm.grouped_matmul(x, w, s, backend="megablox_interpret"))
  for name, a, b in zip(("y", "dx", "dw"), got, ref):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5, err_msg=name)
  for g, size in enumerate(sizes):  # an empty group gets no weight gradient
    assert (size == 0) == (not np.any(got[2][g]))


def test_moe_layer_trains_the_same_through_gmm_and_ragged_dot():
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from effjax.config import MoEConfig  # pylint: disable=g-import-not-at-top
  from effjax.models.moe import MoE  # pylint: disable=g-import-not-at-top
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 24, 32))

  def grads(dispatch):
    cfg = MoEConfig(num_experts=4, top_k=2, dispatch=dispatch)
    layer = MoE(32, cfg, expert_dim=64, init_std=0.2, n_layers=1, rngs=nnx.Rngs(params=0))
    graph, params, rest = nnx.split(layer, nnx.Param, ...)

    def loss(p):
      y, _ = nnx.merge(graph, p, rest)(x)
      return jnp.sum(y ** 2)
    return jax.grad(loss)(params)

  ref, got = grads("ragged_dot"), grads("gmm:megablox_interpret")
  leaves = jax.tree.leaves(jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), got, ref))
  assert max(leaves) < 1e-4, leaves
  assert max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(ref)) > 1e-3


def _device(platform, kind):
  return types.SimpleNamespace(platform=platform, device_kind=kind)


@pytest.mark.parametrize("platform, kind, want", [
    ("tpu", "TPU v5p", "gmm:megablox"), ("gpu", "NVIDIA H100 80GB HBM3", "gmm:mgpu"),
    ("gpu", "NVIDIA H200", "gmm:mgpu"), ("cpu", "cpu", "gmm:megablox_interpret")])
def test_resolve_picks_the_kernel_for_the_platform(platform, kind, want):
  c = C.apply_overrides(C.Config(), {"model.moe.num_experts": 4, "model.moe.dispatch": "gmm"})
  assert resolve_lib.resolve(c, [_device(platform, kind)]).model.moe.dispatch == want


def test_resolve_refuses_gmm_on_a_gpu_without_a_kernel():
  c = C.apply_overrides(C.Config(), {"model.moe.num_experts": 4, "model.moe.dispatch": "gmm"})
  with pytest.raises(C.ConfigError, match=r"model\.moe\.dispatch=gmm.*A100.*ragged_dot"):
    resolve_lib.resolve(c, [_device("gpu", "NVIDIA A100-SXM4-80GB")])


def test_mgpu_supports_names_what_does_not_fit():
  assert gm.mgpu_supports(1024, 4096, jnp.bfloat16) is None
  assert "float32" in gm.mgpu_supports(1024, 4096, jnp.float32)
  assert "K = 96" in gm.mgpu_supports(96, 4096, jnp.bfloat16)
  assert "M = 200" in gm.mgpu_supports(1024, 200, jnp.bfloat16)
  x, w, s = _problem(k=96, dtype=jnp.bfloat16)
  with pytest.raises(ValueError, match="dispatch=ragged_dot"):
    gm.grouped_matmul(x, w, s, backend="mgpu")


def test_megablox_kernels_lower_for_tpu():
  """The TPU path through Pallas's Mosaic TPU lowering, exported for TPU from CPU (bf16, a
  row count that is not a multiple of the row tile): forward, input gradient (gmm) and
  weight gradient (tgmm) are three Mosaic kernels. Lowering only: not libtpu's compiler."""
  x = jax.ShapeDtypeStruct((1000, 256), jnp.bfloat16)
  w = jax.ShapeDtypeStruct((8, 256, 512), jnp.bfloat16)
  sizes = jax.ShapeDtypeStruct((8,), jnp.int32)

  def fwd_bwd(x, w, sizes):
    y, vjp = jax.vjp(lambda x, w: gm.grouped_matmul(x, w, sizes, backend="megablox"), x, w)
    return y, vjp(y)

  exported = jax.export.export(jax.jit(fwd_bwd), platforms=["tpu"])(x, w, sizes)
  assert exported.mlir_module().count("tpu_custom_call") == 3
