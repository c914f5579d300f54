"""muP's per-matrix treatment derived from shapes (Yang et al. 2022, Tensor Programs V, Table 3).

A matrix's rule depends on which of its dimensions grow with width, found by comparing its
shape in this model with its shape in the same model built at `model.base_width`:
  fan_in and fan_out grow (hidden):      init std x 1/sqrt(m_in),  Adam lr x 1/m_in
  only fan_in grows (output-like: the
    MoE router d -> E, fixed-size MLP or
    expert up/gate projections):         init std x 1/m_in,        Adam lr x 1/m_in
  fan_in fixed (input-like: embeddings,
    fixed-size down projections):        init std x 1,             Adam lr x 1
with m_in, m_out the ratios of fan_in (shape[-2]) and fan_out (shape[-1]) to the base
model's (a scanned stack's leading layer axis is not a matrix dimension: a stacked vector
stays a vector). The LM head keeps its own multiplier form (logits x alpha_out / m, W
width-independent, lr x 1) and vectors are never scaled. The ratios are stored on each
parameter as metadata `fan_in_mult` / `fan_out_mult`, which the optimizer reads through
the parameter specs (effjax/optim/scaling.py).
"""

from __future__ import annotations

import dataclasses
import math

from flax import nnx

from effjax.config import ModelConfig
from effjax.models.layers import layer_stacked


def base_model_config(config: ModelConfig, head_dim: int) -> ModelConfig:
  """The same model at model.base_width: heads grow with width at a fixed head_dim, or, when
  the head count does not scale to an integer, head_dim grows at a fixed head count."""
  d, base = config.d_model, config.base_width
  heads, kv = config.n_heads, config.n_kv_heads or config.n_heads
  if (heads * base) % d == 0:
    heads_b = heads * base // d
    kv_b = kv * base // d if (kv * base) % d == 0 and kv * base >= d else kv
    if heads_b % kv_b:
      kv_b = heads_b
    return dataclasses.replace(config, d_model=base, n_heads=heads_b, n_kv_heads=kv_b,
                               head_dim=head_dim)
  if (head_dim * base) % d == 0:
    return dataclasses.replace(config, d_model=base, head_dim=head_dim * base // d)
  raise ValueError(f"model.base_width={base} does not scale model.n_heads={heads} or the head "
                   f"dimension {head_dim} of model.d_model={d} to integers")


def _params(module) -> dict:
  return {path: node for path, node in nnx.iter_graph(module) if isinstance(node, nnx.Param)}


def apply_width_rules(module, base_module) -> None:
  """Tags every parameter of `module` with fan_in_mult / fan_out_mult against `base_module`
  (the same model at base width; shapes only) and rescales the init of matrices by the
  rules above, in place."""
  base = _params(base_module)
  for path, param in _params(module).items():
    shape, base_shape = param.get_value().shape, base[path].get_value().shape
    matrix = len(shape) - layer_stacked(param.get_metadata().get("axes")) >= 2
    if matrix:
      m_in, m_out = shape[-2] / base_shape[-2], shape[-1] / base_shape[-1]
    else:
      m_in = m_out = 1.0
    param.set_metadata("fan_in_mult", m_in)
    param.set_metadata("fan_out_mult", m_out)
    if not matrix or param.role == "readout" or m_in == 1.0:
      continue
    scale = 1.0 / math.sqrt(m_in) if m_out != 1.0 else 1.0 / m_in
    param[...] = param[...] * scale
