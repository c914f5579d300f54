"""TPU attention kernels that stream both sequences through the grid (FlashAttention-on-TPU
style): VMEM use per grid step depends on the block sizes and head dim only, not on T.

Same scores, masks, residuals and maths as kernel.py (its per-block helpers are reused; the
reference is the spec); what changes is how the blocks reach VMEM:

  forward  grid (B, H, Tq/bq, nk) with nk = Tk/bk (softmax, LSSA) or 2 Tk/bk (LSSAR: pass 1
           over steps 0..nk/2-1, pass 2 over the rest; see below). The key axis is last and
           "arbitrary" (sequential), the others "parallel". Running row state lives in VMEM
           scratch: softmax m, l, acc (online softmax); LSSA the row sums and sum a v;
           LSSAR the row sums and row max (pass 1), then sum w v and sum w (pass 2). It is
           initialised at step 0 and the output block, resident across the key axis, is
           written at the last step.
  dq       grid (B, H, Tq/bq, Tk/bk), key axis last and arbitrary, dq (LSSAR: sum db sig k,
           sum sig k and the row constant C) accumulated in scratch.
  dk/dv    grid (B, K, Tk/bk, H/K, Tq/bq): one kv head's key block accumulates dk and dv over
           every query block of every q head of its GQA group (the last two axes are
           arbitrary), so the group sum happens in VMEM in fp32 and the kernel writes
           [B, K, Tk, D] directly (kernel.py writes [B, H, Tk, D] per q head and sums
           afterwards: H/K times the memory).
  counts   (LSSA/LSSAR with segments only) N_i, the keys row i can see inside its segment,
           by a small mask-only kernel gridded (B, Tq/bq, Tk/bk), once per batch row (N is
           head-independent); kernel.py recounts them with an extra loop in every kernel.

Causal block skipping: steps whose key block (forward, dq) or query block (dk/dv) the mask
hides entirely do no work (`pl.when`), and the BlockSpec index_maps clamp the block index to
the nearest visible block, so consecutive skipped steps ask for the block already resident
and the pipeline issues no DMA for them. Key blocks wholly in the padding (tails) are skipped
the same way.

LSSAR's two passes are one pallas_call with a key axis of 2 Tk/bk steps rather than two
calls: the query block, N, the pass-1 row stats and the accumulators stay in VMEM between
the passes (no HBM round trip, no second launch, pass 2's first K block is prefetched while
pass 1 finishes), and V's index_map holds block 0 during pass 1, so V is only streamed once,
in pass 2. The cost is the same as two calls: K streamed and q.k recomputed twice.

Layouts: q/k/v/o/dO are [B, H|K, T, D] as in kernel.py, but every per-row value (segment
ids, inverse norms, N, the row stats, dO.O, C) is a lane-dense [.., 1, T] row in HBM: a
[.., T, 1] column is tiled (8, 128) there, 128 times its size (for LSSAR at T = 32k that was
most of the program's temporary memory). Kernels that need a column (per-query values in
the forward and dq kernels, per-key values in dk/dv) build it once per output block into
VMEM scratch (_row_to_col: a diagonal select and a lane reduction, exact; no transpose).
Mosaic block constraints: the last two dims of a block are multiples of (8, 128) or the
whole dim, so every block size is a multiple of 128 unless one block covers the padded
sequence; `supports()` says when a call cannot run. VMEM per grid step: `vmem_footprint()`
(buffers from the BlockSpecs, double-buffered, plus scratch; T-independent by construction).

State: values and gradients verified against the reference on CPU in interpret mode
(tests/kernels/test_conformance.py); the Mosaic lowering checked by exporting for TPU from
CPU; compiled (not run) for TPU topologies with libtpu where present (tests/kernels/
test_attention_tpu_streaming.py). Never run on a TPU.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.attention import kernel as K
from pallas_kernels.attention import reference
from pallas_kernels.attention.options import ScoreOptions

# Default blocks (block_q, block_k) for sequences longer than a block. A TPU pays ~0.35 us
# of pipeline overhead per grid step, so blocks are large. Mosaic's VMEM need per kernel at
# these defaults (bf16, D = 128; measured by compiling for v5e with a bisected
# vmem_limit_bytes; independent of T): forward 4.5 / 4.75 / 8 MiB (softmax / LSSA / LSSAR),
# dq 4.25 / 5.75 / 6, dk/dv 5.25 / 8 / 5.75, under the 16 MiB default scoped limit of v4,
# v5e and v5p. LSSAR's backward keeps more [bq, bk] fp32 temporaries live (11 MiB at
# 512 x 512), hence 256 x 512. All powers of two: forward and backward padding agree.
TPU_FWD = (512, 512)
TPU_BWD = {"softmax": (512, 512), "lssa": (512, 512), "lssar": (256, 512)}
LANES = 128


@dataclasses.dataclass(frozen=True)
class StreamConfig(K.Config):
  """kernel.Config plus how the kernels run: interpret False (Mosaic), True (Pallas' generic
  interpreter) or a pltpu.InterpretParams (TPU interpret mode: simulated VMEM, DMAs)."""
  interpret: Any = False
  vmem_limit_bytes: int | None = None  # Mosaic's scoped VMEM limit (None: the chip default)


# ---------------------------------------------------------------------------------------
# Block bookkeeping.

def _num_kv_blocks(cfg) -> int:
  """Key blocks holding at least one real key (the rest of the grid is padding)."""
  return pl.cdiv(cfg.kv_len, cfg.block_k)


def _num_q_blocks(cfg) -> int:
  return pl.cdiv(cfg.q_len, cfg.block_q)


def _kv_block(cfg, i, j):
  """The key block fetched at (query block i, key step j): j clamped to the last block that
  query block i can see, so steps past it re-request the resident block (no DMA)."""
  return jnp.minimum(j, K._k_blocks_for_q_block(cfg, i) - 1)


def _q_range(cfg, j):
  """[lo, hi): the query blocks that may see key block j (causal: none before lo)."""
  lo = K._first_q_block_for_k_block(cfg, j)
  return lo, _num_q_blocks(cfg)


def _q_block(cfg, i, j):
  """The query block fetched at (key block j, query step i) by the dk/dv kernel: i clamped
  into [lo, hi); for key blocks wholly in the padding, the last block throughout."""
  lo, hi = _q_range(cfg, j)
  lo = jnp.where(j < _num_kv_blocks(cfg), lo, hi - 1)
  return jnp.minimum(jnp.maximum(i, lo), hi - 1)


@dataclasses.dataclass
class _Plan:
  """One pallas_call: named operands with their BlockSpecs (shared by the call and by
  vmem_footprint, so the footprint is computed from what actually runs). `cols` names row
  operands ([1, n] blocks) that the kernel turns into [n, 1] column scratch once per output
  block (see _row_to_col); `scratch` are the accumulators."""
  name: str
  body: Callable
  grid: tuple
  ins: list          # (name, BlockSpec, dtype)
  outs: list         # (name, BlockSpec, ShapeDtypeStruct)
  cols: list         # (name, dtype)
  scratch: list      # (shape, dtype)
  semantics: tuple

  def scratch_shapes(self):
    n = {name: s.block_shape[-1] for name, s, _ in self.ins}
    return [((n[name], 1), dt) for name, dt in self.cols] + list(self.scratch)


def _call(cfg: StreamConfig, plan: _Plan, args: dict):
  names = tuple(n for n, _, _ in plan.ins) + tuple(n for n, _, _ in plan.outs)
  kw = {"interpret": cfg.interpret} if cfg.interpret is not False else {}
  return pl.pallas_call(
      functools.partial(plan.body, names=names, cols=tuple(n for n, _ in plan.cols)),
      out_shape=[s for _, _, s in plan.outs],
      grid=plan.grid,
      in_specs=[s for _, s, _ in plan.ins],
      out_specs=[s for _, s, _ in plan.outs],
      scratch_shapes=[pltpu.VMEM(shape, dt) for shape, dt in plan.scratch_shapes()],
      compiler_params=pltpu.CompilerParams(dimension_semantics=plan.semantics,
                                           vmem_limit_bytes=cfg.vmem_limit_bytes),
      name=plan.name, **kw,
  )(*[args[n] for n, _, _ in plan.ins])


def _tile_bytes(shape, dtype) -> int:
  """VMEM bytes of a block: last dim padded to 128 lanes, the one before to the sublane
  tile (8 rows of 32 bits: 8 fp32, 16 bf16)."""
  shape = [int(s) for s in shape if s is not None]
  item = jnp.dtype(dtype).itemsize
  if len(shape) == 1:
    shape = [1] + shape
  *lead, r, c = shape
  sub = 8 * max(1, 4 // item)
  return math.prod(lead) * (-(-r // sub) * sub) * (-(-c // LANES) * LANES) * item


def _plan_bytes(plan: _Plan) -> dict:
  bufs = sum(2 * _tile_bytes(s.block_shape, dt) for _, s, dt in plan.ins)
  bufs += sum(2 * _tile_bytes(s.block_shape, o.dtype) for _, s, o in plan.outs)
  scratch = sum(_tile_bytes(shape, dt) for shape, dt in plan.scratch_shapes())
  return {"buffers": bufs, "scratch": scratch, "total": bufs + scratch}


# ---------------------------------------------------------------------------------------
# Kernels.

def _eye(n):
  return lax.broadcasted_iota(jnp.int32, (n, n), 0) == lax.broadcasted_iota(jnp.int32, (n, n), 1)


def _row_to_col(row):
  """[1, n] -> [n, 1] without a transpose: keep the diagonal of the row broadcast over n
  sublanes and reduce over lanes (exact: one nonzero term per row). Run once per output
  block, so per-row values can be lane-dense [.., 1, T] rows in HBM (a [T, 1] column is
  tiled (8, 128) there: 128 times its size) and still be columns in the kernel."""
  n = row.shape[-1]
  return jnp.sum(jnp.where(_eye(n), row, jnp.zeros((), row.dtype)), axis=1, keepdims=True)


def _col_to_row(col):
  n = col.shape[0]
  return jnp.sum(jnp.where(_eye(n), col, jnp.zeros((), col.dtype)), axis=0, keepdims=True)


class _Blocks:
  """A grid step's blocks by name. b[name] reads a block, or for the names in `cols` the
  column made from it by load_cols() (call it at the first step of each output block)."""

  def __init__(self, refs, names, cols):
    self.refs = dict(zip(names, refs))
    self.col_refs = dict(zip(cols, refs[len(names):len(names) + len(cols)]))
    self.scratch = refs[len(names) + len(cols):]

  def load_cols(self):
    for name, ref in self.col_refs.items():
      ref[...] = _row_to_col(self.refs[name][...])

  def __contains__(self, name):
    return name in self.refs

  def __getitem__(self, name):
    return (self.col_refs[name] if name in self.col_refs else self.refs[name])[...]

  def put(self, name, value):
    ref = self.refs[name]
    ref[...] = value.astype(ref.dtype)


def _scores(b, x, y, q_idx, k_idx, cfg):
  """x.y^T in fp32 (cosines for LSSA/LSSAR) and the mask: [bq, bk] for (x, y) = (q, k),
  [bk, bq] for (k, q); q_idx, k_idx and the per-row values broadcast accordingly."""
  s = lax.dot_general(b[x], b[y], K._NT, preferred_element_type=jnp.float32)
  if "iq" in b:
    s = s * b["iq"] * b["ik"]
  return s, K._mask(cfg, q_idx, k_idx, b["qseg"], b["kseg"])


def _counts(cfg, b, q_idx):
  """N_i as a [bq, 1] column: analytic without segments (kernel._visible_counts), else the
  count kernel's output."""
  if cfg.has_segments:
    return b["n"]
  return K._visible_counts(cfg, q_idx, None, None, None)


def _zero(refs):
  for ref in refs:
    ref[...] = jnp.zeros(ref.shape, ref.dtype)


def _dot(w, x):
  return jnp.dot(w.astype(x.dtype), x, preferred_element_type=jnp.float32)


def _fwd_kernel(*refs, cfg, names, cols, nk):
  b = _Blocks(refs, names, cols)
  i, step = pl.program_id(2), pl.program_id(3)
  bq, bk = cfg.block_q, cfg.block_k
  num_k = K._k_blocks_for_q_block(cfg, i)
  q_idx = i * bq + lax.broadcasted_iota(jnp.int32, (bq, 1), 0)
  k_idx = lambda j: j * bk + lax.broadcasted_iota(jnp.int32, (1, bk), 1)

  @pl.when(step == 0)
  def _():
    b.load_cols()
    _zero(b.scratch)
    if cfg.score == "softmax":
      b.scratch[0][...] = jnp.full(b.scratch[0].shape, K._NEG, jnp.float32)

  if cfg.score == "softmax":
    m_sc, l_sc, acc_sc = b.scratch

    @pl.when(step < num_k)
    def _():
      s, mask = _scores(b, "q", "k", q_idx, k_idx(step), cfg)
      s = jnp.where(mask, s * cfg.scale, K._NEG)
      m_prev = m_sc[...]
      m_new = jnp.maximum(m_prev, jnp.max(s, axis=-1, keepdims=True))
      pr = jnp.where(mask, jnp.exp(s - m_new), 0.0)
      corr = jnp.exp(m_prev - m_new)
      acc_sc[...] = acc_sc[...] * corr + _dot(pr, b["v"])
      l_sc[...] = l_sc[...] * corr + jnp.sum(pr, axis=-1, keepdims=True)
      m_sc[...] = m_new

    @pl.when(step == nk - 1)
    def _():
      m, l = m_sc[...], l_sc[...]
      b.put("o", acc_sc[...] / jnp.where(l > 0, l, 1.0))
      b.put("stat0", _col_to_row(jnp.where(l > 0, m + jnp.log(jnp.where(l > 0, l, 1.0)), 0.0)))
    return

  n = _counts(cfg, b, q_idx)
  coef = cfg.log_d * jnp.log(jnp.maximum(n, 1.0))

  def weights(j):
    s, mask = _scores(b, "q", "k", q_idx, k_idx(j), cfg)
    return jnp.where(mask, K._softplus(coef * s), 0.0), mask

  if cfg.score == "lssa":
    total_sc, acc_sc = b.scratch

    @pl.when(step < num_k)
    def _():
      a, _ = weights(step)
      total_sc[...] += jnp.sum(a, axis=-1, keepdims=True)
      acc_sc[...] += _dot(a, b["v"])

    @pl.when(step == nk - 1)
    def _():
      z = total_sc[...] + reference.EPS
      b.put("o", acc_sc[...] / z)
      b.put("stat0", _col_to_row(z))
      b.put("stat1", _col_to_row(n))
    return

  # LSSAR: steps [0, nk/2) are pass 1, [nk/2, nk) pass 2, over the same key blocks.
  half = nk // 2
  total_sc, amax_sc, acc_sc, den_sc = b.scratch

  @pl.when(step < num_k)
  def _():
    a, _ = weights(step)
    total_sc[...] += jnp.sum(a, axis=-1, keepdims=True)
    amax_sc[...] = jnp.maximum(amax_sc[...], jnp.max(a, axis=-1, keepdims=True))

  def row_consts():
    z = total_sc[...] + reference.EPS
    offset = K._lssar_row_consts(cfg, n)
    r_max = jnp.maximum(n * (amax_sc[...] / z) - offset, 0.0)
    fallback = r_max <= reference.FLOOR
    return z, offset, r_max, fallback, 1.0 / jnp.where(fallback, 1.0, r_max)

  @pl.when((step >= half) & (step - half < num_k))
  def _():
    z, offset, _, fallback, inv_m = row_consts()
    a, mask = weights(step - half)
    bb = a / z
    r = jnp.where(mask, K._pow(jnp.maximum(n * bb - offset, 0.0) * inv_m, cfg.p), 0.0)
    w = jnp.where(fallback, bb, r)
    acc_sc[...] += _dot(w, b["v"])
    den_sc[...] += jnp.sum(w, axis=-1, keepdims=True)

  @pl.when(step == nk - 1)
  def _():
    z, _, r_max, fallback, _ = row_consts()
    den = jnp.where(fallback, 1.0, den_sc[...])
    b.put("o", acc_sc[...] / jnp.where(den > 0, den, 1.0))
    for t, val in enumerate((z, n, r_max, den)):
      b.put(f"stat{t}", _col_to_row(val))


def _count_kernel(*refs, cfg, names, cols):
  """N_i with segments: the keys each query row can see (mask only)."""
  b = _Blocks(refs, names, cols)
  (n_sc,) = b.scratch
  i, j = pl.program_id(1), pl.program_id(2)
  bq, bk = cfg.block_q, cfg.block_k

  @pl.when(j == 0)
  def _():
    b.load_cols()
    _zero(b.scratch)

  @pl.when(j < K._k_blocks_for_q_block(cfg, i))
  def _():
    q_idx = i * bq + lax.broadcasted_iota(jnp.int32, (bq, 1), 0)
    k_idx = j * bk + lax.broadcasted_iota(jnp.int32, (1, bk), 1)
    m = K._mask(cfg, q_idx, k_idx, b["qseg"], b["kseg"])
    n_sc[...] += jnp.sum(m.astype(jnp.float32), axis=-1, keepdims=True)

  @pl.when(j == pl.num_programs(2) - 1)
  def _():
    b.put("n", _col_to_row(n_sc[...]))


def _dq_kernel(*refs, cfg, names, cols, nk):
  """dq (LSSA/LSSAR: d/dqhat) and, for LSSAR, the row constants C."""
  b = _Blocks(refs, names, cols)
  i, j = pl.program_id(2), pl.program_id(3)
  bq, bk = cfg.block_q, cfg.block_k
  ns = K._num_stats(cfg.score)
  q_idx = i * bq + lax.broadcasted_iota(jnp.int32, (bq, 1), 0)
  k_idx = j * bk + lax.broadcasted_iota(jnp.int32, (1, bk), 1)
  visible = j < K._k_blocks_for_q_block(cfg, i)

  @pl.when(j == 0)
  def _():
    b.load_cols()
    _zero(b.scratch)

  def load():
    s, mask = _scores(b, "q", "k", q_idx, k_idx, cfg)
    dp = lax.dot_general(b["do"], b["v"], K._NT, preferred_element_type=jnp.float32)
    stats = [b[f"stat{t}"] for t in range(ns)]
    return s, mask, dp, stats, (b["ik"] if "ik" in b else 1.0)

  if cfg.score != "lssar":
    (dq_sc,) = b.scratch

    @pl.when(visible)
    def _():
      s, mask, dp, stats, ik = load()
      _, ds = K._block_grads(cfg, s, mask, dp, stats, b["drow"], None)
      dq_sc[...] += _dot(ds * ik, b["k"])

    @pl.when(j == nk - 1)
    def _():
      b.put("dq", dq_sc[...])
    return

  acc_db_sc, acc_1_sc, c_sc = b.scratch
  coef_z = lambda: (cfg.log_d * jnp.log(jnp.maximum(b["stat1"], 1.0)), b["stat0"])

  @pl.when(visible)
  def _():  # da = (db - C) / Z is affine in the row constant C
    s, mask, dp, stats, ik = load()
    coef, _ = coef_z()
    sp, sig = K._softplus_and_sigmoid(coef * s)
    a = jnp.where(mask, sp, 0.0)
    sig = jnp.where(mask, sig, 0.0) * ik
    bb, db = K._lssar_db(cfg, a, mask, dp, stats, b["drow"])
    acc_db_sc[...] += _dot(db * sig, b["k"])
    acc_1_sc[...] += _dot(sig, b["k"])
    c_sc[...] += jnp.sum(db * bb, axis=-1, keepdims=True)

  @pl.when(j == nk - 1)
  def _():
    coef, z = coef_z()
    c_row = c_sc[...]
    b.put("dq", coef / z * (acc_db_sc[...] - c_row * acc_1_sc[...]))
    b.put("c", _col_to_row(c_row))


def _dkv_kernel(*refs, cfg, names, cols, groups, nq):
  """dk (LSSA/LSSAR: d/dkhat) and dv of one kv head's key block, summed over the q heads of
  its GQA group and all query blocks. Transposed [bk, bq] score blocks as in kernel.py:
  per-query values arrive as [1, bq] rows, per-key ones are [bk, 1] columns."""
  b = _Blocks(refs, names, cols)
  dk_sc, dv_sc = b.scratch
  j, gi, i = pl.program_id(2), pl.program_id(3), pl.program_id(4)
  bq, bk = cfg.block_q, cfg.block_k
  ns = K._num_stats(cfg.score)
  lo, hi = _q_range(cfg, j)

  @pl.when((gi == 0) & (i == 0))
  def _():
    b.load_cols()
    _zero(b.scratch)

  @pl.when((i >= lo) & (i < hi) & (j < _num_kv_blocks(cfg)))
  def _():
    k_idx = j * bk + lax.broadcasted_iota(jnp.int32, (bk, 1), 0)     # column
    q_idx = i * bq + lax.broadcasted_iota(jnp.int32, (1, bq), 1)     # row
    s_t, mask_t = _scores(b, "k", "q", q_idx, k_idx, cfg)            # [bk, bq]
    dp_t = lax.dot_general(b["v"], b["do"], K._NT, preferred_element_type=jnp.float32)
    stats = [b[f"stat{t}"] for t in range(ns)]
    c_row = b["c"] if "c" in b else None
    pr_t, ds_t = K._block_grads(cfg, s_t, mask_t, dp_t, stats, b["drow"], c_row)
    dv_sc[...] += _dot(pr_t, b["do"])
    dk_sc[...] += _dot(ds_t * (b["iq"] if "iq" in b else 1.0), b["q"])

  @pl.when((gi == groups - 1) & (i == nq - 1))
  def _():
    b.put("dk", dk_sc[...])
    b.put("dv", dv_sc[...])


# ---------------------------------------------------------------------------------------
# Plans (grids, BlockSpecs, scratch). HBM layouts: q/k/v/o/dO [B, H|K, T, D]; every
# per-row value a lane-dense row: segments [B, 1, T], inverse norms, stats, dO.O and C
# [B, H|K, 1, T], counts [B, 1, T]. Integer division in index_maps is lax.div (operands
# >= 0): `//` lowers to `sign`, which Mosaic cannot lower when exporting from CPU.

def _seg_row(n, index):
  """[1, n] row blocks of a [B, 1, T] array; index(*grid) gives (b, block)."""
  return pl.BlockSpec((None, 1, n), lambda *grid: (index(*grid)[0], 0, index(*grid)[1]))


def _head_row(n, index):
  """[1, n] row blocks of a [B, H, 1, T] array; index(*grid) gives (b, head, block)."""
  def index_map(*grid):
    b, hh, blk = index(*grid)
    return b, hh, 0, blk
  return pl.BlockSpec((None, None, 1, n), index_map)


def _tile(n, d, index):
  return pl.BlockSpec((None, None, n, d), lambda *g: (*index(*g), 0))


def _fwd_plan(cfg, b, h, kvh, d, tq_p, tk_p, dtype) -> _Plan:
  g = h // kvh
  bq, bk = cfg.block_q, cfg.block_k
  nkb = tk_p // bk
  two = cfg.score == "lssar"
  nk = 2 * nkb if two else nkb

  def kj(i, s):  # the key block of step s (either pass), clamped for causal skipping
    return _kv_block(cfg, i, jnp.where(s >= nkb, s - nkb, s) if two else s)

  def vj(i, s):  # V is needed in pass 2 only: hold block 0 (pass 2's first) during pass 1
    return jnp.where(s < nkb, 0, kj(i, s)) if two else kj(i, s)

  kh = lambda hh: lax.div(hh, g)
  ins = [("q", _tile(bq, d, lambda b, hh, i, s: (b, hh, i)), dtype),
         ("k", _tile(bk, d, lambda b, hh, i, s: (b, kh(hh), kj(i, s))), dtype),
         ("v", _tile(bk, d, lambda b, hh, i, s: (b, kh(hh), vj(i, s))), dtype),
         ("qseg", _seg_row(bq, lambda b, hh, i, s: (b, i)), jnp.int32),
         ("kseg", _seg_row(bk, lambda b, hh, i, s: (b, kj(i, s))), jnp.int32)]
  cols = [("qseg", jnp.int32)]
  if cfg.score != "softmax":
    ins += [("iq", _head_row(bq, lambda b, hh, i, s: (b, hh, i)), jnp.float32),
            ("ik", _head_row(bk, lambda b, hh, i, s: (b, kh(hh), kj(i, s))), jnp.float32)]
    cols.append(("iq", jnp.float32))
    if cfg.has_segments:
      ins.append(("n", _seg_row(bq, lambda b, hh, i, s: (b, i)), jnp.float32))
      cols.append(("n", jnp.float32))
  stat = _head_row(bq, lambda b, hh, i, s: (b, hh, i))
  outs = [("o", _tile(bq, d, lambda b, hh, i, s: (b, hh, i)),
           jax.ShapeDtypeStruct((b, h, tq_p, d), dtype))]
  outs += [(f"stat{t}", stat, jax.ShapeDtypeStruct((b, h, 1, tq_p), jnp.float32))
           for t in range(K._num_stats(cfg.score))]
  col, acc = ((bq, 1), jnp.float32), ((bq, d), jnp.float32)
  scratch = {"softmax": [col, col, acc], "lssa": [col, acc], "lssar": [col, col, acc, col]}
  return _Plan(f"attention_fwd_{cfg.score}", functools.partial(_fwd_kernel, cfg=cfg, nk=nk),
               (b, h, tq_p // bq, nk), ins, outs, cols, scratch[cfg.score],
               ("parallel", "parallel", "parallel", "arbitrary"))


def _count_plan(cfg, b, tq_p, tk_p) -> _Plan:
  bq, bk = cfg.block_q, cfg.block_k
  ins = [("qseg", _seg_row(bq, lambda b, i, j: (b, i)), jnp.int32),
         ("kseg", _seg_row(bk, lambda b, i, j: (b, _kv_block(cfg, i, j))), jnp.int32)]
  outs = [("n", _seg_row(bq, lambda b, i, j: (b, i)), jax.ShapeDtypeStruct((b, 1, tq_p),
                                                                        jnp.float32))]
  return _Plan("attention_counts", functools.partial(_count_kernel, cfg=cfg),
               (b, tq_p // bq, tk_p // bk), ins, outs, [("qseg", jnp.int32)],
               [((bq, 1), jnp.float32)], ("parallel", "parallel", "arbitrary"))


def _dq_plan(cfg, b, h, kvh, d, tq_p, tk_p, dtype) -> _Plan:
  g = h // kvh
  bq, bk = cfg.block_q, cfg.block_k
  kj = lambda i, j: _kv_block(cfg, i, j)
  kh = lambda hh: lax.div(hh, g)
  qtile = _tile(bq, d, lambda b, hh, i, j: (b, hh, i))
  ktile = _tile(bk, d, lambda b, hh, i, j: (b, kh(hh), kj(i, j)))
  qrow = _head_row(bq, lambda b, hh, i, j: (b, hh, i))
  ins = [("q", qtile, dtype), ("k", ktile, dtype), ("v", ktile, dtype),
         ("qseg", _seg_row(bq, lambda b, hh, i, j: (b, i)), jnp.int32),
         ("kseg", _seg_row(bk, lambda b, hh, i, j: (b, kj(i, j))), jnp.int32)]
  cols = [("qseg", jnp.int32)]
  if cfg.score != "softmax":
    ins += [("iq", qrow, jnp.float32),
            ("ik", _head_row(bk, lambda b, hh, i, j: (b, kh(hh), kj(i, j))), jnp.float32)]
    cols.append(("iq", jnp.float32))
  ins += [("do", qtile, dtype), ("drow", qrow, jnp.float32)]
  ins += [(f"stat{t}", qrow, jnp.float32) for t in range(K._num_stats(cfg.score))]
  cols += [(name, jnp.float32) for name, _, _ in ins if name == "drow" or "stat" in name]
  has_c = cfg.score == "lssar"
  outs = [("dq", qtile, jax.ShapeDtypeStruct((b, h, tq_p, d), jnp.float32))]
  if has_c:
    outs.append(("c", qrow, jax.ShapeDtypeStruct((b, h, 1, tq_p), jnp.float32)))
  acc = ((bq, d), jnp.float32)
  scratch = [acc, acc, ((bq, 1), jnp.float32)] if has_c else [acc]
  return _Plan(f"attention_bwd_dq_{cfg.score}",
               functools.partial(_dq_kernel, cfg=cfg, nk=tk_p // bk),
               (b, h, tq_p // bq, tk_p // bk), ins, outs, cols, scratch,
               ("parallel", "parallel", "parallel", "arbitrary"))


def _dkv_plan(cfg, b, h, kvh, d, tq_p, tk_p, dtype) -> _Plan:
  g = h // kvh
  bq, bk = cfg.block_q, cfg.block_k
  nq = tq_p // bq
  qi = lambda i, j: _q_block(cfg, i, j)
  # grid (b, kv head kh, key block j, group member gi, query block i): q head kh * g + gi
  qtile = _tile(bq, d, lambda b, kh, j, gi, i: (b, kh * g + gi, qi(i, j)))
  ktile = _tile(bk, d, lambda b, kh, j, gi, i: (b, kh, j))
  qrow = _head_row(bq, lambda b, kh, j, gi, i: (b, kh * g + gi, qi(i, j)))
  ins = [("q", qtile, dtype), ("k", ktile, dtype), ("v", ktile, dtype),
         ("qseg", _seg_row(bq, lambda b, kh, j, gi, i: (b, qi(i, j))), jnp.int32),
         ("kseg", _seg_row(bk, lambda b, kh, j, gi, i: (b, j)), jnp.int32)]
  cols = [("kseg", jnp.int32)]
  if cfg.score != "softmax":
    ins += [("iq", qrow, jnp.float32),
            ("ik", _head_row(bk, lambda b, kh, j, gi, i: (b, kh, j)), jnp.float32)]
    cols.append(("ik", jnp.float32))
  ins += [("do", qtile, dtype), ("drow", qrow, jnp.float32)]
  ins += [(f"stat{t}", qrow, jnp.float32) for t in range(K._num_stats(cfg.score))]
  if cfg.score == "lssar":
    ins.append(("c", qrow, jnp.float32))
  out_shape = jax.ShapeDtypeStruct((b, kvh, tk_p, d), jnp.float32)
  outs = [("dk", ktile, out_shape), ("dv", ktile, out_shape)]
  acc = ((bk, d), jnp.float32)
  return _Plan(f"attention_bwd_dkv_{cfg.score}",
               functools.partial(_dkv_kernel, cfg=cfg, groups=g, nq=nq),
               (b, kvh, tk_p // bk, g, nq), ins, outs, cols, [acc, acc],
               ("parallel", "parallel", "parallel", "arbitrary", "arbitrary"))


# ---------------------------------------------------------------------------------------
# Forward / backward wrappers (custom_vjp; residuals: the padded output and the row stats).

def _operands(cfg, q, k, v, segment_ids):
  """Padded [B, H, T, D] operands and lane-dense per-row values."""
  b, h = q.shape[0], q.shape[2]
  (q_t, k_t, v_t, qseg, kseg), norms, tq_p, tk_p = K._prepare(cfg, q, k, v, segment_ids)
  args = dict(q=q_t, k=k_t, v=v_t, qseg=qseg.reshape(b, 1, tq_p), kseg=kseg)
  if norms:
    args.update(iq=norms[0].reshape(b, h, 1, tq_p), ik=norms[1])
  return args, tq_p, tk_p


def _forward(cfg, q, k, v, segment_ids):
  b, _, h, d = q.shape
  args, tq_p, tk_p = _operands(cfg, q, k, v, segment_ids)
  if cfg.score != "softmax" and cfg.has_segments:
    (args["n"],) = _call(cfg, _count_plan(cfg, b, tq_p, tk_p), args)
  out, *stats = _call(cfg, _fwd_plan(cfg, b, h, k.shape[2], d, tq_p, tk_p, q.dtype), args)
  return out, stats


def _backward(cfg, q, k, v, segment_ids, out_t, stats, g):
  b, tq, h, d = q.shape
  kvh = k.shape[2]
  args, tq_p, tk_p = _operands(cfg, q, k, v, segment_ids)
  do_t = K._to_bhtd(g.astype(q.dtype), tq_p)
  d_row = jnp.sum(do_t.astype(jnp.float32) * out_t.astype(jnp.float32), -1)[:, :, None]
  args.update(do=do_t, drow=d_row, **{f"stat{t}": s for t, s in enumerate(stats)})
  dq, *c = _call(cfg, _dq_plan(cfg, b, h, kvh, d, tq_p, tk_p, q.dtype), args)
  if c:
    args["c"] = c[0]
  dk, dv = _call(cfg, _dkv_plan(cfg, b, h, kvh, d, tq_p, tk_p, q.dtype), args)

  def back(x_BxHxTxD, t, heads):
    return x_BxHxTxD.transpose(0, 2, 1, 3)[:, :t].reshape(b, t, heads, d)

  dq, dk, dv = back(dq, tq, h), back(dk, cfg.kv_len, kvh), back(dv, cfg.kv_len, kvh)
  if "iq" in args:  # the kernels returned d/dqhat, d/dkhat: apply the normalisation's VJP
    dq = jax.vjp(reference.l2_normalize, q)[1](dq)[0]
    dk = jax.vjp(reference.l2_normalize, k)[1](dk)[0]
  return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


_attention = K.custom_vjp_attention(_forward, _backward)


# ---------------------------------------------------------------------------------------
# Entry points.

def default_block(length: int, preferred: int) -> int:
  """One block (the length rounded up to 8) for sequences up to 128; else the preferred
  block, or the next power of two >= 128 that covers a shorter sequence. Powers of two keep
  forward and backward padding compatible."""
  l8 = max(8, -(-length // 8) * 8)
  if l8 <= LANES:
    return l8
  return min(preferred, 1 << (l8 - 1).bit_length())


def _blocks(score, q_len, kv_len, block_q, block_k, bwd_block_q, bwd_block_k):
  """(fwd bq, fwd bk, bwd bq, bwd bk): given blocks are used as given (forward ones also for
  the backward unless it has its own), missing ones default (TPU_FWD / TPU_BWD)."""
  fq = block_q or default_block(q_len, TPU_FWD[0])
  fk = block_k or default_block(kv_len, TPU_FWD[1])
  bq = bwd_block_q or (block_q or default_block(q_len, TPU_BWD[score][0]))
  bk = bwd_block_k or (block_k or default_block(kv_len, TPU_BWD[score][1]))
  return fq, fk, bq, bk


def _block_problem(name, blk, length, mosaic):
  if blk <= 0 or blk % 8:
    return f"{name}={blk} is not a positive multiple of 8"
  if mosaic and blk % LANES and blk < length:
    return (f"{name}={blk}: on TPU it must be a multiple of {LANES} unless one block covers "
            f"the sequence ({length}): per-row values are [1, {name.split('_')[-1]}] "
            "lane-dense blocks")
  return None


def supports(q, k, *, score="softmax", block_q=None, block_k=None, bwd_block_q=None,
             bwd_block_k=None, interpret=False) -> str | None:
  """Why the streaming kernels cannot take this call, or None when they can."""
  if q.dtype not in (jnp.float32, jnp.bfloat16):
    return f"dtype {q.dtype} is not float32/bfloat16"
  fq, fk, bq, bk = _blocks(score, q.shape[1], k.shape[1], block_q, block_k, bwd_block_q,
                           bwd_block_k)
  mosaic = interpret is False
  for name, blk, length in (("block_q", fq, q.shape[1]), ("block_k", fk, k.shape[1]),
                            ("bwd_block_q", bq, q.shape[1]), ("bwd_block_k", bk, k.shape[1])):
    why = _block_problem(name, blk, length, mosaic)
    if why:
      return why
  for a, b_, what in ((fq, bq, "block_q"), (fk, bk, "block_k")):
    if max(a, b_) % min(a, b_):
      return (f"forward and backward {what} ({a}, {b_}) must divide one another (both "
              "directions pad the sequence alike)")
  return None


def make_config(q, k, *, segment_ids=None, causal=True, score="softmax", q_offset=0,
                scale=None, p=15.0, reweight_offset_rows=3, **tiling) -> StreamConfig:
  """The StreamConfig a call runs with (tiling: tile_config's options)."""
  opts = ScoreOptions.make(q, k, segment_ids=segment_ids, causal=causal, score=score,
                           q_offset=q_offset, scale=scale, p=p,
                           reweight_offset_rows=reweight_offset_rows)
  return tile_config(opts, **tiling)


def tile_config(opts: ScoreOptions, *, block_q=None, block_k=None, bwd_block_q=None,
                bwd_block_k=None, interpret=False, vmem_limit_bytes=None) -> StreamConfig:
  """The shared maths options plus these kernels' blocks (TPU_FWD / TPU_BWD by default)."""
  fq, fk, bq, bk = _blocks(opts.score, opts.q_len, opts.kv_len, block_q, block_k,
                           bwd_block_q, bwd_block_k)
  return StreamConfig.with_tiling(
      opts, block_q=int(fq), block_k=int(fk), backend="tpu", bwd_block_q=int(bq),
      bwd_block_k=int(bk), interpret=interpret, vmem_limit_bytes=vmem_limit_bytes)


def flash_attention(q, k, v, segment_ids=None, *, causal=True, score="softmax", q_offset=0,
                    scale=None, p=15.0, reweight_offset_rows=3, block_q=None, block_k=None,
                    bwd_block_q=None, bwd_block_k=None, interpret=False,
                    vmem_limit_bytes=None):
  """Streaming TPU attention, forward and backward kernels (see the module docstring).

  q [B, Tq, H, D], k/v [B, Tk, K, D]; returns [B, Tq, H, D]. Arguments are validated by
  api.attention. interpret: False (Mosaic, on a TPU), True (Pallas' interpreter, any
  backend) or a pltpu.InterpretParams (TPU interpret mode). vmem_limit_bytes: Mosaic's
  scoped VMEM limit per kernel (None: the chip's default; only needed for blocks larger
  than the defaults). Raises ValueError where supports() names a problem.
  """
  why = supports(q, k, score=score, block_q=block_q, block_k=block_k,
                 bwd_block_q=bwd_block_q, bwd_block_k=bwd_block_k, interpret=interpret)
  if why:
    raise ValueError(f"TPU streaming attention cannot run this call: {why}")
  opts = ScoreOptions.make(q, k, segment_ids=segment_ids, causal=causal, score=score,
                           q_offset=q_offset, scale=scale, p=p,
                           reweight_offset_rows=reweight_offset_rows)
  return run(opts, q, k, v, segment_ids, block_q=block_q, block_k=block_k,
             bwd_block_q=bwd_block_q, bwd_block_k=bwd_block_k, interpret=interpret,
             vmem_limit_bytes=vmem_limit_bytes)


def run(opts: ScoreOptions, q, k, v, segment_ids=None, **tiling):
  """flash_attention with the maths options already built and supports() already checked
  (api.py does both)."""
  return _attention(tile_config(opts, **tiling), q, k, v, segment_ids)


def vmem_footprint(cfg: StreamConfig, *, batch, heads, kv_heads, head_dim, dtype) -> dict:
  """VMEM bytes per grid step of each kernel: its blocks (double-buffered by the pipeline,
  TPU tile padding included) plus its scratch, from the BlockSpecs the kernels run with.
  Not counted: Mosaic's own temporaries for the in-register [bq, bk] score blocks (a few
  fp32 blocks: 4 bq bk bytes each), which `compile()` for a TPU topology checks."""
  tq_p, tk_p = cfg.padded_lengths()
  args = (cfg, batch, heads, kv_heads, head_dim, tq_p, tk_p, dtype)
  bwd = cfg.backward()
  bargs = (bwd, batch, heads, kv_heads, head_dim, tq_p, tk_p, dtype)
  plans = [_fwd_plan(*args), _dq_plan(*bargs), _dkv_plan(*bargs)]
  if cfg.score != "softmax" and cfg.has_segments:
    plans.append(_count_plan(cfg, batch, tq_p, tk_p))
  return {p.name: _plan_bytes(p) for p in plans}
