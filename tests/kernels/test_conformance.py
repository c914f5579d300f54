"""Every attention backend that runs on CPU (interpret, interpret_tpu, interpret_mgpu, xla)
against the reference: the case matrix of conformance.py (values and gradients), rows that
sum to one, LSSAR at long positions, and (slow) the backends' default blocks. Tolerances
and costs: conformance.py's docstring."""

import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.attention import api, mosaic_gpu, reference
from tests.kernels import conformance as C


@pytest.fixture(autouse=True)
def _reset_interpreter():
  """GPU interpret mode keeps global state that an exception inside it leaves dirty."""
  yield
  mosaic_gpu.reset_interpret_state()


@pytest.mark.parametrize("spec, case, score", C.params())
def test_matches_reference(spec, case, score):
  C.run_case(spec, case, score)


_SLOW_ROWS_SUM = {("interpret_mgpu", "lssa")}


@pytest.mark.parametrize("spec, score", [
    pytest.param(s, score, id=f"{s.name}-{score}",
                 marks=[pytest.mark.slow] if (s.name, score) in _SLOW_ROWS_SUM else [])
    for s in C.SPECS for score in ("lssa", "lssar")])
def test_rows_sum_to_one(spec, score):
  """With V = ones the output is each row's weight sum (packed: per document). fp32: within
  1e-4 (LSSA's eps = 1e-6: a deficit <= 1e-5); bf16 weights and output: within 1e-2 (one
  bf16 ulp below 1 is 4e-3)."""
  q, k, _ = C.qkv(2, 100, 2, 1, 64, seed=6, dtype=spec.dtype)
  out = api.attention(q, k, jnp.ones_like(k), score=score, segment_ids=C.packed(2, 100),
                      implementation=spec.name, **spec.blocks)
  atol = 1e-4 if spec.dtype == jnp.float32 else 1e-2
  np.testing.assert_allclose(np.asarray(out, np.float32), 1.0, atol=atol)


_LONG_BLOCKS = {"interpret": dict(block_q=8, block_k=1024),
                "interpret_tpu": dict(block_q=8, block_k=1024), "xla": {}}


@pytest.mark.parametrize("spec", C.SPECS, ids=str)
def test_lssar_finite_at_16k_positions(spec):
  """Queries at positions 16377..16384 over 16 key blocks of 1024 (interpret_tpu: two passes
  of 16 steps): N^15 overflows fp32 without the row-max division."""
  if spec.name not in _LONG_BLOCKS:
    pytest.skip("head_dim 16 and 1024-key blocks are outside the Mosaic GPU kernels' tiles "
                "(checked at long lengths on a GPU: test_attention_mgpu.py -m gpu)")
  q, k, v = C.qkv(1, 8, 1, 1, 16, seed=7, tk=16384)
  kw = dict(score="lssar", q_offset=16384 - 8)
  out = api.attention(q, k, v, implementation=spec.name, **_LONG_BLOCKS[spec.name], **kw)
  assert bool(jnp.all(jnp.isfinite(out)))
  np.testing.assert_allclose(out, reference.attention(q, k, v, **kw), atol=5e-5, rtol=5e-5)


@pytest.mark.slow
@pytest.mark.parametrize("score", C.SCORES)
@pytest.mark.parametrize("spec", C.SPECS[:3], ids=str)
def test_default_blocks_multi_block(spec, score):
  """The backend's default blocks with several blocks per axis (long_len: kernel.py and the
  Mosaic GPU kernels 300, the TPU kernels' 512 blocks 1100), head dim 128, GQA 2, packed
  into two documents."""
  t = spec.long_len
  q, k, v = C.qkv(1, t, 4, 2, 128, seed=11, dtype=spec.dtype)
  seg = jnp.asarray([[1] * (t * 7 // 12) + [2] * (t - t * 7 // 12)])
  C.check(lambda q, k, v: api.attention(q, k, v, segment_ids=seg, score=score,
                                        implementation=spec.name), q, k, v,
          tol=spec.tol(q.dtype, score), fast=spec.fast, segment_ids=seg, score=score)


def test_every_cpu_backend_is_under_test():
  """The suite covers every backend of the table that runs without an accelerator."""
  cpu = {n for n, b in api.BACKENDS.items() if b.platform is None}
  # softmax-only vendor kernels in the Pallas interpreter: checked against the reference
  # (values, gradients, GQA, packed documents) in tests/kernels/test_vendor.py
  vendor_tested = {"interpret_splash"}
  # the warp-specialised Mosaic GPU kernels: outputs and gradients equal to interpret_mgpu's
  # (a row of this suite) in tests/kernels/test_attention_mgpu_ws.py
  ws_tested = {"interpret_mgpu_ws"}
  assert cpu == {s.name for s in C.SPECS} | vendor_tested | ws_tested
