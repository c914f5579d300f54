"""MoE layer benchmark (issue 5): forward+backward time of the MoE FFN versus a dense
SwiGLU with equal active FLOPs, in one run. Prints a table (--out also writes it to a file).

  python -m effjax.models.moe_bench [--tokens=4096] [--d=256] [--out=results/perf/moe.md]

Equal active FLOPs: each expert has d_ff / top_k hidden units, so a token touches the
same number of expert weights as the dense layer's d_ff (the router's d x E is extra).
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
from flax import nnx

from effjax.config import MoEConfig
from effjax.models.layers import Linear
from effjax.models.mlp import SwiGLU
from effjax.models.moe import MoE


def _time_fwd_bwd(module, x, repeats: int) -> float:
  graphdef, params, rest = nnx.split(module, nnx.Param, ...)

  @jax.jit
  def step(params, x):
    def loss(p):
      y, _ = nnx.merge(graphdef, p, rest)(x)
      return jnp.sum(y * y)
    return jax.grad(loss)(params)

  jax.block_until_ready(step(params, x))
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(step(params, x))
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--tokens", type=int, default=4096)
  parser.add_argument("--d", type=int, default=256)
  parser.add_argument("--d-ff", type=int, default=1024)
  parser.add_argument("--experts", default="8,16,32,64")
  parser.add_argument("--top-k", default="1,2")
  parser.add_argument("--dispatch", default="blocks,ragged_dot")
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--out", default="", help="also write the table here")
  args = parser.parse_args(argv)
  x = jax.random.normal(jax.random.PRNGKey(0), (args.tokens // 256, 256, args.d))
  rngs = nnx.Rngs(params=0)
  linear = lambda kind, d_in, d_out, *, axes, slot="", **kw: Linear(d_in, d_out, rngs=rngs,
                                                                    axes=axes, **kw)
  dense = SwiGLU(args.d, args.d_ff, init_std=0.02, n_layers=1, linear=linear)
  dense_time = _time_fwd_bwd(dense, x, args.repeats)
  rows = []
  for dispatch in args.dispatch.split(","):
    for e in map(int, args.experts.split(",")):
      for k in map(int, args.top_k.split(",")):
        cfg = MoEConfig(num_experts=e, top_k=k, dispatch=dispatch, router="sigmoid")
        layer = MoE(args.d, cfg, expert_dim=args.d_ff // k, init_std=0.02, n_layers=1,
                    rngs=nnx.Rngs(params=0))
        t = _time_fwd_bwd(layer, x, args.repeats)
        rows.append((dispatch, e, k, t * 1e3, t / dense_time))
        print(f"{dispatch:10s} E={e:3d} k={k}: {t * 1e3:8.1f} ms  ({t / dense_time:.2f}x dense)",
              file=sys.stderr, flush=True)
  header = (f"{args.tokens} tokens, d_model {args.d}, dense d_ff {args.d_ff} "
            f"(expert d_ff = {args.d_ff} / top_k); fwd+bwd, median of {args.repeats}; device "
            f"{jax.devices()[0].device_kind} ({jax.default_backend()}), {os.cpu_count()} host cores; "
            f"jax {jax.__version__}; {datetime.date.today()}.")
  table = ["| dispatch | experts | top-k | MoE fwd+bwd (ms) | x dense |", "|---|---|---|---|---|"]
  table += [f"| {d} | {e} | {k} | {t:.1f} | {r:.2f} |" for d, e, k, t, r in rows]
  table.append(f"| dense SwiGLU | - | - | {dense_time * 1e3:.1f} | 1.00 |")
  text = "\n".join(table)
  print(header + "\n\n" + text)
  if args.out:
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
      f.write(f"# MoE layer benchmark\n\nCommand: `python -m effjax.models.moe_bench "
              f"{' '.join(argv or sys.argv[1:])}`\n\n{header}\n\n{text}\n\n"
              "On CPU only the ratios within one run mean anything. The 'x dense' column is the "
              "cost of routing, sorting, gathering and the grouped matmul at equal active FLOPs.\n")
  return 0


if __name__ == "__main__":
  sys.exit(main())
