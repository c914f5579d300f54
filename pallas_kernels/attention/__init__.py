"""Attention op: pure-jnp reference (softmax, LSSA, LSSAR; the spec), Pallas kernels
(forward and backward, interpret mode on CPU, Mosaic on TPU) and the dispatching
`attention(..., implementation=...)`. See api.py for positions, segments and N_i."""
from pallas_kernels.attention.api import IMPLEMENTATIONS, SCORES, attention, unavailable_reason
from pallas_kernels.attention.kernel import flash_attention
from pallas_kernels.attention.reference import attention_weights, chunked_attention

__all__ = ["IMPLEMENTATIONS", "SCORES", "attention", "attention_weights", "chunked_attention",
           "flash_attention", "unavailable_reason"]
