"""The maths of one attention call, shared by every kernel backend.

ScoreOptions holds what the kernels compute (score, mask, positions, scale, LSSAR's p and
offset rows, log d), built once from the call by `ScoreOptions.make`. Each backend keeps its
own tiling in a subclass (kernel.Config, tpu_streaming.StreamConfig, mosaic_gpu.Config),
made with `Config.with_tiling(opts, block_q=..., ...)`, so the kernels read cfg.score and
cfg.block_q alike. Frozen and hashable: a custom_vjp nondiff argument.
"""

from __future__ import annotations

import dataclasses
import math


@dataclasses.dataclass(frozen=True)
class ScoreOptions:
  """Static maths options of an attention call (positions: see api.py)."""
  score: str
  causal: bool
  has_segments: bool
  q_len: int
  kv_len: int
  q_offset: int
  scale: float       # softmax logit scale (LSSA/LSSAR ignore it)
  p: float           # LSSAR power
  offset_rows: int   # LSSAR: rows with N_i <= offset_rows use O_i = 0
  log_d: float       # log(head_dim), LSSA/LSSAR's temperature factor

  @classmethod
  def make(cls, q, k, *, segment_ids=None, causal=True, score="softmax", q_offset=0,
           scale=None, p=15.0, reweight_offset_rows=3) -> "ScoreOptions":
    """From q [B, Tq, H, D], k [B, Tk, K, D] and attention()'s arguments (validated there).
    segment_ids: only whether it is None matters."""
    d = q.shape[-1]
    if not p > 0:   # the kernels' masks rely on 0**p = 0 for masked weights
      raise ValueError(f"LSSAR's power p must be > 0; got {p}")
    return ScoreOptions(
        score=score, causal=bool(causal), has_segments=segment_ids is not None,
        q_len=q.shape[1], kv_len=k.shape[1], q_offset=int(q_offset),
        scale=float(1.0 / math.sqrt(d) if scale is None else scale), p=float(p),
        offset_rows=int(reweight_offset_rows), log_d=math.log(d))

  @classmethod
  def with_tiling(cls, opts: "ScoreOptions", **tiling):
    """A backend config (a subclass) from the shared options plus its own fields."""
    shared = {f.name: getattr(opts, f.name) for f in dataclasses.fields(ScoreOptions)}
    return cls(**shared, **tiling)

  def padded(self, multiple_q: int, multiple_k: int) -> tuple[int, int]:
    """Query / key lengths rounded up to the given block multiples."""
    return (-(-self.q_len // multiple_q) * multiple_q,
            -(-self.kv_len // multiple_k) * multiple_k)
