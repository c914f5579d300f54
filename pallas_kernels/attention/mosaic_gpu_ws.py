"""Warp-specialised Mosaic GPU forward: two consumer warpgroups and a producer (Hopper).

The structure of jax's own Hopper attention (jax.experimental.pallas.ops.gpu.attention_mgpu,
FlashAttention-3 style), with mosaic_gpu.py's per-tile score maths (softmax, LSSA, LSSAR):

  * one CTA per (batch, q head, pair of query blocks); three warpgroups (`wg` 0, 1, 2);
  * wg 2 is the producer: it TMA-loads the key-side tiles (K^T, V, and the key vectors)
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
fully masked. LSSAR streams the keys twice (pass 1: K^T and vectors only; pass 2: all);
the ring's step counter runs on across the passes.

Outputs and residuals are mosaic_gpu._fwd_kernel's, so its backward kernels are used
unchanged. The probabilities go registers -> SMEM -> wgmma and K^T is a transposed copy, as
in mosaic_gpu.py, because GPU interpret mode (where this is tested, on CPU) runs wgmma only
on SMEM operands without transpose_ref; with a Hopper at hand, a register A operand for P
and `transpose_ref` for K are the next changes to measure. Never run on hardware.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.attention import mosaic_gpu as mg

plgpu = mg.plgpu
CONSUMERS = 2


def smem_bytes(score: str, itemsize: int, d: int, bq: int, bk: int, slots: int,
               segments: bool) -> int:
  """Shared memory of the warp-specialised forward (tiles and vectors)."""
  soft = score != "softmax"
  nr = len(mg.ROWS["fwd", score])
  return (itemsize * (CONSUMERS * (bq * d + bq * bk) + slots * 2 * bk * d)
          + 4 * CONSUMERS * (len(mg.STATS[score]) * bq + nr * bq + segments * bq)
          + 4 * slots * bk * (segments + soft))


def slots_for(score: str, itemsize: int, d: int, bq: int, bk: int, segments: bool):
  """The deepest ring (up to 4 slots, at least 2) that fits in shared memory, or None."""
  for slots in (4, 3, 2):
    if smem_bytes(score, itemsize, d, bq, bk, slots, segments) + mg._SMEM_SLACK <= mg.SMEM_LIMIT:  # pylint: disable=protected-access
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
  sc = dict(q=tile(c, bq, d), kt=tile(slots, d, bk), v=tile(slots, bk, d), p=tile(c, bq, bk),
            stat=f32(c, len(mg.STATS[cfg.score]), bq))
  if soft:
    sc.update(rows=f32(c, len(mg.ROWS["fwd", cfg.score]), bq), ik=f32(slots, bk))
  if seg:
    sc.update(qseg=i32(c, bq), kseg=i32(slots, bk))
  sc.update(qbar=mg._barrier(1 + seg + soft, c),  # pylint: disable=protected-access
            kvbar=mg._barrier(2 + seg + soft, slots),  # pylint: disable=protected-access
            consumed=mg._barrier(c, slots),  # pylint: disable=protected-access
            sched=mg._barrier(c))  # pylint: disable=protected-access
  if cfg.score == "lssar":   # pass 1 loads K^T (and vectors) only
    sc.update(kbar=mg._barrier(1 + seg + soft, slots))  # pylint: disable=protected-access
  return sc


def _kernel(cfg, *refs):
  soft = cfg.score != "softmax"
  names = ["q", "kt", "v"] + ["qseg", "kseg"] * cfg.has_segments + ["rows", "ik"] * soft
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
    if not cfg.interpret:
      plgpu.set_max_registers(40, action="decrease")

    def load(g, slot, full: bool):
      t = lax.rem(g, num_k) if passes == 2 else g
      mg.load_key_tiles(cfg, ins, sc, b, kvh, t, slot, with_v=full)

    def body(g, carry):
      slot = lax.rem(g, slots)

      @pl.when(g >= slots)
      def _():
        plgpu.barrier_wait(sc["consumed"].at[slot])   # both consumers released it
      if passes == 2:   # LSSAR: pass 1 (steps [0, num_k)) streams keys only
        pl.when(g >= num_k)(lambda: load(g, slot, True))
        pl.when(g < num_k)(lambda: load(g, slot, False))
      else:
        load(g, slot, True)
      return carry
    lax.fori_loop(0, total, body, None)

    def drain(g, carry):  # observe the last releases too (GPU interpret mode checks that
      plgpu.barrier_wait(sc["consumed"].at[lax.rem(g, slots)])   # every phase is seen)
      return carry
    lax.fori_loop(jnp.maximum(total - slots, 0), total, drain, None)

  # ------------------------------------------------------------------- consumers (wg 0, 1)
  @pl.when(wg < CONSUMERS)
  def _consumer():
    if not cfg.interpret:
      plgpu.set_max_registers(232, action="increase")
    i = CONSUMERS * pair + wg                       # this consumer's query block
    q_rows = pl.ds(i * bq, bq)
    q_sm, p_sm = sc["q"].at[wg], sc["p"].at[wg]
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
      plgpu.barrier_arrive(sc["sched"])
      plgpu.barrier_wait(sc["sched"])

    def qk(slot):
      """S = Q K^T; the tensor core is handed to the other consumer while it runs."""
      def body(acc_ref):
        plgpu.wgmma(acc_ref, q_sm, sc["kt"].at[slot])
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
      p_sm[...] = w.astype(p_sm.dtype)
      plgpu.commit_smem()
      sched()           # done with the score maths; wait until the tensor core is ours
      return mg._mma(p_sm, sc["v"].at[slot], (bq, d))  # pylint: disable=protected-access

    def end_without_pv():
      plgpu.commit_smem()
      sched()

    def step(g, carry, math_fn, masked):
      slot = lax.rem(g, slots)
      plgpu.barrier_wait((sc["kvbar"] if math_fn.pv else sc["kbar"]).at[slot])
      t = lax.rem(g, num_k) if passes == 2 else g
      carry = math_fn(qk(slot), t, slot, masked, carry)
      plgpu.barrier_arrive(sc["consumed"].at[slot])
      return carry

    def run_pass(math_fn, start, carry):
      def seg(masked):
        return lambda g, cr: step(g, cr, math_fn, masked)
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
