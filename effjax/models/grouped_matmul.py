"""Grouped matmul for the MoE experts: rows sorted by expert, one weight matrix per expert.

    y[rows of group g] = x[rows of group g] @ w[g]        x: [N, K], w: [G, K, M], sizes: [G]

`model.moe.dispatch` picks how (effjax/resolve.py fixes `auto`):

  ragged_dot  jax.lax.ragged_dot, lowered by XLA. On some backends this becomes dense work over
              all experts, especially the weight gradient (`python -m effjax.models.moe_hlo`).
  blocks      rows padded per expert to fixed blocks, a batched matmul over the blocks
              (effjax/models/moe.py; the CPU default).
  gmm         a grouped-matmul Pallas kernel for all three products (forward, input gradient,
              weight gradient): on TPU the megablox kernels (gmm, and tgmm for the weight
              gradient); on a Hopper GPU the Mosaic GPU kernels ragged_dot_mgpu (forward and
              input gradient, the latter with the weight transposed in the kernel) and
              transposed_ragged_dot_mgpu (weight gradient); on CPU the megablox kernels in
              interpret mode (correct but slow: for checking only).

The kernels come with jax (jax.experimental.pallas.ops); this module picks tiles, pads rows
where a kernel needs it, and supplies the gradient for the GPU pair.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

BACKENDS = ("megablox", "megablox_interpret", "mgpu")

# Mosaic GPU tiles (bf16/f16). Not tuned on hardware: jax's own sweeps in the kernels' main()
# search block_m/n in (64, 128, 192), block_k 64; the benchmark (effjax.bench.accelerator)
# is where a tuning would be measured.
MGPU_BLOCKS = dict(block_m=128, block_n=128, block_k=64, max_concurrent_steps=4, grid_block_n=1)


def backend_for(platform: str, device_kind: str = "") -> str | None:
  """The gmm backend for a platform, or None where there is no grouped-matmul kernel."""
  if platform == "tpu":
    return "megablox"
  if platform == "cpu":
    return "megablox_interpret"
  if platform == "gpu" and _is_hopper(device_kind):
    return "mgpu"
  return None


def _is_hopper(device_kind: str) -> bool:
  kind = device_kind.lower()
  return any(name in kind for name in ("h100", "h200", "h800", "gh200"))


def mgpu_supports(k: int, m: int, dtype) -> str | None:
  """Why the Mosaic GPU pair cannot run x [N, k] @ w [G, k, m] (None: it can)."""
  if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
    return f"dtype {jnp.dtype(dtype).name} (the Mosaic GPU kernels take bf16/f16)"
  b = MGPU_BLOCKS
  # fwd contracts k (block_k); dgrad contracts m (block_k); wgrad tiles k x m (block_m, block_n)
  for what, size, block in (("K", k, b["block_k"]), ("M", m, b["block_k"]),
                            ("K", k, b["block_m"]), ("M", m, b["block_n"])):
    if size % block:
      return f"{what} = {size} is not a multiple of {block}"
  return None


def grouped_matmul(x_NxK: jax.Array, w_GxKxM: jax.Array, sizes_G: jax.Array, *,
                   backend: str) -> jax.Array:
  """x @ w[g] for each group's rows (rows sorted by group, sum(sizes) == N, as the dropless
  MoE dispatch makes them). Differentiable in x and w; output dtype = x.dtype."""
  sizes_G = sizes_G.astype(jnp.int32)
  if backend in ("megablox", "megablox_interpret"):
    return _megablox(x_NxK, w_GxKxM, sizes_G, interpret=backend == "megablox_interpret")
  if backend == "mgpu":
    why = mgpu_supports(x_NxK.shape[1], w_GxKxM.shape[2], x_NxK.dtype)
    if why:
      raise ValueError(f"model.moe.dispatch=gmm on a GPU: {why}; use dispatch=ragged_dot")
    return _mgpu(x_NxK, w_GxKxM.astype(x_NxK.dtype), sizes_G)
  raise ValueError(f"grouped_matmul backend {backend!r}; valid: {', '.join(BACKENDS)}")


# ----------------------------------------------------------------------------- TPU: megablox

def _tile(size: int, largest: int = 128) -> int:
  """The largest power of two <= `largest` dividing `size` (megablox needs exact tiles)."""
  t = largest
  while size % t:
    t //= 2
  return t


def _megablox(x_NxK, w_GxKxM, sizes_G, *, interpret: bool):
  from jax.experimental.pallas.ops.tpu.megablox import ops as megablox  # pylint: disable=g-import-not-at-top
  n, k = x_NxK.shape
  m = w_GxKxM.shape[2]
  tm = min(128, -(-n // 8) * 8)
  n_pad = -(-n // tm) * tm
  if n_pad != n:  # zero rows, counted in the last group: zero outputs, no gradient added
    x_NxK = jnp.pad(x_NxK, ((0, n_pad - n), (0, 0)))
    sizes_G = sizes_G.at[-1].add(n_pad - n)
  tiling = (tm, _tile(k), _tile(m))
  y = megablox.gmm(x_NxK, w_GxKxM.astype(x_NxK.dtype), sizes_G, x_NxK.dtype, tiling,
                   None, None, False, interpret)
  return y[:n]


# ----------------------------------------------------------------------------- GPU: Mosaic GPU

@jax.custom_vjp
def _mgpu(x_NxK, w_GxKxM, sizes_G):
  from jax.experimental.pallas.ops.gpu import ragged_dot_mgpu  # pylint: disable=g-import-not-at-top
  return ragged_dot_mgpu.ragged_dot(x_NxK, w_GxKxM, group_sizes=sizes_G, **MGPU_BLOCKS)


def _mgpu_fwd(x_NxK, w_GxKxM, sizes_G):
  return _mgpu(x_NxK, w_GxKxM, sizes_G), (x_NxK, w_GxKxM, sizes_G)


def _mgpu_bwd(res, dy_NxM):
  from jax.experimental.pallas.ops.gpu import ragged_dot_mgpu, transposed_ragged_dot_mgpu  # pylint: disable=g-import-not-at-top
  x_NxK, w_GxKxM, sizes_G = res
  dy_NxM = dy_NxM.astype(x_NxK.dtype)
  dx_NxK = ragged_dot_mgpu.ragged_dot(dy_NxM, w_GxKxM, group_sizes=sizes_G,
                                      transpose_rhs=True, **MGPU_BLOCKS)
  dw_GxKxM = transposed_ragged_dot_mgpu.transposed_ragged_dot(
      x_NxK, dy_NxM, group_sizes=sizes_G, **MGPU_BLOCKS)
  return dx_NxK, dw_GxKxM.astype(w_GxKxM.dtype), None


_mgpu.defvjp(_mgpu_fwd, _mgpu_bwd)


@functools.cache
def local_backend() -> str | None:
  """backend_for the first local device."""
  d = jax.local_devices()[0]
  return backend_for(d.platform, getattr(d, "device_kind", ""))
