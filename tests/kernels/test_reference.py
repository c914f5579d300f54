"""The reference attention (pallas_kernels/attention/reference.py, the spec): its defining
properties, written out independently of the kernels."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.attention import attention, attention_weights, chunked_attention
from tests.kernels.conformance import SCORES, packed, qkv


def test_reference_softmax_matches_jax_dot_product_attention():
  q, k, v = qkv(2, 37, 4, 2, 16)
  ref = jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="xla")
  np.testing.assert_allclose(attention(q, k, v, implementation="xla"), ref, atol=1e-5,
                             rtol=1e-5)


def test_reference_lssa_rows_sum_to_one_and_match_formula():
  q, k, _ = qkv(2, 37, 4, 2, 16)
  for score in ("lssa", "lssar"):
    w = attention_weights(q, k, score=score)
    np.testing.assert_allclose(jnp.sum(w, -1), 1.0, atol=1e-4)  # eps = 1e-6: tiny deficit
    assert float(jnp.max(jnp.abs(jnp.triu(w, k=1)))) == 0.0     # causal
  # Row 9 (N = 10) written out: A = softplus(log d log N qhat.khat) / (sum + eps).
  w = attention_weights(q, k, score="lssa")[0, 0, 9]
  qh = q[0, 9, 0] / jnp.linalg.norm(q[0, 9, 0])
  kh = k[0, :10, 0] / jnp.linalg.norm(k[0, :10, 0], axis=-1, keepdims=True)
  a = jax.nn.softplus(math.log(16) * math.log(10) * kh @ qh)
  np.testing.assert_allclose(w[:10], a / (a.sum() + 1e-6), rtol=1e-5)
  r = attention_weights(q, k, score="lssar", p=3.0)[0, 0, 9]
  rr = jnp.maximum(10 * a / (a.sum() + 1e-6) - 1, 0) ** 3   # O_i = 1 since N > 3
  np.testing.assert_allclose(r[:10], rr / rr.sum(), rtol=1e-4, atol=1e-7)


def test_reference_lssar_uniform_rows_fall_back_to_lssa():
  """All keys identical: every A row is uniform, ReLU(N A - 1) = 0, so R falls back to A
  (the guard for all-zero rows; the kernels' side: conformance row lssar_uniform_rows)."""
  q, k, _ = qkv(1, 40, 2, 1, 64, seed=5)
  k = jnp.broadcast_to(k[:, :1], k.shape)
  w = attention_weights(q, k, score="lssar")[:, :, 3:]  # rows with N_i > 3 (O_i = 1)
  np.testing.assert_allclose(w, attention_weights(q, k, score="lssa")[:, :, 3:], atol=1e-7)


def test_reference_lssar_rows_sum_to_one_at_16k_positions():
  """Queries at positions 16377..16384: N^15 overflows fp32 without the row-max division
  (the kernels' side: test_conformance.test_lssar_finite_at_16k_positions)."""
  q, k, _ = qkv(1, 8, 1, 1, 16, seed=7, tk=16384)
  w = attention_weights(q, k, score="lssar", q_offset=16384 - 8)
  np.testing.assert_allclose(jnp.sum(w, -1), 1.0, atol=1e-4)


def test_reference_packed_document_equals_document_alone():
  q, k, v = qkv(1, 20, 2, 1, 16)
  seg = jnp.asarray([[1] * 8 + [2] * 12])
  for score in SCORES:
    packed_out = attention(q, k, v, score=score, segment_ids=seg, implementation="xla")
    alone = attention(q[:, 8:], k[:, 8:], v[:, 8:], score=score, implementation="xla")
    np.testing.assert_allclose(packed_out[:, 8:], alone, atol=1e-5, rtol=1e-5, err_msg=score)


@pytest.mark.parametrize("score", SCORES)
def test_reference_chunked_equals_plain(score):
  q, k, v = qkv(2, 100, 4, 2, 16)
  seg = packed(2, 100)
  plain = attention(q, k, v, score=score, segment_ids=seg, implementation="xla")
  chunked = chunked_attention(q, k, v, chunk_size=32, score=score, segment_ids=seg)
  np.testing.assert_allclose(chunked, plain, atol=1e-5, rtol=1e-5)


def test_reference_lssar_finite_at_16k_chunked():
  """The chunked reference for the last 1024 queries of a 16k sequence (tiny head): finite,
  and rows sum to 1 (V's last column is ones, so that output column is the row sum)."""
  q, k, v = qkv(1, 1024, 1, 1, 8, seed=8, tk=16384)
  v = v.at[..., -1].set(1.0)
  out = jax.jit(lambda q, k, v: chunked_attention(q, k, v, chunk_size=256, score="lssar",
                                                  q_offset=16384 - 1024))(q, k, v)
  assert bool(jnp.all(jnp.isfinite(out)))
  np.testing.assert_allclose(out[..., -1], 1.0, atol=1e-4)
