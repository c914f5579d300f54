"""Block-diagonal Hadamard rotations along one axis (QuEST, Panferov et al. 2025, step 1)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np


@functools.lru_cache(maxsize=None)
def _sylvester(n: int) -> np.ndarray:
  h = np.ones((1, 1), np.float32)
  while h.shape[0] < n:
    h = np.block([[h, h], [h, -h]])
  return h / np.sqrt(n, dtype=np.float32)


def hadamard_matrix(n: int) -> jax.Array:
  """The n x n Sylvester Hadamard matrix scaled by 1/sqrt(n): symmetric and orthogonal."""
  if n < 1 or n & (n - 1):
    raise ValueError(f"Hadamard size must be a power of two; got {n}")
  return jnp.asarray(_sylvester(n))


def hadamard_block_size(fan_in: int, block: int = 128) -> int:
  """The rotation block for a fan-in: `block`, or the largest power of two dividing fan_in
  when `block` does not (e.g. 64 for d_model 192)."""
  largest = fan_in & -fan_in  # largest power of two dividing fan_in
  return min(block, largest)


def block_hadamard(x: jax.Array, block: int, axis: int = -1) -> jax.Array:
  """x rotated by the block-diagonal matrix diag(H_block, ..., H_block) along `axis`.

  H is symmetric and orthogonal, so applying it twice is the identity and, for a weight
  W [in, out] rotated along axis 0 and an input x rotated along its last axis,
  (x H)(H W) = x W: the "half-Hadamard" form multiplies in the rotated basis directly.
  """
  axis = axis % x.ndim
  n = x.shape[axis]
  if n % block:
    raise ValueError(f"axis {axis} of size {n} is not a multiple of the Hadamard block {block}")
  h = hadamard_matrix(block).astype(x.dtype)
  moved = jnp.moveaxis(x, axis, -1)
  rotated = (moved.reshape(*moved.shape[:-1], n // block, block) @ h).reshape(moved.shape)
  return jnp.moveaxis(rotated, -1, axis)
