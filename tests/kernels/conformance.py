"""Attention conformance: the helpers, the backends that run on CPU and the case matrix that
test_conformance.py runs against every one of them (values and gradients versus the
reference, pallas_kernels/attention/reference.py). Backend-specific checks (VMEM footprint,
shared-memory budget, exported lowerings, dispatch, hardware-only runs) live in the other
test files and use these helpers.

Tolerances. Each check compares the output and d(sum(out * cot))/d(q, k, v) for a random
cotangent with the fp32 reference on the same (rounded) inputs; outputs within atol = rtol =
tol, gradients within atol = tol * max(1, max|ref|), rtol = tol.
  * fp32 kernels (interpret: kernel.py; interpret_tpu: tpu_streaming.py). The kernels sum
    keys block by block (online-softmax rescaling, two-pass sums) where the reference does
    one reduction, so they differ by rounding: 1e-5 for softmax and LSSA (O(1) values);
    LSSAR raises ratios to the p-th power, which multiplies A's relative rounding by ~p:
    5e-5. Observed: ~7e-7 (softmax, LSSA) and ~1e-5 (LSSAR) on outputs, <= 5e-6 relative
    on gradients.
  * bf16 operands, any kernel: 2e-2 ~ 2.5 bf16 ulps at 1. The error is the rounding of what
    the kernels feed the matrix units and return, not of q/k/v: P (softmax / softplus
    weights) and dS are rounded to bf16 before the P V, dS K and dS^T Q products (~1e-2
    relative per element, averaging down over a row), outputs and gradients are returned in
    bf16 (half an ulp: 2e-3..4e-3 relative), and the cotangent reaching the backward is
    rounded to bf16. LSSAR's dq is a difference of two accumulations of bf16-rounded
    operands (kernel.py's affine-in-C trick) and its p = 15 power multiplies relative weight
    errors by ~p. Observed on the Mosaic GPU kernels: <= 5e-3 * max|ref| (LSSAR dq/dk
    4.5e-3); on kernel.py's LSSAR ~8e-3 abs, ~5e-3 relative for gradients.
  * f16 operands: 8x finer rounding than bf16; Mosaic GPU softmax observed <= 6e-4 *
    max|ref|, bound 3e-3. That the error shrinks with the operand precision is the check
    that it is rounding and not a bug (a wrong mask or residual gives O(1) errors at any
    precision). (LSSAR's dq shrinks only ~3x in f16, 1.5e-3, from the cancellation above:
    not tested at the f16 bound.)
  * xla: attention(implementation="xla") is the reference itself, reached through the
    backend table: fp32 results must be bit-identical to calling reference.attention
    directly (this checks that the table passes every argument through).

Cost. Interpret-mode kernels are compile-bound on CPU (~2-5 s per configuration on 2
cores; running takes ~0.1 s), so each check computes the output and all three gradients
in one jitted call, the kernels compile at XLA's backend optimisation level 0 (nearly
halves that; only the kernels: at level 0 the LSSAR *reference* gradient came out NaN here,
from XLA CPU's codegen of its masked power), and the reference results are cached across
backends. Cases that add little for a backend run only with -m slow (Spec.slow).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.attention import api, kernel, mosaic_gpu, reference
from pallas_kernels.attention import tpu_streaming

SCORES = ("softmax", "lssa", "lssar")
TOL = {"softmax": 1e-5, "lssa": 1e-5, "lssar": 5e-5}   # fp32 kernels
TOL_16 = {jnp.dtype(jnp.bfloat16): 2e-2, jnp.dtype(jnp.float16): 3e-3}
FAST_COMPILE = {"xla_backend_optimization_level": 0}


# ------------------------------------------------------------------ helpers

def qkv(b=1, t=37, h=2, kv=2, d=64, *, seed=0, tk=None, dtype=jnp.float32):
  """Random q [b, t, h, d], k / v [b, tk, kv, d] (never zeros)."""
  ks = jax.random.split(jax.random.PRNGKey(seed), 3)
  tk = tk or t
  return tuple(x.astype(dtype) for x in (jax.random.normal(ks[0], (b, t, h, d)),
                                         jax.random.normal(ks[1], (b, tk, kv, d)),
                                         jax.random.normal(ks[2], (b, tk, kv, d))))


def packed(b, t):
  """Row 0: three documents (one of length 1); row 1: one document."""
  row0 = [1] * (t // 3) + [2] + [3] * (t - t // 3 - 1)
  return jnp.asarray([row0, [7] * t][:b], jnp.int32)


def out_and_grads(fn, q, k, v, cot, *, fast=False):
  """fn(q, k, v) and d(sum(out * cot))/d(q, k, v), in one jitted call; fast: compile at
  XLA's backend optimisation level 0 (for interpret-mode kernels)."""
  def loss(q, k, v):
    out = fn(q, k, v)
    return jnp.sum(out.astype(jnp.float32) * cot), out
  f = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))
  (_, out), grads = f.lower(q, k, v).compile(
      compiler_options=FAST_COMPILE if fast else {})(q, k, v)
  return out, grads


def assert_close(a, b, tol, what):
  """|a - b| <= tol * max(1, max|b|) + tol |b|, and a finite."""
  a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
  assert np.all(np.isfinite(a)), f"{what}: non-finite values"
  np.testing.assert_allclose(a, b, atol=tol * max(1.0, float(np.abs(b).max())), rtol=tol,
                             err_msg=what)


def pallas_calls(jaxpr, out=None):
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
          pallas_calls(sub, out)
  return out


_REFERENCE_CACHE: dict = {}


def reference_out_and_grads(q, k, v, cot, *, key=None, **kw):
  """The fp32 reference on q, k, v's values; cached under `key` when given."""
  if key is not None and key in _REFERENCE_CACHE:
    return _REFERENCE_CACHE[key]
  f32 = [x.astype(jnp.float32) for x in (q, k, v)]
  result = out_and_grads(lambda q, k, v: reference.attention(q, k, v, **kw), *f32, cot)
  if key is not None:
    _REFERENCE_CACHE[key] = result
  return result


def check(fn, q, k, v, *, tol, fast=False, key=None, **kw):
  """fn(q, k, v) (a kernel given reference.attention's keyword arguments kw) against the
  fp32 reference: output and the three gradients, in q's dtype, finite and within tol."""
  cot = jax.random.normal(jax.random.PRNGKey(9), q.shape)  # a non-uniform cotangent
  out_k, g_k = out_and_grads(fn, q, k, v, cot, fast=fast)
  out_r, g_r = reference_out_and_grads(q, k, v, cot, key=key, **kw)
  assert out_k.dtype == q.dtype and all(g.dtype == q.dtype for g in g_k)
  assert bool(jnp.all(jnp.isfinite(out_k.astype(jnp.float32)))), "output: non-finite values"
  np.testing.assert_allclose(np.asarray(out_k, np.float32), out_r, atol=tol, rtol=tol,
                             err_msg="output")
  for name, a, b in zip("qkv", g_k, g_r):
    assert float(jnp.abs(b).max()) > 0, f"d{name} is zero: the test checks nothing"
    assert_close(a, b, tol, f"d{name}")


# ------------------------------------------------------------------ the case matrix

@dataclasses.dataclass(frozen=True)
class Case:
  """One row: shape (b, t, h, kv, d), key length tk (default t), packed segments, causal,
  q_offset, extra attention() arguments, which scores, an operand dtype (None: the
  backend's), blocks ("test": Spec.blocks, "default": the backend's own, "separate":
  Spec.bwd_blocks), identical keys (uniform rows)."""
  name: str
  shape: tuple
  tk: int | None = None
  seed: int = 0
  packed: bool = False
  causal: bool = True
  q_offset: int = 0
  kw: tuple = ()
  scores: tuple = SCORES
  dtype: Any = None
  blocks: str = "test"
  same_keys: bool = False


CASES = (
    # GQA 1, causal, ragged length over several blocks (3 of 64, 5 of 32): causal skipping.
    Case("gqa1_causal_ragged", (1, 130, 2, 2, 64), seed=1),
    # GQA 2, packed documents (N_i within a document; the count kernel of interpret_tpu).
    Case("gqa2_packed", (2, 100, 4, 2, 64), seed=2, packed=True),
    # Non-causal (no block skipping; N_i = the whole document), packed, GQA 2.
    Case("non_causal_packed", (2, 100, 2, 1, 64), seed=3, packed=True, causal=False),
    # GQA 4 (MQA), head dim 128.
    Case("mqa_d128", (1, 72, 4, 1, 128), seed=4),
    # A query chunk at positions 131..200 of 200 keys (N_i = q_offset + r + 1; the causal
    # clamp starts mid-sequence); softmax with a non-default logit scale (LSSA/LSSAR
    # ignore it).
    Case("q_offset", (1, 70, 2, 1, 64), tk=200, seed=5, q_offset=130,
         kw=(("scale", 0.3 / math.sqrt(64)),)),
    # p = 2.5 takes the exp/log power path; 5 offset rows move the O_i = 0 boundary.
    Case("lssar_fractional_p", (1, 100, 2, 1, 64), seed=6, scores=("lssar",),
         kw=(("p", 2.5), ("reweight_offset_rows", 5))),
    # All keys identical: every A row is uniform, ReLU(N A - 1) = 0, so LSSAR falls back to
    # the LSSA weights (decided in pass 2 from pass-1 stats).
    Case("lssar_uniform_rows", (1, 100, 2, 1, 64), seed=7, scores=("lssar",), same_keys=True),
    # The backend's default blocks on a short sequence: one block in every kernel and pass.
    Case("single_block", (1, 40, 2, 2, 64), seed=8, scores=("lssar",), blocks="default"),
    # Backward blocks unlike the forward's reuse the forward's padded residuals.
    Case("separate_bwd_blocks", (1, 100, 4, 2, 64), seed=9, packed=True,
         scores=("softmax", "lssar"), blocks="separate"),
    # bf16 operands (the model's dtype) against the fp32 reference; LSSAR is the most
    # sensitive score (p = 15 amplifies cosine errors).
    Case("bfloat16", (1, 70, 4, 2, 64), seed=10, scores=("lssar",), dtype=jnp.bfloat16),
    # f16 operands: 8x finer rounding, so a 7x tighter bound than bf16.
    Case("float16", (2, 130, 2, 1, 64), seed=11, packed=True, scores=("softmax",),
         dtype=jnp.float16),
)


# ------------------------------------------------------------------ backends

@dataclasses.dataclass(frozen=True)
class Spec:
  """A backend under test. blocks: the small blocks the cases run with (several blocks per
  axis at small shapes); bwd_blocks: forward and backward blocks that differ, run through
  `flash` (the module's own entry: attention() takes forward blocks only); long_len: a
  length with several default blocks per axis; slow: (case, score) pairs that run only
  with -m slow; skip: case -> why it does not apply."""
  name: str
  dtype: Any
  blocks: dict
  bwd_blocks: dict | None = None
  flash: Callable | None = None
  fast: bool = True
  exact: bool = False
  long_len: int = 300
  slow: frozenset = frozenset()
  skip: dict = dataclasses.field(default_factory=dict)

  def tol(self, dtype, score) -> float:
    if jnp.dtype(dtype) != jnp.float32:
      return TOL_16[jnp.dtype(dtype)]
    return 0.0 if self.exact else TOL[score]

  def __str__(self):
    return self.name


def _tpu_flash(q, k, v, segment_ids, **kw):
  return tpu_streaming.flash_attention(q, k, v, segment_ids, interpret=True, **kw)


def _mgpu_flash(q, k, v, segment_ids, **kw):
  return mosaic_gpu.flash_attention(q, k, v, segment_ids, interpret=True, **kw)


def _kernel_flash(q, k, v, segment_ids, **kw):
  return kernel.flash_attention(q, k, v, segment_ids, backend="interpret", **kw)


def _all_but(*pairs):
  """Every (case, score) of the matrix except `pairs` (the slow set of a cheap backend)."""
  return frozenset((c.name, s) for c in CASES for s in c.scores) - set(pairs)


_NO_BLOCKS = "the reference has no blocks"


# The backends under test. Their default selection keeps every row the backend's own test
# file ran before this suite existed, plus rows that add a property it lacked; rows that
# repeat a property another score covers run with -m slow.
SPECS = (
    Spec("interpret", jnp.float32, dict(block_q=32, block_k=32), flash=_kernel_flash,
         bwd_blocks=dict(block_q=32, block_k=64, bwd_block_q=16, bwd_block_k=32),
         slow=frozenset({("non_causal_packed", "lssar"), ("q_offset", "lssa"),
                         ("separate_bwd_blocks", "softmax"), ("float16", "softmax")})),
    Spec("interpret_tpu", jnp.float32, dict(block_q=32, block_k=32), flash=_tpu_flash,
         bwd_blocks=dict(block_q=64, block_k=32, bwd_block_q=16, bwd_block_k=64),
         long_len=1100,  # TPU default blocks are 512
         slow=frozenset({("mqa_d128", "lssa"), ("non_causal_packed", "softmax"),
                         ("q_offset", "lssa"), ("lssar_fractional_p", "lssar"),
                         ("separate_bwd_blocks", "softmax")})),
    Spec("interpret_mgpu", jnp.bfloat16, dict(block_q=64, block_k=64), flash=_mgpu_flash,
         bwd_blocks=dict(block_q=64, block_k=128),  # the backward keeps 64 x 64
         # by default separate backward blocks with LSSAR only, ragged causal without LSSA
         slow=frozenset({("mqa_d128", s) for s in SCORES} | {
             ("gqa2_packed", "softmax"), ("gqa2_packed", "lssa"), ("q_offset", "lssa"),
             ("separate_bwd_blocks", "softmax"), ("gqa1_causal_ragged", "lssa")}),
         skip={"bfloat16": "every interpret_mgpu case runs in bf16"}),
    # The reference through the table: one row per argument it must pass on.
    Spec("xla", jnp.float32, {}, fast=False, exact=True,
         slow=_all_but(("q_offset", "softmax"), ("q_offset", "lssa"), ("q_offset", "lssar"),
                       ("lssar_fractional_p", "lssar"), ("non_causal_packed", "softmax"),
                       ("gqa2_packed", "lssar"), ("bfloat16", "lssar")),
         skip={"single_block": _NO_BLOCKS, "separate_bwd_blocks": _NO_BLOCKS}),
)


def params():
  """pytest params (spec, case, score), with ids and slow marks."""
  out = []
  for spec in SPECS:
    for case in CASES:
      for score in case.scores:
        marks = [pytest.mark.slow] if (case.name, score) in spec.slow else []
        out.append(pytest.param(spec, case, score, marks=marks,
                                id=f"{spec.name}-{case.name}-{score}"))
  return out


def inputs(spec: Spec, case: Case):
  """(q, k, v, segment_ids) of a case in the backend's dtype (or the case's)."""
  b, t, h, kv, d = case.shape
  q, k, v = qkv(b, t, h, kv, d, seed=case.seed, tk=case.tk, dtype=case.dtype or spec.dtype)
  if case.same_keys:
    k = jnp.broadcast_to(k[:, :1], k.shape)
  return q, k, v, packed(b, t) if case.packed else None


def skip_reason(spec: Spec, case: Case, score: str, q, k, v, segment_ids) -> str | None:
  """Why the case does not apply to the backend: its own skip list, or its supports()."""
  if case.name in spec.skip:
    return spec.skip[case.name]
  blocks = spec.blocks if case.blocks == "test" else {}
  pb = api.Problem(q, k, v, segment_ids, causal=case.causal, score=score,
                   q_offset=case.q_offset, scale=None, p=15.0, reweight_offset_rows=3,
                   block_q=blocks.get("block_q"), block_k=blocks.get("block_k"))
  return api.BACKENDS[spec.name].supports(pb)


def run_case(spec: Spec, case: Case, score: str):
  """The case through the backend against the reference (pytest.skip where it does not
  apply)."""
  q, k, v, seg = inputs(spec, case)
  why = skip_reason(spec, case, score, q, k, v, seg)
  if why:
    pytest.skip(why)
  kw = dict(causal=case.causal, score=score, q_offset=case.q_offset, **dict(case.kw))
  if case.blocks == "separate":
    fn = lambda q, k, v: spec.flash(q, k, v, seg, **spec.bwd_blocks, **kw)
  else:
    blocks = spec.blocks if case.blocks == "test" else {}
    fn = lambda q, k, v: api.attention(q, k, v, segment_ids=seg, implementation=spec.name,
                                       **blocks, **kw)
  dtype = jnp.dtype(q.dtype).name
  check(fn, q, k, v, tol=spec.tol(q.dtype, score), fast=spec.fast,
        key=(case.name, score, dtype), segment_ids=seg, **kw)
