"""The scoreboard's arithmetic (effjax/experiments/scoreboard.py): the dense loss law, its
compute-optimal frontier, and a technique's effective compute multiplier.

Dense law: L(N, D) = E + A / N^alpha + B / D^beta (Hoffmann et al. 2022, eq. 2), fitted by
`effjax.fit.fit_chinchilla` on (non-embedding parameters N, training tokens D, eval loss).
Training compute of a dense model: C = f(N) * D, where f(N) (training FLOPs per token,
attention and LM head included) is a power law fitted through the dense runs' counted FLOPs.

Effective compute multiplier of a run with eval loss L_t and counted training FLOPs C_t:
  C_dense(L_t) = min over N of f(N) * D(N, L_t),  D(N, L) = (B / (L - E - A / N^alpha))^(1/beta)
  multiplier   = C_dense(L_t) / C_t
(the dense compute that reaches the same loss on the frontier, divided by what the technique
spent). > 1: the technique is worth that many times its compute; < 1: it costs compute.
Intervals: percentile bootstrap that resamples the dense runs (refit) and, per resample, one of
the technique's seeds.

Size-matched multiplier (`ref=(N_ref, f_ref)`): the same ratio with the dense compute of the
technique's own base model instead of the frontier, C_ref(L_t) = f_ref * D(N_ref, L_t): how
much longer the dense reference model would have to train to match. It isolates the
technique from the choice of model size; the frontier multiplier of the dense reference
itself says how far that size is from compute-optimal at the budget.

Effective parameters (QAT): N_eff solves L(N_eff, D_t) = L_t at the technique's own tokens, so
N_eff / N is the dense-parameter equivalent of a quantised model, and N_eff * 16 / (N * bits)
is how many bf16 bits of dense quality each stored weight bit buys.
"""

from __future__ import annotations

import dataclasses
import itertools
import math

import numpy as np

from effjax import fit as fit_lib

N_GRID_POINTS = 2000
N_GRID_SPAN = 2.0  # the frontier searches N in [N_min / span, N_max * span]: near the grid
# L-BFGS starts (log A, log B, log E, alpha, beta): a sparser grid than effjax.fit's default,
# since the scoreboard refits after every run.
INITS = tuple(itertools.product((2.0, 8.0), (2.0, 8.0), (0.0,), (0.3, 0.6), (0.3, 0.6)))


@dataclasses.dataclass(frozen=True)
class DenseLaw:
  params: dict           # E, A, alpha, B, beta
  fpt_c: float           # f(N) = fpt_c * N^fpt_k
  fpt_k: float
  n_range: tuple         # (min, max) N of the dense runs
  c_range: tuple         # (min, max) training FLOPs of the dense runs

  def loss(self, n, d):
    return fit_lib.chinchilla_predict(self.params, n, d)

  def flops_per_token(self, n):
    return self.fpt_c * np.power(n, self.fpt_k)

  def n_grid(self) -> np.ndarray:
    lo, hi = self.n_range
    return np.geomspace(lo / N_GRID_SPAN, hi * N_GRID_SPAN, N_GRID_POINTS)

  def tokens_to_reach(self, n, loss):
    """D(N, L): tokens a dense model of N parameters needs to reach `loss` (inf if never)."""
    p = self.params
    gap = loss - p["E"] - p["A"] / np.power(n, p["alpha"])
    with np.errstate(divide="ignore", invalid="ignore"):
      d = np.power(p["B"] / gap, 1.0 / p["beta"])
    return np.where(gap > 0, d, np.inf)

  def dense_compute(self, loss) -> tuple[float, float]:
    """(C_dense, N at the optimum) on the compute-optimal frontier for `loss`."""
    n = self.n_grid()
    c = self.flops_per_token(n) * self.tokens_to_reach(n, loss)
    i = int(np.argmin(c))
    return float(c[i]), float(n[i])

  def size_matched_compute(self, loss, n_ref: float, fpt_ref: float) -> float:
    """Dense compute of a model with N_ref parameters (f_ref FLOPs per token) to reach `loss`."""
    return float(fpt_ref * self.tokens_to_reach(n_ref, loss))

  def frontier(self, flops) -> np.ndarray:
    """L*(C) = min over N of L(N, C / f(N)), for each C in `flops`."""
    n = self.n_grid()[None, :]
    c = np.asarray(flops, float)[:, None]
    return np.min(self.loss(n, c / self.flops_per_token(n)), axis=1)

  def effective_params(self, loss, tokens) -> float:
    """N_eff with L(N_eff, tokens) = loss (inf if even N -> inf does not reach it)."""
    p = self.params
    gap = loss - p["E"] - p["B"] / tokens ** p["beta"]
    return float((p["A"] / gap) ** (1.0 / p["alpha"])) if gap > 0 else math.inf


def fit_dense(n, d, loss, flops, *, inits=None) -> DenseLaw:
  """The dense law from arrays of N, tokens D, eval loss and counted training FLOPs."""
  n, d, loss, flops = (np.asarray(x, float) for x in (n, d, loss, flops))
  p = fit_lib.fit_chinchilla(n, d, loss, inits=INITS if inits is None else inits)
  k, log_c = np.polyfit(np.log(n), np.log(flops / d), 1)
  return DenseLaw(p, math.exp(log_c), float(k), (float(n.min()), float(n.max())),
                  (float(flops.min()), float(flops.max())))


def residuals(law: DenseLaw, n, d, loss) -> np.ndarray:
  """Observed minus fitted eval loss of each dense run."""
  return np.asarray(loss, float) - law.loss(np.asarray(n, float), np.asarray(d, float))


@dataclasses.dataclass
class Multiplier:
  value: float
  lo: float
  hi: float
  dense_flops: float
  extrapolated: bool     # the equal-loss dense compute lies outside the dense runs' range

  def verdict(self) -> str:
    if not math.isfinite(self.value):
      return "beyond the dense law (loss below its reach)"
    if self.lo <= 1.0 <= self.hi:
      return "no measurable effect at this scale"
    return "helps" if self.lo > 1.0 else "costs compute"


def multiplier(law: DenseLaw, losses: list, flops: float, boot_laws: list,
               ref: tuple | None = None) -> Multiplier:
  """Effective compute multiplier of a technique from its per-seed eval losses: against the
  dense frontier, or with ref=(N_ref, f_ref) against the dense model of that size."""
  def dense_compute(lw: DenseLaw, loss: float) -> float:
    return lw.dense_compute(loss)[0] if ref is None else lw.size_matched_compute(loss, *ref)
  mean = float(np.mean(losses))
  c_dense = dense_compute(law, mean)
  rng = np.random.default_rng(0)
  samples = []
  for b in boot_laws:
    samples.append(dense_compute(b, float(rng.choice(losses))) / flops)
  finite = [s for s in samples if math.isfinite(s)]
  # an infinite resample (a loss the refit law never reaches) counts as the largest value
  lo, hi = ((float(np.percentile(samples, 2.5)), float(np.percentile(samples, 97.5)))
            if finite and len(finite) == len(samples) else
            (float(np.percentile(finite, 2.5)) if finite else math.nan, math.inf))
  lo_c, hi_c = law.c_range
  return Multiplier(c_dense / flops, lo, hi, c_dense,
                    not lo_c / 2 <= c_dense <= hi_c * 2)


def bootstrap_laws(n, d, loss, flops, law: DenseLaw, resamples: int, seed: int = 0) -> list:
  """Dense laws refitted on runs resampled with replacement (from the full fit's optimum)."""
  n, d, loss, flops = (np.asarray(x, float) for x in (n, d, loss, flops))
  rng = np.random.default_rng(seed)
  out = []
  start = [tuple(law.params["_theta"])]
  for _ in range(resamples):
    idx = rng.integers(0, len(n), len(n))
    if len(set(d[idx])) < 2 or len(set(n[idx])) < 2:
      continue  # the law is not identifiable from one size or one budget
    out.append(fit_dense(n[idx], d[idx], loss[idx], flops[idx], inits=start))
  return out
