"""QAT in the trainer (TECHNIQUES.md 5): oscillation tracking and CGA as post-update hooks, and
eval metrics per layer type (qkv, attn_out, mlp):

  quant/weight_rel_mse/<type>  mean (Q(W) - W)^2 / mean W^2 of the quantized kernels
                               (type qk: QKR's per-head W_q W_k^T products)
  quant/trusted/<type>         QuEST: fraction of weights inside the trust region
  quant/osc/<type>             fraction of weights whose flip EMA exceeds OSC_THRESHOLD
                               (StatsQ / LSQ weights)
  quant/cga_trainable          CGA: fraction of quantized weights still training

Oscillation (Nagel et al. 2022; OFQ, Liu et al. 2023): after every optimizer step each
weight's integer code is compared with the previous one; a change in the opposite
direction to the weight's last change is a flip; ema <- (1 - m) ema + m flip, m = 0.01.
"""

from __future__ import annotations

import jax.numpy as jnp

from effjax.models.attention import qk_product
from effjax.quant import lsq
from effjax.quant.hadamard import block_hadamard, hadamard_block_size
from effjax.quant.quest import quest_quantize, quest_rotated
from effjax.quant.statsq import statsq_codes, statsq_quantize
from effjax.train.extensions import Extension

OSC_MOMENTUM = 0.01
OSC_THRESHOLD = 0.01  # flips more often than about once per 100 steps


def _layer_type(path: tuple) -> str:
  names = [p for p in path if isinstance(p, str)]
  if "attn" in names:
    return "attn_out" if "o" in names else "qkv"
  return "mlp"


def _get(tree, path):
  for p in path:
    tree = tree[p]
  return tree


def _set(tree, path, value):
  """A copy of the nested dict `tree` with tree[path] = value (untouched branches shared)."""
  if not path:
    return value
  out = dict(tree)
  out[path[0]] = _set(tree[path[0]], path[1:], value)
  return out


def _linear_paths(params, layers, qkr: bool = False) -> list[tuple]:
  """Paths of the quantized block Linears: kernels under blocks/*/attn or blocks/*/ffn
  whose layer type is in quant.layers (QuEST hooks hold no params, so go by position).
  Under QKR the q and k projections are not quantized themselves (their product is)."""
  found = []

  def walk(node, path):
    if isinstance(node, dict):
      if ("kernel" in node and "blocks" in path and ("attn" in path or "ffn" in path)
          and _layer_type(path) in layers and not (qkr and path[-1] in ("q", "k"))):
        found.append(path)
      for k, v in node.items():
        walk(v, path + (k,))
  walk(params, ())
  return found


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

  def __init__(self, config, model):
    self.q = config.quant
    self.linears = _linear_paths(model.initial_params, self.q.layers, self.q.qkr)
    self.qkr_attn = sorted({p[:-1] for p in self.linears if p[-1] == "v"}) if self.q.qkr else []
    self.heads = (model.dims.n_heads, model.dims.n_kv_heads)
    self.tracked = [p for p in self.linears if self.q.method in ("statsq", "lsq")]
    self.cga_step = int(round(self.q.cga_start * config.train.steps)) if self.q.cga_start else 0

  def _codes(self, params, path):
    w = _get(params, path + ("kernel",))
    if self.q.method == "statsq":
      return statsq_codes(w, self.q.weight_bits)[0]
    step = jnp.abs(_get(params, path + ("hooks", 0, "step"))) + 1e-8
    q_n, q_p = lsq.lsq_range(self.q.weight_bits)
    return jnp.round(jnp.clip(w / step, -q_n, q_p))

  def _track(self, new_state, old_state, aux):
    del old_state, aux
    buffers = new_state.buffers
    for path in self.tracked:
      bpath = path + ("hooks", 0)
      b = _get(buffers, bpath)
      code = self._codes(new_state.params, path)
      started = b["osc_started"] > 0
      delta = jnp.where(started, jnp.sign(code - b["osc_code"]), 0.0)
      flip = ((delta != 0) & (b["osc_dir"] != 0) & (delta != b["osc_dir"])).astype(jnp.float32)
      ema = jnp.where(started, (1 - OSC_MOMENTUM) * b["osc_ema"] + OSC_MOMENTUM * flip,
                      b["osc_ema"])
      buffers = _set(buffers, bpath, {
          **b, "osc_code": code, "osc_dir": jnp.where(delta != 0, delta, b["osc_dir"]),
          "osc_ema": ema, "osc_started": jnp.ones_like(b["osc_started"])})
    return new_state.replace(buffers=buffers)

  def _frozen(self, state, path):
    """The freeze mask for the step that `state` starts. In the phase it is recomputed from
    the current weights at every step (OFQ recomputes it every iteration), and a weight
    once frozen stays frozen: a weight that leaves the boundary band freezes where it is,
    so the trainable set only shrinks (the annealing). All zeros before the phase."""
    mask = _get(state.buffers, path + ("hooks", 0, "cga_frozen"))
    now = jnp.maximum(mask, cga_confident(_get(state.params, path + ("kernel",)), self.q.weight_bits,
                                                self.q.cga_br))
    return jnp.where(state.step >= self.cga_step, now, mask)

  def _cga(self, new_state, old_state, aux):
    """CGA (OFQ, Liu et al. 2023, Sec. 4.3): during the phase, the weights frozen for this
    step (`_frozen`) are restored after the optimizer step, and the mask is stored."""
    del aux
    params, buffers = new_state.params, new_state.buffers
    in_phase = old_state.step >= self.cga_step
    for path in self.linears:
      frozen = self._frozen(old_state, path)
      buffers = _set(buffers, path + ("hooks", 0, "cga_frozen"), frozen)
      old_w = _get(old_state.params, path + ("kernel",))
      new_w = _get(params, path + ("kernel",))
      params = _set(params, path + ("kernel",),
                    jnp.where(in_phase & (frozen > 0), old_w, new_w))
    return new_state.replace(params=params, buffers=buffers)

  def _cga_grads(self, grads, state):
    """CGA: frozen weights get no gradient (so they neither enter the global-norm clip nor
    the Adam moments), from the phase's first step on."""
    for path in self.linears:
      g = _get(grads, path + ("kernel",))
      grads = _set(grads, path + ("kernel",),
                   jnp.where(self._frozen(state, path) > 0, jnp.zeros_like(g), g))
    return grads

  def grad_hooks(self):
    return [self._cga_grads] if self.cga_step else []

  def hooks(self):
    # CGA first: oscillation tracking must see the restored weights.
    return ([self._cga] if self.cga_step else []) + ([self._track] if self.tracked else [])

  def _quantized_weight(self, w, step_path, params):
    bits = self.q.weight_bits
    if self.q.method == "quest":
      block = 0 if self.q.hadamard == "none" else hadamard_block_size(w.shape[0])
      return quest_quantize(w, bits, axis=0, hadamard_block=block or None)
    if self.q.method == "statsq":
      return statsq_quantize(w, bits)
    return lsq.lsq_quantize(w, _get(params, step_path), bits, numel=w.size)

  def _trusted(self, w):
    block = 0 if self.q.hadamard == "none" else hadamard_block_size(w.shape[0])
    wh = block_hadamard(w, block, 0) if block else w
    return quest_rotated(wh, self.q.weight_bits, axis=0, trust=self.q.trust)[1]["trusted"]

  def _qk_product(self, params, attn_path):
    """QKR's W_qk as the attention builds it (before quantization)."""
    return qk_product(_get(params, attn_path + ("q", "kernel")),
                      _get(params, attn_path + ("k", "kernel")), *self.heads)

  def eval_params_metrics(self, params) -> dict:
    weights = [(_layer_type(p), _get(params, p + ("kernel",)), p + ("hooks", 0, "step"))
               for p in self.linears]
    weights += [("qk", self._qk_product(params, p), p + ("qk_hooks", 0, "step"))
                for p in self.qkr_attn]
    errors: dict = {}
    trusted: dict = {}
    for kind, w, step_path in weights:
      err = jnp.mean(jnp.square(self._quantized_weight(w, step_path, params) - w)) / jnp.mean(w * w)
      errors.setdefault(kind, []).append(err)
      if self.q.method == "quest":
        trusted.setdefault(kind, []).append(self._trusted(w))
    out = {f"quant/weight_rel_mse/{k}": float(jnp.mean(jnp.stack(v))) for k, v in errors.items()}
    out.update({f"quant/trusted/{k}": float(jnp.mean(jnp.stack(v))) for k, v in trusted.items()})
    return out

  def eval_buffer_metrics(self, buffers) -> dict:
    out = {}
    if self.cga_step:  # before the phase the mask is all zeros: everything trains
      frozen = [_get(buffers, p + ("hooks", 0, "cga_frozen")) for p in self.linears]
      out["quant/cga_trainable"] = 1.0 - float(sum(jnp.sum(f) for f in frozen)) / sum(
          f.size for f in frozen)
    fracs: dict = {}
    for path in self.tracked:
      ema = _get(buffers, path + ("hooks", 0, "osc_ema"))
      fracs.setdefault(_layer_type(path), []).append(
          (jnp.sum(ema > OSC_THRESHOLD), ema.size))
    out.update({f"quant/osc/{k}": float(sum(n for n, _ in v)) / sum(s for _, s in v)
                for k, v in fracs.items()})
    return out
