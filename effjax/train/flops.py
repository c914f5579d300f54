"""FLOP accounting (hand-written per architecture, MaxText style) and MFU.

Model FLOPs per token: 2 x (matmul parameters touched per token) for every
linear layer including the LM head (the embedding lookup is free), plus
attention scores and values: 2 x 2 x T x (heads x head_dim) per layer, halved for
causal attention. Training = 3 x forward (backward is twice the forward).
"""

from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

from effjax.config import MoRConfig
from effjax.models import mor as mor_lib
from effjax.models.transformer import Dims

# Peak dense bf16 matmul FLOP/s per chip (vendor datasheets).
PEAK_FLOPS = {
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,  # v5e
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v5": 459e12,
    "TPU v6 lite": 918e12,  # v6e (Trillium)
    "TPU v6e": 918e12,
    "NVIDIA A100": 312e12,
    "NVIDIA H100": 989e12,  # SXM; dense
    "NVIDIA H200": 989e12,
}


def flops_per_token(dims: Dims, seq_len: int, *, tie_embeddings: bool, training: bool = True,
                    ffn_active_params: list[int] | None = None,
                    mor: MoRConfig | None = None,
                    attn_proj_params: int | None = None,
                    weight_build_flops: float = 0.0, tokens_per_step: int = 1) -> float:
  """Model FLOPs per token (causal attention counted at half).

  ffn_active_params: per-layer FFN parameters a token touches (MoE: top-k experts,
  shared experts and router); default a dense SwiGLU in every layer.
  mor: Mixture-of-Recursions (model.mor): each unique layer counts once per application,
  times the fraction cap_r of tokens its recursion processes (sum over r of cap_r); the
  selected tokens attend among cap_r * T tokens, so that application's attention costs
  cap_r^2 of a full one per token; plus the routers (d x N_r per token). Under recursive
  KV sharing (model.mor.kv_strategy=shared) a recursion r >= 1 projects no keys or values
  and its cap_r * T queries attend over all T tokens (cap_r of a full attention).
  attn_proj_params: per-layer attention-projection matmul parameters a token touches
  (low-rank projections: effjax/models/masa.py); default dense q, k, v, o.
  weight_build_flops: forward FLOPs per step spent building weights before the layers
  (MASA's 'ls,sio->lio' einsum), shared by the step's tokens_per_step tokens.
  """
  d, h, kv, hd = dims.d_model, dims.n_heads, dims.n_kv_heads, dims.head_dim
  attn_proj = d * h * hd * 2 + d * kv * hd * 2 if attn_proj_params is None else attn_proj_params
  ffn = (3 * d * dims.mlp_dim * dims.n_layers if ffn_active_params is None
         else sum(ffn_active_params))
  head = d * dims.vocab
  del tie_embeddings  # tied or not, the readout matmul is done
  full_attention = 2 * 2 * seq_len * h * hd / 2
  if mor is None or not mor.enabled:
    matmul_params = dims.n_layers * attn_proj + ffn + head
    attention = dims.n_layers * full_attention
  else:
    ffn_layers = (ffn_active_params if ffn_active_params is not None
                  else [3 * d * dims.mlp_dim] * dims.n_layers)
    uses = mor_lib.layer_capacities(mor, dims.n_layers)
    matmul_params = (sum(sum(caps) * (attn_proj + f) for caps, f in zip(uses, ffn_layers))
                     + head + mor_lib.router_params(mor, d))
    attention = sum(c * c for caps in uses for c in caps) * full_attention
    reads = mor_lib.shared_kv_reads(mor, dims.n_layers)  # replace c^2 by c, drop k/v proj
    attention += sum(c - c * c for caps in reads for c in caps) * full_attention
    if attn_proj_params is None:
      matmul_params -= sum(c for caps in reads for c in caps) * d * kv * hd * 2
  forward = 2 * matmul_params + attention + weight_build_flops / tokens_per_step
  return 3 * forward if training else forward


def isoflop_token_ratio(dense_flops_per_token: float, other_flops_per_token: float) -> float:
  """How many more tokens a model (e.g. MoR) trains on for the dense model's FLOP budget:
  the ratio of FLOPs per token (the MoR paper reports about 1.34x for N_r = 2 and 1.5x for
  N_r = 3 against its vanilla baselines)."""
  return dense_flops_per_token / other_flops_per_token


def _ns_flops(m: int, n: int, steps: int, quintic: bool) -> float:
  """Newton-Schulz on an m x n matrix (a = min side): X X^T (2a^2 b), the polynomial in it
  (quintic: one more a x a product, 2a^3) and its product with X (2a^2 b), per step."""
  a, b = min(m, n), max(m, n)
  return steps * (4 * a * a * b + (2 * a ** 3 if quintic else 0))


def optimizer_flops_per_step(config, specs: dict, shapes: dict) -> float:
  """Matrix FLOPs the optimizer and the weight constraints add per training step.

  Muon: Newton-Schulz on each matrix of optim.muon_roles (Jordan et al. 2024). Constraints
  (constraints.method): power iteration (2 matrix-vector products per iteration, plus the
  rank-one update), cubic Newton-Schulz for hard_cap, one odd cubic polynomial for
  soft_cap, an SVD (~4a^2 b + 22a^3, Golub & Van Loan) for svd_clip. Leading axes (stacked
  layers, experts) are batches of matrices. Element-wise optimizer work is not counted."""
  import jax  # pylint: disable=g-import-not-at-top
  from effjax.models.layers import layer_stacked  # pylint: disable=g-import-not-at-top
  o, c = config.optim, config.constraints
  total = 0.0
  leaves = jax.tree_util.tree_leaves_with_path(specs, is_leaf=lambda x: hasattr(x, "role"))
  shape_of = dict(jax.tree_util.tree_leaves_with_path(shapes))
  for path, spec in leaves:
    shape = tuple(getattr(shape_of.get(path), "shape", shape_of.get(path)) or ())
    if len(shape) - layer_stacked(spec.axes) < 2:
      continue
    m, n = shape[-2], shape[-1]
    batch = int(np.prod(shape[:-2])) if len(shape) > 2 else 1
    per = 0.0
    if o.name == "muon" and spec.role in o.muon_roles:
      per += _ns_flops(m, n, o.muon_ns_steps, o.muon_ns == "quintic")
    if c.method != "none" and spec.role in c.roles:
      if c.method in ("spectral_normalize", "spectral_hammer", "spectral_weight_decay"):
        per += c.power_iters * 4 * m * n + 2 * m * n
      elif c.method == "hard_cap":
        per += _ns_flops(m, n, c.hard_cap_steps, quintic=False)
      elif c.method == "soft_cap":
        per += _ns_flops(m, n, 1, quintic=False)
      elif c.method == "svd_clip":
        a, b = min(m, n), max(m, n)
        per += 4 * a * a * b + 22 * a ** 3 + 2 * m * n * a
    total += batch * per
  return total


def peak_flops_per_device() -> tuple[float, str]:
  """(peak FLOP/s, source). Accelerators: datasheet table; CPU: a measured matmul peak."""
  dev = jax.devices()[0]
  kind = getattr(dev, "device_kind", "")
  for name, peak in PEAK_FLOPS.items():
    if kind.startswith(name) or name in kind:
      return peak, f"table:{name}"
  if dev.platform == "cpu":
    return measured_cpu_matmul_flops(), "measured:cpu-matmul-f32"
  return float("nan"), f"unknown device kind {kind!r}"


@functools.lru_cache(maxsize=None)
def measured_cpu_matmul_flops(n: int = 1024, repeats: int = 5) -> float:
  """FLOP/s of a jitted n x n float32 matmul on the host (median of a few runs).

  On CPU, jax runs one device over all cores; this is the whole host's rate and is
  used as the 'peak' for perf/mfu, so CPU MFU means 'fraction of a big matmul'.
  """
  a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32)
  b = jax.random.normal(jax.random.PRNGKey(1), (n, n), jnp.float32)
  f = jax.jit(lambda x, y: x @ y)
  f(a, b).block_until_ready()
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    f(a, b).block_until_ready()
    times.append(time.perf_counter() - t0)
  return 2 * n ** 3 / float(np.median(times))
