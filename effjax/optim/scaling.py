"""Per-role lr and weight-decay multipliers: muP and weight-decay scaling rules.

muP for Adam (Yang et al. 2022, Tensor Programs V, Table 3 / TECHNIQUES.md 6.1), with
width multiplier m = d_model / base_width:
  embedding, vector (gains, biases), readout:  lr x 1
  matrix-like (hidden, expert, router, atom):  lr x 1/m  (every such matrix's fan_in
                                               grows with width, by the same m)
Weight-decay rules (TECHNIQUES.md 6.2) for decoupled AdamW decay lambda:
  none         lambda for decayed roles
  mup          lambda x m for matrix-like roles (keeps lr x lambda constant)
  layerwise    lambda x m^e for matrix-like roles, 0 for the rest (Fan et al. 2025,
               arXiv 2510.15262: lambda_2 ~ sqrt(d) with eta_2 ~ 1/d, so e = 1/2 by default
               and eta_2 lambda_2 ~ d^-1/2; e = 1 equals the mup rule on every matrix)
  power_lines  lambda from a target timescale tau = B / (lr lambda D) (Bergsma et al. 2025)
"""

from __future__ import annotations

MATRIX_ROLES = ("hidden", "expert", "router", "atom")


def width_mult(config) -> float:
  base = config.model.base_width or config.model.d_model
  return config.model.d_model / base


def lr_multiplier(role: str, config) -> float:
  if config.model.param == "mup" and role in MATRIX_ROLES:
    return 1.0 / width_mult(config)
  return 1.0


def base_weight_decay(config) -> float:
  """The decoupled decay lambda before per-role multipliers."""
  o, t = config.optim, config.train
  if o.wd_rule == "power_lines" and o.wd_tau > 0:
    return 1.0 / (t.lr * o.wd_tau * t.steps)
  return o.weight_decay


def wd_multiplier(role: str, config) -> float:
  o = config.optim
  if role in o.no_decay_roles:
    return 0.0
  m = width_mult(config)
  if o.wd_rule == "mup" and role in MATRIX_ROLES:
    return m
  if o.wd_rule == "layerwise":
    return m ** o.wd_exponent if role in MATRIX_ROLES else 0.0
  return 1.0


def adamw_timescale(config) -> float:
  """tau = B / (lr * lambda * D) as a fraction of the run (B, D in tokens) = 1/(lr*lambda*steps)."""
  wd = base_weight_decay(config)
  if wd <= 0:
    return float("inf")
  return 1.0 / (config.train.lr * wd * config.train.steps)
