"""The block stack slot and the per-call context every slot reads.

`Context` carries per-call options (static under jit): a per-layer MoE top-k (progressive
sparsification phases) and whether to record activation probes. A stack maps
(x, positions, segment_ids, ctx) -> (x, aux) with aux keys suffixed by layer
(`moe/maxvio/layer3`). `PlainStack` is a loop over distinct blocks; a recursion schedule
(Mixture-of-Recursions) or a scanned stack implements the same interface.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from flax import nnx

from effjax.models.layers import RMSNorm, Tag
from effjax.parallel.sharding import constrain

RESIDUAL_AXES = ("batch", "length", "embed")  # activation sharding of the residual stream


@dataclasses.dataclass(frozen=True)
class Context:
  """Per-call options, hashable (one compiled step per distinct context).

  moe_top_k: per-layer top-k (a schedule phase), or None for model.moe.top_k.
  probe: record mean |activation| of every module output (muP coordinate check), sown as
    nnx.Intermediate and returned by FunctionalModel.apply as aux 'act/*'."""
  moe_top_k: tuple | None = None
  probe: bool = False


class Block(nnx.Module):
  """Pre-norm block: x += attn(norm(x)); x += ffn(norm(x)). attn and ffn are built modules;
  the FFN returns (y, aux)."""

  def __init__(self, attn, ffn, *, d_model: int, eps: float, tag: Tag):
    self.attn_norm = RMSNorm(d_model, eps=eps)
    self.attn = attn
    self.ffn_norm = RMSNorm(d_model, eps=eps)
    self.ffn = ffn
    self.tag = tag

  def __call__(self, x_BxLxD, positions_BxL, segment_ids_BxL, ctx: Context):
    attn_in = self.attn_norm(x_BxLxD)
    attn_out = self.attn(attn_in, positions_BxL=positions_BxL, segment_ids_BxL=segment_ids_BxL)
    x_BxLxD = x_BxLxD + attn_out
    y_BxLxD, aux = self.ffn(self.ffn_norm(x_BxLxD), ctx)
    x_BxLxD = x_BxLxD + y_BxLxD
    if ctx.probe:
      self.sow(nnx.Intermediate, "probe_attn_logits", self.attn.logit_scale_probe(attn_in, positions_BxL))
      self.sow(nnx.Intermediate, "probe_attn_out", jnp.mean(jnp.abs(attn_out)))
      self.sow(nnx.Intermediate, "probe_mlp_out", jnp.mean(jnp.abs(y_BxLxD)))
      self.sow(nnx.Intermediate, "probe_residual", jnp.mean(jnp.abs(x_BxLxD)))
    return x_BxLxD, aux


def _block_forward(block, x_BxLxD, positions_BxL, segment_ids_BxL, ctx):
  return block(x_BxLxD, positions_BxL, segment_ids_BxL, ctx)


# remat: activations inside a block are recomputed in the backward pass; ctx is static.
_remat_block_forward = nnx.remat(_block_forward, static_argnums=(4,))


class PlainStack(nnx.Module):
  """Layers applied once each, in order (model.remat: each block rematerialised)."""

  def __init__(self, blocks, *, remat: bool = False):
    self.layers = nnx.List(blocks) if hasattr(nnx, "List") else list(blocks)
    self.remat = remat

  def __call__(self, x_BxLxD, positions_BxL, segment_ids_BxL, ctx: Context):
    aux = {}
    call = _remat_block_forward if self.remat else _block_forward
    for i, block in enumerate(self.layers):
      x_BxLxD, block_aux = call(block, x_BxLxD, positions_BxL, segment_ids_BxL, ctx)
      x_BxLxD = constrain(x_BxLxD, RESIDUAL_AXES)
      aux.update({f"{k}/layer{i}": v for k, v in block_aux.items()})
    return x_BxLxD, aux
