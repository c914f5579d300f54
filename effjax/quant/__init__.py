"""Quantization-aware training (docs/qat.md): QuEST, StatsQ and LSQ as `LinearHook`s."""

from effjax.quant.hadamard import block_hadamard, hadamard_block_size, hadamard_matrix
from effjax.quant.hooks import QUANT_LAYERS, make_hooks
from effjax.quant.lsq import lsq_quantize
from effjax.quant.quest import ALPHA, quest_quantize, quest_rotated
from effjax.quant.statsq import statsq_quantize

__all__ = ["ALPHA", "QUANT_LAYERS", "block_hadamard", "hadamard_block_size", "hadamard_matrix",
           "make_hooks", "lsq_quantize", "quest_quantize", "quest_rotated", "statsq_quantize"]
