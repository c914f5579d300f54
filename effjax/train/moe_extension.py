"""MoE in the trainer: ALF-LB bias updates, the top-k schedule, eval-set load metrics
and the tokens-per-expert heat map (docs/moe.md)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from effjax import paths
from effjax.models.index import get_path, set_path
from effjax.models.moe import alf_bias_update, alf_rate, balance_methods, topk_schedule
from effjax.train.extensions import Extension


class MoEExtension(Extension):
  name = "moe"

  @classmethod
  def enabled(cls, config) -> bool:
    return config.model.moe.num_experts > 0

  def __init__(self, config, model):
    self.cfg = config.model.moe
    self.total_steps = config.train.steps
    self.moe = model.index.of("moe")  # the MoE layers, wherever the builder put them
    self.layers = [e.tag.layer for e in self.moe]
    self.switch_step, self.k_before, self.k_after = topk_schedule(
        self.cfg, model.dims.n_layers, config.train.steps)

  def hooks(self):
    if "alf" not in balance_methods(self.cfg):
      return []
    cfg, moe, total = self.cfg, self.moe, self.total_steps

    def alf_hook(new_state, old_state, aux):
      """Once per optimizer step, outside autodiff, from counts over the whole global batch."""
      buffers = new_state.buffers
      rate = alf_rate(cfg, old_state.step, total)
      for entry in moe:
        counts = aux[f"stat/moe_counts/layer{entry.tag.layer}"]
        bias = get_path(buffers, entry.at("bias"))
        buffers = set_path(buffers, entry.at("bias"),
                           alf_bias_update(bias, counts, rate=rate, rule=cfg.bias_update))
      return new_state.replace(buffers=buffers)

    return [alf_hook]

  def step_metrics(self, aux):
    """Batch MaxVio and empty experts over the whole step's tokens: with grad_accum > 1 the
    model's per-call values would be means over micro-batches."""
    out = {}
    for i in self.layers:
      counts = aux[f"stat/moe_counts/layer{i}"]
      mean_c = jnp.mean(counts)
      out[f"moe/maxvio/layer{i}"] = (jnp.max(counts) - mean_c) / mean_c
      out[f"moe/zero_experts/layer{i}"] = jnp.sum(counts == 0).astype(jnp.float32)
    return out

  def phase_changes(self):
    return () if self.switch_step is None else (self.switch_step,)

  def phase(self, step):
    if self.switch_step is None:
      return {}
    return {"moe_top_k": self.k_before if step < self.switch_step else self.k_after}

  def on_eval(self, state, stats):
    del state
    out, vios = {}, []
    for i in self.layers:
      c = np.asarray(stats[f"stat/moe_counts/layer{i}"], np.float64)
      p = np.asarray(stats[f"stat/moe_probs/layer{i}"], np.float64)
      vio = float((c.max() - c.mean()) / c.mean())
      vios.append(vio)
      out[f"eval/moe/maxvio_global/layer{i}"] = vio
      out[f"eval/moe/min_load/layer{i}"] = float(c.min() / c.mean())
      out[f"eval/moe/max_load/layer{i}"] = float(c.max() / c.mean())
      out[f"eval/moe/f/layer{i}"] = (c / c.sum()).round(6).tolist()
      out[f"eval/moe/p/layer{i}"] = (p / p.sum()).round(6).tolist()
    if vios:
      out["eval/moe/maxvio_global"] = float(np.mean(vios))
    return out

  def on_end(self, workdir, eval_stats):
    if not eval_stats or not self.layers:
      return []
    import matplotlib  # pylint: disable=g-import-not-at-top
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
    load = np.stack([np.asarray(eval_stats[f"stat/moe_counts/layer{i}"]) for i in self.layers])
    load = load / load.mean(axis=1, keepdims=True)
    fig, ax = plt.subplots(figsize=(max(5, load.shape[1] * 0.18 + 2), 1 + 0.5 * len(self.layers)),
                           dpi=110)
    im = ax.imshow(load, aspect="auto", cmap="viridis", vmin=0, vmax=max(2.0, float(load.max())))
    ax.set_xlabel("expert")
    ax.set_ylabel("layer")
    ax.set_yticks(range(len(self.layers)), [str(i) for i in self.layers])
    ax.set_title("tokens per expert / mean (eval set)")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    path = paths.save_figure(fig, paths.as_path(workdir) / "moe_load.png")
    plt.close(fig)
    return [path]
