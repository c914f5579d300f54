"""Multi-head attention with GQA, RoPE, optional QK-norm, and one `attend` function.

`attend` is the single place where the score function (softmax, LSSA, LSSAR;
docs/attention.md) and the kernel implementation (XLA reference or Pallas) are
chosen; the layer itself only projects, rotates and reshapes.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from effjax.config import AttentionConfig
from effjax.models import kv_cache
from effjax.models.layers import RMSNorm

def rope(x_BxLxHxD: jax.Array, positions_BxL: jax.Array, theta: float) -> jax.Array:
  """Rotary position embedding (Su et al. 2021), rotating pairs (i, i + D/2)."""
  d = x_BxLxHxD.shape[-1]
  freqs = theta ** (-jnp.arange(0, d // 2, dtype=jnp.float32) * 2 / d)
  angles_BxLxF = positions_BxL[..., None].astype(jnp.float32) * freqs
  sin = jnp.sin(angles_BxLxF)[:, :, None, :]
  cos = jnp.cos(angles_BxLxF)[:, :, None, :]
  x1, x2 = jnp.split(x_BxLxHxD.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_BxLxHxD.dtype)


def attention_mask(segment_ids_BxL: jax.Array | None, length: int) -> jax.Array:
  """[B or 1, 1, L, L] boolean mask: causal, and within the same segment if given."""
  causal_LxL = jnp.tril(jnp.ones((length, length), bool))
  if segment_ids_BxL is None:
    return causal_LxL[None, None]
  same_BxLxL = segment_ids_BxL[:, :, None] == segment_ids_BxL[:, None, :]
  return (causal_LxL[None] & same_BxLxL)[:, None]


def xla_softmax_attention(q_BxLxHxD, k_BxLxKxD, v_BxLxKxD, *, segment_ids_BxL=None,
                          scale: float, log_n_positions_BxL=None) -> jax.Array:
  """Reference causal softmax attention with GQA (K kv heads shared by H/K query heads)."""
  b, l, h, d = q_BxLxHxD.shape
  kv = k_BxLxKxD.shape[2]
  q_BxLxKxGxD = q_BxLxHxD.reshape(b, l, kv, h // kv, d)
  logits = jnp.einsum("bqkgd,bskd->bkgqs", q_BxLxKxGxD, k_BxLxKxD,
                      preferred_element_type=jnp.float32) * scale
  if log_n_positions_BxL is not None:  # softmax + log-n scaling baseline (docs/attention.md)
    log_n = jnp.log(jnp.maximum(log_n_positions_BxL.astype(jnp.float32), 1.0))
    logits = logits * jnp.maximum(log_n, 1.0)[:, None, None, :, None]
  mask = attention_mask(segment_ids_BxL, l)[:, :, None]  # [B,1,1,L,L]
  logits = jnp.where(mask, logits, -1e30)
  probs = jax.nn.softmax(logits, axis=-1).astype(v_BxLxKxD.dtype)
  out = jnp.einsum("bkgqs,bskd->bqkgd", probs, v_BxLxKxD)
  return out.reshape(b, l, h, v_BxLxKxD.shape[-1])  # QKR: q, k wider than v


def attend(q_BxLxHxD, k_BxLxKxD, v_BxLxKxD, *, config: AttentionConfig, segment_ids_BxL=None,
           positions_BxL=None, scale: float | None = None) -> jax.Array:
  """Causal attention: chooses the score function and the kernel implementation.

  scale: softmax logit scale (default 1/sqrt(d_head); muP passes alpha/d_head).
  """
  d = q_BxLxHxD.shape[-1]
  scale = 1.0 / math.sqrt(d) if scale is None else scale
  # effjax.resolve sets impl for the target devices: xla on CPU, 'auto:tpu' / 'auto:gpu'
  # (the kernels' dispatch picks that platform's Pallas kernel or falls back to the
  # reference); an unresolved auto takes the XLA path. Softmax runs on the fused XLA path
  # when asked for and for the log-n baseline (no kernel scales by log n).
  impl, _, platform = config.impl.partition(":")
  if impl == "auto" and not platform:
    impl = "xla"
  xla = impl == "xla" or config.log_n_scale
  if config.query_chunk and impl == "xla" and not config.log_n_scale:
    from pallas_kernels.attention import reference  # pylint: disable=g-import-not-at-top
    return reference.chunked_attention(
        q_BxLxHxD, k_BxLxKxD, v_BxLxKxD, chunk_size=config.query_chunk, causal=True,
        score=config.score, segment_ids=segment_ids_BxL, scale=scale, p=config.lssar_p,
        reweight_offset_rows=config.lssar_offset_rows)
  if config.score == "softmax" and xla:
    log_n = positions_BxL + 1 if config.log_n_scale else None
    return xla_softmax_attention(q_BxLxHxD, k_BxLxKxD, v_BxLxKxD, segment_ids_BxL=segment_ids_BxL,
                                 scale=scale, log_n_positions_BxL=log_n)
  from pallas_kernels.attention import api  # pylint: disable=g-import-not-at-top
  options = {"scale": scale} if config.score == "softmax" else {}
  if config.score == "lssar":
    options = dict(p=config.lssar_p, reweight_offset_rows=config.lssar_offset_rows)
  # A named kernel runs on its own platform; 'auto:<platform>' was resolved for the target.
  platform = platform or getattr(api.BACKENDS.get(impl), "platform", None)
  return api.attention(q_BxLxHxD, k_BxLxKxD, v_BxLxKxD, causal=True, score=config.score,
                       segment_ids=segment_ids_BxL, implementation=impl, platform=platform,
                       **options)


class Attention(nnx.Module):
  """GQA self-attention: q/k/v/o projections (from the builder's projection factory), RoPE,
  optional QK-norm; the score function and kernel are chosen in `attend`.

  linear(kind, d_in, d_out, *, axes, std, zero_init=False) -> Linear: the projection
  factory; kind is "qkv" for q/k/v and "attn_out" for o.
  """

  def __init__(self, d_model: int, n_heads: int, n_kv_heads: int, head_dim: int, *,
               config: AttentionConfig, rope_theta: float, init_std: float, n_layers: int,
               norm_eps: float, linear, scale: float | None = None,
               zero_init_query: bool = False, use_rope: bool = True):
    self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, head_dim
    self.config, self.rope_theta, self.use_rope = config, rope_theta, use_rope
    self.scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    self.q = linear("qkv", d_model, n_heads * head_dim, axes=("embed", "heads"), std=init_std,
                    zero_init=zero_init_query, slot="q")
    self.k = linear("qkv", d_model, n_kv_heads * head_dim, axes=("embed", "kv_heads"),
                    std=init_std, slot="k")
    self.v = linear("qkv", d_model, n_kv_heads * head_dim, axes=("embed", "kv_heads"),
                    std=init_std, slot="v")
    # Output projection init scaled by 1/sqrt(2 * n_layers) (GPT-2 residual scaling).
    self.o = linear("attn_out", n_heads * head_dim, d_model, axes=("heads", "embed"),
                    std=init_std / math.sqrt(2 * n_layers), slot="o")
    if config.qk_norm:
      self.q_norm = RMSNorm(head_dim, eps=norm_eps, axis_name="head_dim")
      self.k_norm = RMSNorm(head_dim, eps=norm_eps, axis_name="head_dim")
    else:
      self.q_norm = self.k_norm = None

  def _project(self, slot: str, x, weights):
    """A projection; one whose weight is shared (MASA etc.) takes its built weight."""
    if weights is not None and slot in weights:
      return getattr(self, slot)(x, weights[slot])
    return getattr(self, slot)(x)

  def _qkv(self, x_BxLxD, positions_BxL, weights=None):
    b, l, _ = x_BxLxD.shape
    q = self._project("q", x_BxLxD, weights).reshape(b, l, self.n_heads, self.head_dim)
    k = self._project("k", x_BxLxD, weights).reshape(b, l, self.n_kv_heads, self.head_dim)
    v = self._project("v", x_BxLxD, weights).reshape(b, l, self.n_kv_heads, self.head_dim)
    if self.q_norm is not None:
      q, k = self.q_norm(q), self.k_norm(k)
    if not self.use_rope:  # absolute positions were added to the embedding
      return q, k, v
    return rope(q, positions_BxL, self.rope_theta), rope(k, positions_BxL, self.rope_theta), v

  def logit_scale_probe(self, x_BxLxD, positions_BxL, weights=None) -> jax.Array:
    """Mean |scaled q.k| over causal pairs (coordinate checks only; recomputes q and k)."""
    q, k, _ = self._qkv(x_BxLxD, positions_BxL, weights)
    k = jnp.repeat(k, q.shape[2] // k.shape[2], axis=2)
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) * self.scale
    causal = jnp.tril(jnp.ones(logits.shape[-2:], bool))
    return jnp.sum(jnp.abs(logits) * causal) / (jnp.sum(causal) * logits.shape[0] * logits.shape[1])

  def _attend(self, q, k, v, positions_BxL, segment_ids_BxL):
    return attend(q, k, v, config=self.config, segment_ids_BxL=segment_ids_BxL,
                  positions_BxL=positions_BxL, scale=self.scale)

  def __call__(self, x_BxLxD, *, positions_BxL, segment_ids_BxL=None, weights=None, kv=None):
    """weights: {slot: W} of this layer's shared projections (effjax/models/masa.py).
    kv: keys and values computed elsewhere (recursive KV sharing, effjax/models/mor.py: an
    object with k_BxTxKxD, v_BxTxKxE and mask_Bx1xLxT): the queries attend to those instead
    of their own keys, with that mask (segment_ids_BxL is then unused)."""
    b, l, _ = x_BxLxD.shape
    q, k, v = self._qkv(x_BxLxD, positions_BxL, weights)
    if kv is None:
      out = self._attend(q, k, v, positions_BxL, segment_ids_BxL)
    else:
      out = self._attend_cached(q, kv.k_BxTxKxD, kv.v_BxTxKxE, positions_BxL, None,
                                mask=kv.mask_Bx1xLxT)
    return self._project("o", out.reshape(b, l, self.n_heads * self.head_dim), weights)

  # ---- incremental decoding (effjax/models/kv_cache.py)
  def kv_widths(self) -> tuple[int, int]:
    """Widths of one cached key and one cached value per kv head."""
    return self.head_dim, self.head_dim

  def init_cache(self, batch: int, max_len: int, dtype) -> kv_cache.KVCache:
    return kv_cache.KVCache.zeros(batch, max_len, self.n_kv_heads, *self.kv_widths(), dtype)

  def _attend_cached(self, q, k, v, positions_BxS, kv_pos_BxT, score=None, mask=None):
    c = self.config
    return kv_cache.attend_cached(q, k, v, positions_BxS=positions_BxS, kv_pos_BxT=kv_pos_BxT,
                                  score=score or c.score, scale=self.scale,
                                  log_n_scale=c.log_n_scale, p=c.lssar_p,
                                  offset_rows=c.lssar_offset_rows, mask_Bx1xSxT=mask)

  def decode(self, x_BxSxD, *, positions_BxS, cache):
    """The S new tokens' outputs and the updated cache: equal to the full forward's rows at
    these positions when the cache holds the tokens before them."""
    b, s, _ = x_BxSxD.shape
    q, k, v = self._qkv(x_BxSxD, positions_BxS)
    cache, k_all, v_all, kv_pos = cache.update(k, v, positions_BxS)
    out = self._attend_cached(q, k_all, v_all, positions_BxS, kv_pos)
    return self.o(out.reshape(b, s, self.n_heads * self.head_dim)), cache
