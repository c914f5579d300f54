"""The model builder: the one place that reads technique config sections and assembles the
model from slots.

  embedding      token table (+ learned absolute positions)
  stack          PlainStack of blocks, or ScannedStack (model.scan_layers: the same blocks
                 stacked on a leading layer axis, run by one scan); remat optional; MoR
                 plugs in here
  attention      Attention, or QKRAttention under quant.qkr
  ffn            SwiGLU, or MoE in the layers model.moe.layers names (model.arch=lipschitz:
                 the GELU MLP, norm-free convex-residual blocks, no final norm; 1/d logits)
  projections    `linear(kind, d_in, d_out, *, axes, std, slot)`: every block linear comes
                 from this factory, which tags it (kind, layer, slot) and attaches the
                 quantizer hooks of quant.* for the kinds in quant.layers, or the
                 reparameterisation of constraints.reparam (weight norm / conditioning); under
                 model.attention.sharing the attention slots in model.masa.projections
                 become low-rank, or SharedLinears whose weights the stack builds once per
                 step (MASA atoms, shared matrix sets: effjax/models/masa.py)

Modules receive built parts and never see the config sections they do not run. Parameters
are created in a fixed order (embedding, positions, per layer: q, k, v, o, FFN; final
norm, head), so a seed gives the same weights as before the builder existed.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from effjax.config import Config
from effjax.models.attention import Attention
from effjax.models import masa
from effjax.models.layers import Embed, Linear, RMSNorm, Tag
from effjax.models.lipschitz import GeluMLP, Identity, LipschitzBlock
from effjax.models.mlp import SwiGLU
from effjax.models.moe import MoE, moe_layer_indices
from effjax.models.mor import RecursionStack
from effjax.models.qkr import QKRAttention
from effjax.models.stack import Block, PlainStack, ScannedStack
from effjax.models.transformer import (Dims, Transformer, attention_scale, expert_dim,
                                       hidden_init_std, width_mult)
from effjax.constraints.reparam import make_reparam
# A module, not its names: `python -m effjax.quant.export` imports effjax.quant first, and
# effjax.quant.hooks (which imports effjax.models.layers) is then only partly initialised.
from effjax.quant import hooks as quant_hooks


class Builder:
  """Builds a Transformer for `config` (dims resolved; batch_groups: data-parallel batch
  shards for per-shard balance losses)."""

  def __init__(self, config: Config, dims: Dims, *, batch_groups: int, rngs: nnx.Rngs):
    self.config, self.model_config, self.dims = config, config.model, dims
    self.batch_groups, self.rngs = batch_groups, rngs
    self.quant = config.quant if config.quant.method != "none" else None
    self.moe_layers = moe_layer_indices(config.model.moe, dims.n_layers)
    self.lipschitz = config.model.arch == "lipschitz"
    self.reparam = config.constraints if config.constraints.reparam != "none" else None
    self.shared_slots = masa.shared_slots(config.model)
    self.shared_specs: dict[str, masa.ProjectionSpec] = {}  # slot -> dense shape and init

  # ---- projections
  def linear_for(self, layer: int | None):
    """The projection factory for `layer`: (kind, d_in, d_out, *, axes, std, slot, ...)."""

    def make(kind: str, d_in: int, d_out: int, *, axes, std=None, slot: str = "", **kwargs):
      hooks = None
      if self.quant is not None and kind in self.quant.layers:
        hooks = quant_hooks.make_hooks(self.quant, d_in, d_out, axes=axes,
                                       std=d_in ** -0.5 if std is None else std)
      if kind in ("qkv", "attn_out") and slot in self.shared_slots:
        return self.shared_projection(d_in, d_out, axes=axes, std=std,
                                      tag=Tag(kind, layer, slot), hooks=hooks, **kwargs)
      if self.reparam is not None and kind in self.reparam.reparam_kinds:
        hooks = make_reparam(self.reparam, d_in, d_out, axes=axes,
                             std=d_in ** -0.5 if std is None else std)
      linear = Linear(d_in, d_out, rngs=self.rngs, axes=axes, std=std, hooks=hooks,
                      tag=Tag(kind, layer, slot), **kwargs)
      if self.lipschitz and not kwargs.get("zero_init"):
        linear.kernel[...] = self.orthogonal_at_w_max(d_in, d_out)
      return linear
    return make

  def orthogonal_at_w_max(self, d_in: int, d_out: int):
    """model.arch=lipschitz: a block matrix starts semi-orthogonal with RMS->RMS norm
    sqrt(d_in / d_out) * sigma_max = constraints.w_max (every singular value equal), as in
    the Lipschitz-transformer paper's init; a Gaussian at init_std would start far inside the
    bound, with near-zero logits in a norm-free model."""
    q = jax.nn.initializers.orthogonal()(self.rngs.params(), (d_in, d_out), jnp.float32)
    return self.config.constraints.w_max * (d_out / d_in) ** 0.5 * q

  def unit_rms_rows(self, table_VxD):
    """model.arch=lipschitz: every token embedding starts at RMS norm constraints.embed_max
    (1 when 0), as in the Lipschitz-transformer paper; a std-0.02 table would give a residual
    stream, and logits, near zero in a norm-free model."""
    target = self.config.constraints.embed_max or 1.0
    rms = jnp.sqrt(jnp.mean(jnp.square(table_VxD), axis=-1, keepdims=True))
    return target * table_VxD / rms

  def shared_projection(self, d_in, d_out, *, axes, std, tag, hooks, zero_init=False):
    """A shared attention projection (model.attention.sharing): low-rank, or a SharedLinear
    whose weight the stack builds (its dense shape and init recorded for the weight source)."""
    del zero_init  # refused for shared slots by the config check (model.zero_init_query)
    std = d_in ** -0.5 if std is None else std
    if self.model_config.attention.sharing == "lowrank":
      rank = masa.lowrank_rank(self.model_config, self.dims)
      return masa.LowRankLinear(d_in, d_out, rank, rngs=self.rngs, axes=axes, std=std,
                                hooks=hooks, tag=tag)
    self.shared_specs[tag.slot] = masa.ProjectionSpec(d_in, d_out, tuple(axes), std)
    return masa.SharedLinear(d_in, d_out, hooks=hooks, tag=tag)

  def shared_weights(self):
    """The stack's weight source for SharedLinears (None without one)."""
    method = self.model_config.attention.sharing
    if method not in masa.SHARED:
      return None
    c, n_layers = self.model_config.masa, self.dims.n_layers
    n = c.resolved_atoms(n_layers) if method == "masa" else c.resolved_groups(n_layers)
    specs = {s: self.shared_specs[s] for s in self.shared_slots}
    return masa.SharedAttentionWeights(method, specs, n_layers=n_layers, n_atoms=n,
                                       mlp_width=c.coef_mlp_width, folded=c.folded,
                                       rngs=self.rngs)

  def plain_linear_for(self, layer: int | None):
    def make(kind: str, d_in: int, d_out: int, *, axes, slot: str = "", **kwargs):
      return Linear(d_in, d_out, rngs=self.rngs, axes=axes, tag=Tag(kind, layer, slot), **kwargs)
    return make

  # ---- slots
  def attention(self, layer: int):
    c, d = self.model_config, self.dims
    scale = 1.0 / d.head_dim if self.lipschitz else attention_scale(c, d.head_dim)
    kwargs = dict(config=c.attention, rope_theta=c.rope_theta, init_std=c.init_std,
                  n_layers=d.n_layers, norm_eps=c.norm_eps, scale=scale,
                  zero_init_query=c.zero_init_query, use_rope=c.position == "rope",
                  linear=self.linear_for(layer))
    args = (d.d_model, d.n_heads, d.n_kv_heads, d.head_dim)
    if self.quant is not None and self.quant.qkr and "qkv" in self.quant.layers:
      std = hidden_init_std(c)
      std_qk = std * std * d.head_dim ** 0.5  # entries of a product of two std-`std` matrices
      qk_hooks = quant_hooks.make_hooks(self.quant, d.d_model, d.n_heads * d.d_model,
                                        std=std_qk, axes=("embed", "heads"), derived=True)
      attn = QKRAttention(*args, plain_linear=self.plain_linear_for(layer), qk_hooks=qk_hooks,
                          **kwargs)
      attn.tag = Tag("qk", layer, "attn")
      return attn
    return Attention(*args, **kwargs)

  def ffn(self, layer: int):
    c, d = self.model_config, self.dims
    if layer in self.moe_layers:
      return MoE(d.d_model, c.moe, expert_dim=expert_dim(c, d), init_std=c.init_std,
                 n_layers=d.n_layers, batch_groups=self.batch_groups, rngs=self.rngs,
                 shared_linear=self.plain_linear_for(layer), tag=Tag("moe", layer, "ffn"))
    if self.lipschitz:
      return GeluMLP(d.d_model, d.mlp_dim, init_std=c.init_std, n_layers=d.n_layers,
                     linear=self.linear_for(layer))
    return SwiGLU(d.d_model, d.mlp_dim, init_std=c.init_std, n_layers=d.n_layers,
                  linear=self.linear_for(layer))

  def block(self, layer: int) -> Block:
    attn = self.attention(layer)
    ffn = self.ffn(layer)
    if self.lipschitz:
      return LipschitzBlock(attn, ffn, n_layers=self.dims.n_layers, tag=Tag("block", layer))
    return Block(attn, ffn, d_model=self.dims.d_model, eps=self.model_config.norm_eps,
                 tag=Tag("block", layer))

  def stack(self):
    blocks = [self.block(i) for i in range(self.dims.n_layers)]
    c = self.model_config
    if c.mor.enabled:  # Mixture-of-Recursions: the unique blocks in a recursion schedule
      return RecursionStack(blocks, c.mor, d_model=self.dims.d_model, init_std=c.init_std,
                            rngs=self.rngs, remat=c.remat)
    kind = ScannedStack if self.model_config.scan_layers else PlainStack
    return kind(blocks, remat=self.model_config.remat, shared=self.shared_weights())

  def model(self) -> Transformer:
    c, d, rngs = self.model_config, self.dims, self.rngs
    embed = Embed(d.vocab, d.d_model, rngs=rngs, std=c.init_std)
    if self.lipschitz:
      embed.table[...] = self.unit_rms_rows(embed.table[...])
    # Learned absolute positions (GPT-2 style), e.g. for QKR, which cannot go with RoPE.
    positions = Embed(c.max_positions, d.d_model, rngs=rngs, std=c.init_std,
                      axes=(None, "embed")) if c.position == "learned" else None
    stack = self.stack()
    final_norm = Identity() if self.lipschitz else RMSNorm(d.d_model, eps=c.norm_eps)
    head = None if c.tie_embeddings else Linear(
        d.d_model, d.vocab, rngs=rngs, role="readout", axes=("embed", "vocab"),
        std=c.init_std, zero_init=c.zero_init_readout, tag=Tag("readout"))
    # muP readout: logits = alpha_out * (W h) / m, W width-independent (or zero) at lr x 1;
    # the tied form applies the same multiplier to h E^T.
    output_mult = c.output_mult / (width_mult(c) if c.param == "mup" else 1.0)
    return Transformer(dims=d, embed=embed, positions=positions, stack=stack,
                       final_norm=final_norm, head=head, output_mult=output_mult,
                       compute_dtype=c.compute_dtype, doc_mask=c.attention.doc_mask,
                       max_positions=c.max_positions, loss_chunk=c.loss_chunk)
