"""Decoder-only transformer LM assembled from the slots in this package.

Pre-norm blocks: x += attn(norm(x)); x += ffn(norm(x)). The FFN slot takes any
module returning (y, aux) (dense SwiGLU today, MoE later); the block stack is a
plain loop (a recursion schedule can replace it). `Transformer.__call__` returns
(logits, aux) where aux is a flat dict: keys starting with "loss/" are added to
the training loss, everything else is reported as a metric.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from effjax.config import ModelConfig
from effjax.models.attention import Attention
from effjax.models.layers import Embed, Linear, RMSNorm
from effjax.models.mlp import SwiGLU


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


def compute_dtype(config: ModelConfig):
  if config.compute_dtype == "auto":
    return jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16
  return jnp.dtype(config.compute_dtype)


class Block(nnx.Module):
  def __init__(self, config: ModelConfig, dims: Dims, *, rngs: nnx.Rngs):
    self.attn_norm = RMSNorm(dims.d_model, eps=config.norm_eps)
    self.attn = Attention(dims.d_model, dims.n_heads, dims.n_kv_heads, dims.head_dim,
                          config=config.attention, rope_theta=config.rope_theta,
                          init_std=config.init_std, n_layers=dims.n_layers,
                          norm_eps=config.norm_eps, rngs=rngs)
    self.ffn_norm = RMSNorm(dims.d_model, eps=config.norm_eps)
    self.ffn = SwiGLU(dims.d_model, dims.mlp_dim, init_std=config.init_std,
                      n_layers=dims.n_layers, rngs=rngs)

  def __call__(self, x_BxLxD, *, positions_BxL, segment_ids_BxL):
    x_BxLxD = x_BxLxD + self.attn(self.attn_norm(x_BxLxD), positions_BxL=positions_BxL,
                                  segment_ids_BxL=segment_ids_BxL)
    y_BxLxD, aux = self.ffn(self.ffn_norm(x_BxLxD))
    return x_BxLxD + y_BxLxD, aux


class Transformer(nnx.Module):
  """Decoder LM: embed -> blocks -> final norm -> LM head (tied or untied)."""

  def __init__(self, config: ModelConfig, dims: Dims, *, rngs: nnx.Rngs):
    self.config, self.dims = config, dims
    self.embed = Embed(dims.vocab, dims.d_model, rngs=rngs, std=config.init_std)
    blocks = [Block(config, dims, rngs=rngs) for _ in range(dims.n_layers)]
    self.blocks = nnx.List(blocks) if hasattr(nnx, "List") else blocks
    self.final_norm = RMSNorm(dims.d_model, eps=config.norm_eps)
    self.head = None if config.tie_embeddings else Linear(
        dims.d_model, dims.vocab, rngs=rngs, role="readout", axes=("embed", "vocab"),
        std=config.init_std)

  def __call__(self, ids_BxL, *, positions_BxL=None, segment_ids_BxL=None):
    b, l = ids_BxL.shape
    if positions_BxL is None:
      positions_BxL = jnp.broadcast_to(jnp.arange(l, dtype=jnp.int32), (b, l))
    if not self.config.attention.doc_mask:
      segment_ids_BxL = None
      positions_BxL = jnp.broadcast_to(jnp.arange(l, dtype=jnp.int32), (b, l))
    x_BxLxD = self.embed(ids_BxL, compute_dtype(self.config))
    aux = {}
    for i, block in enumerate(self.blocks):
      call = nnx.remat(type(block).__call__) if self.config.remat else type(block).__call__
      x_BxLxD, block_aux = call(block, x_BxLxD, positions_BxL=positions_BxL,
                                segment_ids_BxL=segment_ids_BxL)
      aux.update({f"{k}/layer{i}": v for k, v in block_aux.items()})
    x_BxLxD = self.final_norm(x_BxLxD)
    if self.head is None:
      logits_BxLxV = self.embed.attend(x_BxLxD)
    else:
      logits_BxLxV = self.head(x_BxLxD)
    return logits_BxLxV.astype(jnp.float32), aux


def count_params(dims: Dims, tie_embeddings: bool) -> dict[str, int]:
  """Parameter counts by formula (used by FLOP accounting and tests)."""
  d, h, kv, hd, f = dims.d_model, dims.n_heads, dims.n_kv_heads, dims.head_dim, dims.mlp_dim
  attn = d * h * hd * 2 + d * kv * hd * 2
  mlp = 3 * d * f
  per_block = attn + mlp + 2 * d
  embed = dims.vocab * d
  head = 0 if tie_embeddings else d * dims.vocab
  return {"embedding": embed, "head": head, "blocks": dims.n_layers * per_block,
          "attention": dims.n_layers * attn, "mlp": dims.n_layers * mlp,
          "total": embed + head + dims.n_layers * per_block + d}
