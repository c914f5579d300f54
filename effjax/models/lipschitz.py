"""The Lipschitz transformer's parts (model.arch=lipschitz; Newhouse et al. 2025, after the
modular-norm analysis of Large et al. 2024), put in the builder's slots:

  block     no LayerNorm; each of attention and MLP is a convex residual step
            x <- (1 - a) x + a f(x), a = 1 / (2 n_layers), with f = attn(x) / 3 (attention
            logits scaled 1/d_head by the builder) and f = mlp(x)
  ffn       W_out (GELU(W_in x) / 1.1289): 1.1289 = max GELU'(z), so the nonlinearity is
            1-Lipschitz and |GELU(z)| / 1.1289 <= |z|
  final     no final norm (`Identity`)

Each block records the largest per-token RMS norm of its output (aux
'lipschitz/act_max'), which the constraints extension compares with the certified
activation bound (effjax/constraints/lipschitz.py).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from effjax.models.layers import Tag

GELU_LIPSCHITZ = 1.1289  # max_z d/dz GELU(z) (exact erf GELU), attained at z ~ 0.75
ATTENTION_OUT = 1.0 / 3.0


def token_rms(x_BxLxD: jax.Array) -> jax.Array:
  return jnp.sqrt(jnp.mean(jnp.square(x_BxLxD.astype(jnp.float32)), axis=-1))


class GeluMLP(nnx.Module):
  """y = W_out (GELU(W_in x) / 1.1289); (y, aux) like every FFN slot. linear: the projection
  factory (kind "mlp", slots "up" and "down")."""

  def __init__(self, d_model: int, d_ff: int, *, init_std: float, n_layers: int, linear):
    self.up = linear("mlp", d_model, d_ff, axes=("embed", "mlp"), std=init_std, slot="up")
    self.down = linear("mlp", d_ff, d_model, axes=("mlp", "embed"),
                       std=init_std / math.sqrt(2 * n_layers), slot="down")

  def __call__(self, x_BxLxD, ctx=None):
    del ctx
    h = jax.nn.gelu(self.up(x_BxLxD), approximate=False) / GELU_LIPSCHITZ
    return self.down(h), {}


class LipschitzBlock(nnx.Module):
  """x <- (1 - a) x + a attn(x) / 3;  x <- (1 - a) x + a mlp(x);  a = 1 / (2 n_layers)."""

  def __init__(self, attn, ffn, *, n_layers: int, tag: Tag):
    self.attn, self.ffn, self.tag = attn, ffn, tag
    self.alpha = 1.0 / (2 * n_layers)

  def attn_input(self, x_BxLxD):
    """What the attention reads (no norm in this architecture)."""
    return x_BxLxD

  def __call__(self, x_BxLxD, positions_BxL, segment_ids_BxL, ctx, weights=None, kv=None):
    """weights: this layer's built shared attention weights (model.attention.sharing);
    kv: keys and values to attend to instead (recursive KV sharing, effjax/models/mor.py)."""
    a = self.alpha
    shared = {} if weights is None else {"weights": weights}
    if kv is not None:
      shared["kv"] = kv
    attn_out = self.attn(x_BxLxD, positions_BxL=positions_BxL, segment_ids_BxL=segment_ids_BxL,
                         **shared)
    x_BxLxD = (1 - a) * x_BxLxD + a * ATTENTION_OUT * attn_out
    act_max = jnp.max(token_rms(x_BxLxD))
    y_BxLxD, aux = self.ffn(x_BxLxD, ctx)
    x_BxLxD = (1 - a) * x_BxLxD + a * y_BxLxD
    act_max = jnp.maximum(act_max, jnp.max(token_rms(x_BxLxD)))
    return x_BxLxD, {**aux, "lipschitz/act_max": act_max}

  def decode(self, x_BxSxD, positions_BxS, cache, ctx):
    """Incremental decoding: the block on S new tokens with the attention's KV cache."""
    a = self.alpha
    attn_out, cache = self.attn.decode(x_BxSxD, positions_BxS=positions_BxS, cache=cache)
    x_BxSxD = (1 - a) * x_BxSxD + a * ATTENTION_OUT * attn_out
    y_BxSxD, _ = self.ffn(x_BxSxD, ctx)
    return (1 - a) * x_BxSxD + a * y_BxSxD, cache


class Identity(nnx.Module):
  def __call__(self, x):
    return x
