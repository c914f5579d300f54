"""attention(): one entry point, `implementation=` picks the backend (DESIGN.md, Kernels).

  xla         the jnp reference (reference.py), all scores: the spec.
  interpret   the Pallas kernels (kernel.py, forward and backward) run by the Pallas
              interpreter on any backend; verified against the reference on CPU.
  pallas_tpu  the streaming TPU kernels (tpu_streaming.py: both sequences streamed through
              the grid, VMEM per step independent of T, GQA dk/dv summed in-kernel) compiled
              by Mosaic; needs a TPU backend. Lowered and compiled for TPU topologies from
              CPU, never run on TPU hardware yet. Blocks: multiples of 128 unless one block
              covers the sequence.
  interpret_tpu  the pallas_tpu kernels in Pallas' interpreter on any backend (how they are
              tested on CPU).
  pallas_gpu  kernel.py's kernels through Pallas' Triton lowering on a CUDA GPU (deprecated
              upstream from JAX 0.11, kept as the tested GPU path); head_dim a power of
              two >= 16.
  pallas_mgpu the separate Mosaic GPU kernels (mosaic_gpu.py: Hopper wgmma + TMA,
              softmax, LSSA and LSSAR, forward and backward); 16-bit q/k/v, head_dim 64
              or 128 (192 single-buffered), an sm_90 GPU. block_q / block_k set its
              forward blocks (64, 128, 256); its backward keeps 64 x 64. Not yet run on
              hardware: auto does not pick it unless AUTO_GPU_KERNEL is flipped.
  interpret_mgpu  the pallas_mgpu kernels in Pallas' GPU interpret mode (simulated SMEM,
              barriers, TMA and wgmma) on any backend: how they are tested on CPU.
  auto        pallas_tpu on TPU (T <= AUTO_MAX_LEN = 2^24), AUTO_GPU_KERNEL on GPU, where
              the kernels support the call (falling back from pallas_mgpu to pallas_gpu),
              else the reference (the fallback is logged once per backend, score and
              reason).

Positions: query row r has 1-based position N = q_offset + r + 1, key j has position
j + 1; causal means key_pos <= query_pos. With segment_ids [B, T] (q_len == kv_len),
attention stays within equal ids, and for LSSA/LSSAR N_i is the number of keys row i can
see inside its segment (its position within a packed document), so a packed document
behaves exactly like the same document alone.
"""

from __future__ import annotations

import logging
import operator

import jax

from pallas_kernels.attention import kernel, mosaic_gpu, reference, tpu_streaming

SCORES = ("softmax", "lssa", "lssar")
# Longest sequence `auto` sends to the TPU kernels. VMEM no longer bounds it: the streaming
# kernels' VMEM per grid step is independent of T (it was 8192 while a head's whole K/V sat
# in VMEM). What remains: the kernels count N_i (visible keys, LSSA/LSSAR) in fp32, exact up
# to 2^24; their HBM use is linear in T.
AUTO_MAX_LEN = 1 << 24
IMPLEMENTATIONS = ("auto", "xla", "pallas_tpu", "pallas_gpu", "pallas_mgpu", "interpret",
                   "interpret_mgpu", "interpret_tpu")
# What `auto` runs on a GPU. The Mosaic GPU kernels (pallas_mgpu) are verified in interpret
# mode and by exporting the CUDA lowering from CPU, but have never run on a GPU: flip this
# to "pallas_mgpu" after tests/kernels/test_attention_mgpu.py -m gpu passes on a Hopper.
AUTO_GPU_KERNEL = "pallas_gpu"
_LOG = logging.getLogger(__name__)
_logged: set = set()


def _check_args(q, k, v, *, score, implementation, segment_ids, q_offset, block_q, block_k, p,
                reweight_offset_rows):
  if score not in SCORES:
    raise ValueError(f"score must be one of {', '.join(SCORES)}; got {score!r}")
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"implementation must be one of {', '.join(IMPLEMENTATIONS)}; got "
                     f"{implementation!r}")
  if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
    raise ValueError(f"q, k, v must be [batch, len, heads, head_dim]; got shapes {q.shape}, "
                     f"{k.shape}, {v.shape}")
  if k.shape != v.shape:
    raise ValueError(f"k and v shapes differ: k {k.shape} vs v {v.shape}")
  if q.shape[0] != k.shape[0]:
    raise ValueError(f"q and k disagree on batch: q {q.shape} vs k {k.shape}")
  if q.shape[3] != k.shape[3]:
    raise ValueError(f"q and k disagree on head_dim: q {q.shape} vs k {k.shape}")
  if q.shape[2] % k.shape[2]:
    raise ValueError(f"q heads ({q.shape[2]}) must be a multiple of kv heads ({k.shape[2]}) "
                     f"for GQA")
  if segment_ids is not None and (q.shape[1] != k.shape[1] or segment_ids.shape != q.shape[:2]):
    raise ValueError(f"segment_ids {segment_ids.shape} needs q_len == kv_len and shape "
                     f"[batch, len] = {q.shape[:2]}")
  try:
    ok = operator.index(q_offset) >= 0
  except TypeError:
    ok = False
  if not ok:
    raise ValueError(f"q_offset must be a static non-negative integer; got {q_offset!r}")
  if score == "lssar" and isinstance(p, (int, float)) and not p > 0:
    raise ValueError(f"p (the LSSAR power) must be > 0; got {p!r}")
  if score == "lssar" and (not isinstance(reweight_offset_rows, int) or reweight_offset_rows < 0):
    raise ValueError(f"reweight_offset_rows must be an int >= 0; got {reweight_offset_rows!r}")
  for name, blk in (("block_q", block_q), ("block_k", block_k)):
    if blk is not None and (not isinstance(blk, int) or blk <= 0 or blk % 8):
      raise ValueError(f"{name} must be a positive multiple of 8; got {blk!r}")


_KERNEL_BACKEND = {"pallas_gpu": "gpu", "interpret": "interpret"}


def _auto(backend: str, q, k, gpu_problem, mgpu_problem, tpu_problem):
  """(implementation, reason for falling back or None) for implementation='auto'.
  mgpu_problem / tpu_problem: callables giving the Mosaic GPU / TPU kernels' reason to
  refuse a call, or None."""
  if backend == "tpu":
    if max(q.shape[1], k.shape[1]) > AUTO_MAX_LEN:
      return "xla", f"length > {AUTO_MAX_LEN} (N_i is counted in fp32 in the kernels)"
    why = tpu_problem()
    return ("xla", why) if why else ("pallas_tpu", None)
  if backend == "gpu":
    if AUTO_GPU_KERNEL == "pallas_mgpu" and mgpu_problem() is None:
      return "pallas_mgpu", None
    return ("xla", gpu_problem) if gpu_problem else ("pallas_gpu", None)
  return "xla", f"no Pallas kernel for backend {backend!r}"


def attention(q, k, v, *, causal: bool = True, score: str = "softmax", segment_ids=None,
              implementation: str = "auto", q_offset: int = 0, scale: float | None = None,
              p: float = 15.0, reweight_offset_rows: int = 3, block_q: int | None = None,
              block_k: int | None = None, platform: str | None = None):
  """Attention with softmax / LSSA / LSSAR scores (TECHNIQUES.md 3.2).

  q: [B, Tq, H, D]; k, v: [B, Tk, K, D] (GQA when K divides H). Returns [B, Tq, H, D].
  scale: softmax logit scale (default 1/sqrt(D)); LSSA/LSSAR ignore it (they L2-normalise
    q and k and scale by log D log N_i). p, reweight_offset_rows: LSSAR only.
  block_q / block_k: Pallas block sizes (kernel.py: default 128, or one block for short
    sequences; pallas_tpu / interpret_tpu: default tpu_streaming.TPU_FWD / TPU_BWD, and on
    TPU multiples of 128 unless one block covers the whole sequence). For
    pallas_mgpu / interpret_mgpu: the forward's blocks (64, 128 or 256; default 64 x 128).
  platform: the platform the call is compiled for, 'cpu', 'gpu' or 'tpu' (default: this
    host's backend); `auto` and the named kernels' checks go by it, so a caller lowering for
    other devices (effjax.compile_check for a TPU topology from a CPU host) passes theirs.
  """
  _check_args(q, k, v, score=score, implementation=implementation, segment_ids=segment_ids,
              q_offset=q_offset, block_q=block_q, block_k=block_k, p=p,
              reweight_offset_rows=reweight_offset_rows)
  backend = platform or jax.default_backend()
  gpu_problem = kernel.gpu_supports(q, k) if backend == "gpu" else "not a GPU backend"
  for name, needs in (("pallas_tpu", "tpu"), ("pallas_gpu", "gpu"), ("pallas_mgpu", "gpu")):
    if implementation == name and backend != needs:
      raise ValueError(f"implementation={name!r} needs a {needs.upper()} backend; this is "
                       f"{backend!r}. Valid here: auto, xla, interpret, interpret_mgpu, "
                       "interpret_tpu.")
  if implementation == "pallas_gpu" and gpu_problem:
    raise ValueError(f"implementation='pallas_gpu' cannot run this call: {gpu_problem}. "
                     "Use implementation='auto' or 'xla'.")

  def mgpu_problem(interpret=False):
    return mosaic_gpu.supports(q, k, score, v=v, block_q=block_q, block_k=block_k,
                               segments=segment_ids is not None, interpret=interpret)

  def mgpu(interpret=False):
    return mosaic_gpu.flash_attention(q, k, v, segment_ids, causal=causal, score=score,
                                      q_offset=operator.index(q_offset), scale=scale, p=p,
                                      reweight_offset_rows=reweight_offset_rows,
                                      block_q=block_q, block_k=block_k, interpret=interpret)

  def tpu_problem(interpret=False):
    return tpu_streaming.supports(q, k, score=score, block_q=block_q, block_k=block_k,
                                  interpret=interpret)

  if implementation in ("pallas_tpu", "interpret_tpu"):
    why = tpu_problem(implementation == "interpret_tpu")
    if why:
      raise ValueError(f"implementation={implementation!r} cannot run this call: {why}. "
                       "Use implementation='auto' or 'xla'.")

  if implementation in ("pallas_mgpu", "interpret_mgpu"):
    interpret = implementation == "interpret_mgpu"
    why = mgpu_problem(interpret)
    if why:
      raise ValueError(f"implementation={implementation!r} cannot run this call: {why}. "
                       "Use implementation='auto', 'pallas_gpu' or 'xla'.")
    return mgpu(interpret)
  if implementation == "auto":
    implementation, why = _auto(backend, q, k, gpu_problem, mgpu_problem, tpu_problem)
    if implementation == "pallas_mgpu":
      return mgpu()
    if implementation == "xla" and (backend, score, why) not in _logged:
      _logged.add((backend, score, why))
      _LOG.log(logging.INFO if backend == "cpu" else logging.WARNING,
               "attention(score=%r, implementation='auto'): %s; using the XLA reference", score,
               why)
  if implementation in ("pallas_tpu", "interpret_tpu"):
    return tpu_streaming.flash_attention(
        q, k, v, segment_ids, causal=causal, score=score, q_offset=operator.index(q_offset),
        scale=scale, p=p, reweight_offset_rows=reweight_offset_rows, block_q=block_q,
        block_k=block_k, interpret=implementation == "interpret_tpu")
  if implementation in ("pallas_gpu", "interpret"):
    return kernel.flash_attention(q, k, v, segment_ids, causal=causal, score=score,
                                  q_offset=operator.index(q_offset), scale=scale, p=p,
                                  reweight_offset_rows=reweight_offset_rows, block_q=block_q,
                                  block_k=block_k, backend=_KERNEL_BACKEND[implementation])
  return reference.attention(q, k, v, causal=causal, score=score, segment_ids=segment_ids,
                             q_offset=q_offset, scale=scale, p=p,
                             reweight_offset_rows=reweight_offset_rows)
