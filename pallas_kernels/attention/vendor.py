"""Softmax attention on the vendors' kernels: cuDNN on NVIDIA GPUs, splash attention on TPU.

Softmax is the baseline every LSSA/LSSAR study compares against, so it runs on the fastest
kernel that exists (docs/attention-kernels.md); our Pallas kernels stay for the scores no
library has. Both wrappers take attention()'s [B, T, H, D] layout, GQA, a logit scale and
packed documents (segment_ids [B, T]), and say why they cannot run a call (supports_*).

cuDNN (jax.nn.dot_product_attention(implementation="cudnn"), flash attention in cuDNN 9):
  without segments the public call with is_causal=True. The public API (jax 0.10 - 0.12)
  takes only per-row lengths, not packed documents; packed documents go through JAX's
  cuDNN wrapper underneath it (jax._src.cudnn.fused_attention_stablehlo.dot_product_attention),
  whose "packed layout" takes, per batch row, each document's start (q_offsets) and length
  (q_seqlen) with the PADDING_CAUSAL mask: each document is then a causal sequence of its
  own, exactly the segment-id mask. That wrapper is private (checked by signature, so a
  jax without it makes `cudnn` refuse packed calls with the reason, and auto falls back)
  and needs a Hopper (sm_90+) GPU. Documents are the maximal runs of equal segment ids.
splash (jax.experimental.pallas.ops.tpu.splash_attention, what MaxText runs on TPU): a
  per-head causal mask with block skipping and SegmentIds; q is pre-scaled (splash applies
  no scale); GQA through the MQA kernel vmapped over kv heads. interpret=True runs it in
  Pallas' interpreter on any backend (how it is tested on CPU).
"""

from __future__ import annotations

import functools
import inspect

import jax
import jax.numpy as jnp

CUDNN_DTYPES = ("bfloat16", "float16")
SPLASH_BLOCKS = (512, 256, 128)


# ------------------------------------------------------------------ cuDNN

def _private_cudnn():
  """JAX's cuDNN wrapper with packed-document support, or None where this jax lacks it."""
  try:
    from jax._src.cudnn import fused_attention_stablehlo as fa  # pylint: disable=g-import-not-at-top
  except ImportError:
    return None
  params = inspect.signature(fa.dot_product_attention).parameters
  if not {"q_offsets", "kv_offsets", "q_seqlen", "kv_seqlen"} <= set(params):
    return None
  if not hasattr(getattr(fa, "MaskType", None), "PADDING_CAUSAL"):
    return None
  return fa


def _local_compute_capability() -> tuple[int, int] | None:
  """(major, minor) of this process's first GPU, or None (no GPU here: compiling for one
  from another host, where the target's capability is not known)."""
  try:
    if jax.default_backend() != "gpu":
      return None
    major, minor = str(jax.devices()[0].compute_capability).split(".")[:2]
    return int(major), int(minor)
  except (AttributeError, ValueError, RuntimeError):
    return None


def supports_cudnn(q, k, v, *, causal: bool, q_offset: int, segments: bool) -> str | None:
  """None, or why cuDNN flash attention cannot run the call."""
  if q.dtype.name not in CUDNN_DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
    return f"dtype {q.dtype.name}/{k.dtype.name}/{v.dtype.name} is not bfloat16 or float16"
  d = q.shape[-1]
  if d % 8 or d > 128 or v.shape[-1] != d:
    return f"head_dim {d} (v: {v.shape[-1]}) is not a multiple of 8 <= 128, equal for q and v"
  if q_offset or q.shape[1] != k.shape[1]:
    return "q_offset / q_len != kv_len (cuDNN's causal mask is aligned at position 0)"
  cc = _local_compute_capability()
  if cc is not None and cc < (8, 0):
    return f"compute capability {cc[0]}.{cc[1]} < 8.0 (cuDNN flash attention)"
  if segments:
    if _private_cudnn() is None:
      return (f"segment_ids: this jax ({jax.__version__}) has no packed-document cuDNN "
              f"attention (q_offsets / q_seqlen)")
    if cc is not None and cc < (9, 0):
      return "segment_ids: cuDNN's packed layout needs a Hopper (sm_90) GPU or newer"
    if not causal:
      return "segment_ids without causal (only PADDING_CAUSAL is wired)"
  return None


def packed_documents(segment_ids_BxT, max_documents: int | None = None):
  """(seqlen_BxM, offsets_BxM1) int32 for cuDNN's packed layout: the start and length of
  each maximal run of equal segment ids, per row, padded with -1; M = max_documents (default
  T: any row fits; a row with more runs than M would be silently truncated, so M < T is for
  callers that know their data)."""
  b, t = segment_ids_BxT.shape
  m = max_documents or t
  starts_BxT = jnp.concatenate(
      [jnp.ones((b, 1), bool), segment_ids_BxT[:, 1:] != segment_ids_BxT[:, :-1]], axis=1)
  doc_BxT = jnp.cumsum(starts_BxT, axis=1, dtype=jnp.int32) - 1
  n_docs_B = doc_BxT[:, -1] + 1
  rows_BxT = jnp.broadcast_to(jnp.arange(b)[:, None], (b, t))
  pos_BxT = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
  offsets = jnp.full((b, m + 1), t, jnp.int32).at[rows_BxT, doc_BxT].min(pos_BxT, mode="drop")
  seqlen = jnp.zeros((b, m), jnp.int32).at[rows_BxT, doc_BxT].add(1, mode="drop")
  used_BxM1 = jnp.arange(m + 1)[None] < n_docs_B[:, None]
  offsets = jnp.where(used_BxM1, offsets, -1)
  seqlen = jnp.where(used_BxM1[:, :m], seqlen, -1)
  return seqlen, offsets


def cudnn_packed_call(q, k, v, seqlen, offsets, *, scale):
  """JAX's private cuDNN call on the packed layout (a seam: tests replace it on CPU)."""
  fa = _private_cudnn()
  return fa.dot_product_attention(q, k, v, None, None, seqlen, seqlen, offsets, offsets,
                                  scale=scale, mask_type=fa.MaskType.PADDING_CAUSAL,
                                  qkv_layout="BTNH")


def cudnn_attention(q, k, v, segment_ids=None, *, causal: bool, scale: float,
                    max_documents: int | None = None):
  """Softmax attention through cuDNN; q [B, T, H, D], k / v [B, T, K, D] -> [B, T, H, D]."""
  if segment_ids is None:
    return jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=causal,
                                        implementation="cudnn")
  seqlen, offsets = packed_documents(segment_ids, max_documents)
  return cudnn_packed_call(q, k, v, seqlen, offsets, scale=scale)


# ------------------------------------------------------------------ splash (TPU)

def _splash():
  try:
    from jax.experimental.pallas.ops.tpu import splash_attention  # pylint: disable=g-import-not-at-top
  except ImportError:
    return None
  return splash_attention


def splash_block(t: int) -> int | None:
  """The largest splash block (512, 256, 128) dividing the sequence length, or None."""
  return next((blk for blk in SPLASH_BLOCKS if t % blk == 0), None)


def supports_splash(q, k, *, q_offset: int) -> str | None:
  if _splash() is None:
    return f"this jax ({jax.__version__}) has no jax.experimental.pallas.ops.tpu.splash_attention"
  if q_offset or q.shape[1] != k.shape[1]:
    return "q_offset / q_len != kv_len (the splash causal mask here is square)"
  if splash_block(q.shape[1]) is None:
    return f"length {q.shape[1]} is not a multiple of 128"
  if q.dtype.name not in ("float32", "bfloat16"):
    return f"dtype {q.dtype.name} is not float32/bfloat16"
  return None


@functools.lru_cache(maxsize=64)
def _splash_kernel(t: int, heads: int, causal: bool, mqa: bool, interpret: bool):
  sa = _splash()
  blk = splash_block(t)
  base = sa.CausalMask((t, t)) if causal else sa.FullMask((t, t))
  mask = sa.MultiHeadMask([base] * heads)
  sizes = sa.BlockSizes(block_q=blk, block_kv=blk, block_kv_compute=blk, block_q_dkv=blk,
                        block_kv_dkv=blk, block_kv_dkv_compute=blk, block_q_dq=blk,
                        block_kv_dq=blk)
  make = sa.make_splash_mqa if mqa else sa.make_splash_mha
  # The kernel holds its mask-info arrays: build them as constants, never as tracers of
  # whichever jit first asked (the kernel is cached across traces).
  with jax.ensure_compile_time_eval():
    return make(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret)


def splash_attention(q, k, v, segment_ids=None, *, causal: bool, scale: float,
                     interpret: bool = False):
  """Softmax attention through splash attention; q [B, T, H, D], k / v [B, T, K, D]."""
  sa = _splash()
  b, t, h, d = q.shape
  kv = k.shape[2]
  q_BxHxTxD = (q * jnp.asarray(scale, q.dtype)).transpose(0, 2, 1, 3)
  k_BxKxTxD, v_BxKxTxD = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
  kernel = _splash_kernel(t, h // kv if kv != h else h, causal, kv != h, interpret)

  def one_row(q, k, v, s=None):
    return kernel(q, k, v, segment_ids=None if s is None else sa.SegmentIds(q=s, kv=s))

  rows = (q_BxHxTxD, k_BxKxTxD, v_BxKxTxD)
  if segment_ids is not None:
    rows += (segment_ids.astype(jnp.int32),)
  if kv == h:
    out_BxHxTxD = jax.vmap(one_row)(*rows)
  else:  # GQA: the MQA kernel per kv head, over that head's group of query heads
    rows = (q_BxHxTxD.reshape(b, kv, h // kv, t, d),) + rows[1:]
    per_head = jax.vmap(one_row, in_axes=(0, 0, 0, None)[:len(rows)])
    out_BxHxTxD = jax.vmap(per_head)(*rows).reshape(b, h, t, d)
  return out_BxHxTxD.transpose(0, 2, 1, 3).astype(q.dtype)
