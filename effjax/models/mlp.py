"""SwiGLU feed-forward block (Shazeer 2020, "GLU Variants Improve Transformer")."""

from __future__ import annotations

import math

import jax
from flax import nnx


class SwiGLU(nnx.Module):
  """FFN(x) = W_down (silu(x W_gate) * (x W_up)). Returns (y, aux) like every FFN slot.

  linear(kind, d_in, d_out, *, axes, std, slot) -> Linear: the projection factory (kind "mlp").
  """

  def __init__(self, d_model: int, d_ff: int, *, init_std: float, n_layers: int, linear):
    self.gate = linear("mlp", d_model, d_ff, axes=("embed", "mlp"), std=init_std, slot="gate")
    self.up = linear("mlp", d_model, d_ff, axes=("embed", "mlp"), std=init_std, slot="up")
    self.down = linear("mlp", d_ff, d_model, axes=("mlp", "embed"),
                       std=init_std / math.sqrt(2 * n_layers), slot="down")

  def __call__(self, x_BxLxD: jax.Array, ctx=None) -> tuple[jax.Array, dict]:
    del ctx
    h_BxLxF = jax.nn.silu(self.gate(x_BxLxD)) * self.up(x_BxLxD)
    return self.down(h_BxLxF), {}
