"""Attention op: reference (softmax, LSSA, LSSAR) and the dispatching `attention()`."""
from pallas_kernels.attention.api import IMPLEMENTATIONS, SCORES, attention
from pallas_kernels.attention.reference import attention_weights, chunked_attention

__all__ = ["IMPLEMENTATIONS", "SCORES", "attention", "attention_weights", "chunked_attention"]
