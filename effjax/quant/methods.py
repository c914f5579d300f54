"""One object per weight quantizer: fake-quantization, integer codes, and their convention.

The hooks (effjax/quant/hooks.py), the oscillation tracker and CGA
(effjax/train/quant_extension.py) and the export (effjax/quant/export.py) all call these, so
each quantizer's maths is written once:

  fake_quant(w, state)  forward-quantized kernel [in, out] (rows = output units over fan-in,
                        axis 0), with the method's straight-through gradient, in the basis
                        the matmul uses
  codes(w, state)       (integer codes [in, out], scale): value = (codes + offset) * scale,
                        in the rotated basis for QuEST (block Hadamard along fan-in)
  block(d_in)           QuEST's Hadamard block along fan-in (0: no rotation)

`state` holds the hook's own parameters (LSQ: {"step": [out]}).
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from effjax.quant import lsq
from effjax.quant.hadamard import block_hadamard, hadamard_block_size
from effjax.quant.quest import quest_codes, quest_rotated
from effjax.quant.statsq import statsq_codes, statsq_quantize

HADAMARD_BLOCK = 128


@dataclasses.dataclass(frozen=True)
class Quest:
  """QuEST (Panferov et al. 2025). hadamard: full (rotate back), half (stay rotated: the
  input is rotated too), none."""
  bits: int
  trust: float | None = None
  hadamard: str = "full"
  method = "quest"
  offset = 0.5

  def block(self, d_in: int) -> int:
    return hadamard_block_size(d_in, HADAMARD_BLOCK) if self.hadamard != "none" else 0

  def rotate(self, x, axis: int):
    block = self.block(x.shape[axis])
    return block_hadamard(x, block, axis) if block else x

  def fake_quant(self, w_IxO, state=None):
    del state
    y, _ = quest_rotated(self.rotate(w_IxO.astype(jnp.float32), 0), self.bits, axis=0,
                         trust=self.trust)
    return self.rotate(y, 0) if self.hadamard == "full" else y

  def codes(self, w_IxO, state=None):
    del state
    return quest_codes(self.rotate(w_IxO.astype(jnp.float32), 0), self.bits, axis=0)

  def trusted(self, w_IxO) -> jnp.ndarray:
    """Fraction of weights inside the trust region."""
    _, stats = quest_rotated(self.rotate(w_IxO.astype(jnp.float32), 0), self.bits, axis=0,
                             trust=self.trust)
    return stats["trusted"]


@dataclasses.dataclass(frozen=True)
class StatsQ:
  """StatsQ (OFQ, Liu et al. 2023): scale 2 mean|W| per output unit, identity STE."""
  bits: int
  method = "statsq"
  offset = 0.5

  def block(self, d_in: int) -> int:
    del d_in
    return 0

  def fake_quant(self, w_IxO, state=None):
    del state
    return statsq_quantize(w_IxO, self.bits)

  def codes(self, w_IxO, state=None):
    del state
    codes, s = statsq_codes(w_IxO.astype(jnp.float32), self.bits)
    return codes, s / 2 ** (self.bits - 1)


@dataclasses.dataclass(frozen=True)
class Lsq:
  """LSQ (Esser et al. 2020) with a learnable per-output-channel step: state {"step": [out]}."""
  bits: int
  method = "lsq"
  offset = 0.0

  def block(self, d_in: int) -> int:
    del d_in
    return 0

  def fake_quant(self, w_IxO, state):
    return lsq.lsq_quantize(w_IxO, state["step"], self.bits, numel=w_IxO.size)

  def codes(self, w_IxO, state):
    q_n, q_p = lsq.lsq_range(self.bits)
    step = jnp.abs(state["step"]) + 1e-8
    return jnp.round(jnp.clip(w_IxO.astype(jnp.float32) / step, -q_n, q_p)), step


def weight_quantizer(quant, *, derived: bool = False):
  """The weight quantizer for a QuantConfig (None for quant.method=none). derived: the
  weight is computed from other parameters (QKR's W_q W_k^T): QuEST rotates back."""
  if quant.method == "quest":
    hadamard = "full" if quant.hadamard == "auto" else quant.hadamard
    if derived and hadamard == "half":
      hadamard = "full"
    return Quest(quant.weight_bits, quant.trust, hadamard)
  if quant.method == "statsq":
    return StatsQ(quant.weight_bits)
  if quant.method == "lsq":
    return Lsq(quant.weight_bits)
  return None


def dequantize(codes, scale, offset: float, block: int, rotate_back: bool = True):
  """Weights from codes (numpy or jax arrays): (codes + offset) scale, rotated back along
  fan-in by the block Hadamard when `block` (rotate_back=False keeps QuEST's rotated basis,
  what a quant.hadamard=half model multiplies with)."""
  w = (jnp.asarray(codes, jnp.float32) + offset) * jnp.asarray(scale, jnp.float32)
  return block_hadamard(w, block, 0) if block and rotate_back else w
