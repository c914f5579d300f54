"""The block stack slot and the per-call context every slot reads.

`Context` carries per-call options (static under jit): a per-layer MoE top-k (progressive
sparsification phases) and whether to record activation probes. A stack maps
(x, positions, segment_ids, ctx) -> (x, aux) with aux keys suffixed by layer
(`moe/maxvio/layer3`). `PlainStack` is a loop over distinct blocks; `ScannedStack`
(model.scan_layers) runs one traced block under jax.lax.scan over parameters stacked on a
leading "layers" axis; a recursion schedule (Mixture-of-Recursions) implements the same
interface.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from effjax.models.layers import LAYER_AXIS, RMSNorm, Tag
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

  def attn_input(self, x_BxLxD):
    """What the attention reads (its keys and values are projections of this)."""
    return self.attn_norm(x_BxLxD)

  def __call__(self, x_BxLxD, positions_BxL, segment_ids_BxL, ctx: Context, weights=None,
               kv=None):
    """weights: this layer's built shared projection weights {slot: W} (attention sharing,
    effjax/models/masa.py), or None. kv: keys and values to attend to instead of the
    layer's own (recursive KV sharing, effjax/models/mor.py), or None."""
    attn_in = self.attn_input(x_BxLxD)
    shared = {} if weights is None else {"weights": weights}
    if kv is not None:
      shared["kv"] = kv
    attn_out = self.attn(attn_in, positions_BxL=positions_BxL, segment_ids_BxL=segment_ids_BxL,
                         **shared)
    x_BxLxD = x_BxLxD + attn_out
    y_BxLxD, aux = self.ffn(self.ffn_norm(x_BxLxD), ctx)
    x_BxLxD = x_BxLxD + y_BxLxD
    if ctx.probe:
      logits = self.attn.logit_scale_probe(attn_in, positions_BxL, weights)
      self.sow(nnx.Intermediate, "probe_attn_logits", logits)
      self.sow(nnx.Intermediate, "probe_attn_out", jnp.mean(jnp.abs(attn_out)))
      self.sow(nnx.Intermediate, "probe_mlp_out", jnp.mean(jnp.abs(y_BxLxD)))
      self.sow(nnx.Intermediate, "probe_residual", jnp.mean(jnp.abs(x_BxLxD)))
    return x_BxLxD, aux

  def decode(self, x_BxSxD, positions_BxS, cache, ctx: Context):
    """Incremental decoding: the block on S new tokens with the attention's KV cache."""
    attn_out, cache = self.attn.decode(self.attn_norm(x_BxSxD), positions_BxS=positions_BxS,
                                       cache=cache)
    x_BxSxD = x_BxSxD + attn_out
    y_BxSxD, _ = self.ffn(self.ffn_norm(x_BxSxD), ctx)
    return x_BxSxD + y_BxSxD, cache


def _block_forward(block, x_BxLxD, positions_BxL, segment_ids_BxL, ctx, weights=None,
                   kv=None):
  if kv is None:
    return block(x_BxLxD, positions_BxL, segment_ids_BxL, ctx, weights)
  return block(x_BxLxD, positions_BxL, segment_ids_BxL, ctx, weights, kv=kv)


# remat: activations inside a block are recomputed in the backward pass; ctx is static.
_remat_block_forward = nnx.remat(_block_forward, static_argnums=(4,))


def _layer_weights(weights, i: int):
  return None if weights is None else {k: w[i] for k, w in weights.items()}


class PlainStack(nnx.Module):
  """Layers applied once each, in order (model.remat: each block rematerialised).

  shared: the weight source of shared attention projections (MASA and its baselines,
  effjax/models/masa.py), called once per step before the layer loop, or None."""

  def __init__(self, blocks, *, remat: bool = False, shared=None):
    self.layers = nnx.List(blocks) if hasattr(nnx, "List") else list(blocks)
    self.remat = remat
    if shared is not None:
      self.shared = shared

  def __call__(self, x_BxLxD, positions_BxL, segment_ids_BxL, ctx: Context):
    aux = {}
    call = _remat_block_forward if self.remat else _block_forward
    weights = self.shared() if hasattr(self, "shared") else None  # {slot: W [L, in, out]}
    for i, block in enumerate(self.layers):
      x_BxLxD, block_aux = call(block, x_BxLxD, positions_BxL, segment_ids_BxL, ctx,
                                _layer_weights(weights, i))
      x_BxLxD = constrain(x_BxLxD, RESIDUAL_AXES)
      aux.update({f"{k}/layer{i}": v for k, v in block_aux.items()})
    return x_BxLxD, aux

  # ---- incremental decoding: one KV cache per layer (effjax/models/kv_cache.py)
  def init_cache(self, batch: int, max_len: int, dtype) -> tuple:
    return tuple(block.attn.init_cache(batch, max_len, dtype) for block in self.layers)

  def decode(self, x_BxSxD, positions_BxS, cache: tuple, ctx: Context):
    new_cache = []
    for block, layer_cache in zip(self.layers, cache):
      x_BxSxD, layer_cache = block.decode(x_BxSxD, positions_BxS, layer_cache, ctx)
      new_cache.append(layer_cache)
    return x_BxSxD, tuple(new_cache)


def _untag_layers(module) -> None:
  """Sets layer=None on every tag in `module`: a stacked module stands for all layers (the
  model index gives its entries back one per layer)."""
  for _, node in nnx.iter_graph(module):
    tag = getattr(node, "tag", None) if isinstance(node, nnx.Module) else None
    if isinstance(tag, Tag) and tag.layer is not None:
      node.tag = dataclasses.replace(tag, layer=None)


def stack_blocks(blocks) -> nnx.Module:
  """One module of the blocks' structure whose parameters and buffers are the blocks' stacked
  on a leading LAYER_AXIS (logical axes prefixed, roles unchanged). Each layer keeps its own
  init. Raises ValueError if the blocks differ in anything but their values and tags."""
  for block in blocks:
    _untag_layers(block)
  graphdefs, states = zip(*(nnx.split(block) for block in blocks))
  for i, graphdef in enumerate(graphdefs):
    if graphdef != graphdefs[0]:
      raise ValueError(f"a scanned stack needs identical layers, but layer {i} differs from "
                       f"layer 0 in structure or settings; set model.scan_layers=false")
  module = nnx.merge(graphdefs[0], jax.tree.map(lambda *xs: jnp.stack(xs), *states))
  for _, var in nnx.iter_graph(module):
    axes = var.get_metadata().get("axes") if isinstance(var, nnx.Variable) else None
    if axes is not None:
      var.set_metadata("axes", (LAYER_AXIS,) + tuple(axes))
  return module


def unstack_layers(tree: dict, n_layers: int) -> dict:
  """A params (or buffers) dict of a scanned model in the PlainStack layout
  (blocks/layers/<i>/...), for export or loading into a model with scan_layers=false."""
  stacked = tree["blocks"]["layers"]
  layers = {i: jax.tree.map(lambda x, i=i: x[i], stacked) for i in range(n_layers)}
  return {**tree, "blocks": {**tree["blocks"], "layers": layers}}


def stack_layers(tree: dict) -> dict:
  """The inverse of `unstack_layers`: a PlainStack params (or buffers) dict in the scanned
  layout (blocks/layers/... with a leading layer axis)."""
  layers = tree["blocks"]["layers"]
  stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *(layers[i] for i in sorted(layers)))
  return {**tree, "blocks": {**tree["blocks"], "layers": stacked}}


class ScannedStack(nnx.Module):
  """The blocks as one module with parameters stacked over layers (`stack_blocks`), run by
  jax.lax.scan: one block is traced and compiled whatever the depth (model.remat: the scanned
  body is rematerialised). Per-layer aux and probes come out of the scan stacked and are
  returned under per-layer keys, as PlainStack returns them."""

  def __init__(self, blocks, *, remat: bool = False, shared=None):
    self.n_layers = len(blocks)
    self.layers = stack_blocks(blocks)
    self.remat = remat
    if shared is not None:
      self.shared = shared

  def __call__(self, x_BxLxD, positions_BxL, segment_ids_BxL, ctx: Context):
    if ctx.moe_top_k is not None:
      raise ValueError("a scanned stack runs one block for every layer: a per-layer MoE top-k "
                       "(model.moe.topk_schedule) needs model.scan_layers=false")
    graphdef, state = nnx.split(self.layers)
    weights = self.shared() if hasattr(self, "shared") else None  # {slot: W [L, in, out]}

    def body(x_BxLxD, layer_xs):
      layer_state, layer_weights = layer_xs
      block = nnx.merge(graphdef, layer_state)
      x_BxLxD, aux = block(x_BxLxD, positions_BxL, segment_ids_BxL, ctx, layer_weights)
      x_BxLxD = constrain(x_BxLxD, RESIDUAL_AXES)
      return x_BxLxD, (aux, nnx.pop(block, nnx.Intermediate))  # probes sown by the block

    if self.remat:
      body = jax.checkpoint(body, prevent_cse=False)
    x_BxLxD, (aux_stacked, sown) = jax.lax.scan(body, x_BxLxD, (state, weights))
    if ctx.probe:  # stacked [n_layers] values on the stacked module (models.probes reads them)
      nnx.update(self.layers, sown)
    aux = {f"{k}/layer{i}": v[i] for i in range(self.n_layers) for k, v in aux_stacked.items()}
    return x_BxLxD, aux

  # ---- incremental decoding: the layers' KV caches stacked on a leading layer axis
  def init_cache(self, batch: int, max_len: int, dtype):
    one = self.layers.attn.init_cache(batch, max_len, dtype)
    return jax.tree.map(lambda x: jnp.broadcast_to(x, (self.n_layers,) + x.shape), one)

  def decode(self, x_BxSxD, positions_BxS, cache, ctx: Context):
    graphdef, state = nnx.split(self.layers)

    def body(x_BxSxD, layer):
      layer_state, layer_cache = layer
      block = nnx.merge(graphdef, layer_state)
      return block.decode(x_BxSxD, positions_BxS, layer_cache, ctx)

    return jax.lax.scan(body, x_BxSxD, (state, cache))
