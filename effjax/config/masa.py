"""Attention parameter sharing: MASA (Zhussip et al., AAAI 2026, arXiv 2508.04581) and its
baselines at an equal attention-parameter budget (docs/masa.md).

model.attention.sharing picks the method; this section (model.masa.*) sizes it:
  masa             W_l = sum_s c_{l,s} D_s, S atoms per projection type, C from a coef MLP
  lowrank          W_l = A_l B_l of rank `rank` (per layer, not shared)
  sequential       `groups` full matrix sets, consecutive layers share one (0,0,1,1,2,2)
  repeat_all_over  `groups` full matrix sets reused in a cycle (0,1,2,0,1,2)
`projections` names the projections every method applies to; the others stay dense.
"""

from __future__ import annotations

import dataclasses
import typing

from effjax.config.base import ConfigError, _field

if typing.TYPE_CHECKING:
  from effjax.config import Config

SHARING = ("none", "masa", "lowrank", "sequential", "repeat_all_over")
PROJECTIONS = "qkvo"


def default_atoms(n_layers: int) -> int:
  """S = L/3 rounded, at least 1 (the paper's 12 layers: 4 atoms)."""
  return max(1, round(n_layers / 3))


@dataclasses.dataclass(frozen=True)
class MasaConfig:
  projections: str = _field("qkvo", doc="projections shared (any subset of q, k, v, o, e.g. qkv "
                            "or qkvo); the others stay dense per layer")
  atoms: int = _field(0, doc="MASA: atoms S per projection type (0: n_layers / 3 rounded, >= 1)")
  coef_mlp_width: int = _field(64, doc="MASA: hidden width of the 3-layer coefficient MLP")
  folded: bool = _field(False, doc="MASA: coefficients C stored as a [n_layers, S] parameter, no "
                        "MLP (what effjax.models.masa.fold produces for export and evaluation)")
  rank: int = _field(0, doc="lowrank: rank of each shared projection (0: d_model / 3)")
  groups: int = _field(0, doc="sequential / repeat_all_over: distinct matrix sets (0: n_layers / "
                       "3 rounded, >= 1)")

  def resolved_atoms(self, n_layers: int) -> int:
    return self.atoms or default_atoms(n_layers)

  def resolved_groups(self, n_layers: int) -> int:
    return self.groups or default_atoms(n_layers)

  def check(self, config: Config) -> None:
    m = config.model
    p = self.projections
    if not p or any(c not in PROJECTIONS for c in p) or len(set(p)) != len(p):
      raise ConfigError(f"model.masa.projections must be a non-empty subset of the letters "
                        f"{PROJECTIONS!r} without repeats (e.g. qkv, qkvo, qk); got {p!r}.")
    for key, value in {"model.masa.atoms": self.atoms, "model.masa.rank": self.rank,
                       "model.masa.groups": self.groups,
                       "model.masa.coef_mlp_width": self.coef_mlp_width - 1}.items():
      if value < 0:
        raise ConfigError(f"{key} must be >= 0 (coef_mlp_width >= 1); got {value} "
                          f"(0 = the default).")
    sharing = m.attention.sharing
    if sharing in ("sequential", "repeat_all_over") and self.groups > m.n_layers:
      raise ConfigError(f"model.masa.groups ({self.groups}) must be at most model.n_layers "
                        f"({m.n_layers}) for model.attention.sharing={sharing}.")
    if sharing == "lowrank" and self.rank > m.d_model:
      raise ConfigError(f"model.masa.rank ({self.rank}) must be at most model.d_model "
                        f"({m.d_model}).")
    if sharing == "none":
      return
    if config.quant.method != "none" and config.quant.qkr:
      raise ConfigError(f"model.attention.sharing={sharing} builds the q/k/v/o projections; "
                        f"quant.qkr replaces q and k by a QK product: use one of them.")
    if m.zero_init_query and "q" in p and sharing != "lowrank":
      raise ConfigError(f"model.zero_init_query=true cannot zero a shared query projection "
                        f"(model.attention.sharing={sharing}, model.masa.projections={p}); "
                        f"drop q from model.masa.projections or set zero_init_query=false.")
