"""LSQ quantizer with a learnable step (Esser et al., "Learned Step Size Quantization",
ICLR 2020): v = round(clip(x / s, -Q_n, Q_p)) s, straight-through rounding, the step's
gradient scaled by 1 / sqrt(numel Q_p)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def lsq_range(bits: int) -> tuple[int, int]:
  """(Q_n, Q_p) for signed b-bit integers."""
  return 2 ** (bits - 1), 2 ** (bits - 1) - 1


def initial_step(mean_abs: float, bits: int) -> float:
  """LSQ's init 2 mean|x| / sqrt(Q_p)."""
  return 2 * mean_abs / math.sqrt(lsq_range(bits)[1])


def _scale_grad(x, factor: float):
  """Value x, gradient multiplied by factor."""
  return jax.lax.stop_gradient(x) + (x * factor - jax.lax.stop_gradient(x * factor))


def lsq_quantize(x: jax.Array, step: jax.Array, bits: int, *, numel: int) -> jax.Array:
  """Fake-quantized x with learnable step (broadcast against x); fp32 maths, x.dtype out."""
  if bits < 2:
    raise ValueError(f"LSQ needs bits >= 2 (Q_p = 2^(b-1) - 1); got {bits}")
  q_n, q_p = lsq_range(bits)
  s = _scale_grad(jnp.abs(step.astype(jnp.float32)) + 1e-8, 1.0 / math.sqrt(numel * q_p))
  v = jnp.clip(x.astype(jnp.float32) / s, -q_n, q_p)
  v = jnp.round(v) + (v - jax.lax.stop_gradient(v))  # straight-through rounding
  return (v * s).astype(x.dtype)
