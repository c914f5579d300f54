"""Quantizers as `LinearHook`s, and the factory that builds the block linears with them.

`quant.method` picks the pair (weight quantizer, input-activation quantizer):
  quest   QuEST weights (rows = output units, over fan-in) and QuEST inputs (rows = tokens)
  statsq  StatsQ weights, LSQ inputs (the OFQ recipe)
  lsq     LSQ weights (learnable per-output-channel step), LSQ inputs
`quant.hadamard` (QuEST): full = quantize in the rotated basis and rotate back (plain
matmul in the original basis); half = hand the matmul the rotated operands, using
x W = (x H)(H W); none = no rotation. Only the linears named in `quant.layers` are hooked;
the embedding, LM head, norms and attention products stay in high precision.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
from flax import nnx

from effjax.models.layers import Buffer, Linear, LinearHook, make_param
from effjax.quant import lsq
from effjax.quant.hadamard import block_hadamard, hadamard_block_size
from effjax.quant.quest import quest_rotated
from effjax.quant.statsq import statsq_quantize

QUANT_LAYERS = ("qkv", "attn_out", "mlp")
HADAMARD_BLOCK = 128


class QuestHook(LinearHook):
  """QuEST on the weight (rows along axis 0) and/or the input (rows along the last axis)."""

  def __init__(self, d_in: int, *, weight_bits: int, act_bits: int, trust: float | None,
               hadamard: str, on_grid: bool = False):
    self.weight_bits, self.act_bits, self.trust = weight_bits, act_bits, trust
    self.on_grid = on_grid  # weights already quantized (a loaded export)
    hadamard = "full" if hadamard == "auto" else hadamard
    self.hadamard = hadamard
    self.block = hadamard_block_size(d_in, HADAMARD_BLOCK) if hadamard != "none" else 0

  def _apply(self, x, bits, axis):
    x32 = x.astype(jnp.float32)
    xh = block_hadamard(x32, self.block, axis) if self.block else x32
    if bits:
      xh, _ = quest_rotated(xh, bits, axis=axis, trust=self.trust)
    if self.block and self.hadamard == "full":
      xh = block_hadamard(xh, self.block, axis)
    return xh.astype(x.dtype)

  def weight(self, w_IxO):
    if self.on_grid:  # a loaded export, already in the basis the matmul uses
      return w_IxO
    return self._apply(w_IxO, self.weight_bits, 0)

  def input(self, x):
    if not self.act_bits and self.hadamard != "half":
      return x
    return self._apply(x, self.act_bits, -1)


def _oscillation_buffers(d_in: int, d_out: int, axes) -> dict:
  """Per-weight state for oscillation tracking (TECHNIQUES.md 5.2): last integer code, the
  direction of its last change, an EMA of direction flips; `osc_started` marks the first
  update (so the initial code is not counted as a change). Per-weight buffers carry the
  kernel's logical axes, so they are sharded like it."""
  zeros = lambda: Buffer(jnp.zeros((d_in, d_out), jnp.float32), axes=axes)
  return {"osc_code": zeros(), "osc_dir": zeros(), "osc_ema": zeros(),
          "osc_started": Buffer(jnp.zeros((), jnp.float32))}


class StatsQWeightHook(LinearHook):
  def __init__(self, bits: int, d_in: int = 0, d_out: int = 0, track: bool = False,
               cga: bool = False, axes=(None, None)):
    """axes: the kernel's logical axes (for the per-weight buffers' sharding)."""
    self.bits = bits
    if track:
      for k, v in _oscillation_buffers(d_in, d_out, axes).items():
        setattr(self, k, v)
    if cga:  # CGA freeze mask (1 = frozen), set when the CGA phase starts
      self.cga_frozen = Buffer(jnp.zeros((d_in, d_out), jnp.float32), axes=axes)

  on_grid = False

  def weight(self, w_IxO):
    return w_IxO if self.on_grid else statsq_quantize(w_IxO, self.bits, axis=0)


class LsqWeightHook(LinearHook):
  """Learnable per-output-channel step, initialised from the init std (E|W| = std sqrt(2/pi))."""

  def __init__(self, d_in: int, d_out: int, bits: int, *, std: float, axes, track: bool = False):
    """axes: the kernel's logical axes (the step follows the output axis)."""
    self.bits, self.numel = bits, d_in * d_out
    init = lsq.initial_step(std * math.sqrt(2 / math.pi), bits)
    self.step = make_param(jnp.full((d_out,), init, jnp.float32), "vector", (axes[1],))
    if track:
      for k, v in _oscillation_buffers(d_in, d_out, axes).items():
        setattr(self, k, v)

  on_grid = False

  def weight(self, w_IxO):
    if self.on_grid:
      return w_IxO
    return lsq.lsq_quantize(w_IxO, self.step[...], self.bits, numel=self.numel)


class LsqInputHook(LinearHook):
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
               derived: bool = False) -> list[LinearHook]:
  """The hooks of one quantized linear [d_in, d_out] with logical `axes` for a QuantConfig.

  derived: the weight is computed from other parameters (QKR's W_q W_k^T), so there is no
  stored kernel to track, freeze or export on the grid, and QuEST rotates back ("half" would
  leave the keys, which are the layer's inputs, in the rotated basis)."""
  on_grid = quant.weights_on_grid and not derived
  if quant.method == "quest":
    hadamard = "full" if derived and quant.hadamard == "half" else quant.hadamard
    return [QuestHook(d_in, weight_bits=quant.weight_bits, act_bits=quant.act_bits,
                      trust=quant.trust, hadamard=hadamard, on_grid=on_grid)]
  track = not derived
  weight = (StatsQWeightHook(quant.weight_bits, d_in, d_out, track=track,
                             cga=quant.cga_start > 0 and track, axes=axes)
            if quant.method == "statsq" else
            LsqWeightHook(d_in, d_out, quant.weight_bits, std=std, axes=axes, track=track))
  weight.on_grid = on_grid  # a loaded export: weights are final
  return [weight] + ([LsqInputHook(d_in, quant.act_bits)] if quant.act_bits else [])


def qkr_hooks(quant, d_model: int, n_heads: int, *, std: float, head_dim: int):
  """QKR (OFQ, Liu et al. 2023): hooks for the per-head W_qk^h = W_q^h W_k^hT, held as one
  [d_model, n_heads * d_model] kernel (fan-in first, like a Linear), or None when quant.qkr
  is off. Its inputs are the attention inputs (one quantizer for queries and keys)."""
  if quant is None or not quant.qkr or quant.method == "none" or "qkv" not in quant.layers:
    return None
  std_qk = std * std * math.sqrt(head_dim)  # entries of a product of two std-`std` matrices
  return make_hooks(quant, d_model, n_heads * d_model, std=std_qk, axes=("embed", "heads"),
                    derived=True)


def linear_factory(quant, kind: str):
  """A `Linear` constructor for block linears of `kind` (one of QUANT_LAYERS): hooked when
  quantization is on and `kind` is in quant.layers, else plain."""
  if quant is None or quant.method == "none" or kind not in quant.layers:
    return Linear

  def make(d_in, d_out, *, rngs: nnx.Rngs, axes=("embed", "mlp"), std=None, **kwargs):
    std = d_in ** -0.5 if std is None else std
    hooks = make_hooks(quant, d_in, d_out, std=std, axes=axes)
    return Linear(d_in, d_out, rngs=rngs, axes=axes, std=std, hooks=hooks, **kwargs)

  return make
