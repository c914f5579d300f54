"""Weight constraints (docs/constraints.md): projections after every optimizer step
(Lipschitz-enforced transformers, Newhouse et al. 2025) and weight reparameterisations
(weight conditioning, Saratchandran et al. 2024; weight normalisation, Salimans & Kingma
2016). The Lipschitz architecture itself is `model.arch=lipschitz`."""

from __future__ import annotations

import dataclasses
import typing

from effjax.config.base import ConfigError, _field

if typing.TYPE_CHECKING:
  from effjax.config import Config

METHODS = ("none", "spectral_normalize", "spectral_hammer", "spectral_weight_decay", "soft_cap",
           "hard_cap", "svd_clip")
# The soft cap's f is increasing on [0, k] (so it maps every sigma <= k into the bound) while
# k <= 1.3065 w_max (docs/constraints.md): one Muon step may move a matrix by at most 0.3 w_max.
SOFT_CAP_MAX_STEP = 0.3
MUON_GAIN_BOUND = 1.25  # >= the largest singular value Newton-Schulz outputs (optim/muon.py)
# Methods that read sigma_1 (u_1, v_1) by power iteration, warm-started from a buffer.
POWER_METHODS = ("spectral_normalize", "spectral_hammer", "spectral_weight_decay")


@dataclasses.dataclass(frozen=True)
class ConstraintsConfig:
  method: str = _field("none", METHODS, "projection after every optimizer step, on the "
                       "matrices of constraints.roles (RMS->RMS norms)")
  w_max: float = _field(1.0, doc="bound on each constrained matrix's RMS->RMS norm "
                        "sqrt(fan_in/fan_out) sigma_max")
  roles: tuple = _field(("hidden", "expert"), doc="parameter roles the projection applies to "
                        "(expert weights [E, in, out]: each expert on its own)")
  power_iters: int = _field(16, doc="power iterations per step (warm-started from a "
                            "checkpointed buffer)")
  spectral_wd: float = _field(0.01, doc="spectral_weight_decay: W <- W - lambda sigma_1 u v^T "
                              "per step")
  hard_cap_steps: int = _field(30, doc="hard_cap: Newton-Schulz (cubic) steps of each matrix "
                               "sign")
  embed_max: float = _field(1.0, doc="model.arch=lipschitz: token-embedding rows start at RMS "
                            "norm embed_max and are projected back to RMS <= embed_max after "
                            "every step (the paper's embedding); 0: unit-RMS start, no "
                            "projection")
  reparam: str = _field("none", ("none", "weight_norm", "weight_cond"),
                        "reparameterise block linears: W = g V/||V|| per output unit, or "
                        "weight conditioning W~ = E W, E = diag(1/||W_i||)")
  reparam_kinds: tuple = _field(("qkv", "attn_out", "mlp"), doc="block linears reparameterised")
  cond_gain: bool = _field(False, doc="weight_cond: a learnable per-output gain (init 1)")
  cond_stop_grad: bool = _field(False, doc="weight_cond: no gradient through E")

  def check(self, config: Config) -> None:
    _check_lipschitz_arch(config)
    if self.embed_max < 0:
      raise ConfigError(f"constraints.embed_max must be >= 0 (0: no projection); got "
                        f"{self.embed_max}.")
    sharing = config.model.attention.sharing
    if (self.reparam != "none" and sharing != "none"
        and set(self.reparam_kinds) & {"qkv", "attn_out"}):
      raise ConfigError(f"constraints.reparam={self.reparam} on attention projections "
                        f"(constraints.reparam_kinds={','.join(self.reparam_kinds)}) cannot run "
                        f"with model.attention.sharing={sharing}: the shared weights are built "
                        f"by the stack, not stored per layer; drop qkv/attn_out from "
                        f"constraints.reparam_kinds or set model.attention.sharing=none.")
    if self.method != "none":
      if self.w_max <= 0:
        raise ConfigError(f"constraints.w_max must be > 0; got {self.w_max}.")
      if not self.roles:
        raise ConfigError("constraints.roles is empty: name the roles to constrain, e.g. "
                          "hidden.")
      if self.power_iters < 1 or self.hard_cap_steps < 1:
        raise ConfigError("constraints.power_iters and constraints.hard_cap_steps must be >= 1.")
    if self.method == "soft_cap":
      o = config.optim
      uncoupled = sorted(set(self.roles) - set(o.muon_roles))
      if o.name != "muon" or uncoupled:
        raise ConfigError("constraints.method=soft_cap couples alpha to Muon's update norm: "
                          f"it needs optim.name=muon (got {o.name}) and every role of "
                          f"constraints.roles in optim.muon_roles (not: {uncoupled}); use "
                          "spectral_normalize or hard_cap otherwise.")
      step = config.train.lr * o.muon_lr_mult * MUON_GAIN_BOUND
      if step > SOFT_CAP_MAX_STEP * self.w_max:
        raise ConfigError(f"constraints.method=soft_cap: one Muon step at the peak lr may move a "
                          f"matrix by train.lr x optim.muon_lr_mult x {MUON_GAIN_BOUND} = "
                          f"{step:.3g}, above {SOFT_CAP_MAX_STEP} x constraints.w_max = "
                          f"{SOFT_CAP_MAX_STEP * self.w_max:.3g}, where the soft cap no longer "
                          "guarantees the bound; lower the lr or raise w_max.")
    bad = [k for k in self.reparam_kinds if k not in ("qkv", "attn_out", "mlp")]
    if self.reparam != "none" and (bad or not self.reparam_kinds):
      raise ConfigError(f"constraints.reparam_kinds has {bad or 'nothing'}; valid: qkv, "
                        "attn_out, mlp.")
    if self.reparam != "none" and config.quant.method != "none":
      raise ConfigError("constraints.reparam and quant.method both hook the block weights; "
                        "combining them is not supported: set one of them to none.")


def _check_lipschitz_arch(config: Config) -> None:
  """model.arch=lipschitz: the parts its certified bound covers (docs/constraints.md)."""
  m = config.model
  if m.arch != "lipschitz":
    return
  a = m.attention
  problems = [msg for bad, msg in (
      (m.moe.num_experts > 0, "model.moe.num_experts > 0 (the bound covers the dense MLP)"),
      (m.param != "sp", f"model.param={m.param} (the logit scale is fixed at 1/d_head)"),
      (a.qk_norm, "model.attention.qk_norm=true (no norms in a Lipschitz model)"),
      (a.score != "softmax" or a.log_n_scale, "model.attention.score is not plain softmax"),
      (config.quant.method != "none", f"quant.method={config.quant.method}"),
      (config.constraints.reparam != "none",
       f"constraints.reparam={config.constraints.reparam} (the bound reads the stored kernels)"),
  ) if bad]
  if problems:
    raise ConfigError("model.arch=lipschitz cannot run with: " + "; ".join(problems) + ".")
