"""KV caches for incremental decoding (docs/generate.md).

Decoding runs the model on a few new tokens at a time (the prompt, then one token per step)
against the keys and values of the tokens before them. Three pieces, each replaceable:

  KVCache            one attention layer's storage. `update(k_new, v_new, positions)` stores
                     what it keeps of the new keys/values and returns the keys, values and
                     key positions the new queries attend to. This class is the STRATEGY:
                     it decides what is stored and which keys are visible.
  stack.init_cache   the stack slot builds the caches of its layers (one per layer here;
  stack.decode       a Mixture-of-Recursions stack builds one per recursion step, or shares
                     one across steps) and threads them through its blocks.
  attend_cached      the score maths over whatever keys a cache returns: softmax (with the
                     log-n baseline), LSSA and LSSAR (pallas_kernels/attention/reference.py
                     with an explicit visibility mask).

Key positions mark the slots: a slot holding the token at position p has kv position p; an
empty slot has EMPTY. A query at position t sees every slot with 0 <= kv position <= t, so a
cache may store tokens in any slot order, skip tokens (recursion-wise caching) or hand back
another layer's keys (KV sharing) without the attention knowing.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

EMPTY = -1  # kv position of a slot that holds no token


@flax.struct.dataclass
class KVCache:
  """The contiguous cache: the token at position p is stored in slot p (0 <= p < max_len).

  k_BxTxKxD, v_BxTxKxE: keys and values of T = max_len slots; kv_pos_BxT: each slot's token
  position, EMPTY where nothing was written."""
  k_BxTxKxD: jax.Array
  v_BxTxKxE: jax.Array
  kv_pos_BxT: jax.Array

  @classmethod
  def zeros(cls, batch: int, max_len: int, n_kv_heads: int, k_dim: int, v_dim: int,
            dtype) -> "KVCache":
    return cls(jnp.zeros((batch, max_len, n_kv_heads, k_dim), dtype),
               jnp.zeros((batch, max_len, n_kv_heads, v_dim), dtype),
               jnp.full((batch, max_len), EMPTY, jnp.int32))

  @property
  def max_len(self) -> int:
    return self.kv_pos_BxT.shape[-1]

  def update(self, k_BxSxKxD, v_BxSxKxE, positions_BxS):
    """Writes the S new tokens at slots positions[:, 0] ... (consecutive positions, the same
    start in every row) and returns (cache, keys, values, kv positions) to attend to."""
    start = positions_BxS[0, 0]
    write = lambda buf, new: jax.lax.dynamic_update_slice_in_dim(buf, new.astype(buf.dtype),
                                                                 start, axis=1)
    cache = KVCache(write(self.k_BxTxKxD, k_BxSxKxD), write(self.v_BxTxKxE, v_BxSxKxE),
                    write(self.kv_pos_BxT, positions_BxS.astype(jnp.int32)))
    return cache, cache.k_BxTxKxD, cache.v_BxTxKxE, cache.kv_pos_BxT


def visible(positions_BxS, kv_pos_BxT) -> jax.Array:
  """[B, 1, S, T]: query s sees slot t when the slot holds a token at or before it."""
  kv = kv_pos_BxT[:, None, :]
  return ((kv >= 0) & (kv <= positions_BxS[:, :, None]))[:, None]


def attend_cached(q_BxSxHxD, k_BxTxKxD, v_BxTxKxE, *, positions_BxS, kv_pos_BxT, score: str,
                  scale: float, log_n_scale: bool = False, p: float = 15.0,
                  offset_rows: int = 3) -> jax.Array:
  """Attention of S new queries over a cache's keys: [B, S, H, E] in q's dtype.

  The same maths as the full forward (effjax/models/attention.attend): softmax scaled by
  `scale` (times max(log n, 1) under the log-n baseline, n the 1-based query position), or
  LSSA / LSSAR from the reference with the cache's visibility as the mask (N_i = the number
  of visible keys)."""
  mask_Bx1xSxT = visible(positions_BxS, kv_pos_BxT)
  if score != "softmax":
    from pallas_kernels.attention import reference  # pylint: disable=g-import-not-at-top
    h = q_BxSxHxD.shape[2]
    w = reference.attention_weights(q_BxSxHxD, k_BxTxKxD, score=score, p=p,
                                    reweight_offset_rows=offset_rows, mask=mask_Bx1xSxT)
    v = jnp.repeat(v_BxTxKxE, h // v_BxTxKxE.shape[2], axis=2).astype(jnp.float32)
    return jnp.einsum("bhqk,bkhd->bqhd", w, v).astype(q_BxSxHxD.dtype)
  b, s, h, d = q_BxSxHxD.shape
  kv = k_BxTxKxD.shape[2]
  q_BxSxKxGxD = q_BxSxHxD.reshape(b, s, kv, h // kv, d)
  logits = jnp.einsum("bqkgd,bskd->bkgqs", q_BxSxKxGxD, k_BxTxKxD,
                      preferred_element_type=jnp.float32) * scale
  if log_n_scale:
    log_n = jnp.log(jnp.maximum((positions_BxS + 1).astype(jnp.float32), 1.0))
    logits = logits * jnp.maximum(log_n, 1.0)[:, None, None, :, None]
  logits = jnp.where(mask_Bx1xSxT[:, :, None], logits, -1e30)
  probs = jax.nn.softmax(logits, axis=-1).astype(v_BxTxKxE.dtype)
  out = jnp.einsum("bkgqs,bskd->bqkgd", probs, v_BxTxKxE)
  return out.reshape(b, s, h, v_BxTxKxE.shape[-1])

