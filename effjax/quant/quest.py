"""QuEST quantizer (Panferov et al., "QuEST: Stable Training of LLMs with 1-Bit Weights and
Activations", ICML 2025; docs/qat.md): Hadamard rotation, RMS-scaled Gaussian-optimal
clip, zero-free mid-rise grid of 2^b levels, trust-masked straight-through gradient."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from effjax.quant.hadamard import block_hadamard, hadamard_block_size

# MSE-optimal clip (in units of sigma) of a b-bit uniform quantizer for a standard Gaussian.
ALPHA = {1: 0.797885, 2: 1.493535, 3: 2.051068, 4: 2.513931, 5: 2.916094, 6: 3.276597,
         7: 3.601050, 8: 3.884939}
ONE_BIT_CLIP = 1.3  # the 1-bit runs used a plain clip mask |x| <= 1.3 s instead of trust


def _grid(xh, bits: int, axis: int):
  """(codes k, step, sigma, clip s) of QuEST's grid; level value (k + 1/2) step."""
  if bits not in ALPHA:
    raise ValueError(f"QuEST bits must be 1-8; got {bits}")
  sigma = jax.lax.stop_gradient(jnp.sqrt(jnp.mean(xh * xh, axis=axis, keepdims=True)))
  s = ALPHA[bits] * sigma
  if bits == 1:  # levels +-s: k in {-1, 0}, step 2 s
    return jnp.where(jax.lax.stop_gradient(xh) >= 0, 0.0, -1.0), 2 * s, sigma, s
  levels = 2 ** bits
  step = 2 * s / (levels - 1)
  # Nearest half-integer multiple of the step: floor(x / step) + 1/2, in [-2^(b-1), 2^(b-1)).
  k = jnp.clip(jnp.floor(jnp.clip(jax.lax.stop_gradient(xh), -s, s)
                         / jnp.where(step > 0, step, 1.0)), -(levels // 2), levels // 2 - 1)
  return k, step, sigma, s


def quest_codes(xh: jax.Array, bits: int, *, axis: int = -1) -> tuple[jax.Array, jax.Array]:
  """QuEST's grid on rotated values xh (fp32), rows along `axis`: integer codes k in
  [-2^(b-1), 2^(b-1)) and the step (no gradient), level value (k + 1/2) step. The clip is
  s = alpha_b sigma, sigma = sqrt(mean(xh^2)) per row, step = 2 s / (2^b - 1)."""
  k, step, _, _ = _grid(xh.astype(jnp.float32), bits, axis)
  return k, step


def quest_rotated(xh: jax.Array, bits: int, *, axis: int = -1, trust: float | None = None
                  ) -> tuple[jax.Array, dict]:
  """QuEST steps 2-6 on already-rotated values xh (fp32), rows along `axis`.

  Returns (y, stats): y has the forward value of the quantized q and the gradient of
  xh * mask (mask = trust region, docs/qat.md); stats hold the quantization
  MSE and the trusted fraction, without gradient. trust: factor on the default trust
  radius T = alpha_b / (2^b - 1) sigma (half a grid step); None means 1.
  """
  xh = xh.astype(jnp.float32)
  k, step, sigma, s = _grid(xh, bits, axis)
  q = (k + 0.5) * step
  if bits == 1:
    mask = jnp.abs(xh) <= ONE_BIT_CLIP * s
  else:
    radius = (1.0 if trust is None else trust) * ALPHA[bits] / (2 ** bits - 1) * sigma
    mask = jnp.abs(q - xh) <= radius
  masked = xh * mask
  y = q + (masked - jax.lax.stop_gradient(masked))  # forward exactly q, gradient the mask
  stats = {"mse": jnp.mean(jnp.square(q - xh)), "trusted": jnp.mean(mask.astype(jnp.float32))}
  return y, jax.lax.stop_gradient(stats)


def quest_quantize(x: jax.Array, bits: int, *, axis: int = -1, trust: float | None = None,
                   hadamard_block: int | None = 128) -> jax.Array:
  """QuEST fake-quantization of x with rows along `axis`, in x's own basis.

  Rotates by the block Hadamard (hadamard_block=None or 0: no rotation), quantizes each
  row (quest_rotated) and rotates back. Forward = the quantized values, gradient = the
  trust-masked identity (in the rotated basis). Computed in fp32; returns x.dtype.
  """
  block = hadamard_block_size(x.shape[axis], hadamard_block) if hadamard_block else 0
  xh = block_hadamard(x.astype(jnp.float32), block, axis) if block else x.astype(jnp.float32)
  y, _ = quest_rotated(xh, bits, axis=axis, trust=trust)
  return (block_hadamard(y, block, axis) if block else y).astype(x.dtype)
