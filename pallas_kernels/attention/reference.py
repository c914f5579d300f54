"""Reference attention (pure jnp): the spec every kernel is tested against.

Scores (TECHNIQUES.md 3.2; "Softplus attention with re-weighting", 2025):
  softmax  A = softmax(scale * q.k^T + mask)
  lssa     A_ij = softplus(log d * log N_i * qhat_i.khat_j) * M_ij, rows L1-normalised
           (qhat, khat: L2-normalised per head; N_i: number of keys row i may see)
  lssar    R_ij = ReLU(N_i A_ij - O_i)^p, O_i = 0 for N_i <= offset_rows else 1, rows
           L1-normalised; each ReLU row is divided by its maximum before the power (exact,
           since the L1 normalisation cancels any row scale; without it N^15 overflows fp32
           once N > ~370). A row whose ReLU is all zero (a uniform A row) falls back to A.
Positions: query row r sits at 1-based position q_offset + r + 1, key j at j + 1; causal
means key position <= query position. With segment_ids, attention stays within equal
ids, so N_i is the position within the row's own segment.
Shapes: q [B, Tq, H, D], k and v [B, Tk, K, D] with K dividing H (GQA).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

EPS = 1e-6  # LSSA row normalisation: A / (sum A + EPS)


def visibility_mask(q_len: int, kv_len: int, *, causal: bool, q_offset=0, q_segment_ids=None,
                    kv_segment_ids=None) -> jax.Array:
  """[B or 1, 1, Tq, Tk] boolean mask."""
  q_pos = q_offset + jnp.arange(q_len) + 1
  k_pos = jnp.arange(kv_len) + 1
  mask = (k_pos[None, :] <= q_pos[:, None]) if causal else jnp.ones((q_len, kv_len), bool)
  mask = mask[None, None]
  if q_segment_ids is not None:
    mask = mask & (q_segment_ids[:, None, :, None] == kv_segment_ids[:, None, None, :])
  return mask


def _expand_kv(x_BxTxKxD, heads: int):
  return jnp.repeat(x_BxTxKxD, heads // x_BxTxKxD.shape[2], axis=2)


def attention_weights(q, k, *, causal=True, score="softmax", q_offset=0, q_segment_ids=None,
                      kv_segment_ids=None, scale=None, p=15.0, reweight_offset_rows=3):
  """Attention weights [B, H, Tq, Tk] in fp32 (each visible row sums to 1)."""
  b, tq, h, d = q.shape
  tk = k.shape[1]
  q32 = q.astype(jnp.float32)
  k32 = _expand_kv(k, h).astype(jnp.float32)
  mask = visibility_mask(tq, tk, causal=causal, q_offset=q_offset, q_segment_ids=q_segment_ids,
                         kv_segment_ids=kv_segment_ids)
  if score == "softmax":
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    logits = jnp.einsum("bqhd,bkhd->bhqk", q32, k32) * scale
    logits = jnp.where(mask, logits, -jnp.inf)
    return jnp.nan_to_num(jax.nn.softmax(logits, axis=-1))  # fully masked rows -> 0
  qh = q32 / (jnp.linalg.norm(q32, axis=-1, keepdims=True) + 1e-12)
  kh = k32 / (jnp.linalg.norm(k32, axis=-1, keepdims=True) + 1e-12)
  n_i = jnp.sum(mask, axis=-1, keepdims=True).astype(jnp.float32)  # [B|1, 1, Tq, 1]
  cos = jnp.einsum("bqhd,bkhd->bhqk", qh, kh)
  a = jax.nn.softplus(math.log(d) * jnp.log(jnp.maximum(n_i, 1.0)) * cos) * mask
  a = a / (jnp.sum(a, axis=-1, keepdims=True) + EPS)
  if score == "lssa":
    return a
  offset = jnp.where(n_i <= reweight_offset_rows, 0.0, 1.0)
  r = jax.nn.relu(n_i * a - offset) * mask
  row_max = jnp.max(r, axis=-1, keepdims=True)
  r = r / jnp.where(row_max > 0, row_max, 1.0)
  r = jnp.where(r > 0, r, 0.0) ** p
  total = jnp.sum(r, axis=-1, keepdims=True)
  return jnp.where(total > 0, r / jnp.where(total > 0, total, 1.0), a)


def attention(q, k, v, *, causal=True, score="softmax", segment_ids=None, q_offset=0, scale=None,
              p=15.0, reweight_offset_rows=3, kv_segment_ids=None):
  """Reference attention output [B, Tq, H, D] (dtype of q)."""
  h = q.shape[2]
  q_seg = segment_ids
  kv_seg = segment_ids if kv_segment_ids is None else kv_segment_ids
  w = attention_weights(q, k, causal=causal, score=score, q_offset=q_offset, q_segment_ids=q_seg,
                        kv_segment_ids=kv_seg, scale=scale, p=p,
                        reweight_offset_rows=reweight_offset_rows)
  out = jnp.einsum("bhqk,bkhd->bqhd", w, _expand_kv(v, h).astype(jnp.float32))
  return out.astype(q.dtype)


def chunked_attention(q, k, v, *, chunk_size: int, causal=True, score="softmax", segment_ids=None,
                      q_offset=0, scale=None, p=15.0, reweight_offset_rows=3):
  """The reference evaluated `chunk_size` queries at a time (lax.map over chunks), so long
  evaluation (8-16x the training length) never materialises the full [Tq, Tk] scores."""
  b, tq, h, d = q.shape
  n_chunks = -(-tq // chunk_size)
  pad = n_chunks * chunk_size - tq
  q_p = jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0)))
  q_c = q_p.reshape(b, n_chunks, chunk_size, h, d).swapaxes(0, 1)
  if segment_ids is not None:
    seg_p = jnp.pad(segment_ids, ((0, 0), (0, pad)), constant_values=-1)
    seg_c = seg_p.reshape(b, n_chunks, chunk_size).swapaxes(0, 1)
  else:
    seg_c = jnp.zeros((n_chunks, b, chunk_size), jnp.int32)

  def one(args):
    i, q_i, seg_i = args
    return attention(q_i, k, v, causal=causal, score=score,
                     segment_ids=seg_i if segment_ids is not None else None,
                     kv_segment_ids=segment_ids, q_offset=q_offset + i * chunk_size, scale=scale,
                     p=p, reweight_offset_rows=reweight_offset_rows)

  out = jax.lax.map(one, (jnp.arange(n_chunks), q_c, seg_c))
  return out.swapaxes(0, 1).reshape(b, n_chunks * chunk_size, h, d)[:, :tq]
