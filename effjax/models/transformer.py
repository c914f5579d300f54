"""Decoder-only transformer LM assembled from the slots in this package.

Pre-norm blocks: x += attn(norm(x)); x += ffn(norm(x)). The FFN slot takes any
module returning (y, aux) (dense SwiGLU today, MoE later); the block stack is a
plain loop (a recursion schedule can replace it). `Transformer.__call__` returns
(logits, aux) where aux is a flat dict: keys starting with "loss/" are added to
the training loss, everything else is reported as a metric.
"""

from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp
from flax import nnx

from effjax.config import ModelConfig
from effjax.models.attention import Attention
from effjax.models.layers import Embed, Linear, RMSNorm
from effjax.models.mlp import SwiGLU
from effjax.models.moe import MoE, moe_layer_indices
from effjax.parallel.sharding import constrain

RESIDUAL_AXES = ("batch", "length", "embed")  # activation sharding of the residual stream


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
  """effjax.resolve fixes auto for the target devices; unresolved, float32."""
  if config.compute_dtype == "auto":
    return jnp.float32
  return jnp.dtype(config.compute_dtype)


def make_ffn(config: ModelConfig, dims: Dims, layer: int, *, batch_groups: int, rngs: nnx.Rngs,
             linear=Linear):
  """The FFN slot: a dense SwiGLU, or an MoE in the layers named by model.moe.layers."""
  if layer in moe_layer_indices(config.moe, dims.n_layers):
    expert_dim = config.moe.expert_dim or max(dims.mlp_dim // config.moe.top_k, 1)
    return MoE(dims.d_model, config.moe, expert_dim=expert_dim, init_std=config.init_std,
               n_layers=dims.n_layers, batch_groups=batch_groups, rngs=rngs)
  return SwiGLU(dims.d_model, dims.mlp_dim, init_std=config.init_std, n_layers=dims.n_layers,
                rngs=rngs, linear=linear)


def width_mult(config: ModelConfig) -> float:
  return config.d_model / (config.base_width or config.d_model)


def hidden_init_std(config: ModelConfig) -> float:
  """SP: init_std at every width. muP: variance proportional to 1/fan_in, i.e. init_std at
  the base width and init_std / sqrt(m) at m times the base width."""
  if config.param == "mup":
    return config.init_std / math.sqrt(width_mult(config))
  return config.init_std


def attention_scale(config: ModelConfig, head_dim: int) -> float:
  """SP: 1/sqrt(d_head). muP: alpha_attn / d_head (Yang et al. 2022)."""
  if config.param == "mup":
    return config.attn_mult / head_dim
  return config.attn_mult / math.sqrt(head_dim)


class Block(nnx.Module):
  def __init__(self, config: ModelConfig, dims: Dims, layer: int, *, batch_groups: int = 1,
               rngs: nnx.Rngs, quant=None):
    """quant: a QuantConfig (effjax/quant) hooking the block linears, or None."""
    from effjax.quant.hooks import linear_factory, qkr_hooks  # pylint: disable=g-import-not-at-top (cycle)
    hidden_config = dataclasses.replace(config, init_std=hidden_init_std(config))
    self.attn_norm = RMSNorm(dims.d_model, eps=config.norm_eps)
    self.attn = Attention(dims.d_model, dims.n_heads, dims.n_kv_heads, dims.head_dim,
                          config=config.attention, rope_theta=config.rope_theta,
                          init_std=hidden_config.init_std, n_layers=dims.n_layers,
                          norm_eps=config.norm_eps, scale=attention_scale(config, dims.head_dim),
                          zero_init_query=config.zero_init_query, rngs=rngs,
                          linear=linear_factory(quant, "qkv"),
                          out_linear=linear_factory(quant, "attn_out"),
                          use_rope=config.position == "rope",
                          qkr_hooks=qkr_hooks(quant, dims.d_model, dims.n_heads,
                                              std=hidden_config.init_std, head_dim=dims.head_dim))
    config = hidden_config
    self.ffn_norm = RMSNorm(dims.d_model, eps=config.norm_eps)
    self.ffn = make_ffn(config, dims, layer, batch_groups=batch_groups, rngs=rngs,
                        linear=linear_factory(quant, "mlp"))

  def __call__(self, x_BxLxD, *, positions_BxL, segment_ids_BxL, top_k=None, probe=False):
    attn_in = self.attn_norm(x_BxLxD)
    attn_out = self.attn(attn_in, positions_BxL=positions_BxL, segment_ids_BxL=segment_ids_BxL)
    x_BxLxD = x_BxLxD + attn_out
    ffn_kwargs = {"top_k": top_k} if isinstance(self.ffn, MoE) else {}
    y_BxLxD, aux = self.ffn(self.ffn_norm(x_BxLxD), **ffn_kwargs)
    x_BxLxD = x_BxLxD + y_BxLxD
    if probe:  # mean |activation| per module output (muP coordinate check)
      aux = {**aux, "act/attn_logits": self.attn.logit_scale_probe(attn_in, positions_BxL),
             "act/attn_out": jnp.mean(jnp.abs(attn_out)), "act/mlp_out": jnp.mean(jnp.abs(y_BxLxD)),
             "act/residual": jnp.mean(jnp.abs(x_BxLxD))}
    return x_BxLxD, aux


def _block_forward(block, x_BxLxD, positions_BxL, segment_ids_BxL, top_k, probe):
  """One block, all arguments positional (nnx.remat cannot resolve keyword-only ones)."""
  return block(x_BxLxD, positions_BxL=positions_BxL, segment_ids_BxL=segment_ids_BxL,
               top_k=top_k, probe=probe)


# model.remat: activations inside a block are recomputed in the backward pass; top_k and
# probe are static.
_remat_block_forward = nnx.remat(_block_forward, static_argnums=(4, 5))


class Transformer(nnx.Module):
  """Decoder LM: embed -> blocks -> final norm -> LM head (tied or untied)."""

  def __init__(self, config: ModelConfig, dims: Dims, *, batch_groups: int = 1, rngs: nnx.Rngs,
               quant=None):
    self.config, self.dims = config, dims
    self.embed = Embed(dims.vocab, dims.d_model, rngs=rngs, std=config.init_std)
    # Learned absolute positions (GPT-2 style), e.g. for QKR, which cannot go with RoPE.
    self.positions = Embed(config.max_positions, dims.d_model, rngs=rngs, std=config.init_std,
                           axes=(None, "embed")) if config.position == "learned" else None
    blocks = [Block(config, dims, i, batch_groups=batch_groups, rngs=rngs, quant=quant)
              for i in range(dims.n_layers)]
    self.blocks = nnx.List(blocks) if hasattr(nnx, "List") else blocks
    self.final_norm = RMSNorm(dims.d_model, eps=config.norm_eps)
    self.head = None if config.tie_embeddings else Linear(
        dims.d_model, dims.vocab, rngs=rngs, role="readout", axes=("embed", "vocab"),
        std=config.init_std, zero_init=config.zero_init_readout)
    # muP readout: logits = alpha_out * (W h) / m, W width-independent (or zero) at lr x 1;
    # the tied form applies the same multiplier to h E^T.
    self.output_mult = config.output_mult / (width_mult(config) if config.param == "mup" else 1.0)

  def __call__(self, ids_BxL, *, positions_BxL=None, segment_ids_BxL=None, moe_top_k=None,
               probe=False):
    """moe_top_k: optional per-layer top-k (static), for progressive sparsification.
    probe: also return mean |activation| of every module output as aux 'act/*'."""
    b, l = ids_BxL.shape
    if positions_BxL is None:
      positions_BxL = jnp.broadcast_to(jnp.arange(l, dtype=jnp.int32), (b, l))
    if not self.config.attention.doc_mask:
      segment_ids_BxL = None
      positions_BxL = jnp.broadcast_to(jnp.arange(l, dtype=jnp.int32), (b, l))
    x_BxLxD = self.embed(ids_BxL, compute_dtype(self.config))
    if self.positions is not None:
      if l > self.config.max_positions:  # jnp.take would fill NaN past the table
        raise ValueError(f"sequence length {l} exceeds the learned position table "
                         f"(model.max_positions={self.config.max_positions})")
      x_BxLxD = x_BxLxD + self.positions(positions_BxL, x_BxLxD.dtype)
    x_BxLxD = constrain(x_BxLxD, RESIDUAL_AXES)
    aux = {"act/embed": jnp.mean(jnp.abs(x_BxLxD))} if probe else {}
    call = _remat_block_forward if self.config.remat else _block_forward
    for i, block in enumerate(self.blocks):
      x_BxLxD, block_aux = call(block, x_BxLxD, positions_BxL, segment_ids_BxL,
                                moe_top_k[i] if moe_top_k else None, probe)
      x_BxLxD = constrain(x_BxLxD, RESIDUAL_AXES)
      aux.update({f"{k}/layer{i}": v for k, v in block_aux.items()})
    x_BxLxD = self.final_norm(x_BxLxD)
    if self.head is None:
      logits_BxLxV = self.embed.attend(x_BxLxD)
    else:
      logits_BxLxV = self.head(x_BxLxD)
    if self.output_mult != 1.0:
      logits_BxLxV = logits_BxLxV * self.output_mult
    logits_BxLxV = constrain(logits_BxLxV, ("batch", "length", "vocab"))
    if probe:
      aux["act/logits"] = jnp.mean(jnp.abs(logits_BxLxV))
    return logits_BxLxV.astype(jnp.float32), aux


def ffn_params(config: ModelConfig, dims: Dims, top_k=None) -> tuple[list[int], list[int]]:
  """Per-layer FFN parameter counts: (total, active per token). top_k: per-layer override."""
  d, moe = dims.d_model, config.moe
  moe_layers = moe_layer_indices(moe, dims.n_layers)
  total, active = [], []
  for i in range(dims.n_layers):
    if i in moe_layers:
      f = moe.expert_dim or max(dims.mlp_dim // moe.top_k, 1)
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
  if config is None:
    ffn_total = ffn_active = [3 * d * dims.mlp_dim] * dims.n_layers
  else:
    ffn_total, ffn_active = ffn_params(config, dims, top_k)
  norms = 2 * d * dims.n_layers + d
  embed = dims.vocab * d
  if config is not None and config.position == "learned":
    embed += config.max_positions * d  # resolved by config.validate (0 = train.seq_len)
  head = 0 if tie_embeddings else d * dims.vocab
  blocks = dims.n_layers * attn + sum(ffn_total) + 2 * d * dims.n_layers
  return {"embedding": embed, "head": head, "blocks": blocks,
          "attention": dims.n_layers * attn, "mlp": sum(ffn_total),
          "active_non_embedding": dims.n_layers * attn + sum(ffn_active) + norms,
          "total": embed + head + blocks + d}
