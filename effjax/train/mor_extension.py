"""Mixture-of-Recursions in the trainer (docs/mor.md): the token-choice loss-free depth bias,
whole-step selected fractions, eval-set routing metrics and the evaluation under the other
expert-choice selection rule (eval/mor/<rule>/loss)."""

from __future__ import annotations

import dataclasses

import numpy as np

from effjax import models
from effjax.models.index import get_path, set_path
from effjax.models.moe import alf_bias_update
from effjax.train.extensions import Extension


class MoRExtension(Extension):
  name = "mor"

  @classmethod
  def enabled(cls, config) -> bool:
    return config.model.mor.enabled and config.model.mor.router != "none"

  def __init__(self, config, model):
    self.config, self.cfg = config, config.model.mor
    self.stack = model.index.of("mor")[0]  # the RecursionStack, wherever the builder put it

  def hooks(self):
    cfg, stack = self.cfg, self.stack
    if cfg.router != "token" or cfg.token_balance != "alf":
      return []

    def depth_bias_hook(new_state, old_state, aux):
      """ALF-LB on the depths (Wang et al. 2024), from the whole step's depth counts."""
      del old_state
      path = stack.at("depth_bias")
      bias = get_path(new_state.buffers, path)
      bias = alf_bias_update(bias, aux["stat/mor_depth_counts"], rate=cfg.bias_update_rate,
                             rule="sign")
      return new_state.replace(buffers=set_path(new_state.buffers, path, bias))

    return [depth_bias_hook]

  def step_metrics(self, aux):
    """Selected fraction per recursion over the whole step (micro-batches summed)."""
    sel, tokens = aux["stat/mor_selected"], aux["stat/mor_tokens"]
    return {f"mor/selected/rec{r}": sel[r] / tokens for r in range(self.cfg.recursions)}

  def eval_variants(self):
    """Expert-choice: the eval set under the rule eval/loss does not use (top-k as in
    training, or the causal threshold rule)."""
    if self.cfg.router != "expert":
      return {}
    other = "topk" if self.cfg.eval_rule == "threshold" else "threshold"
    model = dataclasses.replace(self.config.model,
                                mor=dataclasses.replace(self.cfg, eval_rule=other))
    return {f"mor/{other}": models.for_evaluation(dataclasses.replace(self.config, model=model))}

  def on_eval(self, state, stats):
    del state
    sel = np.asarray(stats["stat/mor_selected"], np.float64)
    frac = sel / float(stats["stat/mor_tokens"])
    out = {f"eval/mor/selected/rec{r}": float(f) for r, f in enumerate(frac)}
    if len(frac) > 1:
      out["eval/mor/dead_tokens"] = float(1.0 - frac[1])
    out["eval/mor/mean_recursions"] = float(frac.sum())
    if "stat/mor_router_agree" in stats:  # expert-choice: threshold rule vs top-k membership
      agree = np.asarray(stats["stat/mor_router_agree"], np.float64) / float(stats["stat/mor_tokens"])
      bce = np.asarray(stats["stat/mor_bce"], np.float64) / float(stats["stat/mor_tokens"])
      out.update({f"eval/mor/router_acc/rec{r}": float(a) for r, a in enumerate(agree)})
      if len(agree) > 1:
        out["eval/mor/router_acc"] = float(agree[1:].mean())  # recursions that select
      out["eval/mor/bce"] = float(bce.sum())
    if "stat/mor_depth_counts" in stats:
      c = np.asarray(stats["stat/mor_depth_counts"], np.float64)
      out["eval/mor/depth_maxvio"] = float((c.max() - c.mean()) / c.mean())
    return out
