"""Attention benchmark (issue 3): prints a markdown table and writes it with the device,
JAX version and command.

  python -m pallas_kernels.attention.bench [--seq-lens=1024,2048,4096,8192,16384]
      [--batch=B] [--heads=H] [--head-dim=128] [--impls=xla,pallas_tpu,cudnn]
      [--scores=softmax,lssa] [--out=results/perf/attention.md]

FLOPs (causal counted at half): forward 4 B H T^2 D / 2 (QK^T and AV); forward+backward
2.5x forward (the backward does 2x the forward's matmuls plus a recomputed QK^T is not
counted). Times: median of --repeats after a warm-up, block_until_ready around each call.
Peak memory from device.memory_stats() where the backend reports it.
Implementations: xla (the jnp reference), pallas_tpu (on TPU), cudnn
(jax.nn.dot_product_attention, softmax only, on GPU); unavailable ones are skipped with
a note. Smoke test on CPU: --seq-lens=256 --batch=1 --heads=2 --out=/tmp/attn.md
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

from pallas_kernels.attention import attention


def _fn(impl, score):
  if impl == "cudnn":
    if score != "softmax" or jax.default_backend() != "gpu":
      return None
    return lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True,
                                                        implementation="cudnn")
  if impl == "pallas_tpu" and jax.default_backend() != "tpu":
    return None
  return lambda q, k, v: attention(q, k, v, score=score, implementation=impl)


def _time(f, args, repeats):
  jax.block_until_ready(f(*args))
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(f(*args))
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def _peak_bytes():
  stats = getattr(jax.devices()[0], "memory_stats", lambda: None)()
  return (stats or {}).get("peak_bytes_in_use")


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--seq-lens", default="1024,2048,4096,8192,16384")
  parser.add_argument("--batch", type=int, default=4)
  parser.add_argument("--heads", type=int, default=16)
  parser.add_argument("--head-dim", type=int, default=128)
  parser.add_argument("--impls", default="xla,pallas_tpu,cudnn")
  parser.add_argument("--scores", default="softmax,lssa")
  parser.add_argument("--repeats", type=int, default=10)
  parser.add_argument("--out", default="results/perf/attention.md")
  args = parser.parse_args(argv)
  dtype = jnp.bfloat16 if jax.default_backend() != "cpu" else jnp.float32
  rows, notes = [], set()
  for t in map(int, args.seq_lens.split(",")):
    ks = jax.random.split(jax.random.PRNGKey(t), 3)
    shape = (args.batch, t, args.heads, args.head_dim)
    q, k, v = (jax.random.normal(kk, shape, dtype) for kk in ks)
    fwd_flops = 4 * args.batch * args.heads * t * t * args.head_dim / 2
    for score in args.scores.split(","):
      for impl in args.impls.split(","):
        f = _fn(impl, score)
        if f is None:
          notes.add(f"{impl} skipped for {score} on {jax.default_backend()}")
          continue
        fwd = jax.jit(f)
        fwd_bwd = jax.jit(jax.grad(lambda q, k, v: jnp.sum(f(q, k, v).astype(jnp.float32)),
                                   argnums=(0, 1, 2)))
        try:
          t_f = _time(fwd, (q, k, v), args.repeats)
          t_fb = _time(fwd_bwd, (q, k, v), args.repeats)
        except Exception as e:  # e.g. out of memory at long T: record and go on
          notes.add(f"{impl}/{score} at T={t}: {type(e).__name__}: {str(e)[:120]}")
          continue
        peak = _peak_bytes()
        rows.append((t, score, impl, t_f * 1e3, fwd_flops / t_f / 1e12, t_fb * 1e3,
                     2.5 * fwd_flops / t_fb / 1e12, f"{peak / 2**30:.2f}" if peak else "n/a"))
        print(f"T={t} {score} {impl}: fwd {t_f * 1e3:.2f} ms, fwd+bwd {t_fb * 1e3:.2f} ms",
              file=sys.stderr, flush=True)
  header = (f"device {jax.devices()[0].device_kind} ({jax.default_backend()}), jax {jax.__version__}, "
            f"{jnp.dtype(dtype).name}, batch {args.batch}, heads {args.heads}, head_dim "
            f"{args.head_dim}, causal; {datetime.date.today()}.")
  table = ["| T | score | impl | fwd ms | fwd TFLOP/s | fwd+bwd ms | fwd+bwd TFLOP/s | peak GiB |",
           "|---|---|---|---|---|---|---|---|"]
  table += [f"| {t} | {s} | {i} | {a:.2f} | {b:.2f} | {c:.2f} | {d:.2f} | {m} |"
            for t, s, i, a, b, c, d, m in rows]
  text = "\n".join(table) + ("\n\nNotes: " + "; ".join(sorted(notes)) if notes else "")
  print(header + "\n\n" + text)
  if args.out:
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
      f.write(f"# Attention benchmark\n\nCommand: `python -m pallas_kernels.attention.bench "
              f"{' '.join(argv or sys.argv[1:])}`\n\n{header}\n\n{text}\n")
  return 0


if __name__ == "__main__":
  sys.exit(main())
