"""Warp-specialised Mosaic GPU attention (Hopper): a producer warpgroup and consumers.

The structure of jax's own Hopper attention (jax.experimental.pallas.ops.gpu.attention_mgpu,
FlashAttention-3 style), with mosaic_gpu.py's per-tile maths (softmax, LSSA, LSSAR).

Forward:
  * one CTA per (batch, q head, pair of query blocks); three warpgroups (`wg` 0, 1, 2);
  * wg 2 is the producer: it TMA-loads the key-side tiles (K, V, and the key vectors)
    into a ring of `slots` buffers, refilling a slot once both consumers have released it
    (a `consumed` barrier per slot with two arrivals);
  * wg 0 and wg 1 are consumers, each owning 64 query rows: wait for a slot, S = Q K^T on
    the tensor core, the score maths in registers, P V on the tensor core, release the slot;
  * a schedule barrier (two arrivals) makes the consumers take turns on the tensor core
    ("ping-pong"): while one runs its wgmma the other does its softmax / softplus, so the
    special-function work overlaps the matrix work. wg 1 starts one phase behind and wg 0
    catches up at the end, as in attention_mgpu.
  Both consumers run the same number of key steps (the larger of their two causal limits):
  the producer's ring then needs no epilogue, and the extra block of the lower consumer is
  fully masked. LSSAR streams the keys twice (pass 1: K and vectors only; pass 2: all);
  the ring's step counter runs on across the passes. Outputs and residuals are
  mosaic_gpu._fwd_kernel's.

Backward (dq and dk/dv, mosaic_gpu.py's dq_tile / dkv_tile maths): a producer streams the
other sequence's tiles (dq: K, V and key vectors; dk/dv: Q, dO and the
per-query factors) into a ring, and one or two consumers each own a 64-row block (two
where a ring of >= 2 slots still fits in shared memory, else one: see bwd_plan; at the
default 64 x 64 blocks two up to head_dim 128 on a Hopper, up to 64 in interpret mode)
and share every streamed tile. A consumer with fewer steps than the ring carries
(causal limits, a block of padding) observes and releases the rest without work, or (dk/dv
under a causal mask) computes fully masked tiles that add exact zeros. No ping-pong.

Operands (`copies`): on a Hopper, K, V, Q and dO tiles are read as wgmma B operands through
`transpose_ref` views (no XLA transposes, no transposed copies in SMEM) and P / dS^T are
register A operands (no SMEM round trip), as in attention_mgpu; the freed shared memory
gives the backward two consumers at head_dim 128. GPU interpret mode runs wgmma only on
untransposed SMEM operands, so there (`interpret=True`) the kernels take transposed copies
and stage A operands in SMEM, as mosaic_gpu.py does everywhere: the same maths, other
operand plumbing.

Tested: equal to the single-warpgroup kernels in GPU interpret mode (outputs and all three
gradients; tests/kernels/test_attention_mgpu_ws.py, which needs PJRT_NPROC raised on small
hosts), and the CUDA lowering of the Hopper variant exported from CPU. The Hopper operand
variant is checked by that lowering only, and nothing here has run on hardware.
"""

from __future__ import annotations

import functools

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.attention import mosaic_gpu as mg

plgpu = mg.plgpu
CONSUMERS = 2


def copies(cfg) -> bool:
  """Whether these kernels take transposed copies and stage A operands in SMEM (GPU
  interpret mode, which runs wgmma only on untransposed SMEM operands) rather than read
  transpose_ref views and keep P / dS in registers (a Hopper)."""
  return bool(cfg.interpret)


def smem_bytes(score: str, itemsize: int, d: int, bq: int, bk: int, slots: int,
               segments: bool, copies: bool = False) -> int:
  """Shared memory of the warp-specialised forward (tiles and vectors); `copies`: with the
  consumers' SMEM P tiles (GPU interpret mode)."""
  soft = score != "softmax"
  nr = len(mg.ROWS["fwd", score])
  return (itemsize * (CONSUMERS * (bq * d + copies * bq * bk) + slots * 2 * bk * d)
          + 4 * CONSUMERS * (len(mg.STATS[score]) * bq + nr * bq + segments * bq)
          + 4 * slots * bk * (segments + soft))


def slots_for(score: str, itemsize: int, d: int, bq: int, bk: int, segments: bool,
              copies: bool = False):
  """The deepest ring (up to 4 slots, at least 2) that fits in shared memory, or None."""
  for slots in (4, 3, 2):
    need = smem_bytes(score, itemsize, d, bq, bk, slots, segments, copies)
    if need + mg._SMEM_SLACK <= mg.SMEM_LIMIT:  # pylint: disable=protected-access
      return slots
  return None


def _scratch(cfg, dtype, d: int):
  tr = mg._tile_transforms()  # pylint: disable=protected-access
  smem = plgpu.SMEM
  tile = lambda *shape: smem(shape, dtype, transforms=tr)
  f32 = lambda *shape: smem(shape, jnp.float32)
  i32 = lambda *shape: smem(shape, jnp.int32)
  bq, bk, slots = cfg.block_q, cfg.block_k, cfg.fwd_slots
  soft, seg = cfg.score != "softmax", cfg.has_segments
  c = CONSUMERS
  sc = dict(q=tile(c, bq, d), v=tile(slots, bk, d), stat=f32(c, len(mg.STATS[cfg.score]), bq))
  if copies(cfg):   # K^T copies and SMEM P tiles; on a Hopper K (transpose_ref), P in registers
    sc.update(kt=tile(slots, d, bk), p=tile(c, bq, bk))
  else:
    sc.update(k=tile(slots, bk, d))
  if soft:
    sc.update(rows=f32(c, len(mg.ROWS["fwd", cfg.score]), bq), ik=f32(slots, bk))
  if seg:
    sc.update(qseg=i32(c, bq), kseg=i32(slots, bk))
  sc.update(qbar=mg._barrier(1 + seg + soft, c),  # pylint: disable=protected-access
            kvbar=mg._barrier(2 + seg + soft, slots),  # pylint: disable=protected-access
            consumed=mg._barrier(c, slots),  # pylint: disable=protected-access
            sched=mg._barrier(c))  # pylint: disable=protected-access
  if cfg.score == "lssar":   # pass 1 loads K (or K^T) and the vectors only
    sc.update(kbar=mg._barrier(1 + seg + soft, slots))  # pylint: disable=protected-access
  return sc


def produce(total, slots: int, consumed, load):
  """The producer warpgroup's loop: step g's tiles go into ring slot g % slots once every
  consumer has released the slot's previous step (`consumed`, one arrival per consumer);
  load(g, slot) issues the TMA copies. Then it waits for the last releases too (GPU
  interpret mode checks that every barrier phase is observed)."""
  def body(g, carry):
    slot = lax.rem(g, slots)

    @pl.when(g >= slots)
    def _():
      plgpu.barrier_wait(consumed.at[slot])
    load(g, slot)
    return carry
  lax.fori_loop(0, total, body, None)

  def drain(g, carry):
    plgpu.barrier_wait(consumed.at[lax.rem(g, slots)])
    return carry
  lax.fori_loop(jnp.maximum(total - slots, 0), total, drain, None)


def consume(bar, consumed, slots: int, fn):
  """A consumer's loop body over ring steps: wait for step g's tiles (`bar`), fn(g, slot,
  carry) (which must be done with the slot: SMEM committed, wgmmas awaited), release it."""
  def body(g, carry):
    slot = lax.rem(g, slots)
    plgpu.barrier_wait(bar.at[slot])
    carry = fn(g, slot, carry)
    plgpu.barrier_arrive(consumed.at[slot])
    return carry
  return body


def idle(bar, consumed, slots: int):
  """A consumer's loop body for ring steps it has no work in: observe and release them."""
  return consume(bar, consumed, slots, lambda g, slot, carry: carry)


def _kernel(cfg, *refs):
  soft = cfg.score != "softmax"
  names = [*mg.TILE_INPUTS["fwd", copies(cfg)]] + ["qseg", "kseg"] * cfg.has_segments + [
      "rows", "ik"] * soft
  ins = dict(zip(names, refs))
  o_ref, stat_ref, sc = refs[len(names):]
  _, row_l, col_l = mg._layouts()  # pylint: disable=protected-access
  bq, bk, slots = cfg.block_q, cfg.block_k, cfg.fwd_slots
  d = ins["q"].shape[-1]
  b, h, pair = lax.axis_index("b"), lax.axis_index("h"), lax.axis_index("blk")
  wg = lax.axis_index("wg")
  kvh = lax.div(h, cfg.groups)
  passes = 2 if cfg.score == "lssar" else 1
  # Key steps per pass: the larger of the two consumers' limits (the other masks the rest).
  limits = [mg._q_block_limits(cfg, CONSUMERS * pair + c, bq, bk)[0]  # pylint: disable=protected-access
            for c in range(CONSUMERS)]
  num_k = functools.reduce(jnp.maximum, limits)
  total = passes * num_k

  # ------------------------------------------------------------------- producer (wg 2)
  @pl.when(wg == CONSUMERS)
  def _producer():
    _set_registers(cfg, producer=True)

    def load(g, slot, full: bool):
      t = lax.rem(g, num_k) if passes == 2 else g
      mg.load_key_tiles(cfg, ins, sc, b, kvh, t, slot, with_v=full)

    def load_step(g, slot):
      if passes == 2:   # LSSAR: pass 1 (steps [0, num_k)) streams keys only
        pl.when(g >= num_k)(lambda: load(g, slot, True))
        pl.when(g < num_k)(lambda: load(g, slot, False))
      else:
        load(g, slot, True)
    produce(total, slots, sc["consumed"], load_step)

  # ------------------------------------------------------------------- consumers (wg 0, 1)
  @pl.when(wg < CONSUMERS)
  def _consumer():
    _set_registers(cfg, producer=False)
    i = CONSUMERS * pair + wg                       # this consumer's query block
    q_rows = pl.ds(i * bq, bq)
    q_sm = sc["q"].at[wg]
    p_sm = sc["p"].at[wg] if "p" in sc else None   # None: P stays in registers
    qbar = sc["qbar"].at[wg]
    plgpu.copy_gmem_to_smem(ins["q"].at[b, q_rows, h], q_sm, qbar)
    if cfg.has_segments:
      plgpu.copy_gmem_to_smem(ins["qseg"].at[b, q_rows], sc["qseg"].at[wg], qbar)
    if soft:
      plgpu.copy_gmem_to_smem(ins["rows"].at[b, h, :, q_rows], sc["rows"].at[wg], qbar)
    plgpu.barrier_wait(qbar)
    qseg = mg._vec(cfg, sc["qseg"].at[wg], row_l) if cfg.has_segments else None  # pylint: disable=protected-access
    shape = (bq, bk)
    row = mg._row_reader(cfg, "fwd", sc["rows"].at[wg], "row", shape) if soft else None  # pylint: disable=protected-access
    c = cfg.scale * mg._LOG2E  # pylint: disable=protected-access
    # Steps of this consumer that need no mask (a prefix of each pass).
    _, n_full = mg._q_block_limits(cfg, i, bq, bk)  # pylint: disable=protected-access

    def sched():
      """The consumers' ping-pong: orders their turns on the tensor core, changes no value."""
      plgpu.barrier_arrive(sc["sched"].at[0])
      plgpu.barrier_wait(sc["sched"].at[0])

    def qk(slot):
      """S = Q K^T; the tensor core is handed to the other consumer while it runs."""
      def body(acc_ref):
        plgpu.wgmma(acc_ref, q_sm, mg.transposed(sc, "k", slot))
        sched()
        return acc_ref[...]
      return pl.run_scoped(body, plgpu.ACC(shape, jnp.float32))

    def mask_of(t, slot):
      kseg = mg._vec(cfg, sc["kseg"].at[slot], col_l) if cfg.has_segments else None  # pylint: disable=protected-access
      return mg._mask(cfg, shape, i * bq, t * bk, qseg, kseg)  # pylint: disable=protected-access

    def softplus_weights(s, t, slot, masked):
      ik = mg._vec(cfg, sc["ik"].at[slot], col_l)  # pylint: disable=protected-access
      a = mg._softplus(s * row("qc") * mg._cols(ik, shape))  # pylint: disable=protected-access
      return jnp.where(mask_of(t, slot), a, 0.0) if masked else a

    def pv(w, slot):
      """P V after the score maths: wait for the tensor core's turn, then the product."""
      p = mg.a_operand(w, p_sm, q_sm.dtype)
      plgpu.commit_smem()
      sched()           # done with the score maths; wait until the tensor core is ours
      return mg._mma(p, sc["v"].at[slot], (bq, d))  # pylint: disable=protected-access

    def end_without_pv():
      plgpu.commit_smem()
      sched()

    def run_pass(math_fn, start, carry):
      bar = sc["kvbar"] if math_fn.pv else sc["kbar"]

      def seg(masked):
        def fn(g, slot, cr):
          t = lax.rem(g, num_k) if passes == 2 else g
          return math_fn(qk(slot), t, slot, masked, cr)
        return consume(bar, sc["consumed"], slots, fn)
      lo = start + jnp.minimum(n_full, num_k)
      carry = lax.fori_loop(start, lo, seg(False), carry)
      return lax.fori_loop(lo, start + num_k, seg(True), carry)

    zeros_row = mg._cast(cfg, jnp.zeros((bq,), jnp.float32), row_l)  # pylint: disable=protected-access
    acc0 = mg._cast(cfg, jnp.zeros((bq, d), jnp.float32), mg._layouts()[0])  # pylint: disable=protected-access

    pl.when(wg == 1)(sched)   # wg 1 starts one phase behind: the consumers alternate

    if cfg.score == "softmax":
      def softmax_math(s, t, slot, masked, carry):
        m, l, acc = carry
        s = s * c
        if masked:
          mask = mask_of(t, slot)
          s = jnp.where(mask, s, mg._NEG)  # pylint: disable=protected-access
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        p = jnp.exp2(s - mg._rows(m_new, shape))  # pylint: disable=protected-access
        if masked:
          p = jnp.where(mask, p, 0.0)
        corr = jnp.exp2(m - m_new)
        l = l * corr + jnp.sum(p, axis=1)
        acc = acc * mg._rows(corr, (bq, d)) + pv(p, slot)  # pylint: disable=protected-access
        return m_new, l, acc
      softmax_math.pv = True
      m0 = mg._cast(cfg, jnp.full((bq,), mg._NEG, jnp.float32), row_l)  # pylint: disable=protected-access
      m, l, acc = run_pass(softmax_math, 0, (m0, zeros_row, acc0))
      out, stats = mg.softmax_finish(m, l, acc, (bq, d))
    elif cfg.score == "lssa":
      def lssa_math(s, t, slot, masked, carry):
        total_, acc = carry
        a = softplus_weights(s, t, slot, masked)
        return total_ + jnp.sum(a, axis=1), acc + pv(a, slot)
      lssa_math.pv = True
      tot, acc = run_pass(lssa_math, 0, (zeros_row, acc0))
      out, stats = mg.lssa_finish(tot, acc, (bq, d))
    else:
      def pass1_math(s, t, slot, masked, carry):
        tot_, amax = carry
        a = softplus_weights(s, t, slot, masked)
        end_without_pv()     # the slot's vectors were read; hand over the tensor core
        return tot_ + jnp.sum(a, axis=1), jnp.maximum(amax, jnp.max(a, axis=1))
      pass1_math.pv = False
      tot, amax = run_pass(pass1_math, 0, (zeros_row, zeros_row))
      lc = mg.lssar_row_constants(tot, amax, row, bq)

      def pass2_math(s, t, slot, masked, carry):
        acc, den = carry
        w = mg.lssar_weights(cfg, softplus_weights(s, t, slot, masked), lc, shape)
        return acc + pv(w, slot), den + jnp.sum(w, axis=1)
      pass2_math.pv = True
      acc, den = run_pass(pass2_math, num_k, (acc0, zeros_row))
      out, stats = mg.lssar_finish(acc, den, lc, (bq, d))

    pl.when(wg == 0)(sched)   # wg 0 catches up: both end on the same phase count

    q_sm[...] = out.astype(q_sm.dtype)
    for r, val in enumerate(stats):
      mg._store_f32(cfg, sc["stat"].at[wg, r], val)  # pylint: disable=protected-access
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(q_sm, o_ref.at[b, q_rows, h])
    plgpu.copy_smem_to_gmem(sc["stat"].at[wg], stat_ref.at[b, h, :, q_rows])
    plgpu.wait_smem_to_gmem(0)


def call(cfg, args, out_type, d: int, dtype, grid_q: int):
  """Runs the kernel on mosaic_gpu._forward's arguments; grid_q = padded Tq / block_q."""
  b, h = out_type[0].shape[0], out_type[0].shape[2]
  return mg._kernel_call(  # pylint: disable=protected-access
      cfg, functools.partial(_kernel, cfg), out_type, [_scratch(cfg, dtype, d)],
      (b, h, grid_q // CONSUMERS), f"mgpu_attention_fwd_ws_{cfg.score}",
      num_threads=CONSUMERS + 1, thread_name="wg")(*args)


# ---------------------------------------------------------------------------------------
# Backward: the dq and dk/dv kernels of mosaic_gpu.py (the same per-tile maths: dq_tile,
# dkv_tile) with a producer warpgroup streaming the other sequence's tiles into a ring
# and `nc` consumer warpgroups that each own one block (dq: 64 query rows; dk/dv: 64 key
# rows) and share every streamed tile, as in jax's attention_mgpu backward. No ping-pong
# (attention_mgpu's backward has none either): each consumer's wgmmas and maths follow
# one another.

def bwd_plan(kind: str, score: str, itemsize: int, d: int, bq: int, bk: int,
             segments: bool, copies: bool = False):
  """(consumers, ring slots) of the warp-specialised dq or dk/dv kernel: two consumers with
  the deepest ring (4, 3 or 2 slots) that fits in shared memory, else one, else None.
  `copies` (GPU interpret mode): with transposed copies in the ring and SMEM dS / P^T
  tiles (see `copies`); those fit two consumers at head_dim 64, one at 128."""
  fixed = mg.smem_bytes(kind, score, itemsize, d, bq, bk, 0, segments)   # one consumer's
  per_slot = mg.smem_bytes(kind, score, itemsize, d, bq, bk, 1, segments) - fixed
  if not copies:   # mosaic_gpu.smem_bytes counts both; a Hopper needs neither
    fixed -= itemsize * bq * bk * (2 if kind == "dkv" or score == "lssar" else 1)
    per_slot -= itemsize * d * (bk if kind == "dq" else 2 * bq)   # K^T, V^T -> V; Q^T, dO^T
  for consumers in (2, 1):
    for slots in (4, 3, 2):
      if consumers * fixed + slots * per_slot + mg._SMEM_SLACK <= mg.SMEM_LIMIT:  # pylint: disable=protected-access
        return consumers, slots
  return None


def _set_registers(cfg, producer: bool, consumers: int = CONSUMERS):
  """Moves registers from the producer (40 per thread) to the consumers (hardware only)."""
  if cfg.interpret:
    return
  if producer:
    plgpu.set_max_registers(40, action="decrease")
  else:
    plgpu.set_max_registers(232 if consumers == 2 else 240, action="increase")


def _bwd_scratch(cfg, kind: str, dtype, d: int, nc: int):
  """mosaic_gpu._scratch's backward buffers, the non-streamed ones once per consumer; on a
  Hopper without the transposed copies and the A-operand tiles (see `copies`)."""
  tr = mg._tile_transforms()  # pylint: disable=protected-access
  smem = plgpu.SMEM
  tile = lambda *shape: smem(shape, dtype, transforms=tr)
  f32 = lambda *shape: smem(shape, jnp.float32)
  i32 = lambda *shape: smem(shape, jnp.int32)
  bq, bk = cfg.bwd_block_q, cfg.bwd_block_k
  soft, seg = cfg.score != "softmax", cfg.has_segments
  nr = len(mg.ROWS[kind, cfg.score])
  barrier = mg._barrier  # pylint: disable=protected-access
  cp = copies(cfg)
  if kind == "dq":
    slots = cfg.dq_slots
    sc = dict(q=tile(nc, bq, d), do=tile(nc, bq, d), dq=f32(nc, bq, d), rows=f32(nc, nr, bq),
              k=tile(slots, bk, d))
    if cp:
      sc.update(ds=tile(nc, bq, bk), kt=tile(slots, d, bk), vt=tile(slots, d, bk))
      if cfg.score == "lssar":
        sc.update(sig=tile(nc, bq, bk))
    else:
      sc.update(v=tile(slots, bk, d))
    if cfg.score == "lssar":
      sc.update(c=f32(nc, bq))
    if soft:
      sc.update(ik=f32(slots, bk))
    if seg:
      sc.update(qseg=i32(nc, bq), kseg=i32(slots, bk))
    sc.update(qbar=barrier(3 + seg, nc), kvbar=barrier(2 + cp + seg + soft, slots),
              consumed=barrier(nc, slots))
    return sc
  slots = cfg.dkv_slots
  sc = dict(k=tile(nc, bk, d), v=tile(nc, bk, d), out=f32(nc, bk, d), q=tile(slots, bq, d),
            do=tile(slots, bq, d), rows=f32(slots, nr, bq))
  if cp:
    sc.update(pt=tile(nc, bk, bq), dst=tile(nc, bk, bq), qt=tile(slots, d, bq),
              dot=tile(slots, d, bq))
  if soft:
    sc.update(ik=f32(nc, bk))
  if seg:
    sc.update(kseg=i32(nc, bk), qseg=i32(slots, bq))
  sc.update(kbar=barrier(2 + seg + soft, nc), qbar=barrier(3 + 2 * cp + seg, slots),
            consumed=barrier(nc, slots))
  return sc


def _dq_kernel(cfg, nc: int, *refs):
  soft, lssar, seg = cfg.score != "softmax", cfg.score == "lssar", cfg.has_segments
  names = [*mg.TILE_INPUTS["dq", copies(cfg)], "rows"] + ["qseg", "kseg"] * seg + [
      "ik"] * soft
  ins = dict(zip(names, refs))
  dq_ref, *c_ref, sc = refs[len(names):]
  _, row_l, col_l = mg._layouts()  # pylint: disable=protected-access
  bq, bk, slots = cfg.bwd_block_q, cfg.bwd_block_k, cfg.dq_slots
  d = ins["q"].shape[-1]
  b, h, blk, wg = (lax.axis_index(n) for n in ("b", "h", "blk", "wg"))
  kvh = lax.div(h, cfg.groups)
  # Key steps: the most any consumer needs; the others idle through the rest.
  num_k = functools.reduce(jnp.maximum, [
      mg._q_block_limits(cfg, nc * blk + c, bq, bk)[0] for c in range(nc)])  # pylint: disable=protected-access

  @pl.when(wg == nc)
  def _producer():
    _set_registers(cfg, producer=True)
    produce(num_k, slots, sc["consumed"],
            lambda g, slot: mg.load_dq_key_tiles(cfg, ins, sc, b, kvh, g, slot))

  @pl.when(wg < nc)
  def _consumer():
    _set_registers(cfg, producer=False, consumers=nc)
    i = nc * blk + wg                       # this consumer's query block
    q_rows = pl.ds(i * bq, bq)
    own = {n: sc[n].at[wg] for n in ("q", "do", "rows", "ds", "dq", "sig", "c", "qseg")
           if n in sc}
    qbar = sc["qbar"].at[wg]
    plgpu.copy_gmem_to_smem(ins["q"].at[b, q_rows, h], own["q"], qbar)
    plgpu.copy_gmem_to_smem(ins["do"].at[b, q_rows, h], own["do"], qbar)
    plgpu.copy_gmem_to_smem(ins["rows"].at[b, h, :, q_rows], own["rows"], qbar)
    if seg:
      plgpu.copy_gmem_to_smem(ins["qseg"].at[b, q_rows], own["qseg"], qbar)
    plgpu.barrier_wait(qbar)
    own_k, n_full = mg._q_block_limits(cfg, i, bq, bk)  # pylint: disable=protected-access
    qseg = mg._vec(cfg, own["qseg"], row_l) if seg else None  # pylint: disable=protected-access
    shape = (bq, bk)
    row = mg._row_reader(cfg, "dq", own["rows"], "row", shape)  # pylint: disable=protected-access

    def tile(masked):
      def fn(t, slot, carry):
        s = mg._mma(own["q"], mg.transposed(sc, "k", slot), shape)  # pylint: disable=protected-access
        dp = mg._mma(own["do"], mg.transposed(sc, "v", slot), shape)  # pylint: disable=protected-access
        mask = None
        if masked:
          kseg = mg._vec(cfg, sc["kseg"].at[slot], col_l) if seg else None  # pylint: disable=protected-access
          mask = mg._mask(cfg, shape, i * bq, t * bk, qseg, kseg)  # pylint: disable=protected-access
        return mg.dq_tile(cfg, carry, s, dp, mask, row, sc["ik"].at[slot] if soft else None,
                          sc["k"].at[slot], own.get("ds"), own.get("sig"))
      return consume(sc["kvbar"], sc["consumed"], slots, fn)

    carry = lax.fori_loop(0, n_full, tile(False), mg.dq_carry0(cfg, bq, d))
    carry = lax.fori_loop(n_full, own_k, tile(True), carry)
    lax.fori_loop(own_k, num_k, idle(sc["kvbar"], sc["consumed"], slots), None)
    dq, c_row = mg.dq_finish(cfg, carry, row, bq, d)
    if lssar:
      mg._store_f32(cfg, own["c"], c_row)  # pylint: disable=protected-access
    mg._store_f32(cfg, own["dq"], dq)  # pylint: disable=protected-access
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(own["dq"], dq_ref.at[b, q_rows, h])
    if lssar:
      plgpu.copy_smem_to_gmem(own["c"], c_ref[0].at[b, h, q_rows])
    plgpu.wait_smem_to_gmem(0)


def _dkv_kernel(cfg, nc: int, *refs):
  soft, seg = cfg.score != "softmax", cfg.has_segments
  names = [*mg.TILE_INPUTS["dkv", copies(cfg)], "rows"] + ["qseg", "kseg"] * seg + [
      "ik"] * soft
  ins = dict(zip(names, refs))
  dk_ref, dv_ref, sc = refs[len(names):]
  _, row_l, col_l = mg._layouts()  # pylint: disable=protected-access
  bq, bk, slots = cfg.bwd_block_q, cfg.bwd_block_k, cfg.dkv_slots
  d = ins["k"].shape[-1]
  b, kvh, blk, wg = (lax.axis_index(n) for n in ("b", "h", "blk", "wg"))
  # The steps of the first consumer's key block: under a causal mask it sees every query
  # block a later key block sees (those earlier ones are fully masked for the others).
  total, head_and_block = mg.dkv_query_steps(cfg, nc * blk, kvh)

  @pl.when(wg == nc)
  def _producer():
    _set_registers(cfg, producer=True)
    produce(total, slots, sc["consumed"],
            lambda g, slot: mg.load_dkv_query_tiles(cfg, ins, sc, b, *head_and_block(g), slot))

  @pl.when(wg < nc)
  def _consumer():
    _set_registers(cfg, producer=False, consumers=nc)
    j = nc * blk + wg                       # this consumer's key block
    k_rows = pl.ds(j * bk, bk)
    own = {n: sc[n].at[wg] for n in ("k", "v", "pt", "dst", "out", "ik", "kseg") if n in sc}
    kbar = sc["kbar"].at[wg]
    plgpu.copy_gmem_to_smem(ins["k"].at[b, k_rows, kvh], own["k"], kbar)
    plgpu.copy_gmem_to_smem(ins["v"].at[b, k_rows, kvh], own["v"], kbar)
    if seg:
      plgpu.copy_gmem_to_smem(ins["kseg"].at[b, k_rows], own["kseg"], kbar)
    if soft:
      plgpu.copy_gmem_to_smem(ins["ik"].at[b, kvh, k_rows], own["ik"], kbar)
    plgpu.barrier_wait(kbar)
    kseg = mg._vec(cfg, own["kseg"], row_l) if seg else None  # pylint: disable=protected-access
    ik = mg._vec(cfg, own["ik"], row_l) if soft else None  # pylint: disable=protected-access
    shape = (bk, bq)
    masked = mg.dkv_masked(cfg)

    def fn(t, slot, carry):
      _, i = head_and_block(t)
      col = mg._row_reader(cfg, "dkv", sc["rows"], "col", shape, slot)  # pylint: disable=protected-access
      st = mg._mma(own["k"], mg.transposed(sc, "q", slot), shape)  # pylint: disable=protected-access
      dpt = mg._mma(own["v"], mg.transposed(sc, "do", slot), shape)  # pylint: disable=protected-access
      mask = None
      if masked:
        qseg = mg._vec(cfg, sc["qseg"].at[slot], col_l) if seg else None  # pylint: disable=protected-access
        mask = mg._mask(cfg, shape, i * bq, j * bk, qseg, kseg, transposed=True)  # pylint: disable=protected-access
      return mg.dkv_tile(cfg, carry, st, dpt, col, ik, mask, own.get("pt"), own.get("dst"),
                         sc["do"].at[slot], sc["q"].at[slot])

    n_own = jnp.where(j * bk < cfg.kv_len, total, 0)   # a key block of padding: no work
    carry = lax.fori_loop(0, n_own, consume(sc["qbar"], sc["consumed"], slots, fn),
                          mg.dkv_carry0(cfg, bk, d))
    lax.fori_loop(n_own, total, idle(sc["qbar"], sc["consumed"], slots), None)
    mg.dkv_store(cfg, carry, own["out"], dk_ref, dv_ref, b, k_rows, kvh)


def call_backward(cfg, kind: str, args, out_type, d: int, dtype, grid):
  """Runs the warp-specialised dq or dk/dv kernel on mosaic_gpu._backward's arguments;
  grid: the single-warpgroup kernel's (b, heads, blocks)."""
  nc = cfg.dq_consumers if kind == "dq" else cfg.dkv_consumers
  body = _dq_kernel if kind == "dq" else _dkv_kernel
  b, heads, blocks = grid
  return mg._kernel_call(  # pylint: disable=protected-access
      cfg, functools.partial(body, cfg, nc), out_type, [_bwd_scratch(cfg, kind, dtype, d, nc)],
      (b, heads, blocks // nc), f"mgpu_attention_bwd_{kind}_ws_{cfg.score}",
      num_threads=nc + 1, thread_name="wg")(*args)
