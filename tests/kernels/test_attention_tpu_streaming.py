"""Streaming TPU attention kernels (pallas_kernels/attention/tpu_streaming.py; implementation
"pallas_tpu" / "interpret_tpu"): values and gradients in interpret mode versus the
reference, the Mosaic lowering (export for TPU from CPU, up to T = 32k), the VMEM footprint
per grid step (independent of T), the DMA-skipping index maps, dispatch, and (slow, where
libtpu is importable) compilation for TPU topologies with Mosaic's real compiler.

Tolerances as tests/kernels/test_attention.py (the kernels do the same maths): fp32 outputs
1e-5 for softmax and LSSA, 5e-5 for LSSAR (the p-th power multiplies A's relative rounding
by ~p); gradients max|kernel - ref| <= tol * max|ref|. Observed here: ~7e-7 (softmax, LSSA)
and ~1e-5 (LSSAR) on outputs, <= 5e-6 relative on gradients. Interpret mode runs blocks of
32 (the lane-width rule for Mosaic blocks does not apply to the interpreter), so small
shapes still have several blocks per axis.
"""

import importlib.util
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.attention import api, attention, reference, tpu_streaming as ts

TOL = {"softmax": 1e-5, "lssa": 1e-5, "lssar": 5e-5}
SCORES = ("softmax", "lssa", "lssar")
BLOCKS = dict(block_q=32, block_k=32)
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _qkv(b=1, t=37, h=2, kv=2, d=64, seed=0, tk=None, dtype=jnp.float32):
  ks = jax.random.split(jax.random.PRNGKey(seed), 3)
  tk = tk or t
  return tuple(x.astype(dtype) for x in (jax.random.normal(ks[0], (b, t, h, d)),
                                         jax.random.normal(ks[1], (b, tk, kv, d)),
                                         jax.random.normal(ks[2], (b, tk, kv, d))))


def _packed(b, t):
  """Row 0: three documents (one of length 1); row 1: one document."""
  row0 = [1] * (t // 3) + [2] + [3] * (t - t // 3 - 1)
  return jnp.asarray([row0, [7] * t][:b], jnp.int32)


# Interpret-mode kernels are compile-bound on CPU (~3-5 s per configuration; running takes
# ~0.1 s): XLA's backend optimisation level 0 nearly halves that for the kernels. Only for
# the kernels: at level 0 the LSSAR *reference* gradient came out NaN here (XLA CPU codegen
# of its masked power), so the reference compiles at the default level.
FAST_COMPILE = {"xla_backend_optimization_level": 0}


def _out_and_grads(fn, q, k, v, cot, fast=False):
  """fn's output and d(sum(out * cot))/d(q, k, v), in one jitted call."""
  def loss(q, k, v):
    out = fn(q, k, v)
    return jnp.sum(out.astype(jnp.float32) * cot), out
  f = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))
  opts = FAST_COMPILE if fast else {}
  (_, out), grads = f.lower(q, k, v).compile(compiler_options=opts)(q, k, v)
  return out, grads


def _assert_close(a, b, tol, what):
  b = np.asarray(b)
  np.testing.assert_allclose(a, b, atol=tol * max(1.0, float(np.abs(b).max())), rtol=tol,
                             err_msg=what)


def _check(q, k, v, *, score, segment_ids=None, interpret=True, tol=None, blocks=BLOCKS,
           **kw):
  tol = tol or TOL[score]
  cot = jax.random.normal(jax.random.PRNGKey(9), q.shape)  # a non-uniform cotangent
  out_k, g_k = _out_and_grads(
      lambda q, k, v: ts.flash_attention(q, k, v, segment_ids, score=score,
                                         interpret=interpret, **blocks, **kw), q, k, v, cot,
      fast=True)
  out_r, g_r = _out_and_grads(
      lambda q, k, v: reference.attention(q, k, v, score=score, segment_ids=segment_ids, **kw),
      q, k, v, cot)
  assert bool(jnp.all(jnp.isfinite(out_k)))
  np.testing.assert_allclose(out_k, out_r, atol=tol, rtol=tol, err_msg="output")
  for name, a, b in zip("qkv", g_k, g_r):
    assert float(jnp.abs(b).max()) > 0, f"d{name} is zero: the test checks nothing"
    _assert_close(a, b, tol, f"d{name}")


# ------------------------------------------------------------------ interpret vs reference

_MQA_128 = (1, 64, 4, 1, 128, False)  # GQA 4 (MQA), head dim 128


@pytest.mark.parametrize("score, b, t, h, kv, d, packed", [
    *[(s, 1, 37, 2, 2, 64, False) for s in SCORES],   # GQA 1, length not a block multiple
    *[(s, 2, 100, 4, 2, 64, True) for s in SCORES],   # GQA 2, packed (count kernel), ragged
    ("softmax", *_MQA_128), ("lssar", *_MQA_128),
    pytest.param("lssa", *_MQA_128, marks=pytest.mark.slow),
])
def test_streaming_matches_reference(score, b, t, h, kv, d, packed):
  q, k, v = _qkv(b, t, h, kv, d)
  _check(q, k, v, score=score, segment_ids=_packed(b, t) if packed else None)


@pytest.mark.parametrize("score, case", [
    ("lssa", "non_causal"), ("lssar", "non_causal"), ("softmax", "q_offset"),
    ("lssar", "q_offset"),
    pytest.param("softmax", "non_causal", marks=pytest.mark.slow),
    pytest.param("lssa", "q_offset", marks=pytest.mark.slow)])
def test_streaming_non_causal_and_q_offset(score, case):
  """Non-causal (no block skipping; N_i = the whole segment), or a query chunk at q_offset
  into a longer key sequence (N_i = q_offset + r + 1): the causal clamp starts
  mid-sequence and the key grid has padding blocks past kv_len."""
  if case == "non_causal":
    q, k, v = _qkv(2, 40, 2, 1, 64, seed=2)
    _check(q, k, v, score=score, causal=False, segment_ids=_packed(2, 40))
  else:
    q, k, v = _qkv(1, 24, 4, 2, 64, seed=3, tk=70)
    _check(q, k, v, score=score, q_offset=46)


def test_streaming_separate_backward_blocks():
  """Backward blocks unlike the forward's (the TPU default: 512 forward, 256 LSSAR backward)
  reuse the forward's padded residuals; non-square blocks on both sides."""
  q, k, v = _qkv(2, 100, 4, 2, 64, seed=21)
  _check(q, k, v, score="lssar", segment_ids=_packed(2, 100),
         blocks=dict(block_q=64, block_k=32, bwd_block_q=16, bwd_block_k=64))


def test_streaming_tpu_interpret_mode():
  """TPU interpret mode (pltpu.InterpretParams): simulated VMEM/DMAs, scratch and outputs
  start as NaN (a read before the kernel's own initialisation would show), and the grid
  runs with 'parallel' axes in random order: the accumulators must only depend on the
  'arbitrary' axes. LSSAR with segments uses every kernel (counts, two-pass forward, dq with
  C, dk/dv with GQA 2)."""
  from jax.experimental.pallas import tpu as pltpu
  q, k, v = _qkv(1, 70, 4, 2, 64, seed=4)
  params = pltpu.InterpretParams(random_seed=7, uninitialized_memory="nan")
  _check(q, k, v, score="lssar", segment_ids=_packed(1, 70), interpret=params)


@pytest.mark.slow
@pytest.mark.parametrize("score", ["softmax", "lssa"])
def test_streaming_tpu_interpret_mode_other_scores(score):
  from jax.experimental.pallas import tpu as pltpu
  q, k, v = _qkv(2, 100, 4, 2, 64, seed=4)
  params = pltpu.InterpretParams(random_seed=7, uninitialized_memory="nan")
  _check(q, k, v, score=score, segment_ids=_packed(2, 100), interpret=params)


def test_streaming_lssar_uniform_rows_fall_back_to_lssa():
  """Identical keys: every row is uniform, the ReLU vanishes and rows fall back to LSSA,
  decided in pass 2 from the pass-1 stats held in scratch."""
  q, k, v = _qkv(1, 45, 2, 1, 64, seed=5)
  _check(q, jnp.broadcast_to(k[:, :1], k.shape), v, score="lssar")


@pytest.mark.slow
def test_streaming_lssar_fractional_p_and_offset_rows():
  """p = 2.5 takes the exp/log power path; offset rows 5 moves the O_i = 0 boundary."""
  q, k, v = _qkv(1, 45, 2, 1, 64, seed=5)
  _check(q, k, v, score="lssar", p=2.5, reweight_offset_rows=5)


@pytest.mark.parametrize("score", ["lssa", "lssar"])
def test_streaming_rows_sum_to_one(score):
  """With V = ones the output is each row's weight sum (packed: per segment)."""
  q, k, _ = _qkv(2, 50, 2, 1, 64, seed=6)
  out = attention(q, k, jnp.ones_like(k), score=score, segment_ids=_packed(2, 50),
                  implementation="interpret_tpu", **BLOCKS)
  np.testing.assert_allclose(out, 1.0, atol=1e-4)  # LSSA's eps = 1e-6: a deficit <= 1e-5


def test_streaming_lssar_finite_at_16k_positions():
  """Queries at positions 16377..16384 over 16 key blocks of 1024 (two passes: 32 steps):
  N^15 overflows fp32 without the row-max division."""
  q, k, v = _qkv(1, 8, 1, 1, 16, seed=7, tk=16384)
  kw = dict(score="lssar", q_offset=16384 - 8)
  out = ts.flash_attention(q, k, v, interpret=True, block_q=8, block_k=1024, **kw)
  assert bool(jnp.all(jnp.isfinite(out)))
  np.testing.assert_allclose(out, reference.attention(q, k, v, **kw), atol=5e-5, rtol=5e-5)


def test_streaming_bf16_lssar_close_to_fp32_reference():
  """bf16 inputs (the TPU dtype) against the fp32 reference on the same rounded inputs:
  2e-2 ~ 2.5 bf16 ulps at 1, as in test_attention.py."""
  q, k, v = _qkv(1, 70, 4, 2, 64, seed=12, dtype=jnp.bfloat16)
  cot = jax.random.normal(jax.random.PRNGKey(9), q.shape)
  out_k, g_k = _out_and_grads(lambda q, k, v: ts.flash_attention(
      q, k, v, score="lssar", interpret=True, **BLOCKS), q, k, v, cot, fast=True)
  f32 = [x.astype(jnp.float32) for x in (q, k, v)]
  out_r, g_r = _out_and_grads(lambda q, k, v: reference.attention(q, k, v, score="lssar"),
                              *f32, cot)
  assert out_k.dtype == jnp.bfloat16 and all(g.dtype == jnp.bfloat16 for g in g_k)
  np.testing.assert_allclose(out_k.astype(jnp.float32), out_r, atol=2e-2, rtol=2e-2)
  for a, b in zip(g_k, g_r):
    _assert_close(a.astype(jnp.float32), b, 2e-2, "bf16 grad")


@pytest.mark.slow
@pytest.mark.parametrize("score", SCORES)
def test_streaming_default_blocks(score):
  """TPU default blocks (512 forward, 256/512 backward) with several blocks per axis:
  T = 1100 pads to 1536 (3 forward blocks, LSSAR backward 6 x 3), head dim 128, GQA 2,
  packed, and q_offset-free causal skipping at full size."""
  q, k, v = _qkv(1, 1100, 4, 2, 128, seed=11)
  seg = jnp.asarray([[1] * 700 + [2] * 400])
  _check(q, k, v, score=score, segment_ids=seg, blocks={})


@pytest.mark.slow
@pytest.mark.parametrize("score", SCORES)
def test_streaming_non_causal_q_offset_default_blocks(score):
  q, k, v = _qkv(1, 300, 4, 4, 64, seed=12, tk=700)
  _check(q, k, v, score=score, q_offset=400, blocks={})
  _check(q, k, v, score=score, causal=False, blocks={})


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


# ------------------------------------------------------------------ dispatch

def test_dispatch_interpret_tpu_and_block_errors():
  q, k, v = _qkv(1, 40, 2, 1, 16)
  out = attention(q, k, v, implementation="interpret_tpu", score="lssa")
  np.testing.assert_allclose(out, reference.attention(q, k, v, score="lssa"), atol=1e-5)
  long_q = jax.ShapeDtypeStruct((1, 1000, 2, 64), jnp.bfloat16)
  assert ts.supports(long_q, long_q) is None
  assert "multiple of 128" in ts.supports(long_q, long_q, block_k=64)
  assert ts.supports(long_q, long_q, block_k=64, interpret=True) is None
  assert ts.supports(long_q, jax.ShapeDtypeStruct((1, 40, 2, 64), jnp.bfloat16),
                     block_k=40) is None  # one block covers the keys
  assert "divide" in ts.supports(long_q, long_q, block_q=384, bwd_block_q=256)
  assert "dtype" in ts.supports(long_q.update(dtype=jnp.float16), long_q)
  with pytest.raises(ValueError, match="interpret_tpu.*cannot run.*dtype"):
    attention(*(x.astype(jnp.float16) for x in (q, k, v)), implementation="interpret_tpu")
  if jax.default_backend() != "tpu":
    with pytest.raises(ValueError, match="needs a TPU.*interpret_tpu"):
      attention(q, k, v, implementation="pallas_tpu")


def test_auto_on_tpu_takes_the_kernels_at_long_lengths():
  """auto on TPU: the streaming kernels at any length up to AUTO_MAX_LEN (the old limit was
  8192: whole-sequence VMEM blocks); the reference where the kernels refuse the call."""
  def problem(x):
    return api.Problem(x, x, x, None, causal=True, score="softmax", q_offset=0, scale=None,
                       p=15.0, reweight_offset_rows=3, block_q=None, block_k=None)

  for t in (8192, 32768, 131072):
    x = jax.ShapeDtypeStruct((1, t, 8, 128), jnp.bfloat16)
    assert api.select(problem(x), "tpu") == ("pallas_tpu", ())
  x = jax.ShapeDtypeStruct((1, api.AUTO_MAX_LEN + 1, 1, 128), jnp.bfloat16)
  assert api.select(problem(x), "tpu")[0] == "xla"
  short = jax.ShapeDtypeStruct((1, 64, 1, 8), jnp.float16)
  assert api.select(problem(short), "tpu") == (
      "xla", ("pallas_tpu: dtype float16 is not float32/bfloat16",))


def _pallas_calls(jaxpr, out=None):
  """(grid, dimension_semantics) of every pallas_call in a jaxpr, nested ones included."""
  out = [] if out is None else out
  for e in jaxpr.eqns:
    if e.primitive.name == "pallas_call":
      out.append((e.params["grid_mapping"].grid,
                  e.params["compiler_params"].dimension_semantics))
    for p in e.params.values():
      for sub in p if isinstance(p, (list, tuple)) else [p]:
        sub = getattr(sub, "jaxpr", sub)
        if hasattr(sub, "eqns"):
          _pallas_calls(sub, out)
  return out


def test_pallas_tpu_entry_runs_the_streaming_kernels():
  """The backend table's pallas_tpu entry (auto's choice on TPU) runs these kernels: the
  forward and dq grids end in the streamed key axis, dk/dv's in (group, query blocks)."""
  q = jax.ShapeDtypeStruct((1, 1024, 4, 128), jnp.bfloat16)
  kv = jax.ShapeDtypeStruct((1, 1024, 2, 128), jnp.bfloat16)

  def loss(q, k, v):
    pb = api.Problem(q, k, v, None, causal=True, score="softmax", q_offset=0, scale=None,
                     p=15.0, reweight_offset_rows=3, block_q=None, block_k=None)
    return api.BACKENDS["pallas_tpu"].run(pb).astype(jnp.float32).sum()

  calls = _pallas_calls(jax.make_jaxpr(jax.grad(loss, (0, 1, 2)))(q, kv, kv).jaxpr)
  par, arb = "parallel", "arbitrary"
  assert calls == [((1, 4, 2, 2), (par, par, par, arb)), ((1, 4, 2, 2), (par, par, par, arb)),
                   ((1, 2, 2, 2, 2), (par, par, par, arb, arb))]


# ------------------------------------------------------------------ TPU (run with -m tpu)

@pytest.mark.tpu
@pytest.mark.skipif(jax.default_backend() != "tpu", reason="needs a TPU")
@pytest.mark.parametrize("score", SCORES)
def test_pallas_tpu_long_sequence(score):
  """On a TPU: auto takes the streaming kernels at T = 32k (the reference would need
  [T, T] scores); the last 512 queries match the chunked reference (bf16 inputs: 2e-2 as in
  test_attention.py; LSSAR 5e-2), and the gradients are finite."""
  q, k, v = _qkv(1, 32768, 4, 2, 128, seed=3, dtype=jnp.bfloat16)
  fn = lambda q, k, v: attention(q, k, v, score=score)
  assert "arbitrary" in str(_pallas_calls(jax.make_jaxpr(fn)(q, k, v).jaxpr))
  out, grads = _out_and_grads(fn, q, k, v, jnp.ones(q.shape, jnp.float32))
  tail = reference.chunked_attention(*(x.astype(jnp.float32) for x in (q[:, -512:], k, v)),
                                     chunk_size=256, score=score, q_offset=32768 - 512)
  _assert_close(out[:, -512:].astype(jnp.float32), tail, 5e-2 if score == "lssar" else 2e-2,
                "tail")
  assert all(bool(jnp.all(jnp.isfinite(g.astype(jnp.float32)))) for g in grads)


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
