"""attention(): one entry point, `implementation=` picks the backend (DESIGN.md, Kernels).

  xla         the jnp reference (reference.py), all scores: the spec.
  interpret   the Pallas kernels (kernel.py, forward and backward) run by the Pallas
              interpreter on any backend; verified against the reference on CPU.
  pallas_tpu  the same kernels compiled by Mosaic; needs a TPU backend (not yet run on
              real TPU hardware here).
  pallas_gpu  not written (no Mosaic GPU kernel yet): raises NotImplementedError.
  auto        pallas_tpu on TPU, else the reference (logged once per backend and score).

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

from pallas_kernels.attention import kernel, reference

SCORES = ("softmax", "lssa", "lssar")
AUTO_MAX_LEN = 8192  # see the VMEM note in kernel.py: about T <= 8k at head_dim 128
IMPLEMENTATIONS = ("auto", "xla", "pallas_tpu", "pallas_gpu", "interpret")
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


def attention(q, k, v, *, causal: bool = True, score: str = "softmax", segment_ids=None,
              implementation: str = "auto", q_offset: int = 0, scale: float | None = None,
              p: float = 15.0, reweight_offset_rows: int = 3, block_q: int | None = None,
              block_k: int | None = None):
  """Attention with softmax / LSSA / LSSAR scores (TECHNIQUES.md 3.2).

  q: [B, Tq, H, D]; k, v: [B, Tk, K, D] (GQA when K divides H). Returns [B, Tq, H, D].
  scale: softmax logit scale (default 1/sqrt(D)); LSSA/LSSAR ignore it (they L2-normalise
    q and k and scale by log D log N_i). p, reweight_offset_rows: LSSAR only.
  block_q / block_k: Pallas block sizes (default 128, or one block for short sequences);
    on TPU keep block_k a multiple of 128 unless it covers the whole sequence.
  """
  _check_args(q, k, v, score=score, implementation=implementation, segment_ids=segment_ids,
              q_offset=q_offset, block_q=block_q, block_k=block_k, p=p,
              reweight_offset_rows=reweight_offset_rows)
  backend = jax.default_backend()
  if implementation == "pallas_gpu":
    raise NotImplementedError(
        "implementation='pallas_gpu': the Mosaic GPU attention kernel is not written yet; "
        f"valid choices: {', '.join(c for c in IMPLEMENTATIONS if c != 'pallas_gpu')} "
        "(pallas_tpu on TPU only).")
  if implementation == "pallas_tpu" and backend != "tpu":
    raise ValueError(f"implementation='pallas_tpu' needs a TPU backend; this is {backend!r}. "
                     f"Valid here: auto, xla, interpret.")
  if implementation == "auto":
    # The kernels keep one head's whole K/V (or Q/dO) in VMEM: past AUTO_MAX_LEN they would
    # exceed the default Mosaic VMEM limit, so auto falls back to the reference there.
    fits = max(q.shape[1], k.shape[1]) <= AUTO_MAX_LEN
    implementation = "pallas_tpu" if backend == "tpu" and fits else "xla"
    if implementation == "xla" and (backend, score, fits) not in _logged:
      _logged.add((backend, score, fits))
      _LOG.log(logging.INFO if backend == "cpu" else logging.WARNING,
               "attention(score=%r, implementation='auto'): %s; using the XLA reference", score,
               f"no Pallas kernel for backend {backend!r}" if backend != "tpu" else
               f"length > {AUTO_MAX_LEN} exceeds the kernel's VMEM budget")
  if implementation in ("pallas_tpu", "interpret"):
    return kernel.flash_attention(q, k, v, segment_ids, causal=causal, score=score,
                                  q_offset=operator.index(q_offset), scale=scale, p=p,
                                  reweight_offset_rows=reweight_offset_rows, block_q=block_q,
                                  block_k=block_k, interpret=implementation == "interpret")
  return reference.attention(q, k, v, causal=causal, score=score, segment_ids=segment_ids,
                             q_offset=q_offset, scale=scale, p=p,
                             reweight_offset_rows=reweight_offset_rows)
