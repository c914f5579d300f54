"""Accuracy of an attention implementation against the fp32 reference: prints
||x - ref|| / ||ref|| for the output and the three gradients, per score and input dtype.

  python -m pallas_kernels.attention.accuracy [--impl pallas_gpu] [--seq-len 1024]

The reference runs in fp32 with precision="highest" (full fp32 matmuls on GPU/TPU);
bf16 rows feed the implementation bf16 copies of the same inputs. Packed segments (three
documents in row 0) and GQA 2 are on, so masks, N_i and the group sums are exercised.
"""

from __future__ import annotations

import argparse
import sys

import jax
import jax.numpy as jnp

from pallas_kernels.attention import attention


def _rel(a, b) -> float:
  a, b = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
  return float(jnp.linalg.norm(a - b) / jnp.maximum(jnp.linalg.norm(b), 1e-30))


def _out_and_grads(impl, q, k, v, cot, seg, score):
  def loss(q, k, v):
    out = attention(q, k, v, score=score, segment_ids=seg, implementation=impl)
    return jnp.sum(out.astype(jnp.float32) * cot), out
  (_, out), grads = jax.jit(jax.value_and_grad(loss, (0, 1, 2), has_aux=True))(q, k, v)
  return out, grads


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--impl", default="pallas_gpu")
  parser.add_argument("--seq-len", type=int, default=1024)
  parser.add_argument("--head-dim", type=int, default=128)
  args = parser.parse_args(argv)
  t, d = args.seq_len, args.head_dim
  ks = jax.random.split(jax.random.PRNGKey(0), 4)
  q = jax.random.normal(ks[0], (2, t, 4, d))
  k = jax.random.normal(ks[1], (2, t, 2, d))
  v = jax.random.normal(ks[2], (2, t, 2, d))
  cot = jax.random.normal(ks[3], q.shape)
  row0 = [1] * (t // 3) + [2] * (t // 3) + [3] * (t - 2 * (t // 3))
  seg = jnp.asarray([row0, [7] * t], jnp.int32)
  print(f"| score | dtype | out | dq | dk | dv |  ({args.impl} vs fp32 reference, T={t}, "
        f"D={d}, {jax.devices()[0].device_kind})")
  print("|---|---|---:|---:|---:|---:|")
  for score in ("softmax", "lssa", "lssar"):
    with jax.default_matmul_precision("highest"):
      ref = _out_and_grads("xla", q, k, v, cot, seg, score)
    for dtype in (jnp.float32, jnp.bfloat16):
      got = _out_and_grads(args.impl, *(x.astype(dtype) for x in (q, k, v)), cot, seg, score)
      errs = [_rel(got[0], ref[0])] + [_rel(a, b) for a, b in zip(got[1], ref[1])]
      print(f"| {score} | {jnp.dtype(dtype).name} | " + " | ".join(f"{e:.1e}" for e in errs)
            + " |", flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
