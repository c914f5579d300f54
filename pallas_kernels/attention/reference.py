"""Reference attention (pure jnp): the spec every kernel is tested against.

Scores (docs/attention.md; "Softplus attention with re-weighting", 2025):
  softmax  A = softmax(scale * q.k^T) over visible keys (scale defaults to 1/sqrt(d)).
  lssa     A_ij = softplus(log d * log N_i * qhat_i.khat_j) * M_ij, rows L1-normalised as
           A_i / (sum_j A_ij + EPS) with EPS = 1e-6 (qhat, khat: q, k L2-normalised per head,
           the built-in QK-norm; N_i: the number of keys row i may see; M: the 0/1 mask).
  lssar    R_ij = ReLU(N_i A_ij - O_i)^p with O_i = 0 for rows with N_i <= reweight_offset_rows
           (default 3) else 1, rows L1-normalised again. Each ReLU row is divided by its
           maximum before the power: exact, because the L1 normalisation cancels any row scale,
           and without it N^15 overflows fp32 once N > ~370. A row whose ReLU is all zero
           (A uniform; precisely: max_j N_i A_ij - O_i <= FLOOR = 1e-4) falls back to A, so
           no row ever divides by zero.
Positions: query row r sits at 1-based position q_offset + r + 1, key j at j + 1; causal means
key position <= query position. N_i = number of visible keys, so N_i = i at the start of a
sequence (log N_1 = 0: every score in row 1 is softplus(0), fine). With segment_ids, attention
stays within equal ids, so N_i is the (1-based) position of the query within its own segment.
Shapes: q [B, Tq, H, D], k and v [B, Tk, K, D] with K dividing H (GQA). All maths in fp32; the
output has q's dtype.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

EPS = 1e-6  # LSSA row normalisation A / (sum A + EPS): guards rows with no visible key.
# LSSAR rows whose largest N_i A_ij - O_i is <= FLOOR (all weights at most ~uniform, so the
# ReLU is zero up to rounding) fall back to A. A floor above rounding noise, rather than
# exact zero, lets a blocked kernel (row max in one pass, terms recomputed in another) make
# the same decision and never produce an empty row.
FLOOR = 1e-4


def l2_normalize(x):
  """x / ||x|| over the last axis in fp32 (rsqrt form: finite gradient at x = 0)."""
  x32 = x.astype(jnp.float32)
  return x32 * jax.lax.rsqrt(jnp.sum(x32 * x32, axis=-1, keepdims=True) + 1e-24)


def visibility_mask(q_len: int, kv_len: int, *, causal: bool, q_offset=0, q_segment_ids=None,
                    kv_segment_ids=None) -> jax.Array:
  """[B or 1, 1, Tq, Tk] boolean: may query row r see key j."""
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
                      kv_segment_ids=None, scale=None, p=15.0, reweight_offset_rows=3,
                      mask=None):
  """Attention weights [B, H, Tq, Tk] in fp32 (each row with a visible key sums to 1).

  mask: an explicit [B or 1, 1, Tq, Tk] visibility (replaces causal, q_offset and the
  segment ids; N_i is still its row count), e.g. a KV cache's slots (effjax/models/kv_cache.py)."""
  b, tq, h, d = q.shape
  tk = k.shape[1]
  kv_segment_ids = q_segment_ids if kv_segment_ids is None else kv_segment_ids
  if mask is None:
    mask = visibility_mask(tq, tk, causal=causal, q_offset=q_offset,
                           q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids)
  if score == "softmax":
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    logits = jnp.einsum("bqhd,bkhd->bhqk", q.astype(jnp.float32),
                        _expand_kv(k, h).astype(jnp.float32)) * scale
    # A finite fill keeps fully masked rows (padding) NaN-free; * mask then zeroes them.
    return jax.nn.softmax(jnp.where(mask, logits, -1e30), axis=-1) * mask
  n_i = jnp.sum(mask, axis=-1, keepdims=True).astype(jnp.float32)  # [B|1, 1, Tq, 1]
  cos = jnp.einsum("bqhd,bkhd->bhqk", l2_normalize(q), _expand_kv(l2_normalize(k), h))
  a = jax.nn.softplus(math.log(d) * jnp.log(jnp.maximum(n_i, 1.0)) * cos) * mask
  a = a / (jnp.sum(a, axis=-1, keepdims=True) + EPS)
  if score == "lssa":
    return a
  offset = jnp.where(n_i <= reweight_offset_rows, 0.0, 1.0)
  r = jax.nn.relu(n_i * a - offset) * mask
  row_max = jnp.max(r, axis=-1, keepdims=True)
  fallback = row_max <= FLOOR
  r = r / jnp.where(fallback, 1.0, row_max)   # now max r = 1: no overflow for any N, p
  r = jnp.where(r > 0, r, 0.0) ** p
  total = jnp.sum(r, axis=-1, keepdims=True)  # >= 1 unless fallback
  return jnp.where(fallback, a, r / jnp.where(fallback, 1.0, total))


def attention(q, k, v, *, causal=True, score="softmax", segment_ids=None, q_offset=0, scale=None,
              p=15.0, reweight_offset_rows=3, kv_segment_ids=None):
  """Reference attention output [B, Tq, H, D] (dtype of q).

  segment_ids are the query's ids; kv_segment_ids default to them (q_len == kv_len).
  """
  h = q.shape[2]
  w = attention_weights(q, k, causal=causal, score=score, q_offset=q_offset,
                        q_segment_ids=segment_ids, kv_segment_ids=kv_segment_ids, scale=scale,
                        p=p, reweight_offset_rows=reweight_offset_rows)
  out = jnp.einsum("bhqk,bkhd->bqhd", w, _expand_kv(v, h).astype(jnp.float32))
  return out.astype(q.dtype)


def chunked_attention(q, k, v, *, chunk_size: int, causal=True, score="softmax", segment_ids=None,
                      q_offset=0, scale=None, p=15.0, reweight_offset_rows=3):
  """The reference evaluated `chunk_size` queries at a time (lax.map over query chunks, each
  at its own q_offset), so long evaluation (8-16x the training length) holds only one
  [B, H, chunk_size, Tk] score block at a time instead of the full [Tq, Tk] matrix."""
  b, tq, h, d = q.shape
  n_chunks = -(-tq // chunk_size)
  pad = n_chunks * chunk_size - tq
  q_c = jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0))).reshape(
      b, n_chunks, chunk_size, h, d).swapaxes(0, 1)
  if segment_ids is not None:  # padded query rows get id -1: they see no key
    seg_c = jnp.pad(segment_ids, ((0, 0), (0, pad)), constant_values=-1).reshape(
        b, n_chunks, chunk_size).swapaxes(0, 1)
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
