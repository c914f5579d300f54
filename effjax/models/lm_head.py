"""Chunked LM head + cross-entropy: per-token NLL without the [B, L, V] fp32 logits.

The plain path computes logits_BxLxV = (h W) * output_mult, casts them to fp32 and takes a
log-softmax: at a real vocabulary (GPT-2: V = 50304) that is the largest activation of the
step (16 x 2048 x 50304 x 4 B = 6.6 GB) and is kept for the backward. Here the sequence is
cut into chunks of `chunk` positions; a lax.scan runs the head and the cross-entropy chunk
by chunk under jax.checkpoint, so one [B, chunk, V] block lives at a time and the backward
recomputes each chunk's logits (one extra head matmul, ~2 N_head FLOPs per token) instead of
storing them (the "chunked cross-entropy" of e.g. Wijmans et al. 2024, "Cut your losses",
without the custom kernel). Every element is computed by the same operations as the plain
path (matmul in the compute dtype, x output_mult, fp32 log-softmax), so losses agree to
rounding of the final mean, and gradients to fp32 summation order.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from effjax.parallel.sharding import constrain


def token_nll(logits_BxLxV: jax.Array, targets_BxL: jax.Array) -> jax.Array:
  """Per-token negative log-likelihood in nats, computed in fp32."""
  logp = jax.nn.log_softmax(logits_BxLxV.astype(jnp.float32), axis=-1)
  return -jnp.take_along_axis(logp, targets_BxL[..., None], axis=-1)[..., 0]


def chunked_token_nll(x_BxLxD: jax.Array, readout, targets_BxL: jax.Array, *, chunk: int,
                      output_mult: float = 1.0) -> tuple[jax.Array, jax.Array]:
  """(nll_BxL fp32, mean |logit|) with at most [B, chunk, V] logits alive at once.

  readout(x_BxCxD) -> logits_BxCxV in the compute dtype: the LM head with its weight
  already read (hooks applied once, outside the scan). Lengths that `chunk` does not divide
  are padded with zero rows whose NLL is dropped.
  """
  b, l, d = x_BxLxD.shape
  n = -(-l // chunk)
  pad = n * chunk - l
  if pad:
    x_BxLxD = jnp.pad(x_BxLxD, ((0, 0), (0, pad), (0, 0)))
    targets_BxL = jnp.pad(targets_BxL, ((0, 0), (0, pad)))
  x_NxBxCxD = x_BxLxD.reshape(b, n, chunk, d).swapaxes(0, 1)
  t_NxBxC = targets_BxL.reshape(b, n, chunk).swapaxes(0, 1)

  @jax.checkpoint
  def one_chunk(x_BxCxD, t_BxC):
    logits_BxCxV = readout(x_BxCxD)
    if output_mult != 1.0:
      logits_BxCxV = logits_BxCxV * output_mult
    logits_BxCxV = constrain(logits_BxCxV, ("batch", "length", "vocab"))
    abs_sum = jnp.sum(jnp.abs(logits_BxCxV).astype(jnp.float32))
    return token_nll(logits_BxCxV, t_BxC), abs_sum

  def body(carry, xs):
    nll_BxC, abs_sum = one_chunk(*xs)
    return carry + abs_sum, nll_BxC

  abs_total, nll_NxBxC = jax.lax.scan(body, jnp.float32(0), (x_NxBxCxD, t_NxBxC))
  nll_BxL = nll_NxBxC.swapaxes(0, 1).reshape(b, n * chunk)[:, :l]
  return nll_BxL, abs_total
