"""Blockwise Pallas attention forward (softmax, LSSA, LSSAR): first stage of issue 3.

Grid (batch x heads, query blocks). Each program holds one query block and walks the
key blocks with a fori_loop, skipping blocks entirely above the causal diagonal.
  softmax  one pass, online softmax (Dao et al. 2022, FlashAttention, Alg. 1).
  lssa     two passes: row sums S_i of softplus(log d log N_i qhat.khat), then
           sum_j softplus_ij / (S_i + eps) v_j.
  lssar    pass 1 also keeps the row max of the softplus; since ReLU(N a - O) is monotone
           in a, the row max of R is known before pass 2, which accumulates
           (ReLU(N A - O) / max)^p v and its row sum (overflow-safe at any length).
N_i (visible keys per row) is computed outside the kernel in O(T).

Status, stated plainly: forward only; the backward pass (custom_vjp) recomputes through
the jnp reference, so training memory is not yet linear in T. The whole K/V sequence of
one head is one block (fine in interpret mode and for moderate T; a production TPU
kernel would stream K/V blocks). Verified on CPU in interpret mode only: it has not been
lowered on a TPU here, and there is no Mosaic GPU version.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels.attention import reference

_NEG = -1e30


def visible_counts(tq: int, tk: int, q_offset: int, segment_ids):
  """N_i for causal attention: position within the row's segment (1-based), or q_pos."""
  q_pos = q_offset + jnp.arange(tq) + 1
  if segment_ids is None:
    return jnp.minimum(q_pos, tk).astype(jnp.float32)[None, :]
  idx = jnp.arange(tq)
  starts = jnp.concatenate([jnp.ones_like(segment_ids[:, :1], bool),
                            segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
  seg_start = jax.lax.cummax(jnp.where(starts, idx, 0), axis=1)
  return (idx - seg_start + 1).astype(jnp.float32)


def _kernel(q_ref, k_ref, v_ref, qseg_ref, kseg_ref, n_ref, o_ref, *, score, block_q, block_k,
            kv_len, q_offset, scale, p, offset_rows, log_d):
  i = pl.program_id(1)
  q = q_ref[0].astype(jnp.float32)                     # [bq, D]
  n_i = n_ref[0].astype(jnp.float32)                   # [bq]
  q_seg = qseg_ref[0]                                  # [bq]
  q_pos = q_offset + i * block_q + jnp.arange(block_q) + 1
  last_q = q_offset + (i + 1) * block_q                # causal: keys beyond this are never seen
  num_k = jnp.minimum(pl.cdiv(kv_len, block_k), pl.cdiv(last_q, block_k))
  if score != "softmax":
    q = q / (jnp.sqrt(jnp.sum(q * q, axis=-1, keepdims=True)) + 1e-12)
    coef = log_d * jnp.log(jnp.maximum(n_i, 1.0))[:, None]

  def block(j):
    k = k_ref[0, pl.ds(j * block_k, block_k), :].astype(jnp.float32)
    v = v_ref[0, pl.ds(j * block_k, block_k), :].astype(jnp.float32)
    k_pos = j * block_k + jnp.arange(block_k) + 1
    mask = (k_pos[None, :] <= q_pos[:, None]) & (k_pos[None, :] <= kv_len)
    mask &= q_seg[:, None] == kseg_ref[0, pl.ds(j * block_k, block_k)][None, :]
    if score == "softmax":
      s = jnp.dot(q, k.T) * scale
    else:
      k = k / (jnp.sqrt(jnp.sum(k * k, axis=-1, keepdims=True)) + 1e-12)
      s = jax.nn.softplus(coef * jnp.dot(q, k.T))
    return s, v, mask

  bq, d = q.shape
  if score == "softmax":
    def body(j, carry):
      m, l, acc = carry
      s, v, mask = block(j)
      s = jnp.where(mask, s, _NEG)
      m_new = jnp.maximum(m, jnp.max(s, axis=-1))
      corr = jnp.exp(m - m_new)
      pr = jnp.where(mask, jnp.exp(s - m_new[:, None]), 0.0)
      return m_new, l * corr + jnp.sum(pr, -1), acc * corr[:, None] + jnp.dot(pr, v)

    init = (jnp.full((bq,), _NEG), jnp.zeros((bq,)), jnp.zeros((bq, d)))
    _, l, acc = jax.lax.fori_loop(0, num_k, body, init)
    o_ref[0] = (acc / jnp.where(l > 0, l, 1.0)[:, None]).astype(o_ref.dtype)
    return

  def pass1(j, carry):
    total, mx = carry
    s, _, mask = block(j)
    s = jnp.where(mask, s, 0.0)
    return total + jnp.sum(s, -1), jnp.maximum(mx, jnp.max(s, -1))

  total, mx = jax.lax.fori_loop(0, num_k, pass1, (jnp.zeros((bq,)), jnp.zeros((bq,))))
  denom = total + reference.EPS
  offset = jnp.where(n_i <= offset_rows, 0.0, 1.0)
  r_max = jnp.maximum(n_i * mx / denom - offset, 0.0)

  def pass2(j, carry):
    acc_a, acc_r, sum_r = carry
    s, v, mask = block(j)
    a = jnp.where(mask, s, 0.0) / denom[:, None]
    acc_a = acc_a + jnp.dot(a, v)
    if score == "lssar":
      r = jnp.maximum(n_i[:, None] * a - offset[:, None], 0.0) * mask
      r = (r / jnp.where(r_max > 0, r_max, 1.0)[:, None]) ** p
      acc_r, sum_r = acc_r + jnp.dot(r, v), sum_r + jnp.sum(r, -1)
    return acc_a, acc_r, sum_r

  acc_a, acc_r, sum_r = jax.lax.fori_loop(
      0, num_k, pass2, (jnp.zeros((bq, d)), jnp.zeros((bq, d)), jnp.zeros((bq,))))
  if score == "lssa":
    out = acc_a
  else:  # rows whose ReLU is all zero fall back to A, as in the reference
    out = jnp.where((sum_r > 0)[:, None], acc_r / jnp.where(sum_r > 0, sum_r, 1.0)[:, None], acc_a)
  o_ref[0] = out.astype(o_ref.dtype)


def _forward(q, k, v, segment_ids, *, score, q_offset, scale, p, offset_rows, block_q, block_k,
             interpret):
  b, tq, h, d = q.shape
  tk, kvh = k.shape[1], k.shape[2]
  group = h // kvh
  tq_p, tk_p = pl.cdiv(tq, block_q) * block_q, pl.cdiv(tk, block_k) * block_k
  q_r = jnp.pad(q, ((0, 0), (0, tq_p - tq), (0, 0), (0, 0))).transpose(0, 2, 1, 3).reshape(
      b * h, tq_p, d)
  k_r = jnp.pad(k, ((0, 0), (0, tk_p - tk), (0, 0), (0, 0))).transpose(0, 2, 1, 3).reshape(
      b * kvh, tk_p, d)
  v_r = jnp.pad(v, ((0, 0), (0, tk_p - tk), (0, 0), (0, 0))).transpose(0, 2, 1, 3).reshape(
      b * kvh, tk_p, d)
  seg = jnp.zeros((b, tq), jnp.int32) if segment_ids is None else segment_ids.astype(jnp.int32)
  qseg = jnp.pad(seg, ((0, 0), (0, tq_p - tq)), constant_values=-1)
  kseg = jnp.pad(seg if segment_ids is not None else jnp.zeros((b, tk), jnp.int32),
                 ((0, 0), (0, tk_p - tk)), constant_values=-2)
  n_i = jnp.broadcast_to(visible_counts(tq, tk, q_offset, segment_ids), (b, tq))
  n_i = jnp.pad(n_i, ((0, 0), (0, tq_p - tq)), constant_values=1.0)
  kv_index = lambda bh: (bh // h) * kvh + (bh % h) // group
  kernel = functools.partial(_kernel, score=score, block_q=block_q, block_k=block_k, kv_len=tk,
                             q_offset=q_offset, scale=scale, p=p, offset_rows=offset_rows,
                             log_d=math.log(d))
  out = pl.pallas_call(
      kernel,
      out_shape=jax.ShapeDtypeStruct((b * h, tq_p, d), q.dtype),
      grid=(b * h, tq_p // block_q),
      in_specs=[
          pl.BlockSpec((1, block_q, d), lambda bh, i: (bh, i, 0)),
          pl.BlockSpec((1, tk_p, d), lambda bh, i: (kv_index(bh), 0, 0)),
          pl.BlockSpec((1, tk_p, d), lambda bh, i: (kv_index(bh), 0, 0)),
          pl.BlockSpec((1, block_q), lambda bh, i: (bh // h, i)),
          pl.BlockSpec((1, tk_p), lambda bh, i: (bh // h, 0)),
          pl.BlockSpec((1, block_q), lambda bh, i: (bh // h, i)),
      ],
      out_specs=pl.BlockSpec((1, block_q, d), lambda bh, i: (bh, i, 0)),
      interpret=interpret,
  )(q_r, k_r, v_r, qseg, kseg, n_i)
  return out.reshape(b, h, tq_p, d).transpose(0, 2, 1, 3)[:, :tq]


def flash_attention(q, k, v, segment_ids=None, *, score="softmax", q_offset=0, scale=None,
                    p=15.0, reweight_offset_rows=3, block_q=128, block_k=128, interpret=False):
  """Causal attention forward in Pallas; gradients recompute through the reference."""
  scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
  opts = dict(score=score, q_offset=q_offset, scale=scale, p=p, offset_rows=reweight_offset_rows)

  @jax.custom_vjp
  def fn(q, k, v):
    return _forward(q, k, v, segment_ids, block_q=block_q, block_k=block_k, interpret=interpret,
                    **opts)

  def ref(q, k, v):
    return reference.attention(q, k, v, causal=True, score=score, segment_ids=segment_ids,
                               q_offset=q_offset, scale=scale, p=p,
                               reweight_offset_rows=reweight_offset_rows)

  def fwd(q, k, v):
    return fn(q, k, v), (q, k, v)

  def bwd(res, g):
    return jax.vjp(ref, *res)[1](g)

  fn.defvjp(fwd, bwd)
  return fn(q, k, v)
