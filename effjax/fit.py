"""Scaling-law fits with bootstrap confidence intervals (docs/scaling-laws.md).

  python -m effjax.fit --csv=DIR/results.csv --law=chinchilla|power|qat [--out=DIR]
      [--n-col=params_non_embedding] [--d-col=tokens] [--loss-col=eval/loss]
      [--x=COL --y=COL [--offset]]                  (power)
      [--g-col=group_size] [--gap-col=COL | --bits-col=bits]   (qat)
      [--bootstrap=200] [--seed=0]

Laws:
  chinchilla  L(N, D) = E + A / N^alpha + B / D^beta, fitted as in Hoffmann et al. 2022
              (Approach 3): Huber (delta 1e-3) on log L - LSE(a - alpha log N,
              b - beta log D, e), L-BFGS from a grid of initialisations.
  power       y = c x^k (+ E with --offset); k is the slope in log-log space (e.g. tau_opt
              versus tokens per parameter, expected k ~ -0.5, Bergsma et al. 2025).
  qat         the QAT error term of Chen et al. 2025 on the loss gap to full precision:
              delta = k D^gamma_D (log2 G)^gamma_G / N^gamma_N, least squares in log space.
              Rows: either a gap column, or quantised and full-precision rows (bits >= 16,
              0 or empty = full precision) matched on (N, D).
Confidence intervals: percentile bootstrap (rows resampled with replacement, refit from
the full-data optimum). Parameters the data cannot identify (`unidentifiable`: e.g. B, beta
and E of the Chinchilla law from fewer than 3 distinct D) get a warning and no interval
(null in fit.json): the bootstrap would only show the optimiser's start point.
"""

from __future__ import annotations

import argparse
import csv
import io
import itertools
import math
import sys

import numpy as np
from scipy import optimize, special

from effjax import paths


class FitError(ValueError):
  """Bad fit input; the message names the column, row or file."""


# ----------------------------------------------------------------------------- laws


def _huber(r, delta):
  a = np.abs(r)
  return np.where(a <= delta, 0.5 * r * r, delta * (a - 0.5 * delta))


def chinchilla_predict(p: dict, n, d):
  return p["E"] + p["A"] / np.power(n, p["alpha"]) + p["B"] / np.power(d, p["beta"])


def fit_chinchilla(n, d, loss, *, huber_delta: float = 1e-3, inits=None) -> dict:
  """Hoffmann et al. 2022 eq. (2) fitted by Approach 3 (Huber on log-loss, L-BFGS)."""
  log_n, log_d, log_l = np.log(n), np.log(d), np.log(loss)

  def objective(theta):
    """Huber loss / delta (scaled so optimiser tolerances are meaningful) and its gradient."""
    a, b, e, alpha, beta = theta
    terms = np.stack([a - alpha * log_n, b - beta * log_d, np.full_like(log_n, e)])
    pred = special.logsumexp(terms, axis=0)
    w = np.exp(terms - pred)  # softmax weights of the three terms
    r = pred - log_l
    dr = np.clip(r, -huber_delta, huber_delta) / huber_delta
    grad = np.array([np.sum(dr * w[0]), np.sum(dr * w[1]), np.sum(dr * w[2]),
                     -np.sum(dr * w[0] * log_n), -np.sum(dr * w[1] * log_d)])
    return float(np.sum(_huber(r, huber_delta)) / huber_delta), grad

  if inits is None:
    inits = itertools.product((0.0, 6.0, 12.0), (0.0, 6.0, 12.0), (-1.0, 0.5), (0.3, 0.8),
                              (0.3, 0.8))
  best = None
  for init in inits:
    res = optimize.minimize(objective, np.asarray(init, float), jac=True, method="L-BFGS-B",
                            options={"maxiter": 5000, "ftol": 1e-14, "gtol": 1e-10})
    if best is None or res.fun < best.fun:
      best = res
  a, b, e, alpha, beta = best.x
  return {"E": math.exp(e), "A": math.exp(a), "alpha": alpha, "B": math.exp(b), "beta": beta,
          "_theta": best.x.tolist(), "objective": float(best.fun)}


def fit_power(x, y, *, offset: bool = False, huber_delta: float = 1e-3) -> dict:
  """y = c x^k (+ E): least squares in log space, or Huber on log y with an offset."""
  lx, ly = np.log(x), np.log(y)
  k, logc = np.polyfit(lx, ly, 1)
  if not offset:
    return {"c": math.exp(logc), "k": float(k)}

  def objective(theta):
    lc, kk, le = theta
    pred = np.logaddexp(lc + kk * lx, le)
    return float(np.sum(_huber(pred - ly, huber_delta)))

  best = min((optimize.minimize(objective, np.array([logc, k, le0]), method="L-BFGS-B")
              for le0 in (math.log(max(y.min(), 1e-12)) - 1, math.log(max(y.min(), 1e-12)) - 0.1)),
             key=lambda r: r.fun)
  return {"c": math.exp(best.x[0]), "k": float(best.x[1]), "E": math.exp(best.x[2])}


def fit_qat(n, d, g, gap) -> dict:
  """log delta = log k + gamma_D log D + gamma_G log log2 G - gamma_N log N (least squares)."""
  x = np.column_stack([np.ones_like(n), np.log(d), np.log(np.log2(g)), -np.log(n)])
  coef, *_ = np.linalg.lstsq(x, np.log(gap), rcond=None)
  return {"k": math.exp(coef[0]), "gamma_D": float(coef[1]), "gamma_G": float(coef[2]),
          "gamma_N": float(coef[3])}


# ----------------------------------------------------------------------------- bootstrap


def bootstrap(fit_fn, columns: dict, n_resamples: int, seed: int = 0) -> dict:
  """Percentile 95% intervals: {param: (lo, hi)}, refitting on rows resampled with
  replacement."""
  if n_resamples <= 0:
    return {}
  rng = np.random.default_rng(seed)
  size = len(next(iter(columns.values())))
  samples: dict[str, list[float]] = {}
  for _ in range(n_resamples):
    idx = rng.integers(0, size, size)
    try:
      p = fit_fn(**{k: v[idx] for k, v in columns.items()})
    except (np.linalg.LinAlgError, ValueError):
      continue
    for k, v in p.items():
      if not k.startswith("_") and k != "objective":
        samples.setdefault(k, []).append(v)
  return {k: (float(np.percentile(v, 2.5)), float(np.percentile(v, 97.5)))
          for k, v in samples.items()}


# ----------------------------------------------------------------------------- identifiability


def unidentifiable(law: str, cols: dict, *, offset: bool = False) -> dict:
  """{parameter: reason} for the parameters the data's design cannot determine."""
  out = {}
  if law == "chinchilla":
    n_n, n_d = len(np.unique(cols["n"])), len(np.unique(cols["d"]))
    if n_n < 3:
      out.update(dict.fromkeys(("A", "alpha"), f"{n_n} distinct N (needs 3)"))
    if n_d < 3:
      out.update(dict.fromkeys(("B", "beta"), f"{n_d} distinct D (needs 3)"))
    if n_n < 3 or n_d < 3:
      out["E"] = f"{n_n} distinct N and {n_d} distinct D (needs 3 of each)"
  elif law == "power":
    n_x, need = len(np.unique(cols["x"])), 3 if offset else 2
    if n_x < need:
      out.update(dict.fromkeys(("c", "k", "E") if offset else ("c", "k"),
                               f"{n_x} distinct x (needs {need})"))
  else:  # qat: columns of the log-space design matrix in its null space
    x = np.column_stack([np.ones_like(cols["n"]), np.log(cols["d"]),
                         np.log(np.log2(cols["g"])), -np.log(cols["n"])])
    _, sv, vt = np.linalg.svd(x)
    rank = int(np.sum(sv > sv[0] * 1e-10))
    null = vt[rank:]
    for i, name in enumerate(("k", "gamma_D", "gamma_G", "gamma_N")):
      if null.size and np.max(np.abs(null[:, i])) > 1e-8:
        out[name] = f"the design has rank {rank} of 4 (a constant or collinear N, D, G column)"
  return out


# ----------------------------------------------------------------------------- CSV


def read_csv(path: str) -> list[dict]:
  p = paths.as_path(path)  # a local file, file:// or a cloud URL
  if not p.exists() or p.is_dir():
    raise FitError(f"CSV file '{path}' not found")
  rows = list(csv.DictReader(io.StringIO(p.read_text(), newline="")))
  if not rows:
    raise FitError(f"CSV file '{path}' has no data rows")
  return rows


def column(rows: list[dict], name: str, path: str, *, positive: bool = True) -> np.ndarray:
  if name not in rows[0]:
    raise FitError(f"column '{name}' not in '{path}'; available: {', '.join(rows[0])}")
  out = []
  for i, r in enumerate(rows):
    try:
      v = float(r[name])
    except (TypeError, ValueError):
      raise FitError(f"column '{name}', row {i + 2} of '{path}': not a number ({r[name]!r})") from None
    if positive and not v > 0:
      raise FitError(f"column '{name}', row {i + 2} of '{path}': {v} is not positive (logs are taken)")
    out.append(v)
  return np.asarray(out)


def _need(count: int, needed: int, law: str):
  if count < needed:
    raise FitError(f"law '{law}' needs at least {needed} data points; got {count}")


# ----------------------------------------------------------------------------- CLI


def _plot(law, params, cols, path):
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(6, 4.2), dpi=110)
  if law == "chinchilla":
    n, d, loss = cols["n"], cols["d"], cols["loss"]
    for dv in np.unique(d):
      m = d == dv
      ax.plot(n[m], loss[m], "o", label=f"D = {dv:.3g}")
      grid = np.geomspace(n.min(), n.max(), 50)
      ax.plot(grid, chinchilla_predict(params, grid, dv), "-", color=ax.lines[-1].get_color())
    ax.set(xscale="log", xlabel="N (parameters)", ylabel="loss")
  elif law == "power":
    x, y = cols["x"], cols["y"]
    ax.plot(x, y, "o", label="data")
    grid = np.geomspace(x.min(), x.max(), 50)
    ax.plot(grid, params["c"] * grid ** params["k"] + params.get("E", 0.0), "-",
            label=f"fit: k = {params['k']:.3f}")
    ax.set(xscale="log", yscale="log", xlabel="x", ylabel="y")
  else:
    pred = fit_predict_qat(params, cols["n"], cols["d"], cols["g"])
    ax.plot(pred, cols["gap"], "o")
    lim = [min(pred.min(), cols["gap"].min()), max(pred.max(), cols["gap"].max())]
    ax.plot(lim, lim, "k--", lw=0.8)
    ax.set(xscale="log", yscale="log", xlabel="fitted delta", ylabel="measured loss gap")
  ax.set_title(f"{law} fit")
  ax.legend(fontsize=7) if ax.get_legend_handles_labels()[0] else None
  fig.tight_layout()
  paths.save_figure(fig, path)
  plt.close(fig)


def fit_predict_qat(p, n, d, g):
  return p["k"] * d ** p["gamma_D"] * np.log2(g) ** p["gamma_G"] / n ** p["gamma_N"]


def _qat_columns(rows, args):
  n = column(rows, args.n_col, args.csv)
  d = column(rows, args.d_col, args.csv)
  g = column(rows, args.g_col, args.csv)
  if args.gap_col:
    gap = column(rows, args.gap_col, args.csv, positive=False)
  else:
    bits = column(rows, args.bits_col, args.csv, positive=False)
    loss = column(rows, args.loss_col, args.csv)
    fp = {(nn, dd): ll for nn, dd, ll, b in zip(n, d, loss, bits) if b == 0 or b >= 16}
    keep = [i for i, b in enumerate(bits) if 0 < b < 16]
    missing = [i for i in keep if (n[i], d[i]) not in fp]
    if missing:
      raise FitError(f"row {missing[0] + 2} of '{args.csv}' has no full-precision row with the "
                     f"same {args.n_col} and {args.d_col}")
    gap = np.asarray([loss[i] - fp[(n[i], d[i])] for i in keep])
    n, d, g = n[keep], d[keep], g[keep]
  if np.any(gap <= 0):
    raise FitError("the QAT law needs positive loss gaps; some quantised rows are not worse than "
                   "full precision (fit on a subset, or use --gap-col)")
  if np.any(g <= 1):
    raise FitError(f"column '{args.g_col}' must be > 1 (log2 G is taken)")
  return {"n": n, "d": d, "g": g, "gap": gap}


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--csv", required=True)
  parser.add_argument("--law", required=True, choices=("chinchilla", "power", "qat"))
  parser.add_argument("--out", default="")
  parser.add_argument("--n-col", default="params_non_embedding")
  parser.add_argument("--d-col", default="tokens")
  parser.add_argument("--loss-col", default="eval/loss")
  parser.add_argument("--x", default="")
  parser.add_argument("--y", default="")
  parser.add_argument("--offset", action="store_true")
  parser.add_argument("--g-col", default="group_size")
  parser.add_argument("--gap-col", default="")
  parser.add_argument("--bits-col", default="bits")
  parser.add_argument("--bootstrap", type=int, default=200)
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args(argv)
  try:
    rows = read_csv(args.csv)
    if args.law == "chinchilla":
      cols = {"n": column(rows, args.n_col, args.csv), "d": column(rows, args.d_col, args.csv),
              "loss": column(rows, args.loss_col, args.csv)}
      _need(len(rows), 6, "chinchilla")
      params = fit_chinchilla(**cols)
      refit = lambda n, d, loss: fit_chinchilla(n, d, loss, inits=[params["_theta"]])
    elif args.law == "power":
      if not args.x or not args.y:
        raise FitError("law 'power' needs --x=COL and --y=COL")
      cols = {"x": column(rows, args.x, args.csv), "y": column(rows, args.y, args.csv)}
      _need(len(rows), 4 if args.offset else 3, "power")
      params = fit_power(**cols, offset=args.offset)
      refit = lambda x, y: fit_power(x, y, offset=args.offset)
    else:
      cols = _qat_columns(rows, args)
      _need(len(cols["gap"]), 5, "qat")
      params = fit_qat(**cols)
      refit = fit_qat
  except FitError as e:
    print(f"fit: {e}", file=sys.stderr)
    return 2
  public = {k: float(v) for k, v in params.items() if not k.startswith("_") and k != "objective"}
  blind = unidentifiable(args.law, cols, offset=args.offset)
  for k, why in blind.items():
    print(f"fit: WARNING: {k} is not identifiable from this data ({why}); no interval reported",
          file=sys.stderr)
  ci = {k: (None if k in blind else v)
        for k, v in bootstrap(refit, cols, args.bootstrap, args.seed).items()}
  print(f"{args.law} fit on {len(next(iter(cols.values())))} points ({args.csv})")
  print(f"{'parameter':>10} {'estimate':>12}   95% CI ({args.bootstrap} bootstrap resamples)")
  for k, v in public.items():
    if k in blind:
      print(f"{k:>10} {v:12.5g}   not identifiable")
      continue
    lo, hi = ci.get(k) or (float("nan"), float("nan"))
    print(f"{k:>10} {v:12.5g}   [{lo:.5g}, {hi:.5g}]")
  if args.law == "qat":
    signs = {"delta falls with N (gamma_N > 0)": public["gamma_N"] > 0,
             "delta rises with D (gamma_D > 0)": public["gamma_D"] > 0,
             "delta rises with G (gamma_G > 0)": public["gamma_G"] > 0}
    for text, ok in signs.items():
      print(f"  {'yes' if ok else 'NO '}: {text}")
  if args.out:
    out = paths.as_path(args.out)  # a local folder, file:// or a cloud URL
    out.mkdir(parents=True, exist_ok=True)
    paths.write_json(out / "fit.json", {
        "law": args.law, "csv": args.csv, "points": len(next(iter(cols.values()))),
        "params": public, "ci95": ci, "not_identifiable": blind, "bootstrap": args.bootstrap},
        indent=1)
    _plot(args.law, public, cols, out / "fit.png")
    print(f"wrote {out / 'fit.json'} and fit.png")
  return 0


if __name__ == "__main__":
  sys.exit(main())
