"""attention(): one entry point, `implementation=` picks the backend (DESIGN.md, Kernels).

State (issue 3):
  xla         the jnp reference, all scores (the spec).
  interpret   the Pallas forward kernel (kernel.py) run by the Pallas interpreter; its
              backward recomputes through the reference. Verified against the reference.
  pallas_tpu  the same kernel compiled by Mosaic; needs a TPU backend. Not yet lowered on
              real hardware, so `auto` does not pick it.
  pallas_gpu  not written (no Mosaic GPU kernel yet): raises NotImplementedError.
  auto        the reference on every backend, logging once on accelerators.
"""

from __future__ import annotations

import logging

import jax

from pallas_kernels.attention import kernel, reference

SCORES = ("softmax", "lssa", "lssar")
IMPLEMENTATIONS = ("auto", "xla", "pallas_tpu", "pallas_gpu", "interpret")
_logged: set = set()


def _check_args(q, k, v, score, implementation, segment_ids):
  if score not in SCORES:
    raise ValueError(f"score must be one of {', '.join(SCORES)}; got {score!r}")
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"implementation must be one of {', '.join(IMPLEMENTATIONS)}; got "
                     f"{implementation!r}")
  if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
    raise ValueError(f"q, k, v must be [batch, len, heads, head_dim]; got shapes {q.shape}, "
                     f"{k.shape}, {v.shape}")
  if k.shape != v.shape:
    raise ValueError(f"k and v shapes differ: {k.shape} vs {v.shape}")
  if q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
    raise ValueError(f"q {q.shape} and k {k.shape} disagree on batch or head_dim")
  if q.shape[2] % k.shape[2]:
    raise ValueError(f"q heads ({q.shape[2]}) must be a multiple of kv heads ({k.shape[2]})")
  if segment_ids is not None and (q.shape[1] != k.shape[1] or segment_ids.shape != q.shape[:2]):
    raise ValueError(f"segment_ids {segment_ids.shape} needs q_len == kv_len and shape "
                     f"[batch, len] = {q.shape[:2]}")


def attention(q, k, v, *, causal: bool = True, score: str = "softmax", segment_ids=None,
              implementation: str = "auto", q_offset: int = 0, scale: float | None = None,
              p: float = 15.0, reweight_offset_rows: int = 3, block_q: int | None = None,
              block_k: int | None = None):
  """Causal (or full) attention with softmax / LSSA / LSSAR scores.

  q: [B, Tq, H, D]; k, v: [B, Tk, K, D] (GQA when K divides H). Returns [B, Tq, H, D].
  block_q / block_k: block sizes for the Pallas kernels (unused by the reference).
  """
  _check_args(q, k, v, score, implementation, segment_ids)
  if implementation == "pallas_gpu":
    raise NotImplementedError(
        "implementation='pallas_gpu': the Mosaic GPU attention kernel is not written yet "
        "(issue 3); valid now: auto, xla, interpret, pallas_tpu (on TPU).")
  if implementation in ("pallas_tpu", "interpret"):
    if not causal:
      raise NotImplementedError(f"implementation={implementation!r} supports causal=True only")
    if implementation == "pallas_tpu" and jax.default_backend() != "tpu":
      raise ValueError(f"implementation='pallas_tpu' needs a TPU backend; this is "
                       f"{jax.default_backend()!r}. Use 'interpret' to run the kernel on CPU.")
    return kernel.flash_attention(q, k, v, segment_ids, score=score, q_offset=q_offset,
                                  scale=scale, p=p, reweight_offset_rows=reweight_offset_rows,
                                  block_q=block_q or 128, block_k=block_k or 128,
                                  interpret=implementation == "interpret")
  if implementation == "auto" and jax.default_backend() != "cpu" and score not in _logged:
    _logged.add(score)
    logging.warning("attention(score=%r, implementation='auto'): no Pallas kernel for backend %r "
                    "yet; using the XLA reference", score, jax.default_backend())
  return reference.attention(q, k, v, causal=causal, score=score, segment_ids=segment_ids,
                             q_offset=q_offset, scale=scale, p=p,
                             reweight_offset_rows=reweight_offset_rows)
