"""Does jax.lax.ragged_dot stay a grouped matmul on this backend? Read from compiled HLO.

  python -m effjax.models.moe_hlo [--tokens=32768 --d=1024 --d-ff=1024 --experts=64]

XLA may rewrite ragged_dot into dense work over all experts (every token times every
expert's weights: E x the grouped FLOPs; openxla/xla #45995), or into a grouped library
kernel (cuDNN's ragged-dot fusion on GPU: forward and input gradient; XLA's weight gradient
has been reported densified). The MoE FFN's cost on an accelerator depends on which, for
each of the three products a training step runs: the forward (x W_e), the input gradient
(dY W_e^T, "dgrad") and the weight gradient (x^T dY per expert, "wgrad"). For each, this
compiles the product alone at the given shape and reports XLA's FLOP count against the
grouped count 2 N d f, the ragged-dot ops left, the custom calls (library kernels) and the
largest dot output, and a verdict: dense (FLOPs >= E/2 x grouped), grouped, or library
(a custom call whose FLOPs XLA does not count). On CPU it reads dense (XLA CPU loops over
all experts); the benchmark script runs it on the GPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import re
import sys

import jax
import jax.numpy as jnp

PASSES = ("fwd", "dgrad (x)", "wgrad (W)")


@dataclasses.dataclass(frozen=True)
class Lowering:
  name: str
  flops: float             # XLA's cost analysis of the compiled program (custom calls: 0)
  grouped_flops: float     # 2 N d f: what a grouped matmul does
  ragged_ops: int          # ragged-dot instructions left after compilation
  custom_calls: tuple      # custom-call targets (library kernels)
  largest_dot: int         # elements of the largest dot output
  verdict: str


def _cost_flops(compiled) -> float:
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float((cost or {}).get("flops", 0.0))


def _largest_dot(hlo: str) -> int:
  sizes = [0]
  for line in hlo.splitlines():
    if " dot(" in line or "custom-call(" in line:
      m = re.search(r"= \(?\w+\[([\d,]*)\]", line)
      if m and m.group(1):
        sizes.append(math.prod(int(s) for s in m.group(1).split(",")))
  return max(sizes)


def classify(flops: float, grouped_flops: float, experts: int, custom_calls) -> str:
  """dense / grouped / library / unknown from XLA's FLOP count (see the module docstring)."""
  ratio = flops / grouped_flops
  if ratio >= max(experts / 2, 1.5):
    return f"dense ({ratio:.1f}x grouped FLOPs, E={experts})"
  if ratio >= 0.5:
    return "grouped"
  if custom_calls:
    return f"library ({', '.join(sorted(set(custom_calls)))})"
  return f"unknown ({ratio:.2f}x grouped FLOPs, no custom call)"


def inspect_program(name: str, fn, args, grouped_flops: float, experts: int) -> Lowering:
  compiled = jax.jit(fn).lower(*args).compile()
  hlo = compiled.as_text()
  calls = tuple(c for c in re.findall(r'custom_call_target="([^"]+)"', hlo))
  flops = _cost_flops(compiled)
  return Lowering(name, flops, grouped_flops, hlo.count("ragged-dot("), calls, _largest_dot(hlo),
                  classify(flops, grouped_flops, experts, calls))


def inspect_ragged_dot(tokens: int, d: int, f: int, experts: int,
                       dtype: str = "bfloat16") -> list[Lowering]:
  """The three products of one ragged_dot x [N, d] . W [E, d, f] with equal groups."""
  dt = jnp.dtype(dtype)
  x = jax.ShapeDtypeStruct((tokens, d), dt)
  w = jax.ShapeDtypeStruct((experts, d, f), dt)
  gs = jax.ShapeDtypeStruct((experts,), jnp.int32)
  fwd = lambda x, w, gs: jax.lax.ragged_dot(x, w, gs)

  def grad(argnum):
    def fn(x, w, gs):
      return jax.grad(lambda *a: jnp.sum(fwd(*a, gs).astype(jnp.float32)), argnum)(x, w)
    return fn

  grouped = 2.0 * tokens * d * f
  return [inspect_program(n, fn, (x, w, gs), grouped, experts)
          for n, fn in zip(PASSES, (fwd, grad(0), grad(1)))]


def table(rows: list[Lowering]) -> str:
  out = ["| product | XLA GFLOP | grouped GFLOP | ragged-dot ops left | custom calls | "
         "largest dot output | verdict |", "|---|---:|---:|---:|---|---:|---|"]
  for r in rows:
    calls = ", ".join(sorted(set(r.custom_calls))) or "-"
    out.append(f"| {r.name} | {r.flops / 1e9:.2f} | {r.grouped_flops / 1e9:.2f} | "
               f"{r.ragged_ops} | {calls} | {r.largest_dot / 1e6:.1f}M | {r.verdict} |")
  return "\n".join(out)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--tokens", type=int, default=32768)
  parser.add_argument("--d", type=int, default=1024)
  parser.add_argument("--d-ff", type=int, default=1024, help="one expert's hidden size")
  parser.add_argument("--experts", type=int, default=64)
  parser.add_argument("--dtype", default="bfloat16")
  parser.add_argument("--out", default="")
  args = parser.parse_args(argv)
  rows = inspect_ragged_dot(args.tokens, args.d, args.d_ff, args.experts, args.dtype)
  text = (f"ragged_dot lowering on {jax.devices()[0].device_kind} ({jax.default_backend()}), "
          f"jax {jax.__version__}: x [{args.tokens}, {args.d}] . W [{args.experts}, {args.d}, "
          f"{args.d_ff}], {args.dtype}, equal groups.\n\n{table(rows)}\n")
  print(text)
  if args.out:
    with open(args.out, "w") as fh:
      fh.write(f"# ragged_dot lowering\n\n{text}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
