"""Quantization-aware training (TECHNIQUES.md 5): QuEST, StatsQ and LSQ as `LinearHook`s."""

from effjax.quant.hadamard import block_hadamard, hadamard_block_size, hadamard_matrix
from effjax.quant.hooks import QUANT_LAYERS, linear_factory
from effjax.quant.lsq import lsq_quantize
from effjax.quant.quest import ALPHA, quest_quantize, quest_rotated
from effjax.quant.statsq import statsq_quantize

__all__ = ["ALPHA", "QUANT_LAYERS", "block_hadamard", "hadamard_block_size", "hadamard_matrix",
           "linear_factory", "lsq_quantize", "quest_quantize", "quest_rotated", "statsq_quantize"]
