"""Per-parameter lr and weight-decay multipliers: muP and weight-decay scaling rules.

muP for Adam (Yang et al. 2022, Tensor Programs V, Table 3 / docs/mup.md), with width
multiplier m = d_model / base_width and, per matrix, m_in = its fan_in over the base
model's (ParamSpec.fan_in_mult, set from the shapes by effjax/models/mup.py):
  vectors (gains, biases), readout:       lr x 1
  matrices (hidden, output-like, expert,
    router, atom, embedding):             lr x 1/m_in  (1 where fan_in does not grow)
The embedding and readout also take x optim.io_lr_mult (auto: 1, or 10 under
model.arch=lipschitz; docs/constraints.md).
Weight-decay rules (docs/mup.md) for decoupled AdamW decay lambda:
  none         lambda for decayed roles
  mup          lambda x m_in for matrix-like roles (keeps lr x lambda constant)
  layerwise    lambda x m^e for matrix-like roles, 0 for the rest (Fan et al. 2025,
               arXiv 2510.15262: lambda_2 ~ sqrt(d) with eta_2 ~ 1/d, so e = 1/2 by default
               and eta_2 lambda_2 ~ d^-1/2; e = 1 equals the mup rule on every matrix)
  power_lines  lambda from a target timescale tau = B / (lr lambda D) (Bergsma et al. 2025)
"""

from __future__ import annotations

MATRIX_ROLES = ("hidden", "expert", "router", "atom")
IO_ROLES = ("embedding", "readout")  # optim.io_lr_mult


def width_mult(config) -> float:
  base = config.model.base_width or config.model.d_model
  return config.model.d_model / base


def lr_multiplier(spec, config) -> float:
  """spec: the parameter's ParamSpec (role, fan_in_mult)."""
  mult = 1.0
  if config.model.param == "mup" and spec.role not in ("vector", "readout"):
    mult = 1.0 / spec.fan_in_mult
  if spec.role in IO_ROLES:
    mult *= config.optim.resolved_io_lr_mult(config.model.arch)
  return mult


def base_weight_decay(config) -> float:
  """The decoupled decay lambda before per-role multipliers."""
  o, t = config.optim, config.train
  if o.wd_rule == "power_lines" and o.wd_tau > 0:
    return 1.0 / (t.lr * o.wd_tau * t.steps)
  return o.weight_decay


def wd_multiplier(spec, config) -> float:
  o, role = config.optim, spec.role
  if role in o.no_decay_roles:
    return 0.0
  if o.wd_rule == "mup" and role in MATRIX_ROLES:
    return spec.fan_in_mult if config.model.param == "mup" else width_mult(config)
  if o.wd_rule == "layerwise":
    return width_mult(config) ** o.wd_exponent if role in MATRIX_ROLES else 0.0
  return 1.0


def adamw_timescale(config) -> float:
  """tau = B / (lr * lambda * D) as a fraction of the run (B, D in tokens) = 1/(lr*lambda*steps)."""
  wd = base_weight_decay(config)
  if wd <= 0:
    return float("inf")
  return 1.0 / (config.train.lr * wd * config.train.steps)
