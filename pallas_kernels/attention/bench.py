"""Attention benchmark: prints a markdown table with device, JAX version and the command;
--out also writes it to a file.

  python -m pallas_kernels.attention.bench [--seq-lens 1024,2048,4096,8192,16384]
      [--batch 4] [--heads 16] [--kv-heads 16] [--head-dim 128] [--dtype bfloat16]
      [--scores softmax,lssa,lssar] [--impls xla,pallas_tpu,cudnn] [--repeats 10]
      [--segments 4] [--no-memory] [--out results/perf/attention.md]
  CPU smoke run: --seq-lens 128 --batch 1 --heads 2 --out /tmp/x.md

FLOP convention: forward = 4 B H Tq Tk D (QK^T and PV, 2 FLOPs per multiply-add), causal
counted at half; forward+backward = 3.5 x forward (the backward's five matmuls are 2.5 x
the forward's two; the recomputation of QK^T in the backward is not counted, as in the
FlashAttention papers). Softplus/exp work is not counted. Times: median and min of
--repeats calls after a compile and warm-up call, each ended by block_until_ready.
--segments N: every row packs N documents of equal length (segment ids, as training with
model.attention.doc_mask=true passes them) for every implementation that takes them.
--no-memory: skip the temp-memory column (it compiles fwd+bwd once more). Memory: XLA's compiled
temp allocation for the fwd+bwd function (memory_analysis; all backends), and the
process-wide peak_bytes_in_use where the device reports it (cumulative over the run).
Implementations: xla (the jnp reference, which materialises [B, H, T, T] scores), pallas_tpu
(TPU only), pallas_gpu (the same kernels via Pallas' Triton lowering;
pallas_gpu:BQxBKxW+BQxBKxW sets forward and backward blocks and warps), pallas_mgpu (the
Mosaic GPU wgmma/TMA kernels of mosaic_gpu.py, all three scores, Hopper only;
pallas_mgpu:BQxBK[+BQxBK] sets forward and backward blocks; pallas_mgpu_ws[:...] the same with
the warp-specialised kernels), jax_mgpu (JAX's
own Mosaic GPU softmax kernel, forward only: its causal backward is not implemented; fed
float16 copies, conversion included), interpret (the Pallas kernels in the interpreter; slow, opt-in), cudnn
(the dispatch table's cudnn: jax.nn.dot_product_attention(implementation="cudnn"), packed
documents through cuDNN's packed layout with room for T documents per row; cudnn:M with room
for M, which must cover --segments; softmax only, GPU only), splash (TPU, softmax). Unavailable
ones are skipped and failures (e.g. out of memory at long T) are noted, in the same run.
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

from pallas_kernels.attention import attention, kernel, mosaic_gpu, vendor


def _fn(impl: str, score: str, seg=None):
  backend = jax.default_backend()
  if impl.startswith("cudnn:"):  # cudnn:M, cuDNN's packed layout with at most M documents
    if score != "softmax" or backend != "gpu":
      return None, f"{impl}: softmax on GPU only"
    m = int(impl.split(":", 1)[1])
    return (lambda q, k, v: vendor.cudnn_attention(q, k, v, seg, causal=True,
                                                   scale=q.shape[-1] ** -0.5,
                                                   max_documents=m)), None
  if impl == "interpret_splash" and score != "softmax":
    return None, "interpret_splash: softmax only"
  if impl in ("cudnn", "splash"):
    needs = {"cudnn": "gpu", "splash": "tpu"}[impl]
    if score != "softmax" or backend != needs:
      return None, f"{impl}: softmax on {needs.upper()} only (skipped on {backend} or for LSSA/LSSAR)"
  if impl == "pallas_tpu" and backend != "tpu":
    return None, f"pallas_tpu: needs a TPU (skipped on {backend})"
  if impl.startswith("pallas_gpu"):
    if backend != "gpu":
      return None, f"pallas_gpu: needs a GPU (skipped on {backend})"
    opts = _gpu_options(impl)
    return (lambda q, k, v: kernel.flash_attention(q, k, v, seg, causal=True, score=score,
                                                   backend="gpu", **opts)), None
  if impl.startswith("pallas_mgpu"):
    if backend != "gpu":
      return None, f"pallas_mgpu: needs a Hopper GPU (skipped on {backend})"
    if score not in mosaic_gpu.SCORES:
      return None, f"pallas_mgpu: no {score} kernel ({', '.join(mosaic_gpu.SCORES)} only)"
    opts = _mgpu_options(impl.replace("pallas_mgpu_ws", "pallas_mgpu"))
    if impl.startswith("pallas_mgpu_ws"):   # the opt-in warp-specialised kernels
      opts["warp_specialized"] = True
    return (lambda q, k, v: mosaic_gpu.flash_attention(q, k, v, seg, causal=True, score=score,
                                                       **opts)), None
  if impl == "jax_mgpu":
    if seg is not None:
      return None, "jax_mgpu: takes no segment ids (skipped with --segments)"
    return _jax_mgpu(score, backend)
  return (lambda q, k, v: attention(q, k, v, causal=True, score=score, segment_ids=seg,
                                    implementation=impl)), None


def _gpu_options(impl: str) -> dict:
  """'pallas_gpu' (defaults) or 'pallas_gpu:BQxBKxW[+BQxBKxW]': forward blocks and warps,
  then optionally the backward's, e.g. pallas_gpu:128x128x8+64x64x4."""
  if ":" not in impl:
    return {}
  fwd, _, bwd = impl.split(":", 1)[1].partition("+")
  bq, bk, warps = (int(x) for x in fwd.split("x"))
  opts = dict(block_q=bq, block_k=bk, num_warps=warps)
  if bwd:
    bq, bk, warps = (int(x) for x in bwd.split("x"))
    opts.update(bwd_block_q=bq, bwd_block_k=bk, bwd_num_warps=warps)
  return opts


def _mgpu_options(impl: str) -> dict:
  """'pallas_mgpu' (defaults) or 'pallas_mgpu:BQxBK[+BQxBK]': forward, then backward blocks."""
  if ":" not in impl:
    return {}
  fwd, _, bwd = impl.split(":", 1)[1].partition("+")
  opts = dict(zip(("block_q", "block_k"), (int(x) for x in fwd.split("x"))))
  if bwd:
    opts.update(zip(("bwd_block_q", "bwd_block_k"), (int(x) for x in bwd.split("x"))))
  return opts


def _jax_mgpu(score: str, backend: str):
  """JAX's own Mosaic GPU (wgmma) softmax attention, forward only when causal: a yardstick
  for what a Hopper-specialised kernel reaches (jax.experimental.pallas.ops.gpu)."""
  if score != "softmax" or backend != "gpu":
    return None, "jax_mgpu: softmax on GPU only"
  try:
    from jax.experimental.pallas.ops.gpu import attention_mgpu  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    return None, f"jax_mgpu: not importable ({e})"
  config = attention_mgpu.TuningConfig(block_q=64, block_kv=128, max_concurrent_steps=2,
                                       causal=True)
  f16 = lambda x: x.astype(jnp.float16)  # this build's causal path wants float16 operands
  return (lambda q, k, v: attention_mgpu.attention(f16(q), f16(k), f16(v), config)), None


def _time(f, args, repeats: int) -> tuple[float, float]:
  """(median, min) seconds over `repeats` calls after a compile + warm-up call."""
  jax.block_until_ready(f(*args))  # compile + warm-up
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(f(*args))
    times.append(time.perf_counter() - t0)
  return statistics.median(times), min(times)


def packed_segments(batch: int, t: int, n: int):
  """[batch, t] int32: n documents of (nearly) equal length per row."""
  return jnp.broadcast_to((jnp.arange(t) * n // t).astype(jnp.int32), (batch, t))


def _temp_mib(jitted, args):
  try:
    mem = jitted.lower(*args).compile().memory_analysis()
    return f"{mem.temp_size_in_bytes / 2**20:.0f}" if mem is not None else "n/a"
  except Exception:  # pylint: disable=broad-except
    return "n/a"


def _peak_gib():
  stats = getattr(jax.devices()[0], "memory_stats", lambda: None)() or {}
  peak = stats.get("peak_bytes_in_use")
  return f"{peak / 2**30:.2f}" if peak else "n/a"


def main(argv=None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--seq-lens", default="1024,2048,4096,8192,16384")
  parser.add_argument("--batch", type=int, default=4)
  parser.add_argument("--heads", type=int, default=16)
  parser.add_argument("--kv-heads", type=int, default=None, help="default: --heads (MHA)")
  parser.add_argument("--head-dim", type=int, default=128)
  parser.add_argument("--dtype", default="bfloat16")
  parser.add_argument("--scores", default="softmax,lssa,lssar")
  parser.add_argument("--impls", default="xla,pallas_tpu,pallas_gpu,pallas_mgpu,jax_mgpu,cudnn")
  parser.add_argument("--repeats", type=int, default=10)
  parser.add_argument("--segments", type=int, default=0,
                      help="documents packed per row (segment ids); 0: none")
  parser.add_argument("--no-memory", action="store_true", help="skip the temp MiB column")
  parser.add_argument("--out", default="", help="also write the table here")
  args = parser.parse_args(argv)
  dtype = jnp.dtype(args.dtype)
  kvh = args.kv_heads or args.heads
  rows, notes = [], []
  for t in (int(x) for x in args.seq_lens.split(",")):
    ks = jax.random.split(jax.random.PRNGKey(t), 3)
    q = jax.random.normal(ks[0], (args.batch, t, args.heads, args.head_dim), dtype)
    k = jax.random.normal(ks[1], (args.batch, t, kvh, args.head_dim), dtype)
    v = jax.random.normal(ks[2], (args.batch, t, kvh, args.head_dim), dtype)
    # Causal FLOPs of the whole row; with N packed documents the kernels skip cross-document
    # blocks, so the TFLOP/s columns then state work per time at the unpacked count.
    fwd_flops = 4 * args.batch * args.heads * t * t * args.head_dim * 0.5
    seg = packed_segments(args.batch, t, args.segments) if args.segments else None
    for score in args.scores.split(","):
      for impl in args.impls.split(","):
        f, why = _fn(impl, score, seg)
        if f is None:
          if why not in notes:
            notes.append(why)
          continue
        fwd = jax.jit(f)
        fwd_bwd = jax.jit(jax.grad(lambda q, k, v, f=f: jnp.sum(f(q, k, v).astype(jnp.float32)),
                                   argnums=(0, 1, 2)))
        try:
          t_f, t_f_min = _time(fwd, (q, k, v), args.repeats)
          t_fb, t_fb_min = ((float("nan"),) * 2 if impl == "jax_mgpu" else
                            _time(fwd_bwd, (q, k, v), args.repeats))
        except Exception as e:  # pylint: disable=broad-except  (e.g. OOM at long T)
          notes.append(f"{impl}/{score} at T={t} failed: {type(e).__name__}: "
                       f"{str(e).splitlines()[0][:160]}")
          continue
        temp = ("n/a" if impl == "jax_mgpu" or args.no_memory else
                _temp_mib(fwd_bwd, (q, k, v)))
        rows.append((t, score, impl, t_f * 1e3, t_f_min * 1e3, fwd_flops / t_f / 1e12,
                     t_fb * 1e3, t_fb_min * 1e3, 3.5 * fwd_flops / t_fb / 1e12, temp,
                     _peak_gib()))
        print(f"T={t} {score} {impl}: fwd {t_f * 1e3:.3f} ms, fwd+bwd {t_fb * 1e3:.3f} ms",
              file=sys.stderr, flush=True)
  dev = jax.devices()[0]
  header = (f"Device: {dev.device_kind} ({jax.default_backend()}, {jax.device_count()} device(s)); "
            f"jax {jax.__version__}; {dtype.name}; batch {args.batch}, heads {args.heads}, "
            f"kv heads {kvh}, head_dim {args.head_dim}; causal; "
            f"{f'{args.segments} packed documents per row' if args.segments else 'no segments'}; "
            f"median and min of {args.repeats}; "
            f"{datetime.datetime.now().isoformat(timespec='seconds')}.\n\n"
            "FLOPs: forward 4 B H T^2 D x 0.5 (causal); fwd+bwd 3.5 x forward (recompute not "
            "counted). Temp MiB: XLA compiled temp allocation of fwd+bwd. Peak GiB: "
            "process-wide peak_bytes_in_use (cumulative).")
  table = ["| T | score | impl | fwd ms | fwd min ms | fwd TFLOP/s | fwd+bwd ms | "
           "fwd+bwd min ms | fwd+bwd TFLOP/s | temp MiB | peak GiB |",
           "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
  table += [f"| {t} | {s} | {i} | {a:.3f} | {a2:.3f} | {b:.3f} | {c:.3f} | {c2:.3f} | {d:.3f} "
            f"| {m} | {pk} |" for t, s, i, a, a2, b, c, c2, d, m, pk in rows]
  text = "\n".join(table)
  if jax.default_backend() == "cpu":
    notes.append("CPU: only ratios within this run mean anything (shared, noisy machine).")
  if notes:
    text += "\n\nNotes:\n" + "\n".join(f"- {n}" for n in notes)
  command = "python -m pallas_kernels.attention.bench " + " ".join(argv)
  print(f"{header}\n\n{text}")
  if args.out:
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as fh:
      fh.write(f"# Attention benchmark\n\nCommand: `{command.strip()}`\n\n{header}\n\n{text}\n")
    print(f"wrote {args.out}", file=sys.stderr)
  return 0


if __name__ == "__main__":
  sys.exit(main())
