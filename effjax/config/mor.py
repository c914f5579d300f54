"""Mixture-of-Recursions section (docs/mor.md): a shared stack of layers reused N_r times,
with an optional router deciding per token how many recursions it gets."""

from __future__ import annotations

import dataclasses
import typing

from effjax.config.base import ConfigError, _field

if typing.TYPE_CHECKING:
  from effjax.config import Config

SHARING = ("cycle", "sequence", "middle_cycle", "middle_sequence")
ROUTERS = ("none", "expert", "token")
RULES = ("topk", "threshold")
KV_STRATEGIES = ("recursion_wise", "shared")


@dataclasses.dataclass(frozen=True)
class MoRConfig:
  """Mixture-of-Recursions (Bae et al. 2025, arXiv 2507.10524). recursions = 0: off (every
  layer applied once). model.n_layers counts the unique (parameter) layers."""
  recursions: int = _field(0, doc="N_r: recursions of the shared block (0: off; 1: a plain "
                           "stack routed through the recursion code)")
  sharing: str = _field("middle_cycle", SHARING,
                        "cycle: all n_layers form the block, repeated N_r times; sequence: "
                        "each layer repeated N_r times in place; middle_*: unique first and "
                        "last layer, the middle shared")
  router: str = _field("expert", ROUTERS,
                       "none: plain recursion (every token, every recursion); expert: "
                       "expert-choice top-k per recursion; token: one depth per token")
  alpha: float = _field(0.1, doc="expert-choice gate g = alpha * sigmoid(theta_r . h)")
  bce_coef: float = _field(1e-3, doc="expert-choice auxiliary BCE loss (router logits vs "
                           "top-k membership; makes the causal threshold rule work)")
  eval_rule: str = _field("threshold", RULES,
                          "expert-choice at evaluation and sampling: threshold (causal: a "
                          "token continues iff sigma > 0.5) or topk (as in training, leaks "
                          "the future); eval reports the other rule under eval/mor/")
  rule: str = _field("topk", RULES,
                     "the rule this model runs (topk for training; models.for_evaluation "
                     "sets eval_rule for evaluation and sampling)")
  kv_strategy: str = _field("recursion_wise", KV_STRATEGIES,
                            "recursion_wise: each recursion attends only among the tokens it "
                            "selected and its decode cache keeps only those (the model as "
                            "trained by default); shared: recursive KV sharing, every later "
                            "recursion attends to the keys/values the first recursion computed "
                            "for all tokens, and its decode cache is the first recursion's "
                            "alone. shared CHANGES THE MODEL (training forward included): "
                            "choose it before training, not for an existing checkpoint")
  token_balance: str = _field("aux", ("aux", "alf", "none"),
                              "token-choice balance: Switch aux loss + z-loss, or the "
                              "loss-free bias (ALF-LB, as model.moe)")
  aux_coef: float = _field(0.1, doc="token-choice Switch balance loss coefficient")
  z_coef: float = _field(1e-5, doc="token-choice router z-loss coefficient")
  bias_update_rate: float = _field(1e-3, doc="token-choice ALF-LB step u (sign rule)")

  @property
  def enabled(self) -> bool:
    return self.recursions > 0

  def check(self, config: Config) -> None:
    if self.recursions < 0:
      raise ConfigError(f"model.mor.recursions must be >= 0 (0: off); got {self.recursions}.")
    if not self.enabled:
      return
    n = config.model.n_layers
    if self.sharing.startswith("middle") and n < 3:
      raise ConfigError(f"model.mor.sharing={self.sharing} keeps the first and last layer "
                        f"unique and shares the middle: it needs model.n_layers >= 3 (got {n}); "
                        f"or use model.mor.sharing=cycle|sequence.")
    if self.router != "none" and self.recursions < 2:
      raise ConfigError(f"model.mor.router={self.router} routes between recursions: it needs "
                        f"model.mor.recursions >= 2 (got {self.recursions}); or "
                        f"model.mor.router=none.")
    for key, value in {"model.mor.alpha": self.alpha, "model.mor.bce_coef": self.bce_coef,
                       "model.mor.aux_coef": self.aux_coef, "model.mor.z_coef": self.z_coef,
                       "model.mor.bias_update_rate": self.bias_update_rate}.items():
      if value < 0:
        raise ConfigError(f"{key} must be >= 0; got {value}.")
    if self.router == "expert" and not 0 < self.alpha:
      raise ConfigError("model.mor.alpha must be > 0 for the expert-choice gate.")
    if config.model.scan_layers:
      raise ConfigError("model.mor.recursions > 0 runs its own recursion schedule: set "
                        "model.scan_layers=false.")
    if self.kv_strategy not in KV_STRATEGIES:
      raise ConfigError(f"model.mor.kv_strategy must be one of {', '.join(KV_STRATEGIES)}; "
                        f"got {self.kv_strategy!r}.")
    if self.rule == "threshold" and self.router != "expert":
      raise ConfigError(f"model.mor.rule=threshold is the expert-choice inference rule; "
                        f"router is {self.router}.")
