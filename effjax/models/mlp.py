"""SwiGLU feed-forward block (Shazeer 2020, "GLU Variants Improve Transformer")."""

from __future__ import annotations

import math

import jax
from flax import nnx

from effjax.models.layers import Linear


class SwiGLU(nnx.Module):
  """FFN(x) = W_down (silu(x W_gate) * (x W_up)). Returns (y, aux) like every FFN slot."""

  def __init__(self, d_model: int, d_ff: int, *, init_std: float, n_layers: int, rngs: nnx.Rngs,
               linear=Linear):
    self.gate = linear(d_model, d_ff, rngs=rngs, axes=("embed", "mlp"), std=init_std)
    self.up = linear(d_model, d_ff, rngs=rngs, axes=("embed", "mlp"), std=init_std)
    self.down = linear(d_ff, d_model, rngs=rngs, axes=("mlp", "embed"),
                       std=init_std / math.sqrt(2 * n_layers))

  def __call__(self, x_BxLxD: jax.Array) -> tuple[jax.Array, dict]:
    h_BxLxF = jax.nn.silu(self.gate(x_BxLxD)) * self.up(x_BxLxD)
    return self.down(h_BxLxF), {}
