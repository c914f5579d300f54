"""QAT in the trainer (docs/qat.md): oscillation tracking and CGA as post-update hooks, and
eval metrics per layer type (the builder's tag kinds: qkv, attn_out, mlp; qk = QKR products):

  quant/weight_rel_mse/<type>  mean (Q(W) - W)^2 / mean W^2 of the quantized kernels
  quant/trusted/<type>         QuEST: fraction of weights inside the trust region
  quant/osc/<type>             fraction of weights whose flip EMA exceeds OSC_THRESHOLD
                               (StatsQ / LSQ weights)
  quant/cga_trainable          CGA: fraction of quantized weights still training

The quantized linears come from the model index (effjax/models/index.py), their maths from
their quantizer objects (effjax/quant/methods.py), their state from the weight hook
(`<linear>/weight_quant/...`).

Oscillation (Nagel et al. 2022; OFQ, Liu et al. 2023): after every optimizer step each
weight's integer code is compared with the previous one; a change in the opposite
direction to the weight's last change is a flip; ema <- (1 - m) ema + m flip, m = 0.01.
"""

from __future__ import annotations

import jax.numpy as jnp

from effjax.models.index import get_path, set_path
from effjax.quant.hooks import WEIGHT
from effjax.quant.methods import Lsq, Quest
from effjax.train.extensions import Extension

OSC_MOMENTUM = 0.01
OSC_THRESHOLD = 0.01  # flips more often than about once per 100 steps


def cga_confident(w_IxO, bits: int, br: float):
  """CGA's confident weights (1.0) of a kernel [fan_in, out]. With the StatsQ position
  u = clip(W/s) n - 1/2 (s = 2 mean|W| per output unit, n = 2^(bits-1)), the rounding
  boundaries are the interior half-integers i + 1/2, -n <= i <= n - 2; a weight within
  `br` of one is low-confidence and keeps training (OFQ `freeze_outside_boundary_weight_idx`).
  The clip ends are no boundary, so clipped weights are confident."""
  n = 2 ** (bits - 1)
  s = 2 * jnp.mean(jnp.abs(w_IxO), axis=0, keepdims=True)
  u = jnp.clip(w_IxO / jnp.where(s > 0, s, 1.0), -1.0, 1.0 - 1e-6) * n - 0.5
  boundary = jnp.clip(jnp.floor(u) + 0.5, -n + 0.5, n - 1.5)
  return (jnp.abs(u - boundary) > br).astype(jnp.float32)


class QuantExtension(Extension):
  name = "quant"

  @classmethod
  def enabled(cls, config) -> bool:
    return config.quant.method != "none"

  def __init__(self, config, model):
    self.q = config.quant
    self.model = model
    self.linears = model.index.quantized()         # stored kernels: tracked, frozen, exported
    self.qk = [e for e in model.index.of("qk") if e.quantizer is not None]  # QKR products
    self.tracked = [e for e in self.linears if self.q.method in ("statsq", "lsq")]
    self.cga_step = int(round(self.q.cga_start * config.train.steps)) if self.q.cga_start else 0

  @staticmethod
  def _state(tree, entry) -> dict:
    """The quantizer's own parameters (LSQ's step) from a params dict."""
    return ({"step": get_path(tree, entry.at(WEIGHT, "step"))}
            if isinstance(entry.quantizer, Lsq) else {})

  def _codes(self, params, entry):
    return entry.quantizer.codes(get_path(params, entry.at("kernel")), self._state(params, entry))[0]

  def _track(self, new_state, old_state, aux):
    del old_state, aux
    buffers = new_state.buffers
    for entry in self.tracked:
      b = get_path(buffers, entry.at(WEIGHT))
      code = self._codes(new_state.params, entry)
      started = b["osc_started"] > 0
      delta = jnp.where(started, jnp.sign(code - b["osc_code"]), 0.0)
      flip = ((delta != 0) & (b["osc_dir"] != 0) & (delta != b["osc_dir"])).astype(jnp.float32)
      ema = jnp.where(started, (1 - OSC_MOMENTUM) * b["osc_ema"] + OSC_MOMENTUM * flip,
                      b["osc_ema"])
      buffers = set_path(buffers, entry.at(WEIGHT), {
          **b, "osc_code": code, "osc_dir": jnp.where(delta != 0, delta, b["osc_dir"]),
          "osc_ema": ema, "osc_started": jnp.ones_like(b["osc_started"])})
    return new_state.replace(buffers=buffers)

  def _frozen(self, state, entry):
    """The freeze mask for the step that `state` starts. In the phase it is recomputed from
    the current weights at every step (OFQ recomputes it every iteration), and a weight
    once frozen stays frozen: a weight that leaves the boundary band freezes where it is,
    so the trainable set only shrinks (the annealing). All zeros before the phase."""
    mask = get_path(state.buffers, entry.at(WEIGHT, "cga_frozen"))
    now = jnp.maximum(mask, cga_confident(get_path(state.params, entry.at("kernel")),
                                          self.q.weight_bits, self.q.cga_br))
    return jnp.where(state.step >= self.cga_step, now, mask)

  def _cga(self, new_state, old_state, aux):
    """CGA (OFQ, Liu et al. 2023, Sec. 4.3): during the phase, the weights frozen for this
    step (`_frozen`) are restored after the optimizer step, and the mask is stored."""
    del aux
    params, buffers = new_state.params, new_state.buffers
    in_phase = old_state.step >= self.cga_step
    for entry in self.linears:
      frozen = self._frozen(old_state, entry)
      buffers = set_path(buffers, entry.at(WEIGHT, "cga_frozen"), frozen)
      old_w = get_path(old_state.params, entry.at("kernel"))
      new_w = get_path(params, entry.at("kernel"))
      params = set_path(params, entry.at("kernel"),
                        jnp.where(in_phase & (frozen > 0), old_w, new_w))
    return new_state.replace(params=params, buffers=buffers)

  def _cga_grads(self, grads, state):
    """CGA: frozen weights get no gradient (so they neither enter the global-norm clip nor
    the Adam moments), from the phase's first step on."""
    for entry in self.linears:
      g = get_path(grads, entry.at("kernel"))
      grads = set_path(grads, entry.at("kernel"),
                       jnp.where(self._frozen(state, entry) > 0, jnp.zeros_like(g), g))
    return grads

  def grad_hooks(self):
    return [self._cga_grads] if self.cga_step else []

  def hooks(self):
    # CGA first: oscillation tracking must see the restored weights.
    return ([self._cga] if self.cga_step else []) + ([self._track] if self.tracked else [])

  def on_eval(self, state, stats) -> dict:
    del stats
    return {**self.params_metrics(state.params), **self.buffer_metrics(state.buffers)}

  def params_metrics(self, params) -> dict:
    weights = [(e.tag.kind, e.quantizer, get_path(params, e.at("kernel")),
                self._state(params, e)) for e in self.linears]
    if self.qk:  # QKR: the per-head products as the attention builds them (before quantization)
      module = self.model.module(params)
      for e in self.qk:
        qk = self.model.node(module, e.path, e.stacked)
        weights.append(("qk", e.quantizer, qk.raw_qk_product(),
                        {"step": qk.qk_weight_quant.step[...]} if isinstance(e.quantizer, Lsq)
                        else {}))
    errors: dict = {}
    trusted: dict = {}
    for kind, quantizer, w, state in weights:
      q = quantizer.fake_quant(w, state)
      if isinstance(quantizer, Quest) and quantizer.hadamard == "half":
        q = quantizer.rotate(q, 0)  # compare in the original basis
      errors.setdefault(kind, []).append(jnp.mean(jnp.square(q - w)) / jnp.mean(w * w))
      if isinstance(quantizer, Quest):
        trusted.setdefault(kind, []).append(quantizer.trusted(w))
    out = {f"quant/weight_rel_mse/{k}": float(jnp.mean(jnp.stack(v))) for k, v in errors.items()}
    out.update({f"quant/trusted/{k}": float(jnp.mean(jnp.stack(v))) for k, v in trusted.items()})
    return out

  def buffer_metrics(self, buffers) -> dict:
    out = {}
    if self.cga_step:  # before the phase the mask is all zeros: everything trains
      frozen = [get_path(buffers, e.at(WEIGHT, "cga_frozen")) for e in self.linears]
      out["quant/cga_trainable"] = 1.0 - float(sum(jnp.sum(f) for f in frozen)) / sum(
          f.size for f in frozen)
    fracs: dict = {}
    for entry in self.tracked:
      ema = get_path(buffers, entry.at(WEIGHT, "osc_ema"))
      fracs.setdefault(entry.tag.kind, []).append((jnp.sum(ema > OSC_THRESHOLD), ema.size))
    out.update({f"quant/osc/{k}": float(sum(n for n, _ in v)) / sum(s for _, s in v)
                for k, v in fracs.items()})
    return out
