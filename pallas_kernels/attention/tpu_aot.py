"""Compile (not run) the streaming TPU attention kernels for a TPU topology from any host, and
measure each kernel's VMEM need with Mosaic's real compiler. Needs libtpu (importable, e.g.
`pip install libtpu` or PYTHONPATH pointing at an unpacked wheel); no TPU.

  python -m pallas_kernels.attention.tpu_aot [--topology v5e:2x2] [--seq-lens 2048,32768]
      [--scores softmax,lssa,lssar] [--measure] [--vmem-limit-mib 10] [--batch 1]
      [--heads 4] [--kv-heads 2] [--head-dim 128] [--dtype bfloat16] [--no-segments]
      [--block-q N --block-k N --bwd-block-q N --bwd-block-k N]

Default: compile forward + backward (jax.jit(...).lower(...).compile() with the inputs on
one device of the topology) and print XLA's memory figures; a kernel whose VMEM exceeds the
scoped limit fails here with CompileTimeScopedVmemOom, as it would on the chip.
--vmem-limit-mib sets every kernel's vmem_limit_bytes (a tighter bound than the chip's
default). --measure compiles each pallas_call alone and bisects the smallest
vmem_limit_bytes that compiles (256 KiB steps): Mosaic's VMEM need per grid step, which
includes the in-register temporaries that tpu_streaming.vmem_footprint does not count.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

import jax
import jax.numpy as jnp

from pallas_kernels.attention import tpu_streaming as ts


def devices(topology: str):
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  return topologies.get_topology_desc(topology, "tpu").devices


def _shapes(batch, t, heads, kv_heads, head_dim, dtype, sharding):
  q = jax.ShapeDtypeStruct((batch, t, heads, head_dim), dtype, sharding=sharding)
  kv = jax.ShapeDtypeStruct((batch, t, kv_heads, head_dim), dtype, sharding=sharding)
  seg = jax.ShapeDtypeStruct((batch, t), jnp.int32, sharding=sharding)
  return q, kv, seg


def _fwd_bwd(score, segments, opts):
  def fn(q, k, v, s):
    out, vjp = jax.vjp(lambda q, k, v: ts.flash_attention(
        q, k, v, s if segments else None, score=score, **opts), q, k, v)
    return out, vjp(out)
  return fn


def compile_fwd_bwd(topology, score, t, *, batch=1, heads=4, kv_heads=2, head_dim=128,
                    dtype=jnp.bfloat16, segments=True, **opts):
  """Compiles forward + backward for one device of `topology`; returns the Compiled."""
  sharding = jax.sharding.SingleDeviceSharding(devices(topology)[0])
  q, kv, seg = _shapes(batch, t, heads, kv_heads, head_dim, dtype, sharding)
  return jax.jit(_fwd_bwd(score, segments, opts)).lower(q, kv, kv, seg).compile()


def _pallas_calls(score, t, batch, heads, kv_heads, head_dim, dtype, segments, opts):
  """(config, plan, operand shapes) of every pallas_call of forward + backward."""
  calls, orig = [], ts._call

  def record(cfg, plan, args):
    calls.append((cfg, plan, {n: jax.ShapeDtypeStruct(args[n].shape, args[n].dtype)
                              for n, _, _ in plan.ins}))
    return orig(cfg, plan, args)

  ts._call = record
  try:
    q, kv, seg = _shapes(batch, t, heads, kv_heads, head_dim, dtype, None)
    jax.eval_shape(_fwd_bwd(score, segments, opts), q, kv, kv, seg)
  finally:
    ts._call = orig
  return calls


def measure_vmem(topology, score, t, *, batch=1, heads=4, kv_heads=2, head_dim=128,
                 dtype=jnp.bfloat16, segments=True, max_mib=16, **opts):
  """{kernel name: smallest vmem_limit_bytes in MiB that compiles (None: > max_mib)}."""
  sharding = jax.sharding.SingleDeviceSharding(devices(topology)[0])
  out = {}
  for cfg, plan, shapes in _pallas_calls(score, t, batch, heads, kv_heads, head_dim, dtype,
                                         segments, opts):
    args = {n: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding)
            for n, s in shapes.items()}

    def fits(limit, cfg=cfg, plan=plan, args=args):
      c = dataclasses.replace(cfg, vmem_limit_bytes=limit)
      try:
        jax.jit(lambda a: ts._call(c, plan, a)).lower(args).compile()
        return True
      except Exception as e:  # pylint: disable=broad-except
        if "vmem" not in str(e).lower():
          raise
        return False

    lo, hi = 0, max_mib * 4  # units of 256 KiB
    if not fits(hi << 18):
      out[plan.name] = None
      continue
    while hi - lo > 1:
      mid = (lo + hi) // 2
      lo, hi = (lo, mid) if fits(mid << 18) else (mid, hi)
    out[plan.name] = hi / 4
  return out


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--topology", default="v5e:2x2")
  parser.add_argument("--seq-lens", default="2048,32768")
  parser.add_argument("--scores", default="softmax,lssa,lssar")
  parser.add_argument("--measure", action="store_true")
  parser.add_argument("--vmem-limit-mib", type=float, default=None)
  parser.add_argument("--batch", type=int, default=1)
  parser.add_argument("--heads", type=int, default=4)
  parser.add_argument("--kv-heads", type=int, default=2)
  parser.add_argument("--head-dim", type=int, default=128)
  parser.add_argument("--dtype", default="bfloat16")
  parser.add_argument("--no-segments", action="store_true")
  for name in ("block-q", "block-k", "bwd-block-q", "bwd-block-k"):
    parser.add_argument(f"--{name}", type=int, default=None)
  a = parser.parse_args(argv)
  opts = {k: getattr(a, k) for k in ("block_q", "block_k", "bwd_block_q", "bwd_block_k")
          if getattr(a, k)}
  if a.vmem_limit_mib:
    opts["vmem_limit_bytes"] = int(a.vmem_limit_mib * 2**20)
  kw = dict(batch=a.batch, heads=a.heads, kv_heads=a.kv_heads, head_dim=a.head_dim,
            dtype=jnp.dtype(a.dtype), segments=not a.no_segments, **opts)
  failed = False
  for score in a.scores.split(","):
    for t in map(int, a.seq_lens.split(",")):
      head = f"{a.topology} {score} T={t}"
      if a.measure:
        print(head, "VMEM MiB per kernel:", measure_vmem(a.topology, score, t, **kw),
              flush=True)
        continue
      try:
        mem = compile_fwd_bwd(a.topology, score, t, **kw).memory_analysis()
        print(head, f"compiled: temp {mem.temp_size_in_bytes / 2**20:.1f} MiB, arguments "
              f"{mem.argument_size_in_bytes / 2**20:.1f} MiB", flush=True)
      except Exception as e:  # pylint: disable=broad-except
        failed = True
        print(head, "FAILED:", str(e).splitlines()[0][:300], flush=True)
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
