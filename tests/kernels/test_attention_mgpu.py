"""Mosaic GPU attention kernels (pallas_kernels/attention/mosaic_gpu.py, implementation=
"pallas_mgpu" / "interpret_mgpu"), what the conformance suite (test_conformance.py: GPU
interpret mode versus the reference, bf16/f16 tolerances in conformance.py) does not cover:
the CUDA lowering exported from CPU, the jax-version shims, the shared-memory budget, and
(-m gpu) the kernels on a Hopper GPU.
"""

import inspect
import os
import subprocess
import sys
import warnings

import jax
import jax.numpy as jnp
import pytest

from pallas_kernels.attention import attention, mosaic_gpu
from tests.kernels.conformance import TOL_16, assert_close, check, packed, qkv


@pytest.fixture(autouse=True)
def _reset_interpreter():
  """GPU interpret mode keeps global state that an exception inside it leaves dirty."""
  yield
  mosaic_gpu.reset_interpret_state()


# ------------------------------------------------------------------ CUDA lowering (export)

def _cuda_plugin():
  try:
    import jax_cuda12_plugin  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
  except ImportError:
    return False
  return True


def _export_for_cuda(monkeypatch, fn, d, t=200):
  """fn(q, k, v, segment_ids) jitted and exported for CUDA from CPU (bf16, GQA 2, ragged
  length 200): (MLIR text, the warnings raised while lowering). The device check in
  supports() (a Hopper GPU) cannot pass on CPU; everything else in it (dtype, head_dim,
  blocks, shared memory) is still applied by flash_attention."""
  real = mosaic_gpu.supports
  monkeypatch.setattr(mosaic_gpu, "supports",
                      lambda *a, **kw: real(*a, **{**kw, "interpret": True}))
  q = jax.ShapeDtypeStruct((2, t, 4, d), jnp.bfloat16)
  kv = jax.ShapeDtypeStruct((2, t, 2, d), jnp.bfloat16)
  seg = jax.ShapeDtypeStruct((2, t), jnp.int32)
  check = jax.export.DisabledSafetyCheck.custom_call("mosaic_gpu_v2")
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    exported = jax.export.export(jax.jit(fn), platforms=["cuda"],
                                 disabled_checks=[check])(q, kv, kv, seg)
  return exported.mlir_module(), caught


@pytest.mark.skipif(not _cuda_plugin(), reason="needs the jax-cuda12-plugin wheel (not a "
                    "test dependency) to lower for CUDA on a machine without a GPU")
@pytest.mark.parametrize("score", mosaic_gpu.SCORES)
@pytest.mark.parametrize("packed, causal, d", [(False, True, 128), (True, False, 128),
                                               (True, True, 64)])
def test_kernels_lower_to_mosaic_gpu(score, packed, causal, d, monkeypatch):
  """Forward, dq and dk/dv kernels through the real Mosaic GPU lowering, by exporting for
  CUDA from CPU: default blocks. This runs Pallas:MGPU's lowering (register layouts, wgmma
  shape/tiling/swizzle rules, the shared-memory budget) but not ptxas or the hardware."""
  def fwd_bwd(q, k, v, s):
    out, vjp = jax.vjp(lambda q, k, v: mosaic_gpu.flash_attention(
        q, k, v, s if packed else None, score=score, causal=causal), q, k, v)
    return out, vjp(out)

  text, caught = _export_for_cuda(monkeypatch, fwd_bwd, d)
  assert text.count("stablehlo.custom_call @mosaic_gpu_v2") == 3, (
      "expected the fwd, dq and dk/dv Mosaic GPU kernels")
  # jax's API deprecations warn at the caller: none may point into the kernel module
  # (a deprecated plgpu call there is an error in a later jax).
  ours = {str(w.message) for w in caught
          if os.path.abspath(w.filename) == os.path.abspath(mosaic_gpu.__file__)}
  assert not ours, f"deprecated jax APIs used by mosaic_gpu.py: {sorted(ours)}"


@pytest.mark.skipif(not _cuda_plugin(), reason="needs the jax-cuda12-plugin wheel (not a "
                    "test dependency) to lower for CUDA on a machine without a GPU")
@pytest.mark.parametrize("score, packed, d, causal, t, blocks, consumers", [
    ("softmax", True, 128, True, 200, {}, 2), ("lssa", True, 64, True, 200, {}, 2),
    ("lssar", False, 64, True, 200, {}, 2),
    # one consumer (head_dim 192, forward key blocks of 64); no mask in any tile
    ("lssar", False, 192, False, 256, dict(block_k=64), 1)])
def test_warp_specialized_kernels_lower_to_mosaic_gpu(score, packed, d, causal, t, blocks,
                                                      consumers, monkeypatch):
  """The warp-specialised kernels (mosaic_gpu_ws.py: a producer and consumer warpgroups;
  the forward's ping-pong schedule, register reallocation; K, V, Q and dO read through
  transpose_ref and P / dS as register A operands; the backward with two consumers, or
  one) through the Mosaic GPU lowering, fwd + bwd. Only the lowering checks these Hopper
  operands: GPU interpret mode runs the transposed-copy / SMEM variant."""
  from pallas_kernels.attention import mosaic_gpu_ws  # pylint: disable=g-import-not-at-top
  seen = []
  real_call = mosaic_gpu_ws.call_backward

  def spy(cfg, kind, *args):
    seen.append((kind, mosaic_gpu_ws.copies(cfg), cfg.dq_consumers, cfg.dkv_consumers))
    return real_call(cfg, kind, *args)
  monkeypatch.setattr(mosaic_gpu_ws, "call_backward", spy)

  def fwd_bwd(q, k, v, s):
    out, vjp = jax.vjp(lambda q, k, v: mosaic_gpu.flash_attention(
        q, k, v, s if packed else None, score=score, causal=causal, warp_specialized=True,
        **blocks), q, k, v)
    return out, vjp(out)

  text, caught = _export_for_cuda(monkeypatch, fwd_bwd, d, t)
  assert text.count("stablehlo.custom_call @mosaic_gpu_v2") == 3
  for name in ("fwd_ws", "bwd_dq_ws", "bwd_dkv_ws"):   # not the single-warpgroup kernels
    assert f"mgpu_attention_{name}" in text, name
  n = consumers
  assert seen == [("dq", False, n, n), ("dkv", False, n, n)], seen
  ours = {str(w.message) for w in caught
          if os.path.abspath(w.filename) == os.path.abspath(mosaic_gpu_ws.__file__)}
  assert not ours, f"deprecated jax APIs used by mosaic_gpu_ws.py: {sorted(ours)}"


@pytest.mark.skipif(not _cuda_plugin(), reason="needs the jax-cuda12-plugin wheel (not a "
                    "test dependency) to lower for CUDA on a machine without a GPU")
def test_grouped_matmul_kernels_lower_to_mosaic_gpu(monkeypatch):
  """model.moe.dispatch=gmm on Hopper (effjax/models/grouped_matmul.py): the forward,
  input-gradient and weight-gradient kernels (ragged_dot_mgpu, transposed_ragged_dot_mgpu)
  through the real Mosaic GPU lowering, exported for CUDA from CPU: bf16 MoE-FFN shapes."""
  from effjax.models import grouped_matmul  # pylint: disable=g-import-not-at-top
  # transposed_ragged_dot_mgpu reads the SM count from jax.devices() while tracing.
  real = jax.devices
  monkeypatch.setattr(jax, "devices", lambda *a: real(*a) if a else [
      type("Hopper", (), {"core_count": 132, "platform": "gpu"})()])
  x = jax.ShapeDtypeStruct((1000, 256), jnp.bfloat16)
  w = jax.ShapeDtypeStruct((8, 256, 512), jnp.bfloat16)
  sizes = jax.ShapeDtypeStruct((8,), jnp.int32)

  def fwd_bwd(x, w, sizes):
    y, vjp = jax.vjp(lambda x, w: grouped_matmul.grouped_matmul(x, w, sizes, backend="mgpu"),
                     x, w)
    return y, vjp(y)

  check = jax.export.DisabledSafetyCheck.custom_call("mosaic_gpu_v2")
  exported = jax.export.export(jax.jit(fwd_bwd), platforms=["cuda"],
                               disabled_checks=[check])(x, w, sizes)
  assert exported.mlir_module().count("stablehlo.custom_call @mosaic_gpu_v2") == 3, (
      "expected the forward, input-gradient and weight-gradient Mosaic GPU kernels")


def _fetched_cuda_plugin():
  """(directory, None) with the jax-cuda12-plugin wheel matching jaxlib installed in a
  per-user cache (an 8 MB download, once), or (None, why) when pip cannot get it."""
  import jaxlib  # pylint: disable=g-import-not-at-top
  version = jaxlib.__version__
  where = os.path.join(os.path.expanduser("~"), ".cache", "effjax",
                       f"jax-cuda12-plugin-{version}-py{sys.version_info[0]}{sys.version_info[1]}")
  if not os.path.isdir(os.path.join(where, "jax_cuda12_plugin")):
    r = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target",
                        where, f"jax-cuda12-plugin=={version}"], capture_output=True, text=True,
                       timeout=600)
    if r.returncode:
      return None, f"pip install jax-cuda12-plugin=={version} failed: {r.stderr[-300:]}"
  return where, None


@pytest.mark.skipif(_cuda_plugin(), reason="the plugin is importable: the lowering tests above "
                    "run in this process")
def test_lowering_tests_with_a_fetched_cuda_plugin():
  """CI has no CUDA plugin: fetch the wheel matching jaxlib into a cache (lowering needs
  only its Mosaic GPU bindings, not a GPU or CUDA libraries) and run the export-lowering
  tests above in a subprocess that can import it (JAX_PLATFORMS=cpu). Skips, naming the
  reason, where pip cannot fetch the wheel (no index reachable, no wheel for this jaxlib)."""
  where, why = _fetched_cuda_plugin()
  if where is None:
    pytest.skip(why)
  repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             PYTHONPATH=os.pathsep.join([where, repo, os.environ.get("PYTHONPATH", "")]))
  r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                      os.path.abspath(__file__), "-k", "lower_to_mosaic_gpu"], cwd=repo,
                     env=env, capture_output=True, text=True, timeout=900)
  cases = 3 * len(mosaic_gpu.SCORES) + 4 + 1  # + warp-specialised kernels, grouped matmul
  assert r.returncode == 0 and f"{cases} passed" in r.stdout, r.stdout[-3000:] + r.stderr[-2000:]


def test_jax_version_shims():
  """What newer jax changed under the kernels: 0.11 made Warpgroup the default lowering
  semantics (the kernels pin Lane, the lowering they were checked with), 0.11.2 made
  Barrier's num_barriers default () (a 0-d ref that .at[0] cannot index: the kernels
  always pass it), 0.12 removed plgpu.load's positional idx."""
  plgpu = mosaic_gpu.plgpu
  assert mosaic_gpu._barrier(3).get_ref_aval().shape == (1,)
  assert mosaic_gpu._barrier(3, 2).get_ref_aval().shape == (2,)
  params = mosaic_gpu._compiler_params()
  assert params.approx_math and params.lowering_semantics == plgpu.LoweringSemantics.Lane
  idx = inspect.signature(plgpu.load).parameters.get("idx")
  assert mosaic_gpu._LOAD_TAKES_IDX == (idx is not None and idx.default is idx.empty)


def test_shared_memory_budget_matches_the_blocks():
  """supports() refuses what would overflow 227 KiB: head_dim 256's dq kernel (the Mosaic
  lowering rejects it too: 'exceeds available shared memory'), and accepts the defaults
  at head_dim 128 with double buffering in every kernel."""
  q = jax.ShapeDtypeStruct((1, 256, 2, 256), jnp.bfloat16)
  assert "shared memory" in mosaic_gpu.supports(q, q, interpret=True)
  q = jax.ShapeDtypeStruct((1, 256, 2, 128), jnp.bfloat16)
  assert mosaic_gpu.supports(q, q, "lssa", segments=True, interpret=True) is None
  for kind, (bq, bk) in (("fwd", mosaic_gpu.FWD_BLOCKS), ("dq", mosaic_gpu.BWD_BLOCKS),
                         ("dkv", mosaic_gpu.BWD_BLOCKS)):
    assert mosaic_gpu._slots(kind, "lssa", 2, 128, bq, bk, True) == 2, kind


# ------------------------------------------------------------------ GPU (run with -m gpu)

def _check(q, k, v, **kw):
  """pallas_mgpu (16-bit) against the fp32 reference on the same rounded inputs."""
  blocks = {n: kw.pop(n) for n in ("block_q", "block_k") if n in kw}
  check(lambda q, k, v: attention(q, k, v, implementation="pallas_mgpu", **blocks, **kw),
        q, k, v, tol=TOL_16[jnp.dtype(q.dtype)], **kw)


def _on_hopper():
  return jax.default_backend() == "gpu" and mosaic_gpu.supports(
      jax.ShapeDtypeStruct((1, 64, 1, 64), jnp.bfloat16),
      jax.ShapeDtypeStruct((1, 64, 1, 64), jnp.bfloat16)) is None


@pytest.mark.gpu
@pytest.mark.skipif(not _on_hopper(), reason="needs a Hopper (sm_90) GPU")
@pytest.mark.parametrize("score", mosaic_gpu.SCORES)
@pytest.mark.parametrize("b, t, h, kv, d, is_packed, causal", [
    (2, 300, 4, 2, 128, True, True),    # GQA 2, packed, ragged length, head dim 128
    (1, 1024, 4, 4, 64, False, True),   # many blocks per axis, causal skipping
    (1, 100, 4, 1, 64, False, False),   # MQA, non-causal, ragged
    (1, 2048, 2, 1, 128, False, True),  # long enough for every pipeline slot to cycle
])
def test_pallas_mgpu_matches_reference(score, b, t, h, kv, d, is_packed, causal):
  q, k, v = qkv(b, t, h, kv, d, seed=t + h, dtype=jnp.bfloat16)
  with jax.default_matmul_precision("highest"):  # the fp32 reference in full fp32
    _check(q, k, v, score=score, causal=causal,
           segment_ids=packed(b, t) if is_packed else None)


@pytest.mark.gpu
@pytest.mark.skipif(not _on_hopper(), reason="needs a Hopper (sm_90) GPU")
@pytest.mark.parametrize("score", mosaic_gpu.SCORES)
def test_pallas_mgpu_q_offset_blocks_and_interpret_agree(score):
  """A query chunk at q_offset with 128 x 128 forward blocks; and the GPU result equals the
  interpreter's on the same inputs up to accumulation order (the same bf16 roundings)."""
  q, k, v = qkv(1, 256, 4, 2, 128, seed=5, tk=448, dtype=jnp.bfloat16)
  with jax.default_matmul_precision("highest"):
    _check(q, k, v, block_q=128, block_k=128, score=score, q_offset=192)
  gpu = attention(q, k, v, score=score, q_offset=192, implementation="pallas_mgpu")
  cpu = attention(q, k, v, score=score, q_offset=192, implementation="interpret_mgpu")
  assert_close(gpu, cpu, TOL_16[jnp.dtype(jnp.bfloat16)], "GPU vs interpret")
