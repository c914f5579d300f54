"""attention(): one entry point, `implementation=` picks the backend (docs/attention-kernels.md).

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
  pallas_mgpu_ws / interpret_mgpu_ws  the same with the warp-specialised kernels
              (mosaic_gpu_ws.py: a producer warpgroup and consumers, FA3 style), for
              more than one query block of 64 (head_dim <= 128 at default blocks).
              Opt-in: never run on hardware (slow in interpret mode: each warpgroup
              is a host thread).
  cudnn       softmax only: cuDNN flash attention (vendor.py: jax.nn.dot_product_attention,
              packed documents through cuDNN's packed layout on Hopper); bf16/f16,
              head_dim a multiple of 8 <= 128, an NVIDIA GPU.
  splash      softmax only: JAX's splash attention for TPU (vendor.py), T a multiple of 128.
  interpret_splash  splash in Pallas' interpreter on any backend (its tests on CPU).
  auto        the first backend of auto_order(platform) whose supports() accepts the call:
              splash for softmax then pallas_tpu on TPU (T <= AUTO_MAX_LEN = 2^24),
              cudnn for softmax then AUTO_GPU_KERNEL then pallas_gpu on GPU, and always
              xla last (the reasons of the skipped ones are logged once per platform,
              score and reasons; a softmax-only backend is passed over silently for
              LSSA/LSSAR).
  A named softmax-only vendor backend (cudnn, splash) that cannot run a call it was asked
  for (packed documents on a jax or GPU without cuDNN's packed layout, say) falls back to
  auto's pick, with the reason logged once, instead of failing the run.

The backends are a table, BACKENDS = {name: Backend(platform, supports, run)}: attention()
validates, builds a Problem (with the kernels' ScoreOptions, built once), and runs the named
backend (raising with its reason when it cannot run the call) or auto's pick.
unavailable_reason(name, platform) is the platform check config validation shares.

Positions: query row r has 1-based position N = q_offset + r + 1, key j has position
j + 1; causal means key_pos <= query_pos. With segment_ids [B, T] (q_len == kv_len),
attention stays within equal ids, and for LSSA/LSSAR N_i is the number of keys row i can
see inside its segment (its position within a packed document), so a packed document
behaves exactly like the same document alone.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import operator
from typing import Any, Callable

import jax

from pallas_kernels.attention import kernel, mosaic_gpu, reference, tpu_streaming, vendor
from pallas_kernels.attention.options import ScoreOptions

SCORES = ("softmax", "lssa", "lssar")
# Longest sequence `auto` sends to the TPU kernels. VMEM no longer bounds it: the streaming
# kernels' VMEM per grid step is independent of T (it was 8192 while a head's whole K/V sat
# in VMEM). What remains: the kernels count N_i (visible keys, LSSA/LSSAR) in fp32, exact up
# to 2^24; their HBM use is linear in T.
AUTO_MAX_LEN = 1 << 24
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


@dataclasses.dataclass(frozen=True)
class Problem:
  """One validated attention() call, as the backends' supports() and run() see it."""
  q: Any
  k: Any
  v: Any
  segment_ids: Any
  causal: bool
  score: str
  q_offset: int
  scale: float | None
  p: Any
  reweight_offset_rows: int
  block_q: int | None
  block_k: int | None

  @functools.cached_property
  def opts(self) -> ScoreOptions:
    """The kernels' maths options, built once per call (the reference takes the raw
    arguments: it applies its own scale default)."""
    return ScoreOptions.make(self.q, self.k, segment_ids=self.segment_ids, causal=self.causal,
                             score=self.score, q_offset=self.q_offset, scale=self.scale,
                             p=self.p, reweight_offset_rows=self.reweight_offset_rows)


@dataclasses.dataclass(frozen=True)
class Backend:
  """platform: the jax backend it needs (None: any). supports(problem): None, or why it
  cannot run the call. run(problem) -> [B, Tq, H, D]. auto_max_len: the longest sequence
  `auto` sends to it (None: no limit; a named call is not limited). scores: the score
  functions it implements (auto passes over it silently for others). falls_back: named,
  a call it cannot run goes to auto's pick (logged once) instead of raising."""
  platform: str | None
  supports: Callable[[Problem], str | None]
  run: Callable[[Problem], Any]
  auto_max_len: int | None = None
  scores: tuple[str, ...] = SCORES
  falls_back: bool = False


def _always(_: Problem) -> None:
  return None


def _reference(pb: Problem):
  return reference.attention(pb.q, pb.k, pb.v, causal=pb.causal, score=pb.score,
                             segment_ids=pb.segment_ids, q_offset=pb.q_offset, scale=pb.scale,
                             p=pb.p, reweight_offset_rows=pb.reweight_offset_rows)


def _blocks(pb: Problem) -> dict:
  return dict(block_q=pb.block_q, block_k=pb.block_k)


def _kernel(backend: str):
  """kernel.py's kernels through Pallas' interpreter or Triton lowering."""
  return lambda pb: kernel.run(pb.opts, pb.q, pb.k, pb.v, pb.segment_ids, backend=backend,
                               **_blocks(pb))


def _tpu(interpret: bool) -> tuple:
  """(supports, run) of the streaming TPU kernels, on Mosaic or in the interpreter."""
  supports = lambda pb: tpu_streaming.supports(pb.q, pb.k, score=pb.score, interpret=interpret,
                                               **_blocks(pb))
  run = lambda pb: tpu_streaming.run(pb.opts, pb.q, pb.k, pb.v, pb.segment_ids,
                                     interpret=interpret, **_blocks(pb))
  return supports, run


def _mgpu(interpret: bool, warp_specialized: bool = False) -> tuple:
  """(supports, run) of the Mosaic GPU kernels (or their warp-specialised versions), on a
  Hopper or in GPU interpret mode."""
  supports = lambda pb: mosaic_gpu.supports(pb.q, pb.k, pb.score, v=pb.v,
                                            segments=pb.segment_ids is not None,
                                            interpret=interpret,
                                            warp_specialized=warp_specialized, **_blocks(pb))
  run = lambda pb: mosaic_gpu.run(pb.opts, pb.q, pb.k, pb.v, pb.segment_ids,
                                  interpret=interpret, warp_specialized=warp_specialized,
                                  **_blocks(pb))
  return supports, run


def _cudnn() -> tuple:
  supports = lambda pb: vendor.supports_cudnn(pb.q, pb.k, pb.v, causal=pb.causal,
                                              q_offset=pb.q_offset,
                                              segments=pb.segment_ids is not None)
  run = lambda pb: vendor.cudnn_attention(pb.q, pb.k, pb.v, pb.segment_ids, causal=pb.causal,
                                          scale=pb.opts.scale)
  return supports, run


def _splash(interpret: bool) -> tuple:
  supports = lambda pb: vendor.supports_splash(pb.q, pb.k, q_offset=pb.q_offset)
  run = lambda pb: vendor.splash_attention(pb.q, pb.k, pb.v, pb.segment_ids, causal=pb.causal,
                                           scale=pb.opts.scale, interpret=interpret)
  return supports, run


SOFTMAX_ONLY = dict(scores=("softmax",), falls_back=True)
# Every implementation but auto, in the order IMPLEMENTATIONS lists them.
BACKENDS = {
    "xla": Backend(None, _always, _reference),
    "pallas_tpu": Backend("tpu", *_tpu(False), auto_max_len=AUTO_MAX_LEN),
    "pallas_gpu": Backend("gpu", lambda pb: kernel.gpu_supports(pb.q, pb.k), _kernel("gpu")),
    "pallas_mgpu": Backend("gpu", *_mgpu(False)),
    "pallas_mgpu_ws": Backend("gpu", *_mgpu(False, warp_specialized=True)),
    "interpret": Backend(None, _always, _kernel("interpret")),
    "interpret_mgpu": Backend(None, *_mgpu(True)),
    "interpret_mgpu_ws": Backend(None, *_mgpu(True, warp_specialized=True)),
    "interpret_tpu": Backend(None, *_tpu(True)),
    "cudnn": Backend("gpu", *_cudnn(), **SOFTMAX_ONLY),
    "splash": Backend("tpu", *_splash(False), **SOFTMAX_ONLY),
    "interpret_splash": Backend(None, *_splash(True), **SOFTMAX_ONLY),
}
IMPLEMENTATIONS = ("auto", *BACKENDS)


def auto_order(platform: str) -> tuple[str, ...]:
  """The backends `auto` tries on `platform`, in order; always ends in xla. Read at call
  time, so a changed AUTO_GPU_KERNEL takes effect."""
  order = {"tpu": ("splash", "pallas_tpu"),
           "gpu": ("cudnn", AUTO_GPU_KERNEL, "pallas_gpu")}.get(platform, ())
  return tuple(dict.fromkeys(order + ("xla",)))


def unavailable_reason(implementation: str, platform: str | None = None) -> str | None:
  """Why `implementation` cannot run on `platform` (a jax backend name; default: this
  process's), or None when it can (given a call it supports). The text continues the
  implementation's name: f"implementation={name!r} {reason}"."""
  if implementation not in IMPLEMENTATIONS:
    return f"is not one of {', '.join(IMPLEMENTATIONS)}"
  platform = platform or jax.default_backend()
  needs = None if implementation == "auto" else BACKENDS[implementation].platform
  if needs in (None, platform):
    return None
  valid = [n for n in IMPLEMENTATIONS if n == "auto" or BACKENDS[n].platform in (None, platform)]
  return (f"needs a {needs.upper()} backend; this is {platform!r}. Valid here: "
          f"{', '.join(valid)}.")


def select(pb: Problem, platform: str) -> tuple[str, tuple[str, ...]]:
  """(the backend `auto` runs, the reasons of those it skipped on the way)."""
  skipped = []
  for name in auto_order(platform):
    backend = BACKENDS[name]
    if pb.score not in backend.scores:
      continue
    length = max(pb.q.shape[1], pb.k.shape[1])
    if backend.auto_max_len is not None and length > backend.auto_max_len:
      why = f"length > {backend.auto_max_len} (N_i is counted in fp32 in the kernels)"
    else:
      why = backend.supports(pb)
    if why is None:
      if name == "xla" and not skipped:
        skipped.append(f"no Pallas kernel for backend {platform!r}")
      return name, tuple(skipped)
    skipped.append(f"{name}: {why}")
  raise AssertionError("auto_order ends in xla, which supports every call")


def attention(q, k, v, *, causal: bool = True, score: str = "softmax", segment_ids=None,
              implementation: str = "auto", q_offset: int = 0, scale: float | None = None,
              p: float = 15.0, reweight_offset_rows: int = 3, block_q: int | None = None,
              block_k: int | None = None, platform: str | None = None):
  """Attention with softmax / LSSA / LSSAR scores (docs/attention.md).

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
  pb = Problem(q, k, v, segment_ids, causal=causal, score=score,
               q_offset=operator.index(q_offset), scale=scale, p=p,
               reweight_offset_rows=reweight_offset_rows, block_q=block_q, block_k=block_k)
  platform = platform or jax.default_backend()
  if implementation != "auto":
    why = unavailable_reason(implementation, platform)
    if why:
      raise ValueError(f"implementation={implementation!r} {why}")
    backend = BACKENDS[implementation]
    why = (backend.supports(pb) if pb.score in backend.scores else
           f"it implements {', '.join(backend.scores)} only, not score={score!r}")
    if why and backend.falls_back and pb.score in backend.scores:
      name, skipped = select(pb, platform)
      _log_once(platform, score, tuple(dict.fromkeys((f"{implementation}: {why}",) + skipped)),
                f"implementation={implementation!r} falls back", name)
      return BACKENDS[name].run(pb)
    if why:
      *others, last = ["auto"] + [n for n in auto_order(platform) if n != implementation]
      raise ValueError(f"implementation={implementation!r} cannot run this call: {why}. Use "
                       f"implementation={', '.join(map(repr, others))} or {last!r}.")
    return BACKENDS[implementation].run(pb)
  name, skipped = select(pb, platform)
  if skipped:
    _log_once(platform, score, skipped, "implementation='auto'", name)
  return BACKENDS[name].run(pb)


def _log_once(platform: str, score: str, reasons: tuple, what: str, name: str) -> None:
  """One log line per (platform, score, reasons): what was skipped and what ran."""
  if (platform, score, reasons) in _logged:
    return
  _logged.add((platform, score, reasons))
  using = "the XLA reference" if name == "xla" else name
  _LOG.log(logging.INFO if platform == "cpu" else logging.WARNING,
           "attention(score=%r, %s): %s; using %s", score, what, "; ".join(reasons), using)
