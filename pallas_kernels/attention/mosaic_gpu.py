"""Mosaic GPU (Pallas:MGPU, Hopper wgmma + TMA) attention: softmax, LSSA, LSSAR; fwd + bwd.

A separate implementation from kernel.py (which runs on GPU only through the deprecated
Triton lowering): `plgpu.kernel` programs that stage tiles in shared memory with TMA
copies (`copy_gmem_to_smem` + `Barrier`), multiply them with `wgmma` into fp32 `ACC`
accumulators (WGMMA register layout), and walk the other sequence in a `fori_loop` whose
next `num_slots - 1` tiles are already in flight (multi-buffered TMA). The math is
kernel.py's (its module docstring has the forward and backward of every score):

  softmax  online softmax in base 2 (log2 e folded into the logit scale, exp2), fp32
           row max / row sum / output accumulator; residual lse2 = m + log2(l) per row.
           Backward FlashAttention-2 style: a dq kernel (grid over query blocks, loop
           over key blocks) and a dk/dv kernel (grid over key blocks, loop over the
           query blocks of every q head of its GQA group, so dk/dv of a kv head are
           summed in-kernel). dS = P (dP - D) scale, D_i = dO_i . O_i.
  lssa     one pass: the raw q.k on the tensor core (16-bit operands, fp32 accumulation,
           exact products), times fp32 row/column factors x = s (c_i / |q_i|) / |k_j|
           with c_i = log d log N_i, softplus(x), row sums S_i, divide by S_i + eps.
           Backward: da = (dP - D) / Z; dS = da sigmoid(x) c; the kernels return
           d/dqhat, d/dkhat and the wrapper applies the L2 normalisation's VJP.
  lssar    two passes over the keys per query block: pass 1 (K^T only) the row sums S_i and
           row maxima of a_ij, so the row max m_i of ReLU(N a / Z - O) is known; pass 2
           accumulates (ReLU(N_i a_ij / Z_i - O_i) / m_i)^p v_j and its row sum (every
           term <= 1: finite at any length); rows with m_i <= FLOOR fall back to the LSSA
           weights. Backward as kernel.py: the dq kernel accumulates sum db sig k and
           sum sig k (two wgmma accumulators) and the row constants C_i = sum db b, which
           the dk/dv kernel reads; m_i is held constant.

Per-row factors that do not depend on the keys are precomputed by the wrapper in fp32
and streamed in as small vectors (1/|q|, c_i, 1/Z, D_i, ...), so the kernels do no
logs. N_i (LSSA, LSSAR) is analytic without segments; with segment_ids it is counted by XLA
in the wrapper (one fused compare-and-sum over [B, Tq, Tk], no [Tq, Tk] buffer).

Masks are built in-kernel from iotas (causal with q_offset, the ragged key tail) and
segment ids (a row vector of the query ids against a column vector of the key ids).
Causal block skipping: the loops stop at the last key (query) block that the mask
leaves visible, and blocks wholly below the diagonal skip the mask arithmetic.
Sequences are padded in the wrapper to block multiples (q with zeros; segment ids with
-1 / -2, which never match).

Why the operand layout looks like this (it keeps one code path that both the Mosaic
GPU lowering and the CPU interpreter accept): the interpreter (GPU interpret mode,
jax 0.10) runs wgmma only on two SMEM operands without `transpose_ref`, and implements
neither `layout_cast`, `plgpu.load` nor `run_state`. So
  * every B operand is stored in the orientation the product needs: K^T, V^T, Q^T and
    dO^T are transposed copies made by XLA in the wrapper (O(T D) bytes each), loaded
    by TMA next to the untransposed tiles;
  * the probabilities / dS go registers -> SMEM (16-bit) -> wgmma A operand (the
    documented safe path; these kernels use no register A operands: `a_operand`'s
    register path serves only the warp-specialised kernels on a Hopper);
  * accumulators are fresh `run_scoped(ACC)` per product, combined in registers;
  * layout casts and layout-carrying loads are emitted only when compiling for the
    GPU (`Config.interpret` False); they are value-preserving hints.
Warp-specialised versions of all three kernels (a producer and consumer warpgroups, FA3
style; the forward's two consumers ping-pong) are in mosaic_gpu_ws.py, opt-in
(`warp_specialized=True`); on a Hopper they read transpose_ref views and keep P / dS in
registers (interpret mode cannot check that variant: its lowering is checked). Neither
these nor those have run on hardware.

Requirements (see `supports`): 16-bit q/k/v of one dtype (bf16 or f16), head_dim a
multiple of 64 whose tiles fit the 227 KiB of shared memory (64 and 128 double-buffered,
192 single-buffered; 256 does not fit the dq kernel), blocks 64/128/256 (forward default
64 x 128, backward 64 x 64: one warpgroup holds a 64-row tile's accumulators in
registers), and a Hopper (sm_90) GPU when not interpreted.

Verified: on CPU in GPU interpret mode against reference.py (values and gradients,
tests/kernels/test_conformance.py), and the Mosaic GPU lowering by exporting for CUDA from
CPU (tests/kernels/test_attention_mgpu.py). Not verified: ptxas (register spills), timing,
and anything about the real asynchrony of TMA / wgmma (the interpreter completes copies at
issue, so missing fences or waits would not show there).

Synchronization (reviewed against the Pallas:MGPU reference; the interpreter cannot
check it): every register -> SMEM store that a wgmma or a TMA store reads is followed by
commit_smem(); every plain SMEM read of a pipeline slot (key/query vectors) comes before
a commit_smem() in the same step, before TMA refills the slot; every wgmma is awaited
(reading its ACC) before its operands' slot is refilled. Refills also rely on the
warpgroup barrier that Pallas inserts before each TMA issue (so all four warps have
passed their wgmma wait): never set CompilerParams(unsafe_no_auto_barriers=True) here.
Each barrier has at most one copy group in flight and is awaited once per completion.

jax versions: written for 0.10; _compiler_params, _barrier, _vec and _store_f32 keep it
working, with the same lowering, on 0.11 (Warpgroup lowering became the default: Lane is
pinned; 0.11.2: Barrier's num_barriers default became ()) and 0.12 (plgpu.load lost its
idx; untiled fp32 stores need plgpu.store(optimized=False)).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.attention import kernel, reference
from pallas_kernels.attention.options import ScoreOptions

try:  # Pallas:MGPU is part of jax; keep the module importable if a build lacks it.
  from jax.experimental.pallas import mosaic_gpu as plgpu
except ImportError:  # pragma: no cover
  plgpu = None

SCORES = ("softmax", "lssa", "lssar")
BLOCKS = (64, 128, 256)          # wgmma: M a multiple of 64, N <= 256, K a multiple of 64
FWD_BLOCKS = (64, 128)           # (block_q, block_k) defaults: one warpgroup, 64 rows
BWD_BLOCKS = (64, 64)
SMEM_LIMIT = 227 * 1024          # H100/H200 shared memory per block (Mosaic's max_smem_bytes)
_SMEM_SLACK = 4096               # barriers, alignment: Mosaic counted ~3 KiB above our sum
_NEG = -1e30
_LOG2E = math.log2(math.e)


# ---------------------------------------------------------------------------------------
# Interpret-mode plumbing (private in jax 0.10: look for a public name first).

def interpret_params():
  """An instance of the GPU interpret-mode parameters, or None if unavailable."""
  if plgpu is None:
    return None
  cls = getattr(plgpu, "InterpretParams", None) or getattr(plgpu, "InterpretGPUParams", None)
  if cls is None:
    try:  # pylint: disable-next=g-import-not-at-top
      from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams as cls
    except ImportError:
      return None
  return cls()


def reset_interpret_state():
  """Clears GPU interpret mode's global state; needed after an exception inside it."""
  try:  # pylint: disable-next=g-import-not-at-top
    from jax._src.pallas.mosaic_gpu.interpret import interpret_pallas_call
  except ImportError:
    return
  fn = getattr(interpret_pallas_call, "reset_gpu_interpret_mode_state", None)
  if fn is not None:
    fn()


# ---------------------------------------------------------------------------------------
# Static configuration.

@dataclasses.dataclass(frozen=True)
class Config(ScoreOptions):
  """The shared maths options plus these kernels' tiling (hashable: a custom_vjp nondiff
  argument)."""
  groups: int            # q heads per kv head
  block_q: int
  block_k: int
  bwd_block_q: int
  bwd_block_k: int
  fwd_slots: int
  dq_slots: int
  dkv_slots: int
  interpret: object      # False, True, or an interpret-params instance (e.g. detect_races)
  fwd_ws: bool = False   # the warp-specialised forward (mosaic_gpu_ws.py)
  dq_consumers: int = 0  # > 0: the warp-specialised dq kernel with that many consumers
  dkv_consumers: int = 0  # > 0: the same for the dk/dv kernel

  def backward(self) -> "Config":
    """The options of the backward kernels: the same (they read bwd_block_*)."""
    return self

  def padded_lengths(self) -> tuple[int, int]:
    # powers of two: the max is a common multiple (the warp-specialised kernels take
    # blocks in pairs)
    mq = max(self.block_q * (2 if self.fwd_ws else 1),
             self.bwd_block_q * max(self.dq_consumers, 1))
    mk = max(self.block_k, self.bwd_block_k * max(self.dkv_consumers, 1))
    return self.padded(mq, mk)


# Per-query fp32 factors the wrapper computes from q, the counts N_i and the forward's
# residuals, streamed into the kernels as a [B, H, len(rows), Tq_p] array, by kernel:
#   qc = log d log N_i / |q_i| (so x_ij = qc_i s_ij / |k_j|), delta = dO_i . O_i,
#   lse2 = base-2 log-sum-exp, rz = 1 / Z_i, g = c_i / Z_i, w = c_i / (Z_i |q_i|),
#   LSSAR: n = N_i, off = O_i, inv_m = 1 / max_j ReLU(..) (1 for fallback rows), fb = 1.0
#   for fallback rows, iden = 1 / den_i, cc = C_i (from the dq kernel, for dk/dv).
ROWS = {
    ("fwd", "softmax"): (),
    ("fwd", "lssa"): ("qc",),
    ("fwd", "lssar"): ("qc", "n", "off"),
    ("dq", "softmax"): ("lse2", "delta"),
    ("dq", "lssa"): ("qc", "delta", "g"),
    ("dq", "lssar"): ("qc", "delta", "n", "off", "rz", "inv_m", "fb", "iden", "g"),
    ("dkv", "softmax"): ("lse2", "delta"),
    ("dkv", "lssa"): ("qc", "delta", "rz", "w"),
    ("dkv", "lssar"): ("qc", "delta", "n", "off", "rz", "inv_m", "fb", "iden", "w", "cc"),
}
# The 16-bit tile inputs of each kernel in argument order, with transposed copies (True)
# or without (False). A name ending in "t" is the [B, N, D, T] transposed copy of the one
# without (kt = K^T): B operands for GPU interpret mode, which has no transpose_ref; the
# warp-specialised kernels on a Hopper read the untransposed tiles through transpose_ref.
TILE_INPUTS = {
    ("fwd", True): ("q", "kt", "v"), ("fwd", False): ("q", "k", "v"),
    ("dq", True): ("q", "k", "kt", "vt", "do"), ("dq", False): ("q", "k", "v", "do"),
    ("dkv", True): ("k", "v", "q", "qt", "do", "dot"), ("dkv", False): ("k", "v", "q", "do"),
}
# Forward residuals per query row (besides the output): [B, H, len(stats), Tq_p].
STATS = {"softmax": ("lse2",), "lssa": ("z",), "lssar": ("z", "inv_m", "den", "fb")}


def smem_bytes(kind: str, score: str, itemsize: int, d: int, bq: int, bk: int, slots: int,
               segments: bool) -> int:
  """Shared memory of one kernel (tiles and vectors; barriers: see _SMEM_SLACK)."""
  nr = len(ROWS[kind, score])
  soft = score != "softmax"
  lssar = score == "lssar"
  if kind == "fwd":   # q, K^T and V per slot, P, stat staging, vectors
    return (itemsize * (bq * d + slots * 2 * bk * d + bq * bk)
            + 4 * (len(STATS[score]) * bq + nr * bq + segments * bq
                   + slots * bk * (segments + soft)))
  if kind == "dq":    # q, dO, (K, K^T, V^T) per slot, dS (LSSAR: two), fp32 dq staging
    return (itemsize * (2 * bq * d + slots * 3 * bk * d + (1 + lssar) * bq * bk) + 4 * bq * d
            + 4 * (nr * bq + lssar * bq + segments * bq + slots * bk * (segments + soft)))
  # dkv: k, v, (Q, Q^T, dO, dO^T) per slot, P^T, dS^T, one fp32 staging tile, vectors
  return (itemsize * (2 * bk * d + slots * 4 * bq * d + 2 * bk * bq) + 4 * bk * d
          + 4 * (slots * (nr + segments) * bq + bk * (segments + soft)))


def _slots(kind, score, itemsize, d, bq, bk, segments) -> int | None:
  """Double-buffer when it fits in shared memory, else single-buffer, else None."""
  for slots in (2, 1):
    if smem_bytes(kind, score, itemsize, d, bq, bk, slots, segments) + _SMEM_SLACK <= SMEM_LIMIT:
      return slots
  return None


def default_blocks(q_len: int, kv_len: int) -> tuple[int, int, int, int]:
  """(block_q, block_k, bwd_block_q, bwd_block_k): the Hopper defaults, shrunk to 64 for
  sequences that fit one 64-block (less padding)."""
  fit = lambda length, b: 64 if length <= 64 else b
  return (fit(q_len, FWD_BLOCKS[0]), fit(kv_len, FWD_BLOCKS[1]), fit(q_len, BWD_BLOCKS[0]),
          fit(kv_len, BWD_BLOCKS[1]))


def _on_hopper() -> str | None:
  dev = jax.devices()[0]
  cc = getattr(dev, "compute_capability", None)
  if cc is None:
    return None
  if not str(cc).startswith("9."):
    return (f"the Mosaic GPU kernels use Hopper wgmma (compute capability 9.x); this "
            f"device ({dev.device_kind}) is {cc}")
  return None


def supports(q, k, score: str = "softmax", *, v=None, block_q=None, block_k=None,
             bwd_block_q=None, bwd_block_k=None, segments: bool = False,
             interpret: bool = False, warp_specialized: bool = False) -> str | None:
  """Why these operands cannot run on the Mosaic GPU kernels, or None when they can.
  interpret: for GPU interpret mode (any backend) rather than a Hopper GPU;
  warp_specialized: on the warp-specialised kernels (mosaic_gpu_ws.py)."""
  why = _supports(q, k, score, v, (block_q, block_k, bwd_block_q, bwd_block_k), segments,
                  interpret)
  if why or not warp_specialized:
    return why
  bq, bk = (b or dflt for b, dflt in zip((block_q, block_k), default_blocks(q.shape[1],
                                                                          k.shape[1])))
  slots = mosaic_gpu_ws.slots_for(score, jnp.dtype(q.dtype).itemsize, q.shape[-1], bq, bk,
                                  segments, copies=bool(interpret))
  if bq != 64 or q.shape[1] <= bq or not slots:
    return ("the warp-specialised forward needs block_q 64, more than one query block "
            f"(q_len {q.shape[1]}) and a ring of >= 2 K/V slots in shared memory (head_dim "
            f"{q.shape[-1]} with block_k {bk}; at the default block_k: head_dim <= 128)")
  return None


def _supports(q, k, score, v, blocks, segments, interpret) -> str | None:
  if plgpu is None:
    return "jax.experimental.pallas.mosaic_gpu is not importable in this jax build"
  if score not in SCORES:
    return f"score {score!r} has no Mosaic GPU kernel (supported: {', '.join(SCORES)})"
  dtypes = {jnp.dtype(x.dtype) for x in (q, k, v) if x is not None}
  if len(dtypes) > 1 or q.dtype not in (jnp.bfloat16, jnp.float16):
    names = "/".join(str(x.dtype) for x in (q, k, v) if x is not None)
    return (f"dtype {names}: wgmma needs 16-bit operands (bfloat16 or float16, q, k and "
            "v alike)")
  d = q.shape[-1]
  if d % 64 or d > 256:
    return f"head_dim {d} is not a multiple of 64 up to 256 (wgmma tiles)"
  defaults = default_blocks(q.shape[1], k.shape[1])
  blocks = [b or dflt for b, dflt in zip(blocks, defaults)]
  for name, b in zip(("block_q", "block_k", "bwd_block_q", "bwd_block_k"), blocks):
    if b not in BLOCKS:
      return f"{name}={b}: the Mosaic GPU kernels take blocks of {BLOCKS}"
  isz = jnp.dtype(q.dtype).itemsize
  for kind, bq, bk in (("fwd", blocks[0], blocks[1]), ("dq", blocks[2], blocks[3]),
                       ("dkv", blocks[2], blocks[3])):
    if _slots(kind, score, isz, d, bq, bk, segments) is None:
      need = smem_bytes(kind, score, isz, d, bq, bk, 1, segments) + _SMEM_SLACK
      return (f"the {kind} kernel with blocks {bq}x{bk} at head_dim {d} needs "
              f"{need // 1024} KiB of shared memory (limit {SMEM_LIMIT // 1024} KiB)")
  if not interpret:
    if jax.default_backend() != "gpu":
      return f"needs a GPU backend (this is {jax.default_backend()!r})"
    return _on_hopper()
  if interpret_params() is None:
    return "GPU interpret mode is not available in this jax build"
  return None


# ---------------------------------------------------------------------------------------
# In-kernel helpers.

def _barrier(num_arrivals: int, num_barriers: int = 1):
  """`num_barriers` TMA barriers (a 1-D barrier ref, indexed .at[slot]), each completing
  after `num_arrivals` copies (every copy_gmem_to_smem arrives once). num_barriers is
  always passed: jax 0.11.2 changed its default from 1 to () (a 0-d ref, no .at[0])."""
  return plgpu.Barrier(num_arrivals=num_arrivals, num_barriers=num_barriers)


def _load_takes_idx() -> bool:
  """Whether plgpu.load needs its positional idx: required in jax 0.10, optional and
  deprecated (a warning when passed) in 0.11, removed in 0.12 (load(src, *, layout))."""
  try:
    param = inspect.signature(plgpu.load).parameters.get("idx")
  except (TypeError, ValueError):  # pragma: no cover
    return True
  return param is not None and param.default is inspect.Parameter.empty


def _compiler_params():
  """approx_math (ex2/lg2.approx on hardware), and the Lane lowering semantics pinned:
  the only lowering these kernels were checked with (jax 0.10's default); jax 0.11
  made Warpgroup the default."""
  kw = dict(approx_math=True)
  lane = getattr(getattr(plgpu, "LoweringSemantics", None), "Lane", None)
  if lane is not None:
    kw["lowering_semantics"] = lane
  return plgpu.CompilerParams(**kw)


_LOAD_TAKES_IDX = plgpu is not None and _load_takes_idx()


def _tile_transforms():
  """SMEM tiling + 128-byte swizzle for 16-bit wgmma operands (minor dim % 64 == 0)."""
  return (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))


def _layouts():
  wg = plgpu.Layout.WGMMA
  return wg, wg.reduce(1), wg.reduce(0)   # tile, row vector [M], column vector [N]


def _cast(cfg: Config, x, layout):
  return x if cfg.interpret else plgpu.layout_cast(x, layout)


def _vec(cfg: Config, ref, layout):
  """A 1-D SMEM vector as a register array in `layout` (ROW: one value per tile row)."""
  if cfg.interpret:
    return ref[...]
  idx = ((),) if _LOAD_TAKES_IDX else ()
  return plgpu.load(ref, *idx, layout=layout)


def _store_f32(cfg: Config, ref, val):
  """ref[...] = val for the untiled fp32 staging buffers (WGMMA-layout registers into an
  SMEM ref without transforms). jax <= 0.11 lowers `ref[...] =` here with optimized=False;
  jax 0.12 lowers it with optimized=True, which has no bank-conflict-free plan for a
  [64, D] fp32 WGMMA tile and fails to lower, and adds plgpu.store(optimized=...) to ask
  for the 0.11 code instead."""
  if cfg.interpret or not hasattr(plgpu, "store"):
    ref[...] = val
  else:
    plgpu.store(ref, val, optimized=False)


def _iota(cfg: Config, shape, dim):
  return _cast(cfg, lax.broadcasted_iota(jnp.int32, shape, dim), _layouts()[0])


def _rows(x, shape):
  """A ROW vector broadcast along the tile's columns."""
  return lax.broadcast_in_dim(x, shape, [0])


def _cols(x, shape):
  """A COL vector broadcast along the tile's rows."""
  return lax.broadcast_in_dim(x, shape, [1])


def _mma(a_ref, b_ref, shape):
  """a @ b for an SMEM (or register) operand a [M, K] and an SMEM operand b [K, N], in
  fp32 (waits for completion)."""
  def body(acc_ref):
    plgpu.wgmma(acc_ref, a_ref, b_ref)
    return acc_ref[...]
  return pl.run_scoped(body, plgpu.ACC(shape, jnp.float32))


def transposed(sc: dict, name: str, slot):
  """The wgmma B operand name^T from ring slot `slot`: the transposed copy `name + "t"`
  where the scratch holds one (GPU interpret mode has no transpose_ref), else a
  transpose_ref view of the tile (the warp-specialised kernels on a Hopper)."""
  if name + "t" in sc:
    return sc[name + "t"].at[slot]
  return plgpu.transpose_ref(sc[name].at[slot], (1, 0))


def a_operand(val, ref, dtype):
  """A 16-bit wgmma A operand from the fp32 register tile `val`: staged through the SMEM
  tile `ref` (GPU interpret mode runs wgmma only on SMEM operands; the caller commits
  SMEM before the product), or kept in registers when ref is None (Hopper)."""
  if ref is None:
    return val.astype(dtype)
  ref[...] = val.astype(ref.dtype)
  return ref


def _softplus(x):
  # max(x, 0) + log(1 + e^-|x|): no log1p in the Mosaic GPU lowering; the absolute
  # error of log(1 + e) for tiny e is < 6e-8 (fp32 rounding of 1 + e), far below the
  # weights' scale (each visible weight is >= softplus(-log d log N) > 0, and rows are
  # divided by their sums).
  return jnp.maximum(x, 0.0) + jnp.log(1.0 + jnp.exp(-jnp.abs(x)))


def _pow(x, p: float):
  """x ** p for x >= 0 (integer_pow for integral p, else exp/log), as in kernel.py."""
  if float(p).is_integer() and p >= 1:
    return lax.integer_pow(x, int(p))
  if p == 0:
    return jnp.ones_like(x)
  return jnp.where(x > 0, jnp.exp(p * jnp.log(jnp.maximum(x, 1e-30))), 0.0)


def _mask(cfg: Config, shape, q0, k0, qseg=None, kseg=None, *, transposed=False):
  """Visibility of a [rows, cols] tile whose first query / key indices are q0 / k0.
  transposed: rows are keys and columns queries (the dk/dv kernel)."""
  qd, kd = (1, 0) if transposed else (0, 1)
  qi = _iota(cfg, shape, qd) + q0
  ki = _iota(cfg, shape, kd) + k0
  m = ki < cfg.kv_len
  if cfg.causal:
    m = m & (ki <= qi + cfg.q_offset)
  if cfg.has_segments:
    if transposed:
      m = m & (_cols(qseg, shape) == _rows(kseg, shape))
    else:
      m = m & (_rows(qseg, shape) == _cols(kseg, shape))
  return m


def _pipeline(slots: int, max_steps: int, lo, hi, load, bar, segments, carry):
  """Runs steps t in [lo, hi), the tiles of step t in slot (t - lo) % slots, with the
  loads of the next `slots - 1` steps in flight. `segments` is a list of (start, stop,
  fn) covering [lo, hi) in order; fn(t, slot, carry) -> carry must call
  plgpu.commit_smem() after its last plain read of the slot's SMEM and wait for its
  wgmmas (every _mma does), so the slot can be refilled by TMA as soon as fn returns.
  max_steps: a static bound on hi - lo (prefetches past it are not emitted: their static
  slices would be out of bounds even though they never run)."""
  for s in range(min(slots, max_steps)):
    @pl.when(lo + s < hi)
    def _prefetch():
      load(lo + s, s)

  def wrap(fn):
    def body(t, c):
      slot = lax.rem(t - lo, slots)
      plgpu.barrier_wait(bar.at[slot])
      c = fn(t, slot, c)

      @pl.when(t + slots < hi)
      def _refill():
        load(t + slots, slot)
      return c
    return body

  for start, stop, fn in segments:
    carry = lax.fori_loop(start, stop, wrap(fn), carry)
  return carry


def _kernel_call(cfg: Config, body, out_type, scratch, grid, name, **kernel_kw):
  """plgpu.kernel over grid (b, h, blk) in interpret mode or for the GPU, named for
  profiles; kernel_kw: e.g. num_threads / thread_name (mosaic_gpu_ws.py)."""
  kw = dict(kernel_kw)
  if cfg.interpret:
    kw["interpret"] = (interpret_params() if isinstance(cfg.interpret, bool)
                       else cfg.interpret)
  else:
    kw["compiler_params"] = _compiler_params()
  call = plgpu.kernel(body, out_type=out_type, scratch_types=scratch, grid=grid,
                      grid_names=("b", "h", "blk"), **kw)

  def named(*args):
    with jax.named_scope(name):
      return call(*args)
  return named


def _q_block_limits(cfg: Config, i, bq, bk):
  """(number of key blocks query block i sees, number of them needing no mask)."""
  nk = pl.cdiv(cfg.kv_len, bk)
  n = jnp.int32(nk)
  full = cfg.kv_len // bk            # key blocks without a ragged tail
  if cfg.causal:
    n = jnp.minimum(n, lax.div(cfg.q_offset + (i + 1) * bq + bk - 1, bk))
    full = jnp.minimum(full, lax.div(i * bq + cfg.q_offset + 1, bk))
  else:
    full = jnp.int32(full)
  if cfg.has_segments:
    full = jnp.int32(0)
  n = jnp.where(i * bq < cfg.q_len, n, 0)  # query blocks that are all padding: nothing
  return n, jnp.minimum(full, n)


def _row_reader(cfg: Config, kind: str, ref, orient: str, shape, slot=None):
  """read(name[, to_shape]): the named per-query factor (ROWS) from SMEM `ref`,
  broadcast to the tile `shape` along its columns (orient "row": queries are tile rows)
  or along its rows ("col": queries are tile columns); a 1-D shape gives the vector.
  Without a slot (factors of the program's own query block) all are loaded now, once,
  so a loop body using them reads registers (a ROW vector is ~2 registers per thread)."""
  names = ROWS[kind, cfg.score]
  _, row_l, col_l = _layouts()
  layout, bcast = (row_l, _rows) if orient == "row" else (col_l, _cols)
  load = lambda r: _vec(cfg, ref.at[r] if slot is None else ref.at[slot, r], layout)
  vecs = {name: load(r) for r, name in enumerate(names)} if slot is None else {}

  def read(name, to_shape=shape):
    x = vecs[name] if name in vecs else load(names.index(name))
    return x if len(to_shape) == 1 else bcast(x, to_shape)
  return read


def _lssar_u(a, row):
  """b = a / Z and u = N b - O (row: the named-factor reader)."""
  b = a * row("rz")
  return b, row("n") * b - row("off")


def _lssar_db(cfg: Config, a, mask, dp, row):
  """b, and d(loss)/db (kernel.py's _lssar_db): fallback rows pass dP through."""
  b, u = _lssar_u(a, row)
  inv_m = row("inv_m")
  dr = (dp - row("delta")) * row("iden")
  du = dr * (cfg.p * _pow(jnp.maximum(u, 0.0) * inv_m, cfg.p - 1)) * inv_m
  du = jnp.where(u > 0, du, 0.0)
  if mask is not None:
    du = jnp.where(mask, du, 0.0)
    dp = jnp.where(mask, dp, 0.0)
  return b, jnp.where(row("fb") > 0, dp, row("n") * du)


def load_key_tiles(cfg: Config, ins: dict, sc: dict, b, kvh, t, slot, *, with_v: bool):
  """TMA copies of key block t (K^T (or K, where the scratch has no K^T), and V, key
  segment ids, 1/|k| where used) into ring slot `slot` of the forward's scratch, arriving
  on kvbar (with V) or kbar (keys only)."""
  k_cols = pl.ds(t * cfg.block_k, cfg.block_k)
  bar = (sc["kvbar"] if with_v else sc["kbar"]).at[slot]
  if "kt" in sc:
    plgpu.copy_gmem_to_smem(ins["kt"].at[b, kvh, :, k_cols], sc["kt"].at[slot], bar)
  else:   # K itself, read through transpose_ref (see `transposed`)
    plgpu.copy_gmem_to_smem(ins["k"].at[b, k_cols, kvh], sc["k"].at[slot], bar)
  if with_v:
    plgpu.copy_gmem_to_smem(ins["v"].at[b, k_cols, kvh], sc["v"].at[slot], bar)
  if cfg.has_segments:
    plgpu.copy_gmem_to_smem(ins["kseg"].at[b, k_cols], sc["kseg"].at[slot], bar)
  if cfg.score != "softmax":
    plgpu.copy_gmem_to_smem(ins["ik"].at[b, kvh, k_cols], sc["ik"].at[slot], bar)


def softmax_finish(m, l, acc, out_shape):
  """(output, residual rows [lse2]) from the online softmax's row max, sum and output."""
  safe = jnp.where(l > 0, l, 1.0)
  lse2 = jnp.where(l > 0, m + jnp.log(safe) * (1.0 / math.log(2.0)), 0.0)
  return acc / _rows(safe, out_shape), [lse2]


def lssa_finish(total, acc, out_shape):
  """(output, residual rows [z]) from LSSA's row sums of weights and weighted values."""
  z = total + reference.EPS
  return acc / _rows(z, out_shape), [z]


def lssar_row_constants(total, amax, row, bq: int) -> dict:
  """Per-row constants of LSSAR's pass 2 from pass 1's row sums and maxima of the softplus
  weights a: Z, 1/Z, N, O, the fallback flag and 1/m with m the row max of ReLU(N a/Z - O)
  (monotone in a, so known before pass 2); row: the named-factor reader."""
  z = total + reference.EPS
  rz = 1.0 / z
  n, off = row("n", (bq,)), row("off", (bq,))
  r_max = jnp.maximum(n * (amax * rz) - off, 0.0)
  fb = r_max <= reference.FLOOR
  return dict(z=z, rz=rz, n=n, off=off, fb=fb, inv_m=1.0 / jnp.where(fb, 1.0, r_max))


def lssar_weights(cfg: Config, a, lc: dict, shape):
  """LSSAR's pass-2 weights (ReLU(N a/Z - O) / m)^p, or a/Z on fallback rows (masked
  entries: a = 0, so both are 0)."""
  bb = a * _rows(lc["rz"], shape)
  r = _pow(jnp.maximum(_rows(lc["n"], shape) * bb - _rows(lc["off"], shape), 0.0)
           * _rows(lc["inv_m"], shape), cfg.p)
  return jnp.where(_rows(lc["fb"], shape), bb, r)


def lssar_finish(acc, den, lc: dict, out_shape):
  """(output, residual rows [z, inv_m, den, fb]) from pass 2's sums."""
  den = jnp.where(lc["fb"], 1.0, den)
  out = acc / _rows(jnp.where(den > 0, den, 1.0), out_shape)
  return out, [lc["z"], lc["inv_m"], den, jnp.where(lc["fb"], 1.0, 0.0)]


# ---------------------------------------------------------------------------------------
# Forward kernel: grid (batch, q head, query block).

def _fwd_kernel(cfg: Config, *refs):
  soft = cfg.score != "softmax"
  names = [*TILE_INPUTS["fwd", True]] + ["qseg", "kseg"] * cfg.has_segments + [
      "rows", "ik"] * soft
  ins = dict(zip(names, refs))
  o_ref, stat_ref, sc = refs[len(names):]
  _, row_l, col_l = _layouts()
  bq, bk, slots = cfg.block_q, cfg.block_k, cfg.fwd_slots
  d = ins["q"].shape[-1]
  b, h, i = lax.axis_index("b"), lax.axis_index("h"), lax.axis_index("blk")
  kvh = lax.div(h, cfg.groups)
  q_rows = pl.ds(i * bq, bq)

  plgpu.copy_gmem_to_smem(ins["q"].at[b, q_rows, h], sc["q"], sc["qbar"].at[0])
  if cfg.has_segments:
    plgpu.copy_gmem_to_smem(ins["qseg"].at[b, q_rows], sc["qseg"], sc["qbar"].at[0])
  if soft:
    plgpu.copy_gmem_to_smem(ins["rows"].at[b, h, :, q_rows], sc["rows"], sc["qbar"].at[0])

  def load(t, slot, *, with_v=True):
    load_key_tiles(cfg, ins, sc, b, kvh, t, slot, with_v=with_v)

  num_k, n_full = _q_block_limits(cfg, i, bq, bk)
  max_k = pl.cdiv(cfg.kv_len, bk)
  plgpu.barrier_wait(sc["qbar"].at[0])
  qseg = _vec(cfg, sc["qseg"], row_l) if cfg.has_segments else None
  shape = (bq, bk)
  row = _row_reader(cfg, "fwd", sc["rows"], "row", shape) if soft else None
  c = cfg.scale * _LOG2E

  def scores(t, slot, masked):
    s = _mma(sc["q"], sc["kt"].at[slot], shape)
    mask = None
    if masked:
      kseg = _vec(cfg, sc["kseg"].at[slot], col_l) if cfg.has_segments else None
      mask = _mask(cfg, shape, i * bq, t * bk, qseg, kseg)
    return s, mask

  def weights(t, slot, masked):
    """softplus(log d log N_i cos_ij), zero where masked (LSSA / LSSAR)."""
    s, mask = scores(t, slot, masked)
    ik = _vec(cfg, sc["ik"].at[slot], col_l)
    a = _softplus(s * row("qc") * _cols(ik, shape))
    return jnp.where(mask, a, 0.0) if masked else a

  def pv(w, slot):
    sc["p"][...] = w.astype(sc["p"].dtype)
    plgpu.commit_smem()
    return _mma(sc["p"], sc["v"].at[slot], (bq, d))

  def softmax_step(masked):
    def fn(t, slot, carry):
      m, l, acc = carry
      s, mask = scores(t, slot, masked)
      s = s * c
      if masked:
        s = jnp.where(mask, s, _NEG)
      m_new = jnp.maximum(m, jnp.max(s, axis=1))
      p = jnp.exp2(s - _rows(m_new, shape))
      if masked:
        p = jnp.where(mask, p, 0.0)
      corr = jnp.exp2(m - m_new)
      l = l * corr + jnp.sum(p, axis=1)
      acc = acc * _rows(corr, (bq, d)) + pv(p, slot)
      return m_new, l, acc
    return fn

  def lssa_step(masked):
    def fn(t, slot, carry):
      total, acc = carry
      a = weights(t, slot, masked)
      return total + jnp.sum(a, axis=1), acc + pv(a, slot)
    return fn

  def run(step, init, *, with_v=True):
    segs = [(0, n_full, step(False)), (n_full, num_k, step(True))]
    bar = sc["kvbar"] if with_v else sc["kbar"]
    ld = functools.partial(load, with_v=with_v)
    return _pipeline(slots, max_k, 0, num_k, ld, bar, segs, init)

  zeros_row = _cast(cfg, jnp.zeros((bq,), jnp.float32), row_l)
  acc0 = _cast(cfg, jnp.zeros((bq, d), jnp.float32), _layouts()[0])
  if cfg.score == "softmax":
    m, l, acc = run(softmax_step,
                    (_cast(cfg, jnp.full((bq,), _NEG, jnp.float32), row_l), zeros_row, acc0))
    out, stats = softmax_finish(m, l, acc, (bq, d))
  elif cfg.score == "lssa":
    total, acc = run(lssa_step, (zeros_row, acc0))
    out, stats = lssa_finish(total, acc, (bq, d))
  else:
    # Pass 1 (keys only): row sums and row maxima of the softplus weights.
    def pass1(masked):
      def fn(t, slot, carry):
        total, amax = carry
        a = weights(t, slot, masked)
        plgpu.commit_smem()   # the slot's vectors were read: fence before TMA refills it
        return total + jnp.sum(a, axis=1), jnp.maximum(amax, jnp.max(a, axis=1))
      return fn

    total, amax = run(pass1, (zeros_row, zeros_row), with_v=False)
    lc = lssar_row_constants(total, amax, row, bq)

    def pass2(masked):
      def fn(t, slot, carry):
        acc, den = carry
        w = lssar_weights(cfg, weights(t, slot, masked), lc, shape)
        return acc + pv(w, slot), den + jnp.sum(w, axis=1)
      return fn

    acc, den = run(pass2, (acc0, zeros_row))
    out, stats = lssar_finish(acc, den, lc, (bq, d))

  sc["q"][...] = out.astype(sc["q"].dtype)      # q's tile is free: reuse it for the output
  for r, val in enumerate(stats):
    _store_f32(cfg, sc["stat"].at[r], val)
  plgpu.commit_smem()
  plgpu.copy_smem_to_gmem(sc["q"], o_ref.at[b, q_rows, h])
  plgpu.copy_smem_to_gmem(sc["stat"], stat_ref.at[b, h, :, q_rows])
  plgpu.wait_smem_to_gmem(0)


# ---------------------------------------------------------------------------------------
# Backward: dq kernel, grid (batch, q head, query block), loop over key blocks.

def load_dq_key_tiles(cfg: Config, ins: dict, sc: dict, b, kvh, t, slot):
  """TMA copies of key block t for the dq kernels (K, and K^T and V^T or, where the
  scratch has no transposed copies, V; the key segment ids and 1/|k| where used) into
  ring slot `slot`, arriving on kvbar."""
  k_rows = pl.ds(t * cfg.bwd_block_k, cfg.bwd_block_k)
  bar = sc["kvbar"].at[slot]
  plgpu.copy_gmem_to_smem(ins["k"].at[b, k_rows, kvh], sc["k"].at[slot], bar)
  if "kt" in sc:
    plgpu.copy_gmem_to_smem(ins["kt"].at[b, kvh, :, k_rows], sc["kt"].at[slot], bar)
    plgpu.copy_gmem_to_smem(ins["vt"].at[b, kvh, :, k_rows], sc["vt"].at[slot], bar)
  else:   # V itself, read through transpose_ref
    plgpu.copy_gmem_to_smem(ins["v"].at[b, k_rows, kvh], sc["v"].at[slot], bar)
  if cfg.has_segments:
    plgpu.copy_gmem_to_smem(ins["kseg"].at[b, k_rows], sc["kseg"].at[slot], bar)
  if cfg.score != "softmax":
    plgpu.copy_gmem_to_smem(ins["ik"].at[b, kvh, k_rows], sc["ik"].at[slot], bar)


def dq_carry0(cfg: Config, bq: int, d: int):
  """The dq loop's initial carry: the dq accumulator (LSSAR: two, and the row constants)."""
  acc0 = _cast(cfg, jnp.zeros((bq, d), jnp.float32), _layouts()[0])
  if cfg.score != "lssar":
    return acc0
  return acc0, acc0, _cast(cfg, jnp.zeros((bq,), jnp.float32), _layouts()[1])


def dq_tile(cfg: Config, carry, s, dp, mask, row, ik_ref, k_ref, ds_ref, sig_ref=None):
  """One key tile's contribution to dq (kernel.py's backward maths): dS from S = Q K^T and
  dP = dO V^T (mask: None for a tile without masked entries), multiplied by the slot's K
  (`k_ref`) on the tensor core, as an A operand staged in SMEM (`ds_ref`, LSSAR also
  `sig_ref`) or, where those are None, in registers (a_operand). ik_ref: the slot's 1/|k|
  (LSSA / LSSAR). Commits SMEM after the slot's last plain read and waits for its wgmmas,
  so the slot may be refilled when this returns."""
  bq, bk = shape = s.shape
  d = k_ref.shape[-1]
  if cfg.score == "softmax":
    ds = jnp.exp2(s * (cfg.scale * _LOG2E) - row("lse2")) * (dp - row("delta"))
  else:
    ik = _cols(_vec(cfg, ik_ref, _layouts()[2]), shape)
    x = s * row("qc") * ik
    sig_ik = jax.nn.sigmoid(x) * ik
    if mask is not None:
      sig_ik = jnp.where(mask, sig_ik, 0.0)
    if cfg.score == "lssa":
      ds = (dp - row("delta")) * sig_ik
    else:   # da = (db - C) / Z is affine in the row constant C: accumulate both parts
      a = _softplus(x)
      if mask is not None:
        a = jnp.where(mask, a, 0.0)
      bb, db = _lssar_db(cfg, a, mask, dp, row)
      acc_db, acc_1, c_row = carry
      a_db = a_operand(db * sig_ik, ds_ref, k_ref.dtype)
      a_sig = a_operand(sig_ik, sig_ref, k_ref.dtype)
      plgpu.commit_smem()
      return (acc_db + _mma(a_db, k_ref, (bq, d)), acc_1 + _mma(a_sig, k_ref, (bq, d)),
              c_row + jnp.sum(db * bb, axis=1))
  if mask is not None:
    ds = jnp.where(mask, ds, 0.0)
  a_ds = a_operand(ds, ds_ref, k_ref.dtype)
  plgpu.commit_smem()
  return carry + _mma(a_ds, k_ref, (bq, d))


def dq_finish(cfg: Config, carry, row, bq: int, d: int):
  """(dq or d/dqhat [bq, d], LSSAR's row constants C_i or None) from the loop's carry."""
  if cfg.score == "softmax":
    return carry * cfg.scale, None
  g = row("g", (bq, d))   # c_i / Z_i
  if cfg.score == "lssa":
    return carry * g, None
  acc_db, acc_1, c_row = carry
  return g * (acc_db - _rows(c_row, (bq, d)) * acc_1), c_row


def _dq_kernel(cfg: Config, *refs):
  soft = cfg.score != "softmax"
  lssar = cfg.score == "lssar"
  names = [*TILE_INPUTS["dq", True], "rows"] + ["qseg", "kseg"] * cfg.has_segments + [
      "ik"] * soft
  ins = dict(zip(names, refs))
  dq_ref, *c_ref, sc = refs[len(names):]
  _, row_l, col_l = _layouts()
  bq, bk, slots = cfg.bwd_block_q, cfg.bwd_block_k, cfg.dq_slots
  d = ins["q"].shape[-1]
  b, h, i = lax.axis_index("b"), lax.axis_index("h"), lax.axis_index("blk")
  kvh = lax.div(h, cfg.groups)
  q_rows = pl.ds(i * bq, bq)

  qbar = sc["qbar"].at[0]
  plgpu.copy_gmem_to_smem(ins["q"].at[b, q_rows, h], sc["q"], qbar)
  plgpu.copy_gmem_to_smem(ins["do"].at[b, q_rows, h], sc["do"], qbar)
  plgpu.copy_gmem_to_smem(ins["rows"].at[b, h, :, q_rows], sc["rows"], qbar)
  if cfg.has_segments:
    plgpu.copy_gmem_to_smem(ins["qseg"].at[b, q_rows], sc["qseg"], qbar)

  def load(t, slot):
    load_dq_key_tiles(cfg, ins, sc, b, kvh, t, slot)

  num_k, n_full = _q_block_limits(cfg, i, bq, bk)
  plgpu.barrier_wait(qbar)
  qseg = _vec(cfg, sc["qseg"], row_l) if cfg.has_segments else None
  shape = (bq, bk)
  row = _row_reader(cfg, "dq", sc["rows"], "row", shape)

  def step(masked):
    def fn(t, slot, carry):
      s = _mma(sc["q"], sc["kt"].at[slot], shape)
      dp = _mma(sc["do"], sc["vt"].at[slot], shape)
      mask = None
      if masked:
        kseg = _vec(cfg, sc["kseg"].at[slot], col_l) if cfg.has_segments else None
        mask = _mask(cfg, shape, i * bq, t * bk, qseg, kseg)
      return dq_tile(cfg, carry, s, dp, mask, row, sc["ik"].at[slot] if soft else None,
                     sc["k"].at[slot], sc["ds"], sc.get("sig"))
    return fn

  segs = [(0, n_full, step(False)), (n_full, num_k, step(True))]
  carry = _pipeline(slots, pl.cdiv(cfg.kv_len, bk), 0, num_k, load, sc["kvbar"], segs,
                    dq_carry0(cfg, bq, d))
  dq, c_row = dq_finish(cfg, carry, row, bq, d)
  if lssar:
    _store_f32(cfg, sc["c"], c_row)
  _store_f32(cfg, sc["dq"], dq)
  plgpu.commit_smem()
  plgpu.copy_smem_to_gmem(sc["dq"], dq_ref.at[b, q_rows, h])
  if lssar:
    plgpu.copy_smem_to_gmem(sc["c"], c_ref[0].at[b, h, q_rows])
  plgpu.wait_smem_to_gmem(0)


# ---------------------------------------------------------------------------------------
# Backward: dk/dv kernel, grid (batch, kv head, key block), loop over the query blocks of
# every q head in the GQA group. Tiles are transposed: rows are keys, columns queries.

def load_dkv_query_tiles(cfg: Config, ins: dict, sc: dict, b, h, i, slot):
  """TMA copies of query block i of q head h for the dk/dv kernels (Q, dO, their
  transposed copies where the scratch has them, the per-query factors, the query segment
  ids where used) into ring slot `slot`, on qbar."""
  bq = cfg.bwd_block_q
  q_rows = pl.ds(i * bq, bq)
  bar = sc["qbar"].at[slot]
  plgpu.copy_gmem_to_smem(ins["q"].at[b, q_rows, h], sc["q"].at[slot], bar)
  plgpu.copy_gmem_to_smem(ins["do"].at[b, q_rows, h], sc["do"].at[slot], bar)
  if "qt" in sc:   # else Q and dO are read through transpose_ref
    plgpu.copy_gmem_to_smem(ins["qt"].at[b, h, :, q_rows], sc["qt"].at[slot], bar)
    plgpu.copy_gmem_to_smem(ins["dot"].at[b, h, :, q_rows], sc["dot"].at[slot], bar)
  plgpu.copy_gmem_to_smem(ins["rows"].at[b, h, :, q_rows], sc["rows"].at[slot], bar)
  if cfg.has_segments:
    plgpu.copy_gmem_to_smem(ins["qseg"].at[b, q_rows], sc["qseg"].at[slot], bar)


def dkv_query_steps(cfg: Config, j, kvh):
  """The dk/dv loop over (q head of kv head kvh's group, query block) for key block j:
  (number of steps, step -> (q head, query block)). Causal: from the first query block
  that sees block j; key blocks that are all padding: no steps."""
  bq, bk = cfg.bwd_block_q, cfg.bwd_block_k
  nq = pl.cdiv(cfg.q_len, bq)
  first = 0
  if cfg.causal:
    first = lax.div(jnp.maximum(j * bk - cfg.q_offset, 0), bq)
  n_per = jnp.maximum(nq - first, 0)
  n_per = jnp.where(j * bk < cfg.kv_len, n_per, 0)

  def head_and_block(t):
    safe = jnp.maximum(n_per, 1)
    return kvh * cfg.groups + lax.div(t, safe), first + lax.rem(t, safe)
  return cfg.groups * n_per, head_and_block


def dkv_masked(cfg: Config) -> bool:
  """Whether the dk/dv tiles need a mask (static: causal, documents or a ragged key tail)."""
  return cfg.causal or cfg.has_segments or cfg.kv_len % cfg.bwd_block_k != 0


def dkv_carry0(cfg: Config, bk: int, d: int):
  zeros = _cast(cfg, jnp.zeros((bk, d), jnp.float32), _layouts()[0])
  return zeros, zeros


def dkv_tile(cfg: Config, carry, st, dpt, col, ik, mask, pt_ref, dst_ref, do_ref, q_ref):
  """One query tile's contribution to (dk, dv) (kernel.py's backward maths, transposed:
  rows are keys): P^T and dS^T from S^T = K Q^T and dP^T = V dO^T, multiplied by the
  slot's dO and Q on the tensor core as A operands staged in SMEM (`pt_ref`, `dst_ref`) or,
  where those are None, in registers. col: the slot's per-query factor
  reader; ik: this key block's 1/|k| (LSSA / LSSAR); mask: None when no tile is masked.
  Commits SMEM after the slot's last plain read and waits for its wgmmas."""
  dk, dv = carry
  shape = st.shape
  bk, d = shape[0], q_ref.shape[-1]
  if cfg.score == "softmax":
    pt = jnp.exp2(st * (cfg.scale * _LOG2E) - col("lse2"))
    dst = pt * (dpt - col("delta"))
  else:
    x = st * _rows(ik, shape) * col("qc")
    sig = jax.nn.sigmoid(x)
    a = _softplus(x)
    if cfg.score == "lssa":
      pt = a * col("rz")
      dst = (dpt - col("delta")) * sig * col("w")
    else:
      if mask is not None:
        a = jnp.where(mask, a, 0.0)
      bb, db = _lssar_db(cfg, a, mask, dpt, col)
      _, u = _lssar_u(a, col)
      r = _pow(jnp.maximum(u, 0.0) * col("inv_m"), cfg.p)
      pt = jnp.where(col("fb") > 0, bb, r) * col("iden")
      dst = (db - col("cc")) * sig * col("w")
  if mask is not None:
    pt = jnp.where(mask, pt, 0.0)
    dst = jnp.where(mask, dst, 0.0)
  a_pt = a_operand(pt, pt_ref, q_ref.dtype)
  a_dst = a_operand(dst, dst_ref, q_ref.dtype)
  plgpu.commit_smem()
  dv = dv + _mma(a_pt, do_ref, (bk, d))
  dk = dk + _mma(a_dst, q_ref, (bk, d))
  return dk, dv


def dkv_store(cfg: Config, carry, out_sm, dk_ref, dv_ref, b, k_rows, kvh):
  """Writes (dk, dv) (softmax: dk times the logit scale) through one fp32 staging tile."""
  dk, dv = carry
  if cfg.score == "softmax":
    dk = dk * cfg.scale
  for val, out_ref in ((dk, dk_ref), (dv, dv_ref)):   # one fp32 staging tile, used twice
    _store_f32(cfg, out_sm, val)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(out_sm, out_ref.at[b, k_rows, kvh])
    plgpu.wait_smem_to_gmem(0)


def _dkv_kernel(cfg: Config, *refs):
  soft = cfg.score != "softmax"
  names = [*TILE_INPUTS["dkv", True], "rows"] + ["qseg", "kseg"] * cfg.has_segments + [
      "ik"] * soft
  ins = dict(zip(names, refs))
  dk_ref, dv_ref, sc = refs[len(names):]
  _, row_l, col_l = _layouts()
  bq, bk, slots = cfg.bwd_block_q, cfg.bwd_block_k, cfg.dkv_slots
  d = ins["k"].shape[-1]
  b, kvh, j = lax.axis_index("b"), lax.axis_index("h"), lax.axis_index("blk")
  k_rows = pl.ds(j * bk, bk)

  kbar = sc["kbar"].at[0]
  plgpu.copy_gmem_to_smem(ins["k"].at[b, k_rows, kvh], sc["k"], kbar)
  plgpu.copy_gmem_to_smem(ins["v"].at[b, k_rows, kvh], sc["v"], kbar)
  if cfg.has_segments:
    plgpu.copy_gmem_to_smem(ins["kseg"].at[b, k_rows], sc["kseg"], kbar)
  if soft:
    plgpu.copy_gmem_to_smem(ins["ik"].at[b, kvh, k_rows], sc["ik"], kbar)

  total, head_and_block = dkv_query_steps(cfg, j, kvh)

  def load(t, slot):
    load_dkv_query_tiles(cfg, ins, sc, b, *head_and_block(t), slot)

  plgpu.barrier_wait(kbar)
  kseg = _vec(cfg, sc["kseg"], row_l) if cfg.has_segments else None
  ik = _vec(cfg, sc["ik"], row_l) if soft else None
  shape = (bk, bq)
  masked = dkv_masked(cfg)

  def fn(t, slot, carry):
    _, i = head_and_block(t)
    col = _row_reader(cfg, "dkv", sc["rows"], "col", shape, slot)
    st = _mma(sc["k"], sc["qt"].at[slot], shape)
    dpt = _mma(sc["v"], sc["dot"].at[slot], shape)
    mask = None
    if masked:
      qseg = _vec(cfg, sc["qseg"].at[slot], col_l) if cfg.has_segments else None
      mask = _mask(cfg, shape, i * bq, j * bk, qseg, kseg, transposed=True)
    return dkv_tile(cfg, carry, st, dpt, col, ik, mask, sc["pt"], sc["dst"],
                    sc["do"].at[slot], sc["q"].at[slot])

  nq = pl.cdiv(cfg.q_len, bq)
  carry = _pipeline(slots, cfg.groups * nq, 0, total, load, sc["qbar"], [(0, total, fn)],
                    dkv_carry0(cfg, bk, d))
  dkv_store(cfg, carry, sc["out"], dk_ref, dv_ref, b, k_rows, kvh)


# ---------------------------------------------------------------------------------------
# Wrappers.

def _pad_t(x, t_pad, value=0):
  widths = [(0, 0)] * x.ndim
  widths[1] = (0, t_pad - x.shape[1])
  return jnp.pad(x, widths, constant_values=value)


def _inv_norm(x):
  """1 / |x| in fp32 over the last axis (the reference's rsqrt(sum x^2 + 1e-24))."""
  x32 = x.astype(jnp.float32)
  return lax.rsqrt(jnp.sum(x32 * x32, axis=-1) + 1e-24)


def _visible_counts(cfg: Config, segment_ids, batch, tq_p):
  """N_i [B, Tq_p] (fp32): keys row i may see (padding rows: anything finite)."""
  r = jnp.arange(tq_p)
  if segment_ids is None:
    n = jnp.minimum(r + cfg.q_offset + 1, cfg.kv_len) if cfg.causal else jnp.full_like(
        r, cfg.kv_len)
    return jnp.broadcast_to(n.astype(jnp.float32), (batch, tq_p))
  seg = segment_ids.astype(jnp.int32)
  vis = seg[:, :, None] == seg[:, None, :]                      # [B, Tq, Tk], fused into
  if cfg.causal:                                                # the reduction by XLA
    vis = vis & (jnp.arange(cfg.kv_len)[None, None, :]
                 <= jnp.arange(cfg.q_len)[None, :, None] + cfg.q_offset)
  n = jnp.sum(vis, axis=-1).astype(jnp.float32)
  return _pad_t(n, tq_p, 1.0)


def _softplus_factors(cfg: Config, q_p, segment_ids) -> dict:
  """Per-query factors of LSSA / LSSAR that need no forward pass, each [B, H, Tq_p]."""
  b, tq_p = q_p.shape[:2]
  iq = _inv_norm(q_p).transpose(0, 2, 1)
  n = jnp.broadcast_to(_visible_counts(cfg, segment_ids, b, tq_p)[:, None, :], iq.shape)
  coef = cfg.log_d * jnp.log(jnp.maximum(n, 1.0))
  return dict(iq=iq, n=n, coef=coef, qc=iq * coef,
              off=jnp.where(n <= cfg.offset_rows, 0.0, 1.0))


def _tile_args(kind: str, copies: bool, **arrays) -> list:
  """The kernel's TILE_INPUTS from the padded [B, T, N, D] arrays (q, k, v, do)."""
  return [arrays[n] if n in arrays else arrays[n[:-1]].transpose(0, 2, 3, 1)
          for n in TILE_INPUTS[kind, copies]]


def _stack_rows(kind: str, score: str, f: dict):
  return jnp.stack([f[name] for name in ROWS[kind, score]], axis=2)   # [B, H, R, Tq_p]


def _segments(cfg: Config, segment_ids, tq_p, tk_p):
  seg = segment_ids.astype(jnp.int32)
  return (_pad_t(seg, tq_p, -1), _pad_t(seg[:, :cfg.kv_len], tk_p, -2))


def _scratch(cfg: Config, *, kind: str, dtype, d: int):
  """Scratch dict of a kernel (see smem_bytes for the budget)."""
  tr = _tile_transforms()
  smem = plgpu.SMEM
  tile = lambda *shape: smem(shape, dtype, transforms=tr)
  f32 = lambda *shape: smem(shape, jnp.float32)
  i32 = lambda *shape: smem(shape, jnp.int32)
  soft = cfg.score != "softmax"
  seg = cfg.has_segments
  nr = len(ROWS[kind, cfg.score])
  if kind == "fwd":
    bq, bk, slots = cfg.block_q, cfg.block_k, cfg.fwd_slots
    sc = dict(q=tile(bq, d), kt=tile(slots, d, bk), v=tile(slots, bk, d), p=tile(bq, bk),
              stat=f32(len(STATS[cfg.score]), bq))
    if soft:
      sc.update(rows=f32(nr, bq), ik=f32(slots, bk))
    if seg:
      sc.update(qseg=i32(bq), kseg=i32(slots, bk))
    sc.update(qbar=_barrier(1 + seg + soft),
              kvbar=_barrier(2 + seg + soft, slots))
    if cfg.score == "lssar":   # pass 1 loads K^T (and vectors) only
      sc.update(kbar=_barrier(1 + seg + soft, slots))
    return sc
  bq, bk = cfg.bwd_block_q, cfg.bwd_block_k
  if kind == "dq":
    slots = cfg.dq_slots
    sc = dict(q=tile(bq, d), do=tile(bq, d), k=tile(slots, bk, d), kt=tile(slots, d, bk),
              vt=tile(slots, d, bk), ds=tile(bq, bk), dq=f32(bq, d), rows=f32(nr, bq))
    if cfg.score == "lssar":
      sc.update(sig=tile(bq, bk), c=f32(bq))
    if soft:
      sc.update(ik=f32(slots, bk))
    if seg:
      sc.update(qseg=i32(bq), kseg=i32(slots, bk))
    sc.update(qbar=_barrier(3 + seg),
              kvbar=_barrier(3 + seg + soft, slots))
    return sc
  slots = cfg.dkv_slots
  sc = dict(k=tile(bk, d), v=tile(bk, d), q=tile(slots, bq, d), qt=tile(slots, d, bq),
            do=tile(slots, bq, d), dot=tile(slots, d, bq), rows=f32(slots, nr, bq),
            pt=tile(bk, bq), dst=tile(bk, bq), out=f32(bk, d))
  if soft:
    sc.update(ik=f32(bk))
  if seg:
    sc.update(kseg=i32(bk), qseg=i32(slots, bq))
  sc.update(kbar=_barrier(2 + seg + soft),
            qbar=_barrier(5 + seg, slots))
  return sc


def _forward(cfg: Config, q, k, v, segment_ids):
  b, _, h, d = q.shape
  tq_p, tk_p = cfg.padded_lengths()
  q_p, k_p, v_p = _pad_t(q, tq_p), _pad_t(k, tk_p), _pad_t(v, tk_p)
  args = _tile_args("fwd", not cfg.fwd_ws or mosaic_gpu_ws.copies(cfg), q=q_p, k=k_p, v=v_p)
  if cfg.has_segments:
    args += list(_segments(cfg, segment_ids, tq_p, tk_p))
  if cfg.score != "softmax":
    f = _softplus_factors(cfg, q_p, segment_ids)
    args += [_stack_rows("fwd", cfg.score, f), _inv_norm(k_p).transpose(0, 2, 1)]
  out_type = (jax.ShapeDtypeStruct((b, tq_p, h, d), q.dtype),
              jax.ShapeDtypeStruct((b, h, len(STATS[cfg.score]), tq_p), jnp.float32))
  if cfg.fwd_ws:
    return mosaic_gpu_ws.call(cfg, args, out_type, d, q.dtype, tq_p // cfg.block_q)
  scratch = [_scratch(cfg, kind="fwd", dtype=q.dtype, d=d)]
  return _kernel_call(cfg, functools.partial(_fwd_kernel, cfg), out_type, scratch,
                      (b, h, tq_p // cfg.block_q), f"mgpu_attention_fwd_{cfg.score}")(*args)


def _backward(cfg: Config, q, k, v, segment_ids, out_p, stats, g):
  b, tq, h, d = q.shape
  kvh = k.shape[2]
  tq_p, tk_p = cfg.padded_lengths()
  q_p, k_p, v_p = _pad_t(q, tq_p), _pad_t(k, tk_p), _pad_t(v, tk_p)
  do_p = _pad_t(g.astype(q.dtype), tq_p)
  f = {name: stats[:, :, r] for r, name in enumerate(STATS[cfg.score])}
  f["delta"] = jnp.sum(do_p.astype(jnp.float32) * out_p.astype(jnp.float32),
                       -1).transpose(0, 2, 1)
  if cfg.score != "softmax":
    f.update(_softplus_factors(cfg, q_p, segment_ids))
    f["rz"] = 1.0 / f["z"]
    f["g"] = f["coef"] * f["rz"]
    f["w"] = f["g"] * f["iq"]
  if cfg.score == "lssar":
    f["iden"] = 1.0 / jnp.where(f["den"] > 0, f["den"], 1.0)
  segs = list(_segments(cfg, segment_ids, tq_p, tk_p)) if cfg.has_segments else []
  ik = [_inv_norm(k_p).transpose(0, 2, 1)] if cfg.score != "softmax" else []
  tiles = dict(q=q_p, k=k_p, v=v_p, do=do_p)

  dq_out = jax.ShapeDtypeStruct((b, tq_p, h, d), jnp.float32)
  if cfg.score == "lssar":
    dq_out = (dq_out, jax.ShapeDtypeStruct((b, h, tq_p), jnp.float32))
  copies = not cfg.dq_consumers or mosaic_gpu_ws.copies(cfg)
  dq_args = (*_tile_args("dq", copies, **tiles), _stack_rows("dq", cfg.score, f), *segs, *ik)
  dq_grid = (b, h, tq_p // cfg.bwd_block_q)
  if cfg.dq_consumers:
    dq = mosaic_gpu_ws.call_backward(cfg, "dq", dq_args, dq_out, d, q.dtype, dq_grid)
  else:
    dq = _kernel_call(cfg, functools.partial(_dq_kernel, cfg), dq_out,
                      [_scratch(cfg, kind="dq", dtype=q.dtype, d=d)], dq_grid,
                      f"mgpu_attention_bwd_dq_{cfg.score}")(*dq_args)
  if cfg.score == "lssar":
    dq, f["cc"] = dq

  dkv_out = (jax.ShapeDtypeStruct((b, tk_p, kvh, d), jnp.float32),) * 2
  copies = not cfg.dkv_consumers or mosaic_gpu_ws.copies(cfg)
  dkv_args = (*_tile_args("dkv", copies, **tiles), _stack_rows("dkv", cfg.score, f), *segs,
              *ik)
  dkv_grid = (b, kvh, tk_p // cfg.bwd_block_k)
  if cfg.dkv_consumers:
    dk, dv = mosaic_gpu_ws.call_backward(cfg, "dkv", dkv_args, dkv_out, d, q.dtype, dkv_grid)
  else:
    dk, dv = _kernel_call(cfg, functools.partial(_dkv_kernel, cfg), dkv_out,
                          [_scratch(cfg, kind="dkv", dtype=q.dtype, d=d)], dkv_grid,
                          f"mgpu_attention_bwd_dkv_{cfg.score}")(*dkv_args)

  dq, dk, dv = dq[:, :tq], dk[:, :cfg.kv_len], dv[:, :cfg.kv_len]
  if cfg.score != "softmax":   # the kernels returned d/dqhat, d/dkhat
    dq = jax.vjp(reference.l2_normalize, q)[1](dq)[0]
    dk = jax.vjp(reference.l2_normalize, k)[1](dk)[0]
  return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


_attention = kernel.custom_vjp_attention(_forward, _backward, heads_first=False)


def flash_attention(q, k, v, segment_ids=None, *, causal=True, score="softmax", q_offset=0,
                    scale=None, p=15.0, reweight_offset_rows=3, block_q=None, block_k=None,
                    bwd_block_q=None, bwd_block_k=None, interpret=False,
                    warp_specialized=False):
  """Mosaic GPU attention, forward and backward (see the module docstring).

  q [B, Tq, H, D], k/v [B, Tk, K, D] (K divides H), 16-bit; segment_ids [B, T] (Tq == Tk).
  Returns [B, Tq, H, D] in q's dtype. p / reweight_offset_rows: LSSAR only.
  interpret=True runs GPU interpret mode (any backend); an interpret-params instance
  (e.g. InterpretGPUParams(detect_races=True)) is passed on. warp_specialized: the
  kernels with a producer and consumer warpgroups (mosaic_gpu_ws.py): the forward needs
  more than one query block of 64 and a ring that fits in shared memory (head_dim <= 128
  at the default blocks); opt-in until it has run on a Hopper. Raises ValueError with the
  reason when `supports` rejects the call.
  """
  why = supports(q, k, score, v=v, block_q=block_q, block_k=block_k, bwd_block_q=bwd_block_q,
                 bwd_block_k=bwd_block_k, segments=segment_ids is not None,
                 interpret=bool(interpret), warp_specialized=warp_specialized)
  if why:
    raise ValueError(f"Mosaic GPU attention cannot run this call: {why}")
  opts = ScoreOptions.make(q, k, segment_ids=segment_ids, causal=causal, score=score,
                           q_offset=q_offset, scale=scale, p=p,
                           reweight_offset_rows=reweight_offset_rows)
  return run(opts, q, k, v, segment_ids, block_q=block_q, block_k=block_k,
             bwd_block_q=bwd_block_q, bwd_block_k=bwd_block_k, interpret=interpret,
             warp_specialized=warp_specialized)


def run(opts: ScoreOptions, q, k, v, segment_ids=None, *, block_q=None, block_k=None,
        bwd_block_q=None, bwd_block_k=None, interpret=False, warp_specialized=False):
  """flash_attention with the maths options already built and supports() already checked
  (api.py does both)."""
  d = q.shape[-1]
  bq, bk, bbq, bbk = (x or dflt for x, dflt in zip(
      (block_q, block_k, bwd_block_q, bwd_block_k), default_blocks(q.shape[1], k.shape[1])))
  isz = jnp.dtype(q.dtype).itemsize
  score, seg = opts.score, opts.has_segments
  ws = bool(warp_specialized)   # opt-in until a Hopper has run it (see mosaic_gpu_ws.py)
  copies = bool(interpret)   # the warp-specialised kernels' operands (mosaic_gpu_ws.copies)
  ws_slots = mosaic_gpu_ws.slots_for(score, isz, d, bq, bk, seg, copies) if ws else None
  plans = {kind: (mosaic_gpu_ws.bwd_plan(kind, score, isz, d, bbq, bbk, seg, copies) if ws
                  else None)
           or (0, _slots(kind, score, isz, d, bbq, bbk, seg)) for kind in ("dq", "dkv")}
  cfg = Config.with_tiling(
      opts, groups=q.shape[2] // k.shape[2], block_q=bq, block_k=bk, bwd_block_q=bbq,
      bwd_block_k=bbk, fwd_ws=ws,
      fwd_slots=ws_slots if ws else _slots("fwd", score, isz, d, bq, bk, seg),
      dq_consumers=plans["dq"][0], dq_slots=plans["dq"][1],
      dkv_consumers=plans["dkv"][0], dkv_slots=plans["dkv"][1],
      interpret=interpret if interpret else False)
  return _attention(cfg, q, k, v, segment_ids)


# The warp-specialised kernels build on this module's helpers (and import it).
from pallas_kernels.attention import mosaic_gpu_ws  # pylint: disable=g-import-not-at-top,wrong-import-position
