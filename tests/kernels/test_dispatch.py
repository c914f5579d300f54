"""attention()'s dispatch (pallas_kernels/attention/api.py): argument errors, the backend
table, auto's order and fallback (logged once), named backends that cannot run, and the
platform check that config validation shares (api.unavailable_reason)."""

import dataclasses
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.attention import api, attention, kernel, mosaic_gpu, reference
from pallas_kernels.attention import tpu_streaming as ts
from tests.kernels.conformance import pallas_calls, qkv


def _problem(q, k=None, v=None, score="softmax", **kw):
  k = q if k is None else k
  return api.Problem(q, k, k if v is None else v, None, causal=True, score=score, q_offset=0,
                     scale=None, p=15.0, reweight_offset_rows=3,
                     **{"block_q": None, "block_k": None, **kw})


def test_dispatch_errors_name_the_argument():
  q, k, v = qkv(1, 16, 4, 2, 16)
  with pytest.raises(ValueError, match="score"):
    attention(q, k, v, score="sparsemax")
  with pytest.raises(ValueError, match="implementation.*auto"):
    attention(q, k, v, implementation="cuda")
  with pytest.raises(ValueError, match="kv heads"):
    attention(q, k[:, :, :1].repeat(3, axis=2), v[:, :, :1].repeat(3, axis=2))
  with pytest.raises(ValueError, match="head_dim"):
    attention(q, k[..., :8], v[..., :8])
  with pytest.raises(ValueError, match="k and v"):
    attention(q, k, v[:, :8])
  with pytest.raises(ValueError, match="segment_ids"):
    attention(q, k, v, segment_ids=jnp.zeros((1, 8), jnp.int32))
  with pytest.raises(ValueError, match="block_k"):
    attention(q, k, v, implementation="interpret", block_k=12)
  with pytest.raises(ValueError, match="q_offset"):
    attention(q, k, v, q_offset=-1)
  with pytest.raises(ValueError, match="p \\(the LSSAR power\\)"):
    attention(q, k, v, score="lssar", p=0.0)
  if jax.default_backend() != "gpu":
    with pytest.raises(ValueError, match="needs a GPU.*interpret"):
      attention(q, k, v, implementation="pallas_gpu")
  if jax.default_backend() != "tpu":
    with pytest.raises(ValueError, match="needs a TPU.*interpret_tpu"):
      attention(q, k, v, implementation="pallas_tpu")


def test_the_table_lists_every_implementation_with_its_platform():
  assert api.IMPLEMENTATIONS == ("auto", "xla", "pallas_tpu", "pallas_gpu", "pallas_mgpu",
                                 "pallas_mgpu_ws", "interpret", "interpret_mgpu",
                                 "interpret_mgpu_ws", "interpret_tpu", "cudnn", "splash",
                                 "interpret_splash")
  assert {n: b.platform for n, b in api.BACKENDS.items() if b.platform} == {
      "pallas_tpu": "tpu", "pallas_gpu": "gpu", "pallas_mgpu": "gpu", "pallas_mgpu_ws": "gpu",
      "cudnn": "gpu", "splash": "tpu"}
  for platform in ("cpu", "gpu", "tpu"):
    assert api.auto_order(platform)[-1] == "xla"


def test_unavailable_reason_is_the_platform_check():
  """The text config validation reports: which backend a name needs and what is valid."""
  assert api.unavailable_reason("pallas_tpu", "cpu") == (
      "needs a TPU backend; this is 'cpu'. Valid here: auto, xla, interpret, "
      "interpret_mgpu, interpret_mgpu_ws, interpret_tpu, interpret_splash.")
  assert "needs a GPU backend; this is 'tpu'. Valid here: auto, xla, pallas_tpu," in (
      api.unavailable_reason("pallas_mgpu", "tpu"))
  for name in ("auto", "xla", "interpret", "interpret_mgpu", "interpret_tpu"):
    assert api.unavailable_reason(name, "cpu") is None
  assert api.unavailable_reason("pallas_gpu", "gpu") is None
  assert api.unavailable_reason("pallas_tpu", "tpu") is None
  assert "is not one of" in api.unavailable_reason("cuda", "gpu")


@pytest.mark.skipif(jax.default_backend() == "tpu", reason="auto picks pallas_tpu on TPU")
def test_auto_falls_back_to_reference_and_logs_once(caplog):
  q, k, v = qkv(1, 16, 2, 1, 16)
  api._logged.clear()
  with caplog.at_level(logging.INFO, logger=api.__name__):
    out = attention(q, k, v, score="lssa")
    attention(q, k, v, score="lssa")
  assert sum("XLA reference" in r.getMessage() for r in caplog.records) == 1
  np.testing.assert_array_equal(out, reference.attention(q, k, v, score="lssa"))


def test_auto_on_tpu_takes_the_kernels_at_long_lengths():
  """auto on TPU: the streaming kernels at any length up to AUTO_MAX_LEN (the old limit was
  8192: whole-sequence VMEM blocks); the reference where the kernels refuse the call.
  (Softmax goes to splash first: test_vendor.py.)"""
  for t in (8192, 32768, 131072):
    x = jax.ShapeDtypeStruct((1, t, 8, 128), jnp.bfloat16)
    assert api.select(_problem(x, score="lssa"), "tpu") == ("pallas_tpu", ())
  x = jax.ShapeDtypeStruct((1, api.AUTO_MAX_LEN + 1, 1, 128), jnp.bfloat16)
  name, why = api.select(_problem(x, score="lssa"), "tpu")
  assert name == "xla" and "length > " in why[0]
  short = jax.ShapeDtypeStruct((1, 64, 1, 8), jnp.float16)
  assert api.select(_problem(short, score="lssa"), "tpu") == (
      "xla", ("pallas_tpu: dtype float16 is not float32/bfloat16",))


def test_auto_on_gpu_picks_the_configured_kernel_and_falls_back(monkeypatch):
  """auto on a GPU runs AUTO_GPU_KERNEL: the Triton path today (the Mosaic GPU kernels have
  never run on hardware); flipped to pallas_mgpu it runs those where they accept the call
  and falls back to the Triton path where they refuse it. (Softmax goes to cuDNN first:
  test_vendor.py.)"""
  pb = _problem(jax.ShapeDtypeStruct((1, 64, 2, 64), jnp.bfloat16), score="lssa")

  def refuse(name, why):
    monkeypatch.setitem(api.BACKENDS, name, dataclasses.replace(
        api.BACKENDS[name], supports=lambda _: why))

  def accept(name):
    refuse(name, None)

  assert api.AUTO_GPU_KERNEL == "pallas_gpu"
  accept("pallas_mgpu")
  assert api.select(pb, "gpu") == ("pallas_gpu", ())
  monkeypatch.setattr(api, "AUTO_GPU_KERNEL", "pallas_mgpu")
  assert api.select(pb, "gpu") == ("pallas_mgpu", ())
  refuse("pallas_mgpu", "head_dim 32")
  assert api.select(pb, "gpu") == ("pallas_gpu", ("pallas_mgpu: head_dim 32",))
  refuse("pallas_gpu", "no triton")
  assert api.select(pb, "gpu") == ("xla", ("pallas_mgpu: head_dim 32",
                                           "pallas_gpu: no triton"))


def test_auto_logs_each_fallback_once(monkeypatch, caplog):
  """auto's fallback reasons are logged once per (platform, score, reasons), naming each
  skipped backend and the one that ran."""
  q, k, v = qkv(1, 16, 2, 1, 16)
  order = ("pallas_mgpu", "interpret", "xla")
  monkeypatch.setattr(api, "auto_order", lambda platform: order)
  monkeypatch.setitem(api.BACKENDS, "pallas_mgpu", dataclasses.replace(
      api.BACKENDS["pallas_mgpu"], supports=lambda _: "not on this machine"))
  api._logged.clear()
  with caplog.at_level(logging.INFO, logger=api.__name__):
    for _ in range(2):
      out = attention(q, k, v, score="lssar", block_q=8, block_k=8)
  msgs = [r.getMessage() for r in caplog.records]
  assert msgs == ["attention(score='lssar', implementation='auto'): pallas_mgpu: not on this "
                  "machine; using interpret"], msgs
  np.testing.assert_allclose(out, reference.attention(q, k, v, score="lssar"), atol=5e-5)


def test_pallas_tpu_entry_runs_the_streaming_kernels():
  """The table's pallas_tpu entry (auto's choice on TPU) runs tpu_streaming's kernels: the
  forward and dq grids end in the streamed key axis, dk/dv's in (group, query blocks).
  Traced on CPU (the Mosaic kernels are not run)."""
  q = jax.ShapeDtypeStruct((1, 1024, 4, 128), jnp.bfloat16)
  kv = jax.ShapeDtypeStruct((1, 1024, 2, 128), jnp.bfloat16)

  def loss(q, k, v):
    out = api.BACKENDS["pallas_tpu"].run(_problem(q, k, v))
    return out.astype(jnp.float32).sum()

  calls = pallas_calls(jax.make_jaxpr(jax.grad(loss, (0, 1, 2)))(q, kv, kv).jaxpr)
  par, arb = "parallel", "arbitrary"
  assert calls == [((1, 4, 2, 2), (par, par, par, arb)), ((1, 4, 2, 2), (par, par, par, arb)),
                   ((1, 2, 2, 2, 2), (par, par, par, arb, arb))]


def test_kernel_module_has_no_tpu_dispatch():
  """kernel.flash_attention runs kernel.py's kernels only: the streaming TPU kernels are
  chosen by the table, not by a second dispatch inside kernel.py."""
  q, k, v = qkv(1, 16, 2, 1, 16)
  with pytest.raises(ValueError, match="tpu_streaming"):
    kernel.flash_attention(q, k, v, backend="tpu")


def test_dispatch_interpret_tpu_and_block_errors():
  q, k, v = qkv(1, 40, 2, 1, 16)
  out = attention(q, k, v, implementation="interpret_tpu", score="lssa")
  np.testing.assert_allclose(out, reference.attention(q, k, v, score="lssa"), atol=1e-5)
  long_q = jax.ShapeDtypeStruct((1, 1000, 2, 64), jnp.bfloat16)
  assert ts.supports(long_q, long_q) is None
  assert "multiple of 128" in ts.supports(long_q, long_q, block_k=64)
  assert ts.supports(long_q, long_q, block_k=64, interpret=True) is None
  assert ts.supports(long_q, jax.ShapeDtypeStruct((1, 40, 2, 64), jnp.bfloat16),
                     block_k=40) is None  # one block covers the keys
  assert "divide" in ts.supports(long_q, long_q, block_q=384, bwd_block_q=256)
  assert "dtype" in ts.supports(long_q.update(dtype=jnp.float16), long_q)
  with pytest.raises(ValueError, match="interpret_tpu.*cannot run.*dtype"):
    attention(*(x.astype(jnp.float16) for x in (q, k, v)), implementation="interpret_tpu")
  if jax.default_backend() != "tpu":
    with pytest.raises(ValueError, match="needs a TPU.*interpret_tpu"):
      attention(q, k, v, implementation="pallas_tpu")


def test_dispatch_pallas_mgpu_errors():
  q, k, v = qkv(1, 64, 2, 1, 64, dtype=jnp.bfloat16)
  if jax.default_backend() != "gpu":
    with pytest.raises(ValueError, match="pallas_mgpu.*needs a GPU.*interpret_mgpu"):
      attention(q, k, v, implementation="pallas_mgpu")
  cases = [
      (dict(q=q.astype(jnp.float32), k=k.astype(jnp.float32), v=v.astype(jnp.float32)),
       "16-bit"),
      (dict(q=q[..., :32], k=k[..., :32], v=v[..., :32]), "head_dim 32"),
      (dict(q=jnp.tile(q, 4), k=jnp.tile(k, 4), v=jnp.tile(v, 4)),   # head_dim 256
       "dq kernel .* needs .* KiB of shared memory"),
      (dict(block_q=32), "block_q=32"),
      (dict(v=v.astype(jnp.float16)), "bfloat16/bfloat16/float16"),
  ]
  try:
    for kw, match in cases:
      kw = {"q": q, "k": k, "v": v, **kw}
      with pytest.raises(ValueError, match=f"interpret_mgpu.*cannot run this call: .*{match}"):
        attention(kw.pop("q"), kw.pop("k"), kw.pop("v"), implementation="interpret_mgpu",
                  **kw)
  finally:
    mosaic_gpu.reset_interpret_state()
