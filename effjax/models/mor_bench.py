"""Mixture-of-Recursions benchmark (issue 13): forward+backward time of the whole model with a
MoR stack versus the vanilla stack of the same unique layers (equal parameters), in one run,
next to the model-FLOP ratio, so that time / FLOPs shows what routing, top-k and the
gather/scatter cost. Prints a table (--out also writes it to a file).

  python -m effjax.models.mor_bench [--d=128] [--layers=4] [--batch=8] [--seq=256]
      [--out=results/perf/mor.md]

Rows: vanilla (each unique layer once), plain recursion (router none), expert-choice MoR
(gathered top-k), token-choice MoR (masked full-length blocks), for N_r = 2 and 3; the
sharing is middle_cycle throughout. 'overhead' = (time ratio / FLOP ratio) - 1 relative to
plain recursion at the same N_r: the price of selection, gather and scatter per useful FLOP.
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp

from effjax import config as config_lib
from effjax import models
from effjax.train import flops as flops_lib
from effjax.train.step import make_loss_fn

VOCAB = 256


def _compiled_step(cfg, ids):
  """A jitted fwd+bwd of the loss for `cfg`, compiled and run once; () -> grads."""
  m = models.build(cfg, VOCAB)
  loss_fn = make_loss_fn(m)
  batch = {"inputs": ids[:, :-1], "targets": ids[:, 1:],
           "positions": jnp.broadcast_to(jnp.arange(ids.shape[1] - 1), ids[:, 1:].shape),
           "segment_ids": jnp.ones(ids[:, 1:].shape, jnp.int32)}
  step = jax.jit(jax.grad(lambda p: loss_fn(p, m.initial_buffers, batch)[0]))
  jax.block_until_ready(step(m.initial_params))
  return lambda: step(m.initial_params)


def _time_round_robin(steps: dict, repeats: int) -> dict:
  """Median seconds per variant, timing the variants in turn `repeats` times (load changes
  on a shared machine then hit every variant alike)."""
  times = {name: [] for name in steps}
  for _ in range(repeats):
    for name, step in steps.items():
      t0 = time.perf_counter()
      jax.block_until_ready(step())
      times[name].append(time.perf_counter() - t0)
  return {name: statistics.median(ts) for name, ts in times.items()}


def _fpt(cfg) -> float:
  dims = models.resolve_dims(cfg.model, VOCAB)
  return flops_lib.flops_per_token(dims, cfg.train.seq_len, tie_embeddings=False,
                                   mor=cfg.model.mor)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--d", type=int, default=128)
  parser.add_argument("--layers", type=int, default=4, help="unique layers (all variants)")
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--seq", type=int, default=256)
  parser.add_argument("--recursions", default="2,3")
  parser.add_argument("--repeats", type=int, default=11)
  parser.add_argument("--out", default="", help="also write the table here")
  args = parser.parse_args(argv)
  base = config_lib.apply_overrides(config_lib.Config(), {
      "model": {"d_model": args.d, "n_layers": args.layers, "n_heads": max(1, args.d // 32),
                "vocab_size": VOCAB},
      "train": {"seq_len": args.seq}})
  ids = jax.random.randint(jax.random.PRNGKey(0), (args.batch, args.seq + 1), 0, VOCAB)
  variants = [("vanilla", base)]
  for n in map(int, args.recursions.split(",")):
    for router in ("none", "expert", "token"):
      variants.append((f"{router} N_r={n}", config_lib.validate(config_lib.apply_overrides(
          base, {"model": {"mor": {"recursions": n, "router": router}}}))))
  steps = {}
  for name, cfg in variants:
    steps[name] = _compiled_step(cfg, ids)
    print(f"compiled {name}", file=sys.stderr, flush=True)
  times = _time_round_robin(steps, args.repeats)
  results = {name: (times[name], _fpt(cfg)) for name, cfg in variants}
  t0, f0 = results["vanilla"]
  rows = []
  for name, (t, f) in results.items():
    plain = results.get(f"none {name.split()[-1]}") if name != "vanilla" else None
    overhead = ((t / f) / (plain[0] / plain[1]) - 1) if plain else float("nan")
    rows.append((name, t * 1e3, t / t0, f / f0, (t / t0) / (f / f0), overhead))
  header = (f"batch {args.batch} x {args.seq} tokens, d_model {args.d}, {args.layers} unique layers "
            f"(middle_cycle), fwd+bwd of the loss, median of {args.repeats} round-robin rounds; device "
            f"{jax.devices()[0].device_kind} ({jax.default_backend()}), {os.cpu_count()} host "
            f"cores; jax {jax.__version__}; {datetime.date.today()}.")
  table = ["| variant | fwd+bwd (ms) | time x vanilla | FLOPs x vanilla | time/FLOP x vanilla "
           "| overhead vs plain recursion |", "|---|---|---|---|---|---|"]
  table += [f"| {n} | {t:.1f} | {r:.2f} | {f:.2f} | {e:.2f} | "
            + ("-" if o != o else f"{o:+.0%}") + " |" for n, t, r, f, e, o in rows]
  text = "\n".join(table)
  print(header + "\n\n" + text)
  if args.out:
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
      f.write(f"# Mixture-of-Recursions benchmark\n\nCommand: `python -m effjax.models.mor_bench "
              f"{' '.join(argv if argv is not None else sys.argv[1:])}`\n\n{header}\n\n{text}\n\n"
              "On CPU only the ratios within one run mean anything. FLOPs count each recursion at "
              "its capacity (effjax/train/flops.py); token-choice runs its recursions on every "
              "token with masked attention (no static shape for a data-dependent depth), so its "
              "time does not shrink with its FLOPs.\n")
  return 0


if __name__ == "__main__":
  sys.exit(main())
