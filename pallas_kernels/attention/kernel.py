"""Blockwise Pallas attention (softmax, LSSA, LSSAR): forward and backward kernels.

Layout: q/k/v are transposed to [B, H, T, D] and padded to block multiples; every kernel
has grid (batch, heads, blocks) and walks the other sequence with a `fori_loop`, skipping
blocks that the causal mask hides entirely. GQA: q head h reads kv head h // (H // K)
through the BlockSpec index_map. Masks are built in-kernel from iotas (causal, ragged
tails, padded rows) and segment ids. Per-query values (segment ids, row stats) are
columns [.., T, 1] in kernels gridded over query blocks and lane-dense rows [.., 1, T] in
the dk/dv kernel, which works on transposed blocks; so no kernel transposes in-register.

Scores (docs/attention.md, "softplus attention with length-scaled re-weighting", 2025):
  softmax  online softmax (FlashAttention, Dao et al. 2022, Alg. 1; FlashAttention-2
           backward, Dao 2023, Alg. 2): stats lse_i.
  lssa     cosines qhat.khat = (q.k) / (|q| |k|): the raw q.k runs on the MXU in the input
           dtype with fp32 accumulation (exact products for bf16 inputs) and is scaled by
           fp32 inverse norms computed outside ([B, H, Tq, 1] column, [B, K, 1, Tk] row);
           the backward kernels return d/dqhat, d/dkhat and the wrapper applies the
           normalisation's VJP. One pass per query block accumulates the row sums
           S_i of a_ij = softplus(log d log N_i qhat.khat) and sum_j a_ij v_j (bounded
           weights: no rescaling), then divides by S_i + eps.
           Stats Z_i = S_i + eps, N_i.
  lssar    two passes: pass 1 the row sums S_i and max_j a_ij; ReLU(N a / Z - O) is monotone in a, so the row
           max m_i of the ReLU is known before pass 2, which accumulates
           (ReLU(N_i a_ij / Z_i - O_i) / m_i)^p v_j and its row sum (overflow-safe at any
           length: every term is <= 1). A row with m_i <= reference.FLOOR (weights at most
           ~uniform) falls back to the LSSA weights, as in the reference. Stats Z, N, m, den.
N_i (visible keys of row i) is analytic without segments; with segments an extra cheap
loop counts the visible keys (mask only, no matmul), so it matches the reference exactly.

Backward (custom_vjp, all Pallas): a dq kernel (grid over query blocks, loop over keys)
and a dk/dv kernel (grid over key blocks, loop over queries) per q head; GQA sums dk/dv
over the group afterwards. With D_i = dO_i . O_i and dP = dO V^T:
  softmax  dS = P (dP - D) scale.
  lssa     da = (dP - D) / Z;  dS = da sigmoid(c s) c,  c = log d log N.
  lssar    dr = (dP - D) / den; du = dr p (relu(u)/m)^(p-1) / m [u > 0];
           db = N du (LSSA rows: db = dP); da = (db - C) / Z with C_i = sum_k db_ik b_ik,
           b = a / Z. The dq kernel accumulates sum db sig(cs) k and sum sig(cs) k and C
           in one loop (da is affine in C), and hands C to the dk/dv kernel.
           (m is held constant: the output is invariant to the row scale of r.)

Limits, stated plainly: the K/V (forward, dq) or Q/dO (dk/dv) sequence of one head is one
VMEM block that the loop slices (double-buffered: ~8 T D bytes in bf16). That suits the
Triton GPU lowering (the loop streams from global memory) but not TPU VMEM: compiled for
v5p with libtpu (bf16, D = 128), the default 16 MiB scoped VMEM overflows from T = 16k for
LSSAR and T = 32k for softmax. So
on TPU, api.attention runs tpu_streaming.py instead (the same maths, both sequences
streamed through the grid, VMEM per step independent of T); backend="tpu_resident" keeps
these kernels on Mosaic for comparison on hardware. Verified against the reference on CPU in
interpret mode. On GPU these kernels compile through Pallas' Triton lowering (tested and
benchmarked on an H100: results/perf/attention.md); the Mosaic GPU (wgmma / TMA) version
is mosaic_gpu.py.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.attention import reference
from pallas_kernels.attention.options import ScoreOptions

_NEG = -1e30
_NT = (((1,), (1,)), ((), ()))  # a @ b.T


@dataclasses.dataclass(frozen=True)
class Config(ScoreOptions):
  """The shared maths options plus these kernels' tiling (hashable: a custom_vjp nondiff
  argument)."""
  block_q: int
  block_k: int
  backend: str  # "interpret" | "tpu_resident" (Mosaic) | "gpu" (Triton lowering); "tpu" for
  # tpu_streaming.StreamConfig
  num_warps: int | None = None  # GPU only
  num_stages: int | None = None
  bwd_block_q: int | None = None  # backward kernels' blocks / warps (None: as forward)
  bwd_block_k: int | None = None
  bwd_num_warps: int | None = None
  pad_multiple_q: int | None = None  # set by backward() to keep the forward's padding
  pad_multiple_k: int | None = None

  def backward(self) -> "Config":
    """The options the dq and dk/dv kernels run with."""
    mq = max(self.block_q, self.bwd_block_q or 0)
    mk = max(self.block_k, self.bwd_block_k or 0)
    return dataclasses.replace(self, block_q=self.bwd_block_q or self.block_q,
                               block_k=self.bwd_block_k or self.block_k,
                               num_warps=self.bwd_num_warps or self.num_warps,
                               pad_multiple_q=mq, pad_multiple_k=mk)

  def padded_lengths(self) -> tuple[int, int]:
    """Query / key lengths padded to a multiple of every block size in use (forward and
    backward blocks are powers of two, or equal), so forward residuals serve the backward.
    Unchanged by backward(): both directions pad alike."""
    mq = max(self.block_q, self.bwd_block_q or 0)
    mk = max(self.block_k, self.bwd_block_k or 0)
    if self.pad_multiple_q:
      mq, mk = self.pad_multiple_q, self.pad_multiple_k
    return self.padded(mq, mk)


def _pow(x, p: float):
  """x ** p for x >= 0, Mosaic-friendly (integer_pow for integral p, else exp/log)."""
  if float(p).is_integer() and p >= 1:
    return lax.integer_pow(x, int(p))
  if p == 0:
    return jnp.ones_like(x)
  return jnp.where(x > 0, jnp.exp(p * jnp.log(jnp.maximum(x, 1e-30))), 0.0)


def _softplus(x):
  return jnp.maximum(x, 0.0) + jnp.log1p(jnp.exp(-jnp.abs(x)))


def _softplus_and_sigmoid(x):
  """softplus(x) and its derivative sigmoid(x) from one exp (the backward needs both)."""
  e = jnp.exp(-jnp.abs(x))
  return jnp.maximum(x, 0.0) + jnp.log1p(e), jnp.where(x >= 0, 1.0, e) / (1.0 + e)


def _num_stats(score):
  return {"softmax": 1, "lssa": 2, "lssar": 4}[score]


def _num_norms(score):
  """Inverse-norm inputs: none for softmax; q column and k row for LSSA/LSSAR."""
  return 0 if score == "softmax" else 2


# ---------------------------------------------------------------------------------------
# Shared per-block helpers.

def _mask(cfg: Config, q_idx, k_idx, q_seg, k_seg):
  """[bq, bk] visibility: q_idx [bq, 1] and k_idx [1, bk] are 0-based row/key indices."""
  m = (q_idx < cfg.q_len) & (k_idx < cfg.kv_len)
  if cfg.causal:
    m = m & (k_idx <= q_idx + cfg.q_offset)  # key pos j+1 <= query pos q_offset+r+1
  if cfg.has_segments:
    m = m & (q_seg == k_seg)
  return m


def _k_blocks_for_q_block(cfg: Config, i):
  """Number of key blocks query block i can see (causal block skipping)."""
  n = pl.cdiv(cfg.kv_len, cfg.block_k)
  if cfg.causal:
    n = jnp.minimum(n, pl.cdiv(cfg.q_offset + (i + 1) * cfg.block_q, cfg.block_k))
  return n


def _first_q_block_for_k_block(cfg: Config, j):
  if not cfg.causal:
    return 0
  return lax.div(jnp.maximum(j * cfg.block_k - cfg.q_offset, 0), cfg.block_q)


def _visible_counts(cfg: Config, q_idx, q_seg, kseg_ref, num_k):
  """N_i as a float [bq, 1] column."""
  if not cfg.has_segments:
    n = jnp.full(q_idx.shape, cfg.kv_len, jnp.int32)
    if cfg.causal:
      n = jnp.minimum(q_idx + cfg.q_offset + 1, cfg.kv_len)
    return jnp.where(q_idx < cfg.q_len, n, 0).astype(jnp.float32)
  bk = cfg.block_k

  def count(j, n):
    k_idx = j * bk + lax.broadcasted_iota(jnp.int32, (1, bk), 1)
    m = _mask(cfg, q_idx, k_idx, q_seg, kseg_ref[:, pl.ds(j * bk, bk)])
    return n + jnp.sum(m.astype(jnp.float32), axis=-1, keepdims=True)

  return lax.fori_loop(0, num_k, count, jnp.zeros(q_idx.shape, jnp.float32))


def _lssar_row_consts(cfg: Config, n):
  offset = jnp.where(n <= cfg.offset_rows, 0.0, 1.0)
  return offset


# ---------------------------------------------------------------------------------------
# Forward.

def _split(refs, *counts):
  out, refs = [], list(refs)
  for c in counts:
    out.append(refs[:c])
    refs = refs[c:]
  assert not refs
  return out


def _fwd_kernel(q_ref, k_ref, v_ref, qseg_ref, kseg_ref, *refs, cfg: Config):
  norm_refs, (o_ref,), stat_refs = _split(refs, _num_norms(cfg.score), 1,
                                          _num_stats(cfg.score))
  i = pl.program_id(2)
  bq, bk = cfg.block_q, cfg.block_k
  q = q_ref[...]                                                   # [bq, D]
  d = q.shape[-1]
  q_idx = i * bq + lax.broadcasted_iota(jnp.int32, (bq, 1), 0)
  q_seg = qseg_ref[...]                                            # [bq, 1]
  num_k = _k_blocks_for_q_block(cfg, i)
  iq = norm_refs[0][...] if norm_refs else None                   # [bq, 1]

  def load(j):
    start = pl.multiple_of(j * bk, bk)
    k = k_ref[pl.ds(start, bk), :]
    k_idx = j * bk + lax.broadcasted_iota(jnp.int32, (1, bk), 1)
    mask = _mask(cfg, q_idx, k_idx, q_seg, kseg_ref[:, pl.ds(start, bk)])
    s = lax.dot_general(q, k, _NT, preferred_element_type=jnp.float32)   # [bq, bk]
    if norm_refs:  # cosine qhat.khat
      s = s * iq * norm_refs[1][:, pl.ds(start, bk)]
    return s, mask, v_ref[pl.ds(start, bk), :]

  if cfg.score == "softmax":
    def body(j, carry):
      m_prev, l_prev, acc = carry
      s, mask, v = load(j)
      s = jnp.where(mask, s * cfg.scale, _NEG)
      m_new = jnp.maximum(m_prev, jnp.max(s, axis=-1, keepdims=True))
      pr = jnp.where(mask, jnp.exp(s - m_new), 0.0)
      corr = jnp.exp(m_prev - m_new)
      acc = acc * corr + jnp.dot(pr.astype(v.dtype), v, preferred_element_type=jnp.float32)
      return m_new, l_prev * corr + jnp.sum(pr, axis=-1, keepdims=True), acc

    init = (jnp.full((bq, 1), _NEG, jnp.float32), jnp.zeros((bq, 1), jnp.float32),
            jnp.zeros((bq, d), jnp.float32))
    m, l, acc = lax.fori_loop(0, num_k, body, init)
    o_ref[...] = (acc / jnp.where(l > 0, l, 1.0)).astype(o_ref.dtype)
    stat_refs[0][...] = jnp.where(l > 0, m + jnp.log(jnp.where(l > 0, l, 1.0)), 0.0)
    return

  n = _visible_counts(cfg, q_idx, q_seg, kseg_ref, num_k)
  coef = cfg.log_d * jnp.log(jnp.maximum(n, 1.0))                   # [bq, 1]

  def weights(j):
    s, mask, v = load(j)
    return jnp.where(mask, _softplus(coef * s), 0.0), mask, v

  zeros = jnp.zeros((bq, 1), jnp.float32)
  if cfg.score == "lssa":
    # One pass: softplus weights are bounded (<= log d log N + log 2), so sum_j a_ij v_j
    # and the row sum accumulate without rescaling and the L1 normalisation is one
    # division at the end (the two-pass form of the docs is needed for LSSAR only).
    def body(j, carry):
      total, acc = carry
      a, _, v = weights(j)
      return (total + jnp.sum(a, axis=-1, keepdims=True),
              acc + jnp.dot(a.astype(v.dtype), v, preferred_element_type=jnp.float32))

    total, acc = lax.fori_loop(0, num_k, body, (zeros, jnp.zeros((bq, d), jnp.float32)))
    z = total + reference.EPS
    o_ref[...] = (acc / z).astype(o_ref.dtype)
    stat_refs[0][...] = z
    stat_refs[1][...] = n
    return

  def pass1(j, carry):
    total, amax = carry
    a, _, _ = weights(j)
    return (total + jnp.sum(a, axis=-1, keepdims=True),
            jnp.maximum(amax, jnp.max(a, axis=-1, keepdims=True)))

  total, amax = lax.fori_loop(0, num_k, pass1, (zeros, zeros))
  z = total + reference.EPS

  offset = _lssar_row_consts(cfg, n)
  r_max = jnp.maximum(n * (amax / z) - offset, 0.0)
  fallback = r_max <= reference.FLOOR
  inv_m = 1.0 / jnp.where(fallback, 1.0, r_max)

  def pass2r(j, carry):
    acc, den = carry
    a, mask, v = weights(j)
    b = a / z
    r = jnp.where(mask, _pow(jnp.maximum(n * b - offset, 0.0) * inv_m, cfg.p), 0.0)
    w = jnp.where(fallback, b, r)
    return (acc + jnp.dot(w.astype(v.dtype), v, preferred_element_type=jnp.float32),
            den + jnp.sum(w, axis=-1, keepdims=True))

  acc, den = lax.fori_loop(0, num_k, pass2r, (jnp.zeros((bq, d), jnp.float32), zeros))
  den = jnp.where(fallback, 1.0, den)
  o_ref[...] = (acc / jnp.where(den > 0, den, 1.0)).astype(o_ref.dtype)
  for ref, val in zip(stat_refs, (z, n, r_max, den)):
    ref[...] = val


# ---------------------------------------------------------------------------------------
# Backward: per-block gradient of the scores. Returns (P, ds, C-term) where P are the
# output weights (for dV), ds the gradient w.r.t. the raw dot products s = q.k
# (for dQ/dK), given the row constant C (LSSAR) or None.

def _block_grads(cfg: Config, s, mask, dp, stats, d_row, c_row):
  if cfg.score == "softmax":
    (lse,) = stats
    pr = jnp.where(mask, jnp.exp(s * cfg.scale - lse), 0.0)
    return pr, pr * (dp - d_row) * cfg.scale
  z, n = stats[0], stats[1]
  coef = cfg.log_d * jnp.log(jnp.maximum(n, 1.0))
  sp, sig = _softplus_and_sigmoid(coef * s)
  a = jnp.where(mask, sp, 0.0)
  sig_c = jnp.where(mask, sig, 0.0) * coef
  if cfg.score == "lssa":
    return a / z, jnp.where(mask, (dp - d_row) / z, 0.0) * sig_c
  b, db = _lssar_db(cfg, a, mask, dp, stats, d_row)
  return _lssar_weights(cfg, b, mask, stats), (db - c_row) / z * sig_c


def _lssar_weights(cfg: Config, b, mask, stats):
  _, n, r_max, den = stats
  fallback = r_max <= reference.FLOOR
  inv_m = 1.0 / jnp.where(fallback, 1.0, r_max)
  offset = _lssar_row_consts(cfg, n)
  r = jnp.where(mask, _pow(jnp.maximum(n * b - offset, 0.0) * inv_m, cfg.p), 0.0)
  return jnp.where(fallback, b, r) / den


def _lssar_db(cfg: Config, a, mask, dp, stats, d_row):
  """b = a / Z and d(loss)/db (masked)."""
  z, n, r_max, den = stats
  b = a / z
  fallback = r_max <= reference.FLOOR
  inv_m = 1.0 / jnp.where(fallback, 1.0, r_max)
  u = n * b - _lssar_row_consts(cfg, n)
  dr = (dp - d_row) / den
  du = jnp.where(mask & (u > 0), dr * cfg.p * _pow(jnp.maximum(u, 0.0) * inv_m, cfg.p - 1)
                 * inv_m, 0.0)
  db = jnp.where(fallback, jnp.where(mask, dp, 0.0), n * du)
  return b, db


def _dq_kernel(q_ref, k_ref, v_ref, qseg_ref, kseg_ref, *refs, cfg: Config):
  """dq (for LSSA/LSSAR: d/dqhat) and, for LSSAR, the row constants C."""
  has_c = cfg.score == "lssar"
  norm_refs, (do_ref, drow_ref), stat_refs, out_refs = _split(
      refs, _num_norms(cfg.score), 2, _num_stats(cfg.score), 1 + has_c)
  dq_ref = out_refs[0]
  i = pl.program_id(2)
  bq, bk = cfg.block_q, cfg.block_k
  q, do = q_ref[...], do_ref[...]
  d = q.shape[-1]
  q_idx = i * bq + lax.broadcasted_iota(jnp.int32, (bq, 1), 0)
  q_seg = qseg_ref[...]
  stats = [r[...] for r in stat_refs]
  d_row = drow_ref[...]
  num_k = _k_blocks_for_q_block(cfg, i)
  iq = norm_refs[0][...] if norm_refs else None

  def load(j):
    """k, s (cosine for LSSA), mask, dP, and the k row scale (d/dqhat = ds (ik k))."""
    start = pl.multiple_of(j * bk, bk)
    k, v = k_ref[pl.ds(start, bk), :], v_ref[pl.ds(start, bk), :]
    k_idx = j * bk + lax.broadcasted_iota(jnp.int32, (1, bk), 1)
    mask = _mask(cfg, q_idx, k_idx, q_seg, kseg_ref[:, pl.ds(start, bk)])
    s = lax.dot_general(q, k, _NT, preferred_element_type=jnp.float32)
    ik = norm_refs[1][:, pl.ds(start, bk)] if norm_refs else 1.0
    if norm_refs:
      s = s * iq * ik
    dp = lax.dot_general(do, v, _NT, preferred_element_type=jnp.float32)
    return k, s, mask, dp, ik

  zeros_qd = jnp.zeros((bq, d), jnp.float32)
  if cfg.score != "lssar":
    def body(j, dq):
      k, s, mask, dp, ik = load(j)
      _, ds = _block_grads(cfg, s, mask, dp, stats, d_row, None)
      return dq + jnp.dot((ds * ik).astype(k.dtype), k, preferred_element_type=jnp.float32)

    dq_ref[...] = lax.fori_loop(0, num_k, body, zeros_qd)
    return

  z, n = stats[0], stats[1]
  coef = cfg.log_d * jnp.log(jnp.maximum(n, 1.0))

  def body_r(j, carry):  # da = (db - C) / Z is affine in the row constant C
    acc_db, acc_1, c_row = carry
    k, s, mask, dp, ik = load(j)
    sp, sig = _softplus_and_sigmoid(coef * s)
    a = jnp.where(mask, sp, 0.0)
    sig = jnp.where(mask, sig, 0.0) * ik
    b, db = _lssar_db(cfg, a, mask, dp, stats, d_row)
    acc_db += jnp.dot((db * sig).astype(k.dtype), k, preferred_element_type=jnp.float32)
    acc_1 += jnp.dot(sig.astype(k.dtype), k, preferred_element_type=jnp.float32)
    return acc_db, acc_1, c_row + jnp.sum(db * b, axis=-1, keepdims=True)

  acc_db, acc_1, c_row = lax.fori_loop(
      0, num_k, body_r, (zeros_qd, zeros_qd, jnp.zeros((bq, 1), jnp.float32)))
  dq_ref[...] = coef / z * (acc_db - c_row * acc_1)
  out_refs[1][...] = c_row


def _dkv_kernel(q_ref, k_ref, v_ref, qseg_ref, kseg_ref, *refs, cfg: Config):
  """dk (for LSSA/LSSAR: d/dkhat) and dv of one key block, for one q head.

  Works on transposed score blocks [bk, bq] (s^T = k q^T), so per-query-row values arrive
  as lane-dense rows [1, Tq] (a [Tq, 1] column would pad to 128 lanes in TPU VMEM) and
  both gradient matmuls are plain [bk, bq] x [bq, D] products. The score maths
  (_block_grads) is elementwise, so it serves both orientations.
  """
  has_c = cfg.score == "lssar"
  norm_refs, (do_ref, drow_ref), stat_refs, c_refs, (dk_ref, dv_ref) = _split(
      refs, _num_norms(cfg.score), 2, _num_stats(cfg.score), has_c, 2)
  j = pl.program_id(2)
  bq, bk = cfg.block_q, cfg.block_k
  k, v = k_ref[...], v_ref[...]                                    # [bk, D]
  d = k.shape[-1]
  k_idx = j * bk + lax.broadcasted_iota(jnp.int32, (bk, 1), 0)     # column
  k_seg = kseg_ref[...]                                            # [bk, 1]
  ik = norm_refs[1][...] if norm_refs else 1.0                     # [bk, 1]
  num_q = pl.cdiv(cfg.q_len, bq)

  def body(i, carry):
    dk, dv = carry
    start = pl.multiple_of(i * bq, bq)
    rows = cols = pl.ds(start, bq)
    q, do = q_ref[rows, :], do_ref[rows, :]
    q_idx = i * bq + lax.broadcasted_iota(jnp.int32, (1, bq), 1)   # row
    mask_t = _mask(cfg, q_idx, k_idx, qseg_ref[:, cols], k_seg)     # [bk, bq]
    s_t = lax.dot_general(k, q, _NT, preferred_element_type=jnp.float32)
    iq = norm_refs[0][:, cols] if norm_refs else 1.0              # [1, bq]
    if norm_refs:
      s_t = s_t * iq * ik
    dp_t = lax.dot_general(v, do, _NT, preferred_element_type=jnp.float32)
    stats = [r[:, cols] for r in stat_refs]
    c_row = c_refs[0][:, cols] if has_c else None
    pr_t, ds_t = _block_grads(cfg, s_t, mask_t, dp_t, stats, drow_ref[:, cols], c_row)
    dv = dv + jnp.dot(pr_t.astype(do.dtype), do, preferred_element_type=jnp.float32)
    dk = dk + jnp.dot((ds_t * iq).astype(q.dtype), q, preferred_element_type=jnp.float32)
    return dk, dv

  zeros = jnp.zeros((bk, d), jnp.float32)
  dk, dv = lax.fori_loop(_first_q_block_for_k_block(cfg, j), num_q, body, (zeros, zeros))
  dk_ref[...], dv_ref[...] = dk, dv


# ---------------------------------------------------------------------------------------
# Wrappers.

def _call_options(cfg: Config) -> dict:
  """pallas_call keyword options for the backend: interpreter, Mosaic (TPU), or the
  Triton lowering on GPU with warps / pipeline stages."""
  if cfg.backend == "interpret":
    return {"interpret": True}
  if cfg.backend == "gpu":
    from jax.experimental.pallas import triton as pltriton  # pylint: disable=g-import-not-at-top
    return {"compiler_params": pltriton.CompilerParams(num_warps=cfg.num_warps,
                                                       num_stages=cfg.num_stages)}
  from jax.experimental.pallas import tpu as pltpu  # pylint: disable=g-import-not-at-top
  # Every grid cell (batch, head, block) writes its own output block: all three axes are
  # parallel, which lets Mosaic split the grid across a megacore chip's two TensorCores.
  return {"compiler_params": pltpu.CompilerParams(dimension_semantics=("parallel",) * 3)}


def _to_bhtd(x, t_pad):
  return jnp.pad(x, ((0, 0), (0, t_pad - x.shape[1]), (0, 0), (0, 0))).transpose(0, 2, 1, 3)


def _segments(cfg: Config, segment_ids, batch, tq_p, tk_p):
  """[B, Tq_p, 1] query column and [B, 1, Tk_p] key row (padding never matches)."""
  if segment_ids is None:
    return jnp.zeros((batch, tq_p, 1), jnp.int32), jnp.zeros((batch, 1, tk_p), jnp.int32)
  seg = segment_ids.astype(jnp.int32)
  qseg = jnp.pad(seg, ((0, 0), (0, tq_p - cfg.q_len)), constant_values=-1)[:, :, None]
  kseg = jnp.pad(seg, ((0, 0), (0, tk_p - cfg.kv_len)), constant_values=-2)[:, None, :]
  return qseg, kseg


def _specs(cfg: Config, h, kv_heads, d, tq_p, tk_p, *, over_q: bool):
  """BlockSpecs: q, k/v, q segments, k segments, per-query-row values, k inverse norms.
  Integer division is lax.div (operands >= 0): `//` lowers to `sign`, which Mosaic cannot
  lower when exporting for TPU from another platform."""
  g = h // kv_heads
  bq, bk = cfg.block_q, cfg.block_k
  if over_q:  # grid (b, h, i): one query block, the whole key sequence
    q_spec = pl.BlockSpec((None, None, bq, d), lambda b, hh, i: (b, hh, i, 0))
    kv_spec = pl.BlockSpec((None, None, tk_p, d), lambda b, hh, i: (b, lax.div(hh, g), 0, 0))
    qseg_spec = pl.BlockSpec((None, bq, 1), lambda b, hh, i: (b, i, 0))
    kseg_spec = pl.BlockSpec((None, 1, tk_p), lambda b, hh, i: (b, 0, 0))
    row_spec = pl.BlockSpec((None, None, bq, 1), lambda b, hh, i: (b, hh, i, 0))
    knorm_spec = pl.BlockSpec((None, None, 1, tk_p), lambda b, hh, i: (b, lax.div(hh, g), 0, 0))
  else:       # grid (b, h, j): one key block, the whole query sequence, transposed:
    # per-query values are rows [.., 1, Tq_p], per-key values columns [.., Tk_p, 1].
    q_spec = pl.BlockSpec((None, None, tq_p, d), lambda b, hh, j: (b, hh, 0, 0))
    kv_spec = pl.BlockSpec((None, None, bk, d), lambda b, hh, j: (b, lax.div(hh, g), j, 0))
    qseg_spec = pl.BlockSpec((None, 1, tq_p), lambda b, hh, j: (b, 0, 0))
    kseg_spec = pl.BlockSpec((None, bk, 1), lambda b, hh, j: (b, j, 0))
    row_spec = pl.BlockSpec((None, None, 1, tq_p), lambda b, hh, j: (b, hh, 0, 0))
    knorm_spec = pl.BlockSpec((None, None, bk, 1), lambda b, hh, j: (b, lax.div(hh, g), j, 0))
  return q_spec, kv_spec, qseg_spec, kseg_spec, row_spec, knorm_spec


def _inv_norm(x_BxHxTxD):
  """1 / |x| in fp32, the reference's rsqrt(sum x^2 + 1e-24)."""
  x32 = x_BxHxTxD.astype(jnp.float32)
  return lax.rsqrt(jnp.sum(x32 * x32, axis=-1, keepdims=True) + 1e-24)


def _prepare(cfg: Config, q, k, v, segment_ids):
  """Padded [B, H, T, D] operands, segment ids, and (LSSA/LSSAR) inverse norms."""
  tq_p, tk_p = cfg.padded_lengths()
  q_t, k_t, v_t = _to_bhtd(q, tq_p), _to_bhtd(k, tk_p), _to_bhtd(v, tk_p)
  qseg, kseg = _segments(cfg, segment_ids, q.shape[0], tq_p, tk_p)
  norms = []
  if _num_norms(cfg.score):
    norms = [_inv_norm(q_t), _inv_norm(k_t).swapaxes(2, 3)]  # [B,H,Tq,1] and [B,K,1,Tk]
  return (q_t, k_t, v_t, qseg, kseg), norms, tq_p, tk_p


def _forward(cfg: Config, q, k, v, segment_ids):
  b, _, h, d = q.shape
  base, norms, tq_p, tk_p = _prepare(cfg, q, k, v, segment_ids)
  q_spec, kv_spec, qseg_spec, kseg_spec, row_spec, knorm_spec = _specs(
      cfg, h, k.shape[2], d, tq_p, tk_p, over_q=True)
  ns = _num_stats(cfg.score)
  row_shape = jax.ShapeDtypeStruct((b, h, tq_p, 1), jnp.float32)
  out, *stats = pl.pallas_call(
      functools.partial(_fwd_kernel, cfg=cfg),
      out_shape=[jax.ShapeDtypeStruct((b, h, tq_p, d), q.dtype)] + [row_shape] * ns,
      grid=(b, h, tq_p // cfg.block_q),
      in_specs=[q_spec, kv_spec, kv_spec, qseg_spec, kseg_spec] + [row_spec, knorm_spec][
          :len(norms)],
      out_specs=[q_spec] + [row_spec] * ns,
      **_call_options(cfg),
      name=f"attention_fwd_{cfg.score}",
  )(*base, *norms)
  return out, stats


def _backward(cfg: Config, q, k, v, segment_ids, out_t, stats, g):
  b, tq, h, d = q.shape
  kvh = k.shape[2]
  base, norms, tq_p, tk_p = _prepare(cfg, q, k, v, segment_ids)
  do_t = _to_bhtd(g.astype(q.dtype), tq_p)
  d_row = jnp.sum(do_t.astype(jnp.float32) * out_t.astype(jnp.float32), -1, keepdims=True)
  ns = _num_stats(cfg.score)
  has_c = cfg.score == "lssar"
  row_shape = jax.ShapeDtypeStruct((b, h, tq_p, 1), jnp.float32)

  q_spec, kv_spec, qseg_spec, kseg_spec, row_spec, knorm_spec = _specs(
      cfg, h, kvh, d, tq_p, tk_p, over_q=True)
  dq, *c_rows = pl.pallas_call(
      functools.partial(_dq_kernel, cfg=cfg),
      out_shape=[jax.ShapeDtypeStruct((b, h, tq_p, d), jnp.float32)] + [row_shape] * has_c,
      grid=(b, h, tq_p // cfg.block_q),
      in_specs=[q_spec, kv_spec, kv_spec, qseg_spec, kseg_spec]
      + [row_spec, knorm_spec][:len(norms)] + [q_spec, row_spec] + [row_spec] * ns,
      out_specs=[q_spec] + [row_spec] * has_c,
      **_call_options(cfg),
      name=f"attention_bwd_dq_{cfg.score}",
  )(*base, *norms, do_t, d_row, *stats)

  q_spec, kv_spec, qseg_spec, kseg_spec, row_spec, knorm_spec = _specs(
      cfg, h, kvh, d, tq_p, tk_p, over_q=False)
  # Transposed views for the dk/dv kernel (reshapes of size-1 axes: no data movement).
  q_t, k_t, v_t, qseg, kseg = base
  base_t = (q_t, k_t, v_t, qseg.reshape(b, 1, tq_p), kseg.reshape(b, tk_p, 1))
  as_row = lambda x: x.reshape(x.shape[0], x.shape[1], 1, tq_p)
  norms_t = [as_row(norms[0]), norms[1].reshape(b, kvh, tk_p, 1)] if norms else []
  dkv_spec = pl.BlockSpec((None, None, cfg.block_k, d), lambda bb, hh, j: (bb, hh, j, 0))
  dk, dv = pl.pallas_call(
      functools.partial(_dkv_kernel, cfg=cfg),
      out_shape=[jax.ShapeDtypeStruct((b, h, tk_p, d), jnp.float32)] * 2,
      grid=(b, h, tk_p // cfg.block_k),
      in_specs=[q_spec, kv_spec, kv_spec, qseg_spec, kseg_spec]
      + [row_spec, knorm_spec][:len(norms)] + [q_spec, row_spec] + [row_spec] * (ns + has_c),
      out_specs=[dkv_spec, dkv_spec],
      **_call_options(cfg),
      name=f"attention_bwd_dkv_{cfg.score}",
  )(*base_t, *norms_t, do_t, as_row(d_row), *map(as_row, stats), *map(as_row, c_rows))

  def back(x_BxHxTxD, t, heads):
    return x_BxHxTxD.transpose(0, 2, 1, 3)[:, :t].reshape(b, t, heads, d)

  g_ = h // kvh
  dk = dk.reshape(b, kvh, g_, tk_p, d).sum(2)  # GQA: sum over the q heads of each group
  dv = dv.reshape(b, kvh, g_, tk_p, d).sum(2)
  dq, dk, dv = back(dq, tq, h), back(dk, cfg.kv_len, kvh), back(dv, cfg.kv_len, kvh)
  if norms:  # the kernels returned d/dqhat, d/dkhat: apply the normalisation's VJP
    dq = jax.vjp(reference.l2_normalize, q)[1](dq)[0]
    dk = jax.vjp(reference.l2_normalize, k)[1](dk)[0]
  return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


def custom_vjp_attention(forward, backward, *, heads_first=True):
  """attention(cfg, q, k, v, segment_ids) -> [B, Tq, H, D] with a custom VJP, from
  forward(cfg, q, k, v, seg) -> (out, stats) and
  backward(cfg.backward(), q, k, v, seg, out, stats, g) -> (dq, dk, dv); out is the padded
  output, [B, H, Tq_pad, D] (heads_first) or [B, Tq_pad, H, D]. Shared by these kernels,
  the streaming TPU kernels (tpu_streaming.py) and the Mosaic GPU kernels (mosaic_gpu.py)."""

  def unpad(cfg, out):
    return (out.transpose(0, 2, 1, 3) if heads_first else out)[:, :cfg.q_len]

  @functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
  def attention(cfg, q, k, v, segment_ids):
    out, _ = forward(cfg, q, k, v, segment_ids)
    return unpad(cfg, out)

  def attention_fwd(cfg, q, k, v, segment_ids):
    out, stats = forward(cfg, q, k, v, segment_ids)
    return unpad(cfg, out), (q, k, v, segment_ids, out, stats)

  def attention_bwd(cfg, res, g):
    q, k, v, segment_ids, out, stats = res
    dq, dk, dv = backward(cfg.backward(), q, k, v, segment_ids, out, stats, g)
    return dq, dk, dv, None

  attention.defvjp(attention_fwd, attention_bwd)
  return attention


_attention = custom_vjp_attention(_forward, _backward)


_BACKENDS = ("interpret", "gpu", "tpu_resident")


def default_block(length: int, preferred: int = 128) -> int:
  """`preferred` for long sequences, else the length rounded up to 8 (one block)."""
  return preferred if length >= preferred else max(8, -(-length // 8) * 8)


# GPU (Triton lowering) defaults (block_q, block_k, warps) by operand itemsize, from the
# H100 block sweep in results/perf/attention.md (bf16, D = 128, T = 8k): forward 128 x 64
# with 4 warps for softmax, 128 x 128 with 8 for LSSA / LSSAR (more elementwise work per
# matmul), backward 64 x 64 with 4. fp32 operands halve the blocks: 128 x 128 fp32 blocks
# need 257 KiB of shared memory (H100: 227 KiB per block).
GPU_FWD = {2: (128, 64, 4), 4: (64, 64, 4)}
GPU_FWD_SOFTPLUS = {2: (128, 128, 8), 4: (64, 64, 4)}
GPU_BWD = {2: (64, 64, 4), 4: (32, 64, 4)}
GPU_NUM_STAGES = 2


def _gpu_block(length: int, preferred: int) -> int:
  """Triton tensors need power-of-two sides (>= 16 for tensor-core dots)."""
  return min(preferred, max(16, 1 << (max(length, 1) - 1).bit_length()))


def gpu_supports(q, k) -> str | None:
  """Why the GPU kernels cannot take these operands, or None when they can."""
  d = q.shape[-1]
  if d < 16 or d & (d - 1):
    return f"head_dim {d} is not a power of two >= 16 (Triton block shapes)"
  if q.dtype not in (jnp.float32, jnp.bfloat16, jnp.float16):
    return f"dtype {q.dtype} is not float32/bfloat16/float16"
  return None


def flash_attention(q, k, v, segment_ids=None, *, backend, causal=True, score="softmax",
                    q_offset=0, scale=None, p=15.0, reweight_offset_rows=3, **tiling):
  """Pallas attention, forward and backward kernels (see the module docstring).

  q [B, Tq, H, D], k/v [B, Tk, K, D]; returns [B, Tq, H, D]. Arguments are validated by
  api.attention. backend: "gpu" (Triton lowering), "interpret", or "tpu_resident" (these
  kernels on Mosaic, whole-sequence VMEM blocks; the TPU kernels are tpu_streaming.py's).
  tiling: run()'s block / warp options.
  """
  opts = ScoreOptions.make(q, k, segment_ids=segment_ids, causal=causal, score=score,
                           q_offset=q_offset, scale=scale, p=p,
                           reweight_offset_rows=reweight_offset_rows)
  return run(opts, q, k, v, segment_ids, backend=backend, **tiling)


def run(opts: ScoreOptions, q, k, v, segment_ids=None, *, backend, block_q=None, block_k=None,
        num_warps=None, num_stages=None, bwd_block_q=None, bwd_block_k=None,
        bwd_num_warps=None):
  """flash_attention with the maths options already built (api.py builds them once).
  Blocks default to 128 (one block for short sequences); on GPU to the GPU_* tables."""
  if backend not in _BACKENDS:
    raise ValueError(f"backend must be one of {', '.join(_BACKENDS)}; got {backend!r} (the "
                     "streaming TPU kernels are tpu_streaming.flash_attention)")
  if backend == "gpu":
    size = 4 if jnp.dtype(q.dtype).itemsize > 2 else 2
    fwd = (GPU_FWD if opts.score == "softmax" else GPU_FWD_SOFTPLUS)[size]
    bwd = GPU_BWD[size]
    block_q = _gpu_block(q.shape[1], block_q or fwd[0])
    block_k = _gpu_block(k.shape[1], block_k or fwd[1])
    num_warps, num_stages = num_warps or fwd[2], num_stages or GPU_NUM_STAGES
    bwd_block_q = _gpu_block(q.shape[1], bwd_block_q or bwd[0])
    bwd_block_k = _gpu_block(k.shape[1], bwd_block_k or bwd[1])
    bwd_num_warps = bwd_num_warps or bwd[2]
  cfg = Config.with_tiling(
      opts, block_q=int(block_q or default_block(q.shape[1])),
      block_k=int(block_k or default_block(k.shape[1])), backend=backend,
      num_warps=num_warps, num_stages=num_stages, bwd_block_q=bwd_block_q,
      bwd_block_k=bwd_block_k, bwd_num_warps=bwd_num_warps)
  return _attention(cfg, q, k, v, segment_ids)
