"""Quantizers as `LinearHook`s: what the model builder attaches to a block linear.

`quant.method` picks the pair (weight quantizer, input-activation quantizer):
  quest   QuEST weights (rows = output units, over fan-in) and QuEST inputs (rows = tokens)
  statsq  StatsQ weights, LSQ inputs (the OFQ recipe)
  lsq     LSQ weights (learnable per-output-channel step), LSQ inputs
`quant.hadamard` (QuEST): full = quantize in the rotated basis and rotate back (plain
matmul in the original basis); half = hand the matmul the rotated operands, using
x W = (x H)(H W); none = no rotation. The maths lives in the quantizer objects
(effjax/quant/methods.py); the hooks hold their state: LSQ steps (params), and per-weight
buffers for oscillation tracking and CGA.

A quantized Linear carries its hooks under the names WEIGHT and INPUT, so their state is
found as `<linear>/weight_quant/...` whatever else is hooked.
"""

from __future__ import annotations

import math

import jax.numpy as jnp

from effjax.models.layers import Buffer, LinearHook, make_param
from effjax.quant import lsq
from effjax.quant.methods import Lsq, Quest, weight_quantizer
from effjax.quant.quest import quest_rotated

QUANT_LAYERS = ("qkv", "attn_out", "mlp")
WEIGHT, INPUT = "weight_quant", "input_quant"


def _per_weight(d_in: int, d_out: int, axes) -> Buffer:
  """Per-weight buffers carry the kernel's logical axes, so they are sharded like it."""
  return Buffer(jnp.zeros((d_in, d_out), jnp.float32), axes=axes)


class WeightQuant(LinearHook):
  """Fake-quantizes the weight with `quantizer` (effjax/quant/methods.py).

  track: per-weight oscillation state (OFQ; docs/qat.md): last integer code, the direction of
  its last change, an EMA of direction flips; `osc_started` marks the first update.
  cga: the CGA freeze mask (1 = frozen). on_grid: weights are already quantized (a loaded
  export): the hook passes them through."""

  def __init__(self, quantizer, d_in: int, d_out: int, *, axes, std: float, track: bool = False,
               cga: bool = False, on_grid: bool = False):
    self.quantizer, self.on_grid = quantizer, on_grid
    if isinstance(quantizer, Lsq):  # initialised from the init std: E|W| = std sqrt(2/pi)
      init = lsq.initial_step(std * math.sqrt(2 / math.pi), quantizer.bits)
      self.step = make_param(jnp.full((d_out,), init, jnp.float32), "vector", (axes[1],))
    if track:
      self.osc_code, self.osc_dir, self.osc_ema = (_per_weight(d_in, d_out, axes)
                                                   for _ in range(3))
      self.osc_started = Buffer(jnp.zeros((), jnp.float32))
    if cga:
      self.cga_frozen = _per_weight(d_in, d_out, axes)

  def state(self) -> dict:
    """The quantizer's parameters (LSQ's step), as arrays."""
    return {"step": self.step[...]} if isinstance(self.quantizer, Lsq) else {}

  def weight(self, w_IxO):
    if self.on_grid:
      return w_IxO
    return self.quantizer.fake_quant(w_IxO, self.state()).astype(w_IxO.dtype)


class QuestInput(LinearHook):
  """QuEST on the input (rows = tokens, the last axis), in the weight quantizer's basis."""

  def __init__(self, quantizer: Quest, bits: int):
    self.quantizer, self.bits = quantizer, bits

  def input(self, x):
    q = self.quantizer
    if not self.bits and q.hadamard != "half":
      return x
    xh = q.rotate(x.astype(jnp.float32), -1)
    if self.bits:
      xh, _ = quest_rotated(xh, self.bits, axis=-1, trust=q.trust)
    if q.hadamard == "full":
      xh = q.rotate(xh, -1)
    return xh.astype(x.dtype)


class LsqInput(LinearHook):
  """Learnable per-tensor step for the input, initialised for unit-RMS Gaussian inputs
  (E|x| = sqrt(2/pi); the block linears read RMS-normalised inputs, the MLP down
  projection excepted: its step adapts during training)."""

  def __init__(self, d_in: int, bits: int):
    self.bits, self.d_in = bits, d_in
    init = lsq.initial_step(math.sqrt(2 / math.pi), bits)
    self.step = make_param(jnp.asarray(init, jnp.float32), "vector", ())

  def input(self, x):
    return lsq.lsq_quantize(x, self.step[...], self.bits, numel=self.d_in)


def make_hooks(quant, d_in: int, d_out: int, *, std: float, axes,
               derived: bool = False) -> dict[str, LinearHook]:
  """{WEIGHT: ..., INPUT: ...} for one quantized linear [d_in, d_out] with logical `axes`.

  derived: the weight is computed from other parameters (QKR's W_q W_k^T), so there is no
  stored kernel to track, freeze or export on the grid, and QuEST rotates back ("half" would
  leave the keys, which are the layer's inputs, in the rotated basis)."""
  quantizer = weight_quantizer(quant, derived=derived)
  stored = not derived
  hooks = {WEIGHT: WeightQuant(quantizer, d_in, d_out, axes=axes, std=std,
                               track=stored and quant.method in ("statsq", "lsq"),
                               cga=stored and quant.method == "statsq" and quant.cga_start > 0,
                               on_grid=quant.weights_on_grid and stored)}
  if isinstance(quantizer, Quest):
    hooks[INPUT] = QuestInput(quantizer, quant.act_bits)
  elif quant.act_bits:
    hooks[INPUT] = LsqInput(d_in, quant.act_bits)
  return hooks
