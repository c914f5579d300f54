"""StatsQ weight quantizer (Liu et al., "Oscillation-free Quantization for Low-bit Vision
Transformers", ICML 2023; docs/qat.md): per-output-channel scale 2 mean|W|, mid-rise
grid of 2^b levels, identity straight-through gradient, no learnable scale."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def statsq_codes(w: jax.Array, bits: int, *, axis: int = 0, eps: float = 1e-6):
  """(integer codes in [-2^(b-1), 2^(b-1)), scale s) for W, statistics along `axis` (the
  fan-in of a Flax (in, out) kernel): level value = s (code + 1/2) / 2^(b-1)."""
  n = 2 ** (bits - 1)
  s = jax.lax.stop_gradient(2 * jnp.mean(jnp.abs(w), axis=axis, keepdims=True))
  w_tilde = jnp.clip(w / jnp.where(s > 0, s, 1.0), -1.0, 1.0 - eps)
  return jnp.clip(jnp.floor(w_tilde * n), -n, n - 1), s


def statsq_quantize(w: jax.Array, bits: int, *, axis: int = 0) -> jax.Array:
  """Fake-quantized W (forward: the grid values; gradient: identity). fp32."""
  w = w.astype(jnp.float32)
  codes, s = statsq_codes(w, bits, axis=axis)
  q = s * (codes + 0.5) / 2 ** (bits - 1)
  return q + (w - jax.lax.stop_gradient(w))  # forward exactly q, identity gradient
