"""Muon (Jordan et al. 2024; Bernstein & Newhouse 2024, "Old optimizer, new norm"): momentum
orthogonalised by a Newton-Schulz iteration, for the hidden matrices.

Per matrix W (stored (fan_in, fan_out); leading axes, e.g. layers or experts, are batch
axes and each slice is orthogonalised on its own):
  m_t = beta m_{t-1} + g_t;  n_t = beta m_t + g_t (Nesterov) or m_t
  O_t = NS(n_t) ~ U V^T (singular values snapped towards 1)
  update = sqrt(fan_out / fan_in) * O_t     (RMS->RMS operator norm of the update ~ 1)
Newton-Schulz (Frobenius-normalised X, A = X^T X): X <- X (a I + b A + c A^2); coefficient
sets in NS_COEFFS: 'quintic' (3.4445, -4.7750, 2.0315) x 5, the common fast one whose output
singular values land in ~[0.7, 1.2]; 'cubic' (1.5, -0.5, 0) which converges to exactly 1 but
needs more steps (used for the hard cap's matrix sign, effjax/constraints/projections.py).

Why not optax.contrib.muon: its width scale is sqrt(max(1, fan_out/fan_in)) (not
sqrt(fan_out/fan_in)), it routes by a weight-dimension-number tree rather than the parameter
roles, and its signature has changed across the optax versions we support; our chain also
needs the Newton-Schulz map itself (the soft cap's coupled alpha uses its largest output,
`ns_max_gain`). The maths is the same; `tests/test_constraints.py` compares the two on 2-D
matrices where optax's is importable.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

NS_COEFFS = {"quintic": (3.4445, -4.7750, 2.0315), "cubic": (1.5, -0.5, 0.0)}


def newton_schulz(x: jax.Array, coeffs=NS_COEFFS["quintic"], steps: int = 5,
                  eps: float = 1e-7) -> jax.Array:
  """~U V^T of the trailing two dims of x (leading dims are batch), by `steps` iterations of
  X <- X (a I + b A + c A^2), A = X^T X, from X / ||X||_F (so sigma_max <= 1 at the start)."""
  a, b, c = coeffs
  x32 = x.astype(jnp.float32)
  wide = x32.shape[-2] < x32.shape[-1]  # iterate on the smaller Gram matrix
  if wide:
    x32 = jnp.swapaxes(x32, -1, -2)
  x32 = x32 / (jnp.linalg.norm(x32, axis=(-2, -1), keepdims=True) + eps)
  for _ in range(steps):
    gram = jnp.swapaxes(x32, -1, -2) @ x32
    x32 = a * x32 + x32 @ (b * gram + c * gram @ gram)
  if wide:
    x32 = jnp.swapaxes(x32, -1, -2)
  return x32.astype(x.dtype)


def ns_max_gain(coeffs=NS_COEFFS["quintic"], steps: int = 5) -> float:
  """The largest singular value Newton-Schulz can output: max over s in (0, 1] of the scalar
  map iterated `steps` times (inputs are Frobenius-normalised, so sigma <= 1)."""
  a, b, c = coeffs
  s = np.linspace(1e-6, 1.0, 200001)
  for _ in range(steps):
    s = a * s + b * s ** 3 + c * s ** 5
  return float(np.max(s))


def shape_scale(shape) -> float:
  """sqrt(fan_out / fan_in) for a (..., fan_in, fan_out) matrix."""
  return float(np.sqrt(shape[-1] / shape[-2]))


class MuonState(NamedTuple):
  momentum: optax.Updates


def scale_by_muon(*, beta: float = 0.95, nesterov: bool = True, coeffs=NS_COEFFS["quintic"],
                  steps: int = 5) -> optax.GradientTransformation:
  """The Muon direction for every leaf it is given (route leaves with optax.multi_transform):
  sqrt(fan_out/fan_in) NS(momentum)."""

  def init(params):
    return MuonState(jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params))

  def update(updates, state, params=None):
    del params
    momentum = jax.tree.map(lambda m, g: beta * m + g.astype(jnp.float32), state.momentum, updates)
    direction = (jax.tree.map(lambda m, g: beta * m + g.astype(jnp.float32), momentum, updates)
                 if nesterov else momentum)
    out = jax.tree.map(lambda d, g: (shape_scale(d.shape) * newton_schulz(d, coeffs, steps))
                       .astype(g.dtype), direction, updates)
    return out, MuonState(momentum)

  return optax.GradientTransformation(init, update)
