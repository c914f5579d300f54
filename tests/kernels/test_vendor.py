"""The vendors' softmax kernels in the dispatch table (pallas_kernels/attention/vendor.py):
splash attention run by Pallas' interpreter against the reference (values and gradients,
GQA, packed documents, a logit scale); the cuDNN wrapper's packed-document layout checked
against an emulation of cuDNN's documented packed-layout semantics (cuDNN itself needs a
GPU: -m gpu below); auto's choice of them for softmax and only for softmax; named calls
they cannot run fall back, logged once; the errors and config checks on CPU."""

import dataclasses
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effjax import checks
from effjax import config as C
from pallas_kernels.attention import api, attention, reference, vendor
from tests.kernels.conformance import check, packed, qkv


def _problem(q, score="softmax", segments=None, **kw):
  return api.Problem(q, q, q, segments, causal=True, score=score, q_offset=0, scale=None,
                     p=15.0, reweight_offset_rows=3, **{"block_q": None, "block_k": None, **kw})


# ------------------------------------------------------------------ splash (interpret)

def test_interpret_splash_matches_reference_with_gqa_and_packed_documents():
  """Splash's mask construction (causal MultiHeadMask, SegmentIds), the pre-scaled q, and
  the GQA path (MQA kernel vmapped over kv heads): values and all three gradients in fp32,
  with two blocks of 128 per sequence so block skipping is exercised."""
  q, k, v = qkv(2, 256, 4, 2, 64)
  seg = packed(2, 256)
  fn = lambda q, k, v: attention(q, k, v, segment_ids=seg, scale=0.3,
                                 implementation="interpret_splash")
  check(fn, q, k, v, tol=1e-5, segment_ids=seg, scale=0.3)


def test_splash_supports_and_blocks():
  x = jax.ShapeDtypeStruct((1, 1000, 2, 64), jnp.bfloat16)
  assert "multiple of 128" in vendor.supports_splash(x, x, q_offset=0)
  assert vendor.splash_block(1024) == 512 and vendor.splash_block(384) == 128
  y = jax.ShapeDtypeStruct((1, 1024, 2, 64), jnp.bfloat16)
  assert vendor.supports_splash(y, y, q_offset=0) is None
  assert "q_offset" in vendor.supports_splash(y, y, q_offset=3)


# ------------------------------------------------------------------ cuDNN (layout on CPU)

def test_packed_documents_are_the_runs_of_equal_segment_ids():
  seg = jnp.asarray([[1, 1, 2, 2, 2, 3], [5, 5, 5, 5, 5, 5], [4, 0, 0, 4, 4, 4]])
  seqlen, offsets = vendor.packed_documents(seg)
  assert seqlen.dtype == offsets.dtype == jnp.int32
  np.testing.assert_array_equal(seqlen, [[2, 3, 1, -1, -1, -1], [6, -1, -1, -1, -1, -1],
                                         [1, 2, 3, -1, -1, -1]])
  np.testing.assert_array_equal(offsets, [[0, 2, 5, -1, -1, -1, -1], [0] + [-1] * 6,
                                          [0, 1, 3, -1, -1, -1, -1]])
  seqlen, offsets = vendor.packed_documents(seg, max_documents=3)
  assert seqlen.shape == (3, 3) and offsets.shape == (3, 4)


def _emulated_cudnn_packed(q, k, v, seqlen, offsets, *, scale):
  """cuDNN's packed layout as JAX documents it: per row, document m covers positions
  [offsets[m], offsets[m] + seqlen[m]), entries past the last document are -1, and
  PADDING_CAUSAL makes each document a causal sequence of its own."""
  t = q.shape[1]
  pos = np.arange(t)
  off, n = np.asarray(offsets)[:, :-1], np.asarray(seqlen)
  inside_BxMxT = (off[..., None] <= pos) & (pos < off[..., None] + n[..., None]) & (n[..., None] > 0)
  assert (inside_BxMxT.sum(1) == 1).all(), "every position in exactly one document"
  assert ((off < 0) == (n < 0)).all() and (np.asarray(offsets)[:, -1] == -1).all()
  doc_BxT = jnp.asarray(inside_BxMxT.argmax(1), jnp.int32)
  return reference.attention(q, k, v, segment_ids=doc_BxT, scale=scale)


def test_cudnn_wrapper_passes_packed_documents_and_scale(monkeypatch):
  """attention(implementation='cudnn') on a GPU target: the wrapper turns segment ids into
  cuDNN's (seqlen, offsets) and passes the scale; with the cuDNN call replaced by its
  documented semantics, the result is the reference's."""
  monkeypatch.setattr(vendor, "cudnn_packed_call", _emulated_cudnn_packed)
  q, k, v = qkv(2, 48, 4, 2, 64, dtype=jnp.bfloat16)
  seg = packed(2, 48)
  out = attention(q, k, v, segment_ids=seg, scale=0.2, implementation="cudnn", platform="gpu")
  np.testing.assert_array_equal(out, reference.attention(q, k, v, segment_ids=seg, scale=0.2))


def test_cudnn_supports_names_what_it_cannot_run(monkeypatch):
  bf = jax.ShapeDtypeStruct((1, 64, 2, 64), jnp.bfloat16)
  sup = lambda q, **kw: vendor.supports_cudnn(q, q, q, **{"causal": True, "q_offset": 0,
                                                          "segments": False, **kw})
  assert sup(bf) is None
  assert "dtype float32" in sup(bf.update(dtype=jnp.float32))
  assert "head_dim 256" in sup(jax.ShapeDtypeStruct((1, 64, 2, 256), jnp.bfloat16))
  assert "q_offset" in sup(bf, q_offset=4)
  assert sup(bf, segments=True) is None  # this jax has the packed layout (private API)
  monkeypatch.setattr(vendor, "_private_cudnn", lambda: None)
  assert "no packed-document cuDNN attention" in sup(bf, segments=True)


# ------------------------------------------------------------------ dispatch

def test_auto_picks_the_vendor_kernel_for_softmax_only():
  assert api.auto_order("gpu") == tuple(dict.fromkeys(
      ("cudnn", api.AUTO_GPU_KERNEL, "pallas_gpu", "xla")))
  assert api.auto_order("tpu") == ("splash", "pallas_tpu", "xla")
  gpu = jax.ShapeDtypeStruct((2, 2048, 8, 64), jnp.bfloat16)
  assert api.select(_problem(gpu), "gpu") == ("cudnn", ())
  assert api.select(_problem(gpu, "lssa"), "gpu") == ("pallas_gpu", ())  # silently past cudnn
  tpu = jax.ShapeDtypeStruct((2, 2048, 8, 128), jnp.bfloat16)
  assert api.select(_problem(tpu), "tpu") == ("splash", ())
  assert api.select(_problem(tpu, "lssar"), "tpu") == ("pallas_tpu", ())
  odd = jax.ShapeDtypeStruct((2, 1000, 8, 128), jnp.bfloat16)
  assert api.select(_problem(odd), "tpu") == (
      "pallas_tpu", ("splash: length 1000 is not a multiple of 128",))
  f32 = jax.ShapeDtypeStruct((2, 256, 8, 64), jnp.float32)
  name, why = api.select(_problem(f32), "gpu")
  assert name == "pallas_gpu" and why[0].startswith("cudnn: dtype float32")


def test_named_cudnn_falls_back_with_the_reason_logged_once(monkeypatch, caplog):
  """impl=cudnn with packed documents on a jax without cuDNN's packed layout: auto's pick
  runs instead (here the interpreter, standing in for the GPU kernel) and says why, once."""
  monkeypatch.setattr(vendor, "_private_cudnn", lambda: None)
  monkeypatch.setattr(api, "auto_order", lambda platform: ("cudnn", "interpret", "xla"))
  q, k, v = qkv(1, 32, 2, 1, 16, dtype=jnp.bfloat16)
  seg = packed(1, 32)
  api._logged.clear()
  with caplog.at_level(logging.INFO, logger=api.__name__):
    for _ in range(2):
      out = attention(q, k, v, segment_ids=seg, implementation="cudnn", platform="gpu",
                      block_q=16, block_k=16)
  msgs = [r.getMessage() for r in caplog.records]
  assert len(msgs) == 1 and "implementation='cudnn' falls back" in msgs[0], msgs
  assert "no packed-document cuDNN attention" in msgs[0] and msgs[0].endswith("using interpret")
  np.testing.assert_allclose(np.asarray(out, np.float32),
                             reference.attention(q, k, v, segment_ids=seg), atol=2e-2)


def test_vendor_backends_refuse_other_scores_and_other_platforms():
  q, k, v = qkv(1, 128, 2, 2, 16)
  with pytest.raises(ValueError, match="interpret_splash.*softmax only, not score='lssa'"):
    attention(q, k, v, score="lssa", implementation="interpret_splash")
  if jax.default_backend() == "cpu":
    with pytest.raises(ValueError, match="implementation='cudnn' needs a GPU backend; this "
                                         "is 'cpu'. Valid here: .*interpret_splash"):
      attention(q, k, v, implementation="cudnn")
    with pytest.raises(C.ConfigError, match="impl=cudnn needs a GPU backend"):
      checks.load(["--config=configs/tiny.py", "--config.model.attention.impl=cudnn"])
    with pytest.raises(C.ConfigError, match="impl=splash needs a TPU backend"):
      checks.load(["--config=configs/tiny.py", "--config.model.attention.impl=splash"])


# ------------------------------------------------------------------ on a GPU

@pytest.mark.gpu
@pytest.mark.parametrize("segments", [False, True])
def test_cudnn_matches_reference_on_gpu(segments):
  """cuDNN flash attention (packed documents: Hopper and the private packed layout) vs the
  fp32 reference, values and gradients, bf16 at the bf16 bound."""
  q, k, v = qkv(2, 1024, 8, 2, 128, dtype=jnp.bfloat16)
  seg = packed(2, 1024) if segments else None
  assert vendor.supports_cudnn(q, k, v, causal=True, q_offset=0, segments=segments) is None
  fn = lambda q, k, v: attention(q, k, v, segment_ids=seg, implementation="cudnn")
  check(fn, q, k, v, tol=2e-2, segment_ids=seg)


def test_splash_kernel_is_reused_across_traces():
  """The cached splash kernel holds constant mask info, not a first trace's tracers."""
  q, k, v = qkv(1, 128, 2, 2, 16)
  f = lambda q: attention(q, k, v, implementation="interpret_splash")
  first = jax.jit(f)(q)
  again = jax.jit(lambda q: f(q) + 0.0)(q)
  np.testing.assert_array_equal(first, again)
