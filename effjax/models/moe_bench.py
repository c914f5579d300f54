"""MoE layer benchmark (issue 5): forward+backward time of the MoE FFN versus a dense
SwiGLU with equal active FLOPs, in one run. Prints a table (--out also writes it to a file).

  python -m effjax.models.moe_bench [--tokens=4096] [--d=256] [--out=results/perf/moe.md]
  python -m effjax.models.moe_bench --dtype=bfloat16 --grad-x --capacity-factor=0,1.25 \
      --tokens=32768 --d=1024 --d-ff=4096 --experts=8,64 --top-k=2 --dispatch=ragged_dot,gmm --hlo

Equal active FLOPs: each expert has d_ff / top_k hidden units, so a token touches the
same number of expert weights as the dense layer's d_ff (the router's d x E is extra).
--dtype: the activations' dtype (the layers cast weights to it: bf16 is what an
accelerator trains in); --grad-x: differentiate w.r.t. the input too (a training step
does: without it XLA drops the input-gradient matmuls and the gather/scatter backward);
--dispatch: a comma list of model.moe.dispatch values (gmm: the grouped-matmul kernel for
this device, effjax/models/grouped_matmul.py); --capacity-factor: 0 = dropless, > 0 the token-dropping dense-batched baseline; --hlo:
also report how ragged_dot compiles here, forward and both gradients (effjax/models/moe_hlo.py).
Times: median and min of --repeats calls after a warm-up, each ended by block_until_ready.
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


def _time_fwd_bwd(module, x, repeats: int, grad_x: bool = False) -> tuple[float, float]:
  """(median, min) seconds of one jitted forward+backward."""
  graphdef, params, rest = nnx.split(module, nnx.Param, ...)

  @jax.jit
  def step(params, x):
    def loss(p, x):
      y, _ = nnx.merge(graphdef, p, rest)(x)
      y = y.astype(jnp.float32)
      return jnp.sum(y * y)
    return jax.grad(loss, argnums=(0, 1) if grad_x else 0)(params, x)

  jax.block_until_ready(step(params, x))
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(step(params, x))
    times.append(time.perf_counter() - t0)
  return statistics.median(times), min(times)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--tokens", type=int, default=4096)
  parser.add_argument("--d", type=int, default=256)
  parser.add_argument("--d-ff", type=int, default=1024)
  parser.add_argument("--experts", default="8,16,32,64")
  parser.add_argument("--top-k", default="1,2")
  parser.add_argument("--dispatch", default="blocks,ragged_dot")
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  parser.add_argument("--grad-x", action="store_true", help="gradients w.r.t. the input too")
  parser.add_argument("--capacity-factor", default="0", help="comma list; 0 = dropless")
  parser.add_argument("--hlo", action="store_true", help="report ragged_dot's lowering too")
  parser.add_argument("--out", default="", help="also write the table here")
  args = parser.parse_args(argv)
  x = jax.random.normal(jax.random.PRNGKey(0), (args.tokens // 256, 256, args.d),
                        jnp.dtype(args.dtype))
  rngs = nnx.Rngs(params=0)
  linear = lambda kind, d_in, d_out, *, axes, slot="", **kw: Linear(d_in, d_out, rngs=rngs,
                                                                    axes=axes, **kw)
  dense = SwiGLU(args.d, args.d_ff, init_std=0.02, n_layers=1, linear=linear)
  dense_time, dense_min = _time_fwd_bwd(dense, x, args.repeats, args.grad_x)
  rows = []
  dispatches = args.dispatch.split(",")
  for dispatch in dispatches:
    for cf in map(float, args.capacity_factor.split(",")):
      if cf and dispatch != dispatches[0]:
        continue  # the capacity path does not use the dispatch: once is enough
      for e in map(int, args.experts.split(",")):
        for k in map(int, args.top_k.split(",")):
          cfg = MoEConfig(num_experts=e, top_k=k, dispatch=dispatch, router="sigmoid",
                          capacity_factor=cf)
          layer = MoE(args.d, cfg, expert_dim=args.d_ff // k, init_std=0.02, n_layers=1,
                      rngs=nnx.Rngs(params=0))
          name = dispatch if not cf else f"capacity {cf:g}"
          try:
            t, t_min = _time_fwd_bwd(layer, x, args.repeats, args.grad_x)
          except Exception as err:  # pylint: disable=broad-except  (a kernel that cannot run here)
            print(f"{name:12s} E={e:3d} k={k}: failed: {str(err)[:300]}", file=sys.stderr,
                  flush=True)
            rows.append((f"{name} (failed: {type(err).__name__})", e, k, float("nan"),
                         float("nan"), float("nan")))
            continue
          rows.append((name, e, k, t * 1e3, t_min * 1e3, t / dense_time))
          print(f"{name:12s} E={e:3d} k={k}: {t * 1e3:8.1f} ms  ({t / dense_time:.2f}x dense)",
                file=sys.stderr, flush=True)
  grads = "params and input" if args.grad_x else "params only"
  header = (f"{args.tokens} tokens, d_model {args.d}, dense d_ff {args.d_ff} "
            f"(expert d_ff = {args.d_ff} / top_k); {args.dtype}; fwd+bwd (gradients of {grads}), "
            f"median and min of {args.repeats}; device "
            f"{jax.devices()[0].device_kind} ({jax.default_backend()}), {os.cpu_count()} host cores; "
            f"jax {jax.__version__}; {datetime.date.today()}.")
  table = ["| dispatch | experts | top-k | MoE fwd+bwd median (ms) | min (ms) | x dense |",
           "|---|---|---|---|---|---|"]
  table += [f"| {d} | {e} | {k} | {t:.2f} | {m:.2f} | {r:.2f} |" for d, e, k, t, m, r in rows]
  table.append(f"| dense SwiGLU | - | - | {dense_time * 1e3:.2f} | {dense_min * 1e3:.2f} | 1.00 |")
  text = "\n".join(table)
  if args.hlo:
    from effjax.models import moe_hlo  # pylint: disable=g-import-not-at-top
    for e in map(int, args.experts.split(",")):
      k = int(args.top_k.split(",")[0])
      rows_hlo = moe_hlo.inspect_ragged_dot(args.tokens * k, args.d, args.d_ff // k, e,
                                            args.dtype)
      text += (f"\n\nragged_dot lowering, E={e}, x [{args.tokens * k}, {args.d}] . W [{e}, "
               f"{args.d}, {args.d_ff // k}]:\n\n{moe_hlo.table(rows_hlo)}")
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
