"""Decoder-only transformer LM: the top module, model dimensions and parameter counts.

The parts (embedding, the block stack, the attention and FFN of each block, every block
linear) are built by effjax/models/builder.py from the config; this module only runs them.
`Transformer.__call__` returns (logits, aux) where aux is a flat dict: keys starting with
"loss/" are added to the training loss, "stat/" arrays are summed over micro-batches,
everything else is reported as a metric. Given targets and model.loss_chunk > 0 it returns
(per-token NLL, aux) instead, from the chunked LM head (effjax/models/lm_head.py).
"""

from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp
from flax import nnx

from effjax.config import ModelConfig
from effjax.models import lm_head
from effjax.models import masa
from effjax.models.layers import Tag
from effjax.models.moe import moe_layer_indices
from effjax.models.stack import RESIDUAL_AXES, Context
from effjax.parallel.sharding import constrain


@dataclasses.dataclass(frozen=True)
class Dims:
  """Derived model dimensions (zeros in ModelConfig resolved)."""
  vocab: int
  d_model: int
  n_layers: int
  n_heads: int
  n_kv_heads: int
  head_dim: int
  mlp_dim: int


def resolve_dims(config: ModelConfig, tokenizer_vocab: int | None = None) -> Dims:
  vocab = config.vocab_size
  if vocab == 0:
    if tokenizer_vocab is None:
      raise ValueError("model.vocab_size is 0 (auto) but no tokenizer vocabulary was given")
    vocab = -(-tokenizer_vocab // 128) * 128  # pad to a multiple of 128
  elif tokenizer_vocab is not None and vocab < tokenizer_vocab:
    raise ValueError(f"model.vocab_size ({vocab}) is smaller than the tokenizer's vocabulary "
                     f"({tokenizer_vocab})")
  head_dim = config.head_dim or config.d_model // config.n_heads
  mlp_dim = config.mlp_dim or -(-int(8 * config.d_model / 3) // 64) * 64
  return Dims(vocab=vocab, d_model=config.d_model, n_layers=config.n_layers,
              n_heads=config.n_heads, n_kv_heads=config.n_kv_heads or config.n_heads,
              head_dim=head_dim, mlp_dim=mlp_dim)


def resolve_compute_dtype(name: str):
  """effjax.resolve fixes auto for the target devices; unresolved, float32."""
  if name == "auto":
    return jnp.float32
  return jnp.dtype(name)


def expert_dim(config: ModelConfig, dims: Dims) -> int:
  """Hidden size of one routed expert: model.moe.expert_dim, or mlp_dim / top_k (the dense
  FFN's active FLOPs)."""
  return config.moe.expert_dim or max(dims.mlp_dim // config.moe.top_k, 1)


def width_mult(config: ModelConfig) -> float:
  return config.d_model / (config.base_width or config.d_model)


def hidden_init_std(config: ModelConfig) -> float:
  """A width-scaled std for values derived from hidden weights (QKR's quantizer init): SP
  init_std; muP init_std / sqrt(m). The matrices themselves are rescaled per matrix after
  construction from their shapes (effjax/models/mup.py)."""
  if config.param == "mup":
    return config.init_std / math.sqrt(width_mult(config))
  return config.init_std


def attention_scale(config: ModelConfig, head_dim: int) -> float:
  """SP: 1/sqrt(d_head). muP: alpha_attn / d_head (Yang et al. 2022)."""
  if config.param == "mup":
    return config.attn_mult / head_dim
  return config.attn_mult / math.sqrt(head_dim)


class Transformer(nnx.Module):
  """Decoder LM: embed (+ learned positions) -> stack -> final norm -> LM head (tied or
  untied), from parts built by effjax/models/builder.py."""

  def __init__(self, *, dims: Dims, embed, positions, stack, final_norm, head,
               output_mult: float, compute_dtype: str, doc_mask: bool, max_positions: int,
               loss_chunk: int = 0):
    self.dims = dims
    # The stack is stored as `blocks`: parameter paths blocks/layers/<i>/... sort before
    # embed/final_norm/head, in the same order as before the builder (reductions over the
    # parameter tree, e.g. the global gradient norm, add leaves in this order).
    self.embed, self.positions, self.blocks = embed, positions, stack
    self.final_norm, self.head = final_norm, head
    self.output_mult, self.compute_dtype = output_mult, compute_dtype
    self.doc_mask, self.max_positions = doc_mask, max_positions
    self.loss_chunk = loss_chunk
    self.tag = Tag("model")

  def readout(self, x_BxLxD):
    """The LM head as a function of its input, weight read once (hooks applied here, so
    the chunked loss does not re-run them per chunk): x_..xD -> logits_..xV, compute dtype."""
    if self.head is None:
      table_VxD = self.embed.table[...].astype(x_BxLxD.dtype)
      return x_BxLxD, lambda x: jnp.einsum("bld,vd->blv", x, table_VxD)
    x_BxLxD = self.head.hooked_input(x_BxLxD)
    w_DxV = self.head.effective_weight().astype(x_BxLxD.dtype)
    bias = None if self.head.bias is None else self.head.bias[...].astype(x_BxLxD.dtype)
    return x_BxLxD, lambda x: (jnp.einsum("...i,io->...o", x, w_DxV) if bias is None
                               else jnp.einsum("...i,io->...o", x, w_DxV) + bias)

  def __call__(self, ids_BxL, *, positions_BxL=None, segment_ids_BxL=None, ctx=None,
               targets_BxL=None):
    """targets_BxL with loss_chunk > 0: returns (nll_BxL fp32, aux), never the logits."""
    ctx = ctx or Context()
    b, l = ids_BxL.shape
    if positions_BxL is None:
      positions_BxL = jnp.broadcast_to(jnp.arange(l, dtype=jnp.int32), (b, l))
    if not self.doc_mask:
      segment_ids_BxL = None
      positions_BxL = jnp.broadcast_to(jnp.arange(l, dtype=jnp.int32), (b, l))
    x_BxLxD = self.embed(ids_BxL, resolve_compute_dtype(self.compute_dtype))
    if self.positions is not None:
      if l > self.max_positions:  # jnp.take would fill NaN past the table
        raise ValueError(f"sequence length {l} exceeds the learned position table "
                         f"(model.max_positions={self.max_positions})")
      x_BxLxD = x_BxLxD + self.positions(positions_BxL, x_BxLxD.dtype)
    x_BxLxD = constrain(x_BxLxD, RESIDUAL_AXES)
    if ctx.probe:
      self.sow(nnx.Intermediate, "probe_embed", jnp.mean(jnp.abs(x_BxLxD)))
    x_BxLxD, aux = self.blocks(x_BxLxD, positions_BxL, segment_ids_BxL, ctx)
    x_BxLxD = self.final_norm(x_BxLxD)
    if targets_BxL is not None and self.loss_chunk:
      x_BxLxD, readout = self.readout(x_BxLxD)
      nll_BxL, abs_sum = lm_head.chunked_token_nll(x_BxLxD, readout, targets_BxL,
                                                   chunk=self.loss_chunk,
                                                   output_mult=self.output_mult)
      if ctx.probe:
        self.sow(nnx.Intermediate, "probe_logits", abs_sum / (b * l * self.dims.vocab))
      return nll_BxL, aux
    if self.head is None:
      logits_BxLxV = self.embed.attend(x_BxLxD)
    else:
      logits_BxLxV = self.head(x_BxLxD)
    if self.output_mult != 1.0:
      logits_BxLxV = logits_BxLxV * self.output_mult
    logits_BxLxV = constrain(logits_BxLxV, ("batch", "length", "vocab"))
    if ctx.probe:
      self.sow(nnx.Intermediate, "probe_logits", jnp.mean(jnp.abs(logits_BxLxV)))
    return logits_BxLxV.astype(jnp.float32), aux


  # ---- incremental decoding (effjax/models/kv_cache.py; docs/generate.md)
  def init_cache(self, batch: int, max_len: int):
    """Empty KV caches for `batch` sequences of up to `max_len` tokens (the stack's layout)."""
    return self.blocks.init_cache(batch, max_len, resolve_compute_dtype(self.compute_dtype))

  def decode(self, ids_BxS, *, start, cache, ctx=None):
    """Logits [B, S, V] of S new tokens at positions start .. start + S - 1 (one document)
    and the updated caches: the rows the full forward gives at those positions when the
    caches hold tokens 0 .. start - 1."""
    ctx = ctx or Context()
    b, s = ids_BxS.shape
    positions_BxS = jnp.broadcast_to(start + jnp.arange(s, dtype=jnp.int32), (b, s))
    x_BxSxD = self.embed(ids_BxS, resolve_compute_dtype(self.compute_dtype))
    if self.positions is not None:
      x_BxSxD = x_BxSxD + self.positions(positions_BxS, x_BxSxD.dtype)
    x_BxSxD, cache = self.blocks.decode(x_BxSxD, positions_BxS, cache, ctx)
    x_BxSxD = self.final_norm(x_BxSxD)
    logits_BxSxV = self.embed.attend(x_BxSxD) if self.head is None else self.head(x_BxSxD)
    if self.output_mult != 1.0:
      logits_BxSxV = logits_BxSxV * self.output_mult
    return logits_BxSxV.astype(jnp.float32), cache


def ffn_params(config: ModelConfig, dims: Dims, top_k=None) -> tuple[list[int], list[int]]:
  """Per-layer FFN parameter counts: (total, active per token). top_k: per-layer override."""
  d, moe = dims.d_model, config.moe
  moe_layers = moe_layer_indices(moe, dims.n_layers)
  total, active = [], []
  for i in range(dims.n_layers):
    if i in moe_layers:
      f = expert_dim(config, dims)
      k = top_k[i] if top_k else moe.top_k
      shared = 3 * d * f * moe.num_shared
      total.append(moe.num_experts * 3 * d * f + shared + d * moe.num_experts)
      active.append(k * 3 * d * f + shared + d * moe.num_experts)
    else:
      total.append(3 * d * dims.mlp_dim)
      active.append(3 * d * dims.mlp_dim)
  return total, active


def count_params(dims: Dims, tie_embeddings: bool, config: ModelConfig | None = None,
                 top_k=None) -> dict[str, int]:
  """Parameter counts by formula (used by FLOP accounting and tests); 'active' counts the
  parameters a token touches (MoE: top-k experts + shared + router)."""
  d, h, kv, hd = dims.d_model, dims.n_heads, dims.n_kv_heads, dims.head_dim
  attn = d * h * hd * 2 + d * kv * hd * 2
  attn_all = dims.n_layers * attn
  if config is not None and config.attention.sharing != "none":  # MASA and its baselines
    attn_all = masa.attention_param_counts(config, dims)["total"]
  if config is None:
    ffn_total = ffn_active = [3 * d * dims.mlp_dim] * dims.n_layers
  else:
    ffn_total, ffn_active = ffn_params(config, dims, top_k)
  norms = 2 * d * dims.n_layers + d
  embed = dims.vocab * d
  if config is not None and config.position == "learned":
    embed += config.max_positions * d  # resolved by config.validate (0 = train.seq_len)
  head = 0 if tie_embeddings else d * dims.vocab
  blocks = attn_all + sum(ffn_total) + 2 * d * dims.n_layers
  if config is not None and config.mor.enabled:  # MoR routers (models/mor.py)
    blocks += config.mor.recursions * d if config.mor.router != "none" else 0
  return {"embedding": embed, "head": head, "blocks": blocks,
          "attention": attn_all, "mlp": sum(ffn_total),
          "active_non_embedding": attn_all + sum(ffn_active) + norms,
          "total": embed + head + blocks + d}
