"""Weight projections applied after every optimizer step (Newhouse et al. 2025, "Training
Transformers with Enforced Lipschitz Constants"; docs/constraints.md).

Norms are RMS->RMS operator norms: for W stored (fan_in, fan_out) (y = x W),
  ||W|| = sqrt(fan_in / fan_out) sigma_max(W),
so the bound ||W|| <= w_max is sigma_max(W) <= s = w_max sqrt(fan_out / fan_in). Leading axes
(layers of a scanned stack, experts [E, in, out]) are batch axes: each matrix is projected on
its own. Projections, with sigma_1, u_1, v_1 the top singular triple (W v = sigma u):
  spectral_normalize     W / max(1, sigma_1 / s)
  spectral_hammer        W - max(0, sigma_1 - s) u_1 v_1^T    (only sigma_1 moves; never raised)
  spectral_weight_decay  W - lambda sigma_1 u_1 v_1^T
  soft_cap               M <- M - alpha M M^T M, then M <- M + alpha M M^T M on the normalised
                         M = W sqrt(fan_in/fan_out): sigma -> f(sigma) = sigma - 3 a^2 s^5
                         + 3 a^3 s^7 - a^4 s^9, alpha from f(k) = w_max (`soft_cap_alpha`)
  hard_cap               U min(Sigma, s) V^T from matrix signs (`hard_cap`)
  svd_clip               the same by an exact SVD (the reference)
sigma_1 comes from power iteration warm-started from the previous step's v_1 (a buffer).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from effjax.optim.muon import NS_COEFFS, newton_schulz


def _t(x):
  return jnp.swapaxes(x, -1, -2)


def rms_scale(shape) -> float:
  """sqrt(fan_in / fan_out): RMS->RMS norm = rms_scale * sigma_max."""
  return (shape[-2] / shape[-1]) ** 0.5


def power_iteration(w: jax.Array, v: jax.Array, iters: int):
  """(sigma_1, u_1, v_1) of each trailing matrix of w [..., in, out], from v [..., out]."""
  w = w.astype(jnp.float32)

  def normalize(x):
    return x / (jnp.linalg.norm(x, axis=-1, keepdims=True) + 1e-30)

  def body(_, v):
    u = normalize(jnp.einsum("...io,...o->...i", w, v))
    return normalize(jnp.einsum("...io,...i->...o", w, u))

  v = jax.lax.fori_loop(0, iters, body, normalize(v.astype(jnp.float32)))
  wv = jnp.einsum("...io,...o->...i", w, v)
  sigma = jnp.linalg.norm(wv, axis=-1)
  return sigma, normalize(wv), v


def cap_row_rms(table_VxD, max_rms: float):
  """Each row (a token embedding) divided by max(1, RMS(row) / max_rms): rows end at RMS norm
  <= max_rms, shorter rows are left alone (the Lipschitz paper's embedding projection)."""
  t = table_VxD.astype(jnp.float32)
  rms = jnp.sqrt(jnp.mean(jnp.square(t), axis=-1, keepdims=True))
  return (t / jnp.maximum(1.0, rms / max_rms)).astype(table_VxD.dtype)


def rank_one(u, v):
  return u[..., :, None] * v[..., None, :]


def spectral_normalize(w, sigma, s):
  return w / jnp.maximum(1.0, sigma / s)[..., None, None]


def spectral_hammer(w, sigma, u, v, s):
  return w - jnp.maximum(0.0, sigma - s)[..., None, None] * rank_one(u, v)


def spectral_weight_decay(w, sigma, u, v, lam):
  return w - (lam * sigma)[..., None, None] * rank_one(u, v)


def soft_cap_poly(sigma, alpha):
  """f(sigma) of the two soft-cap steps (on the singular values)."""
  return sigma - 3 * alpha ** 2 * sigma ** 5 + 3 * alpha ** 3 * sigma ** 7 - alpha ** 4 * sigma ** 9


def soft_cap_alpha(w_max, k, iters: int = 60):
  """The smallest alpha >= 0 with f(k) = w_max (k >= w_max; alpha = 0 when k <= w_max).

  With beta = alpha k^2, f(k) = k h(beta), h(b) = 1 - 3b^2 + 3b^3 - b^4, which falls
  monotonically from h(0) = 1 to h(1) = 0 (h'(b) = -b(6 - 9b + 4b^2) < 0): bisection on [0, 1].
  """
  r = jnp.clip(w_max / k, 0.0, 1.0)
  h = lambda b: 1 - 3 * b ** 2 + 3 * b ** 3 - b ** 4

  def body(_, lo_hi):
    lo, hi = lo_hi
    mid = 0.5 * (lo + hi)
    above = h(mid) > r
    return jnp.where(above, mid, lo), jnp.where(above, hi, mid)

  _, beta = jax.lax.fori_loop(0, iters, body, (jnp.zeros_like(r), jnp.ones_like(r)))
  return beta / k ** 2


def soft_cap(w, alpha):
  """Two odd polynomial steps on the RMS-normalised matrix (alpha in those units)."""
  c = rms_scale(w.shape)
  m = w.astype(jnp.float32) * c
  m = m - alpha * m @ (_t(m) @ m)
  m = m + alpha * m @ (_t(m) @ m)
  return (m / c).astype(w.dtype)


def hard_cap(w, s, steps: int = 30):
  """U min(Sigma, s) V^T without an SVD. With M = W/s, Q = msign(M) = U V^T and
  msign(Q - M) = U sign(I - Sigma) V^T:  U min(Sigma, 1) V^T = (M + Q - msign(Q - M) Q^T (Q - M))/2.
  The cubic Newton-Schulz map never exceeds 1 on Frobenius-normalised inputs, so an unconverged
  small singular value q of Q gives min(sigma, q) <= 1, never more."""
  s = jnp.asarray(s, jnp.float32)
  m = w.astype(jnp.float32) / s[..., None, None]
  cubic = NS_COEFFS["cubic"]
  q = newton_schulz(m, cubic, steps)
  d = q - m
  capped = 0.5 * (m + q - newton_schulz(d, cubic, steps) @ (_t(q) @ d))
  return (capped * s[..., None, None]).astype(w.dtype)


def svd_clip(w, s):
  s = jnp.asarray(s, jnp.float32)
  u, sv, vt = jnp.linalg.svd(w.astype(jnp.float32), full_matrices=False)
  return ((u * jnp.minimum(sv, s[..., None])[..., None, :]) @ vt).astype(w.dtype)


def rms_norms(w) -> jax.Array:
  """Exact RMS->RMS norm of each trailing matrix (SVD; for logging and tests)."""
  return rms_scale(w.shape) * jnp.linalg.svd(w.astype(jnp.float32), compute_uv=False)[..., 0]
