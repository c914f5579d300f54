"""QKR attention (OFQ, Liu et al. 2023, Sec. 4.3): the query-key reparameterisation.

Scores q_i . k_j = x_i W_q^h (x_j W_k^h)^T = (x_i W_qk^h) . x_j are computed through the
per-head product W_qk^h = W_q^h W_k^hT [d_model, d_model], which the quantizer hooks quantize
(with the input x) instead of W_q and W_k. Needs absolute positions (RoPE would sit between
q and k) and no QK-norm, and runs the XLA softmax reference (q and k are d_model wide).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from effjax.models.attention import Attention, xla_softmax_attention


def qk_product(wq_DxHE: jax.Array, wk_DxKE: jax.Array, n_heads: int, n_kv_heads: int):
  """W_qk [d_model, heads * d_model] whose column block h is W_q^h W_k^{g(h)}T, g(h) the GQA
  group of q head h."""
  d, head_dim = wq_DxHE.shape[0], wq_DxHE.shape[1] // n_heads
  wq_DxHxE = wq_DxHE.reshape(d, n_heads, head_dim)
  wk_DxHxE = jnp.repeat(wk_DxKE.reshape(d, n_kv_heads, head_dim), n_heads // n_kv_heads, axis=1)
  return jnp.einsum("dhe,fhe->dhf", wq_DxHxE, wk_DxHxE).reshape(d, n_heads * d)


class QKRAttention(Attention):
  """Attention whose q/k projections enter only through their quantized per-head product.

  plain_linear builds q and k (not quantized themselves); qk_hooks ({name: LinearHook}, as a
  quantized Linear's) quantize the product W_qk (per output column over the fan-in) and the
  inputs; v and o come from the projection factory like any attention's."""

  def __init__(self, *args, plain_linear, qk_hooks, linear, **kwargs):
    if kwargs.get("use_rope", True) or kwargs["config"].qk_norm:
      raise ValueError("QKR needs absolute positions (use_rope=False) and no QK-norm")

    def projections(kind, *a, **kw):  # q and k plain, v and o from the factory
      return (plain_linear if kw.get("slot") in ("q", "k") else linear)(kind, *a, **kw)

    super().__init__(*args, linear=projections, **kwargs)
    self.qk_hook_names = tuple(qk_hooks)
    for name, hook in qk_hooks.items():
      setattr(self, "qk_" + name, hook)

  @property
  def qk_hooks(self):
    return [getattr(self, "qk_" + name) for name in self.qk_hook_names]

  def raw_qk_product(self) -> jax.Array:
    return qk_product(self.q.kernel[...], self.k.kernel[...], self.n_heads, self.n_kv_heads)

  def qk_product(self) -> jax.Array:
    """W_qk as the scores use it (quantized by the hooks)."""
    w = self.raw_qk_product()
    for hook in self.qk_hooks:
      w = hook.weight(w)
    return w

  def _qkv(self, x_BxLxD, positions_BxL, weights=None):
    """Queries x W_qk^h [B, L, H, d_model]; keys the (quantized) inputs themselves."""
    del positions_BxL, weights  # attention sharing is refused with QKR (model.masa check)
    b, l, d = x_BxLxD.shape
    xq_BxLxD = x_BxLxD
    for hook in self.qk_hooks:
      xq_BxLxD = hook.input(xq_BxLxD)
    w_DxHxD = self.qk_product().astype(xq_BxLxD.dtype).reshape(d, self.n_heads, d)
    q = jnp.einsum("bld,dhf->blhf", xq_BxLxD, w_DxHxD)
    k = jnp.broadcast_to(xq_BxLxD[:, :, None, :], (b, l, self.n_kv_heads, d))
    v = self.v(x_BxLxD).reshape(b, l, self.n_kv_heads, self.head_dim)
    return q, k, v

  def _attend(self, q, k, v, positions_BxL, segment_ids_BxL):
    log_n = positions_BxL + 1 if self.config.log_n_scale else None
    return xla_softmax_attention(q, k, v, segment_ids_BxL=segment_ids_BxL, scale=self.scale,
                                 log_n_positions_BxL=log_n)

  def kv_widths(self) -> tuple[int, int]:
    """Keys are the (quantized) inputs: d_model wide."""
    return self.q.kernel.shape[-2], self.head_dim  # [-2]: d_in (also when stacked)

  def _attend_cached(self, q, k, v, positions_BxS, kv_pos_BxT, score=None, mask=None):
    del score  # QKR is softmax-only
    return super()._attend_cached(q, k, v, positions_BxS, kv_pos_BxT, score="softmax",
                                  mask=mask)
