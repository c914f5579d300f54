"""Streaming TPU attention kernels (pallas_kernels/attention/tpu_streaming.py; implementation
"pallas_tpu" / "interpret_tpu"), what the conformance suite (test_conformance.py: interpret
mode versus the reference) does not cover: TPU interpret mode (simulated VMEM, random grid
order), the Mosaic lowering (export for TPU from CPU, up to T = 32k), the VMEM footprint per
grid step (independent of T), the DMA-skipping index maps, and (slow, where libtpu is
importable) compilation for TPU topologies with Mosaic's real compiler; -m tpu: on a TPU.
Tolerances as in conformance.py.
"""

import importlib.util
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.attention import attention, reference, tpu_streaming as ts
from tests.kernels.conformance import (SCORES, TOL, assert_close, check, out_and_grads,
                                       packed, pallas_calls, qkv)

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


BLOCKS = dict(block_q=32, block_k=32)  # interpret mode: no lane-width rule for blocks


def _check(q, k, v, *, score, segment_ids=None, interpret=True, blocks=None, **kw):
  """The streaming kernels (blocks: the TPU defaults unless given) against the reference."""
  check(lambda q, k, v: ts.flash_attention(q, k, v, segment_ids, score=score,
                                           interpret=interpret, **(blocks or {}), **kw),
        q, k, v, tol=TOL[score], fast=True, segment_ids=segment_ids, score=score, **kw)


# ------------------------------------------------------------------ TPU interpret mode

def test_streaming_tpu_interpret_mode():
  """TPU interpret mode (pltpu.InterpretParams): simulated VMEM/DMAs, scratch and outputs
  start as NaN (a read before the kernel's own initialisation would show), and the grid
  runs with 'parallel' axes in random order: the accumulators must only depend on the
  'arbitrary' axes. LSSAR with segments uses every kernel (counts, two-pass forward, dq with
  C, dk/dv with GQA 2)."""
  from jax.experimental.pallas import tpu as pltpu
  q, k, v = qkv(1, 70, 4, 2, 64, seed=4)
  params = pltpu.InterpretParams(random_seed=7, uninitialized_memory="nan")
  _check(q, k, v, score="lssar", segment_ids=packed(1, 70), interpret=params,
         blocks=BLOCKS)


@pytest.mark.slow
@pytest.mark.parametrize("score", ["softmax", "lssa"])
def test_streaming_tpu_interpret_mode_other_scores(score):
  from jax.experimental.pallas import tpu as pltpu
  q, k, v = qkv(2, 100, 4, 2, 64, seed=4)
  params = pltpu.InterpretParams(random_seed=7, uninitialized_memory="nan")
  _check(q, k, v, score=score, segment_ids=packed(2, 100), interpret=params,
         blocks=BLOCKS)


@pytest.mark.slow
@pytest.mark.parametrize("score", SCORES)
def test_streaming_non_causal_q_offset_default_blocks(score):
  q, k, v = qkv(1, 300, 4, 4, 64, seed=12, tk=700)
  _check(q, k, v, score=score, q_offset=400)
  _check(q, k, v, score=score, causal=False)


# ------------------------------------------------------------------ structure

def _grid_points(grid):
  return np.stack(np.meshgrid(*[np.arange(n) for n in grid], indexing="ij"), -1).reshape(
      -1, len(grid))


def _fetches(plan, name):
  """Block fetches of operand `name` over the grid in execution order: the pipeline copies
  a block only when its index differs from the previous step's."""
  spec = dict((n, s) for n, s, _ in plan.ins)[name]
  idx = [tuple(int(x) for x in spec.index_map(*map(jnp.int32, p)))
         for p in _grid_points(plan.grid)]
  return 1 + sum(a != b for a, b in zip(idx, idx[1:]))


def _needed_fetches(blocks):
  """Fetches if exactly the blocks a step computes with are loaded, in order (a block
  needed by consecutive steps is loaded once)."""
  return 1 + sum(a != b for a, b in zip(blocks, blocks[1:]))


@pytest.mark.parametrize("score", SCORES)
def test_causal_skipping_issues_no_dma_for_masked_blocks(score):
  """Causal, 8 x 8 blocks of 128, two q heads on one kv head. The clamped index_maps make
  the pipeline load exactly the blocks the visible steps use: K/V in the forward and dq
  kernels (LSSAR's forward: K in both passes, V in pass 2 only), Q/dO in dk/dv; a fully
  masked step re-requests the resident block. Without clamping: 64 loads per head."""
  q = jax.ShapeDtypeStruct((1, 1024, 2, 64), jnp.float32)
  kv = jax.ShapeDtypeStruct((1, 1024, 1, 64), jnp.float32)
  cfg = ts.make_config(q, kv, score=score, block_q=128, block_k=128)
  args = (cfg, 1, 2, 1, 64, 1024, 1024, jnp.float32)
  per_pass = [j for _ in range(2) for i in range(8) for j in range(i + 1)]  # heads, q, k
  fwd = ts._fwd_plan(*args)
  if score == "lssar":  # per q block: pass 1 then pass 2 over the same visible blocks
    k_needed = [j for _ in range(2) for i in range(8) for _p in range(2) for j in range(i + 1)]
  else:
    k_needed = per_pass
  assert _fetches(fwd, "k") == _needed_fetches(k_needed) <= 2 * 36 * (1 + (score == "lssar"))
  assert _fetches(fwd, "v") == _needed_fetches(per_pass)
  assert _fetches(ts._dq_plan(*args), "k") == _needed_fetches(per_pass)
  dkv = ts._dkv_plan(*args)
  assert dkv.grid == (1, 1, 8, 2, 8)  # (b, kv heads, key blocks, group, query blocks)
  q_needed = [(hh, i) for j in range(8) for hh in range(2) for i in range(j, 8)]
  assert _fetches(dkv, "q") == _needed_fetches(q_needed) == 72
  assert _fetches(dkv, "k") == 8  # one per key block: the GQA group shares it


def test_row_col_conversion_is_exact():
  row = jax.random.normal(jax.random.PRNGKey(0), (1, 256)) * 1e30
  col = ts._row_to_col(row)
  assert col.shape == (256, 1)
  np.testing.assert_array_equal(col[:, 0], row[0])
  np.testing.assert_array_equal(ts._col_to_row(col), row)
  ids = jnp.arange(128, dtype=jnp.int32)[None] * 7919 - 3
  np.testing.assert_array_equal(ts._row_to_col(ids)[:, 0], ids[0])


# Allowance for Mosaic's in-register temporaries: a kernel keeps a few [bq, bk] fp32 blocks
# (scores, weights, their gradients) live. Calibrated with `python -m
# pallas_kernels.attention.tpu_aot --measure` (Mosaic's VMEM need minus vmem_footprint's
# buffers + scratch, bf16, D = 128, default blocks: at most ~7 fp32 score blocks, LSSAR dq).
TEMP_BLOCKS = 8
BUDGET = 16 * 2**20  # the default scoped VMEM limit of v4 / v5e / v5p (v6e: 32 MiB)


@pytest.mark.parametrize("score", SCORES)
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_vmem_footprint_independent_of_length(score, dtype):
  """VMEM per grid step at the default blocks, from the BlockSpecs the kernels run with: the
  same at T = 2k, 32k and 128k, and with the temporaries allowance under 16 MiB (the old
  kernels held ~8 T D bytes, 32 MiB for K/V alone at T = 32k, D = 128, bf16)."""
  foot = {}
  for t in (2048, 32768, 131072):
    q = jax.ShapeDtypeStruct((2, t, 8, 128), dtype)
    kv = jax.ShapeDtypeStruct((2, t, 2, 128), dtype)
    cfg = ts.make_config(q, kv, score=score, segment_ids=True)
    foot[t] = ts.vmem_footprint(cfg, batch=2, heads=8, kv_heads=2, head_dim=128, dtype=dtype)
  assert foot[2048] == foot[32768] == foot[131072]
  cfg = ts.make_config(q, kv, score=score, segment_ids=True)
  for name, f in foot[2048].items():
    bwd = "bwd" in name
    bq = cfg.bwd_block_q if bwd else cfg.block_q
    bk = cfg.bwd_block_k if bwd else cfg.block_k
    need = f["total"] + TEMP_BLOCKS * 4 * bq * bk
    assert need <= BUDGET, (name, f, need / 2**20)
  names = set(foot[2048])
  assert {f"attention_fwd_{score}", f"attention_bwd_dq_{score}",
          f"attention_bwd_dkv_{score}"} <= names


# ------------------------------------------------------------------ Mosaic lowering

def _export_tpu(score, t, h=4, kvh=2, d=128):
  """Forward + backward of the streaming kernels exported for TPU (Mosaic) from CPU."""
  q = jax.ShapeDtypeStruct((2, t, h, d), jnp.bfloat16)
  kv = jax.ShapeDtypeStruct((2, t, kvh, d), jnp.bfloat16)
  seg = jax.ShapeDtypeStruct((2, t), jnp.int32)

  def fwd_bwd(q, k, v, s):
    out, vjp = jax.vjp(lambda q, k, v: ts.flash_attention(q, k, v, s, score=score), q, k, v)
    return out, vjp(out)

  return jax.export.export(jax.jit(fwd_bwd), platforms=["tpu"])(q, kv, kv, seg)


@pytest.mark.parametrize("score", SCORES)
@pytest.mark.parametrize("t", [200, 32768])
def test_streaming_kernels_lower_to_mosaic(score, t):
  """Forward, dq, dk/dv (and the count kernel for LSSA/LSSAR with segments) lower through
  Mosaic when exporting for TPU from CPU: bf16, GQA 2, packed, default blocks; T = 200 (one
  ragged block) and T = 32768 (where the old kernels' whole-sequence blocks overflow VMEM).
  Lowering does not check VMEM: see test_vmem_footprint_independent_of_length and, with
  libtpu, test_streaming_kernels_compile_for_tpu_topology."""
  text = _export_tpu(score, t).mlir_module()
  for name in ("fwd", "bwd_dq", "bwd_dkv"):
    assert f"attention_{name}_{score}" in text, f"missing the {name} Mosaic kernel"
  assert text.count("tpu_custom_call") == 3 + (score != "softmax")


# ------------------------------------------------------------------ TPU (run with -m tpu)

@pytest.mark.tpu
@pytest.mark.skipif(jax.default_backend() != "tpu", reason="needs a TPU")
@pytest.mark.parametrize("score", SCORES)
def test_pallas_tpu_long_sequence(score):
  """On a TPU: auto takes the streaming kernels at T = 32k (the reference would need
  [T, T] scores); the last 512 queries match the chunked reference (bf16 inputs: 2e-2 as in
  test_attention.py; LSSAR 5e-2), and the gradients are finite."""
  q, k, v = qkv(1, 32768, 4, 2, 128, seed=3, dtype=jnp.bfloat16)
  fn = lambda q, k, v: attention(q, k, v, score=score)
  assert "arbitrary" in str(pallas_calls(jax.make_jaxpr(fn)(q, k, v).jaxpr))
  out, grads = out_and_grads(fn, q, k, v, jnp.ones(q.shape, jnp.float32))
  tail = reference.chunked_attention(*(x.astype(jnp.float32) for x in (q[:, -512:], k, v)),
                                     chunk_size=256, score=score, q_offset=32768 - 512)
  assert_close(out[:, -512:].astype(jnp.float32), tail, 5e-2 if score == "lssar" else 2e-2,
               "tail")
  assert all(bool(jnp.all(jnp.isfinite(g.astype(jnp.float32)))) for g in grads)


@pytest.mark.tpu
@pytest.mark.skipif(jax.default_backend() != "tpu", reason="needs a TPU")
@pytest.mark.parametrize("score", SCORES)
def test_pallas_tpu_matches_reference(score):
  """On a TPU: the Mosaic-compiled streaming kernels (pallas_tpu, default blocks) versus the
  reference. fp32 matmuls on the MXU may run at reduced precision, hence 2e-3 (a first-run
  check)."""
  q, k, v = qkv(2, 300, 4, 2, 128, seed=13)
  kw = dict(score=score, segment_ids=jnp.asarray([[1] * 170 + [2] * 130, [5] * 300]))
  check(lambda q, k, v: attention(q, k, v, implementation="pallas_tpu", **kw), q, k, v,
        tol=2e-3, **kw)


# ------------------------------------------------------------------ TPU compiler (libtpu)

def _libtpu_path():
  """A PYTHONPATH entry under which `import libtpu` works: $LIBTPU_SITE, this environment,
  or /tmp/tpusite (an unpacked libtpu wheel); None if there is none."""
  for path in (os.environ.get("LIBTPU_SITE"), "", "/tmp/tpusite"):
    if path is None:
      continue
    if path == "" and importlib.util.find_spec("libtpu") is not None:
      return ""
    if path and os.path.isfile(os.path.join(path, "libtpu", "libtpu.so")):
      return path
  return None


@pytest.mark.slow
@pytest.mark.skipif(_libtpu_path() is None, reason="needs libtpu (set LIBTPU_SITE)")
@pytest.mark.parametrize("topology", ["v5e:2x2", "v5p:2x2x1"])
def test_streaming_kernels_compile_for_tpu_topology(topology):
  """Mosaic's real compiler (VMEM limits included) from CPU via a TPU topology description:
  forward + backward of every score compile at T = 32k and 128k (bf16, D = 128, GQA 2,
  packed) with every kernel's vmem_limit_bytes at 10 MiB, below the chips' 16 MiB default.
  In a subprocess, so libtpu does not change this process's backends."""
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(
      p for p in (_libtpu_path(), REPO, os.environ.get("PYTHONPATH", "")) if p))
  proc = subprocess.run(
      [sys.executable, "-m", "pallas_kernels.attention.tpu_aot", "--topology", topology,
       "--seq-lens", "32768,131072", "--vmem-limit-mib", "10"],
      capture_output=True, text=True, timeout=1200, env=env, cwd=REPO)
  lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(topology)]
  assert proc.returncode == 0 and len(lines) == 6, proc.stdout + proc.stderr[-3000:]
  assert all("compiled" in ln for ln in lines), proc.stdout
