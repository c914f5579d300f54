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
                     Here: KVCache (contiguous), CompactKVCache (keeps only the tokens a
                     mask selects: recursion-wise caching) and ReadOnlyKV (another cache's
                     keys, read without writing: recursive KV sharing).
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


@flax.struct.dataclass
class CompactKVCache:
  """A cache that keeps only some of the new tokens (recursion-wise caching of
  Mixture-of-Recursions, effjax/models/mor.py): kept tokens are appended in arrival order,
  so the filled slots are 0 .. count - 1 of each row and `count` is the number of entries.

  Slots that would overflow the buffer are dropped (count still counts them, so
  `count > slots` reveals an overflow). The `keep` mask is passed per call through
  `keeping`, not stored: the cache's shapes do not depend on how many tokens arrive."""
  k_BxTxKxD: jax.Array
  v_BxTxKxE: jax.Array
  kv_pos_BxT: jax.Array
  count_B: jax.Array

  @classmethod
  def zeros(cls, batch: int, slots: int, n_kv_heads: int, k_dim: int, v_dim: int,
            dtype) -> "CompactKVCache":
    return cls(jnp.zeros((batch, slots, n_kv_heads, k_dim), dtype),
               jnp.zeros((batch, slots, n_kv_heads, v_dim), dtype),
               jnp.full((batch, slots), EMPTY, jnp.int32), jnp.zeros((batch,), jnp.int32))

  def keeping(self, keep_BxS) -> "_Keeping":
    """This cache as the attention's `cache` argument, storing only the tokens keep marks."""
    return _Keeping(self, keep_BxS)

  def append(self, k_BxSxKxD, v_BxSxKxE, positions_BxS, keep_BxS):
    """Appends the kept new tokens; returns (cache, keys, values, kv positions)."""
    slots = self.kv_pos_BxT.shape[-1]
    keep = keep_BxS.astype(jnp.int32)
    slot_BxS = self.count_B[:, None] + jnp.cumsum(keep, axis=1) - 1
    slot_BxS = jnp.where(keep_BxS, slot_BxS, slots)  # out of range: dropped
    rows = jnp.arange(keep.shape[0])[:, None]
    put = lambda buf, new: buf.at[rows, slot_BxS].set(new.astype(buf.dtype), mode="drop")
    cache = CompactKVCache(put(self.k_BxTxKxD, k_BxSxKxD), put(self.v_BxTxKxE, v_BxSxKxE),
                           put(self.kv_pos_BxT, positions_BxS.astype(jnp.int32)),
                           self.count_B + jnp.sum(keep, axis=1))
    return cache, cache.k_BxTxKxD, cache.v_BxTxKxE, cache.kv_pos_BxT


class _Keeping:
  """A CompactKVCache with the keep mask of one call (the `update` protocol of KVCache)."""

  def __init__(self, cache: CompactKVCache, keep_BxS):
    self.cache, self.keep_BxS = cache, keep_BxS

  def update(self, k_BxSxKxD, v_BxSxKxE, positions_BxS):
    return self.cache.append(k_BxSxKxD, v_BxSxKxE, positions_BxS, self.keep_BxS)


class ReadOnlyKV:
  """Another cache's keys and values, read without writing (recursive KV sharing: later
  recursions attend to the first recursion's cache). `update` ignores the new keys and
  returns (None, keys, values, kv positions) of the source, already updated this call."""

  def __init__(self, source):
    self.source = source

  def update(self, k_BxSxKxD, v_BxSxKxE, positions_BxS):
    del k_BxSxKxD, v_BxSxKxE, positions_BxS
    s = self.source
    return None, s.k_BxTxKxD, s.v_BxTxKxE, s.kv_pos_BxT


def visible(positions_BxS, kv_pos_BxT) -> jax.Array:
  """[B, 1, S, T]: query s sees slot t when the slot holds a token at or before it."""
  kv = kv_pos_BxT[:, None, :]
  return ((kv >= 0) & (kv <= positions_BxS[:, :, None]))[:, None]


def attend_cached(q_BxSxHxD, k_BxTxKxD, v_BxTxKxE, *, positions_BxS, kv_pos_BxT, score: str,
                  scale: float, log_n_scale: bool = False, p: float = 15.0,
                  offset_rows: int = 3, mask_Bx1xSxT=None) -> jax.Array:
  """Attention of S new queries over a cache's keys: [B, S, H, E] in q's dtype.

  The same maths as the full forward (effjax/models/attention.attend): softmax scaled by
  `scale` (times max(log n, 1) under the log-n baseline, n the 1-based query position), or
  LSSA / LSSAR from the reference with the cache's visibility as the mask (N_i = the number
  of visible keys). mask_Bx1xSxT: an explicit visibility (e.g. causal by slot and within a
  packed document, effjax/models/mor.py) instead of the one the kv positions give."""
  if mask_Bx1xSxT is None:
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

