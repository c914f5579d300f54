"""Attention parameter sharing: MASA and its baselines (docs/masa.md).

MASA, Matrix Atom Sharing in Attention (Zhussip et al., AAAI 2026, arXiv 2508.04581): for
each shared projection type P (q, k, v, o) a dictionary of S matrix atoms D^P [S, d_in, d_out]
serves all L layers,

    W^P_l = sum_s c^P_{l,s} D^P_s                       (paper eq. 3; einsum 'ls,sio->lio')

with no constraint on D or C. During training C comes from a 3-layer MLP on a learned
per-layer embedding; `fold` computes C once and drops the MLP (model.masa.folded), for export
and evaluation. Every layer's weights are built by one einsum per projection type per step,
before the layer loop (`SharedAttentionWeights.__call__`); the blocks' projections are
parameter-free `SharedLinear`s that take their layer's built weight, so QAT hooks quantize
the built W_l, never the atoms.

Init (the paper gives none): atoms ~ N(0, std_P^2) with std_P the dense projection's init std
(init_std for q/k/v, init_std / sqrt(2L) for o), and the coefficient MLP is residual,
c_l = e_l + W3 gelu(W2 gelu(W1 e_l)) with W3 = 0 at init and each layer's embedding e_l^P a
random unit vector in R^S. Then at init W_l^P = sum_s e_{l,s} D_s has iid entries of variance
std_P^2 * |e_l|^2 = std_P^2: each layer's weight has exactly the dense init distribution,
and distinct layers differ (their embeddings point in different directions).

Baselines (model.attention.sharing), for the same projections:
  sequential       G full matrix sets; layer l uses set floor(l G / L)  (Takase & Kiyono 2021)
  repeat_all_over  G full matrix sets; layer l uses set l mod G          ("cycle")
  lowrank          per layer W_l = A_l B_l, rank r (a projection, not a shared weight)

Roles: atoms "atom" (muP and weight decay treat them as matrices; their logical axes are the
projection's with a leading unsharded atom axis, so they shard like the projections they
build); the coefficient MLP and folded coefficients "coeff"; the full matrix sets of the
sharing baselines "hidden".
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from effjax.models.layers import HookedLinear, Tag, make_param, normal_init

SHARED = ("masa", "sequential", "repeat_all_over")  # methods with a stack-level weight source


@dataclasses.dataclass(frozen=True)
class ProjectionSpec:
  """What the dense projection of a slot would be: shape, logical axes, init std."""
  d_in: int
  d_out: int
  axes: tuple
  std: float


def shared_slots(config) -> tuple[str, ...]:
  """The slots (q, k, v, o) the model's attention sharing applies to ('' for none)."""
  if config.attention.sharing == "none":
    return ()
  return tuple(config.masa.projections)  # the letters are the Attention slot names


class SharedLinear(HookedLinear):
  """A projection whose weight is built outside the block (a MASA combination of atoms or a
  shared matrix set): y = hooks.input(x) @ hooks.weight(w_IxO). Holds only its hooks."""

  def __init__(self, d_in: int, d_out: int, *, hooks=None, tag: Tag | None = None):
    self.d_in, self.d_out = d_in, d_out
    self.attach_hooks(hooks, tag)

  def effective_weight(self, w_IxO: jax.Array) -> jax.Array:
    return self.hooked_weight(w_IxO)

  def __call__(self, x: jax.Array, w_IxO: jax.Array) -> jax.Array:
    return self.hooked_matmul(x, w_IxO)


class LowRankLinear(HookedLinear):
  """y = x A B, A [d_in, r], B [r, d_out] (the low-rank baseline). A and B ~ N(0, s^2) with
  s^2 = std / sqrt(r), so entries of A B have the dense init std. With quantizer hooks the
  product W = A B is formed and quantized (QAT quantizes the weight a layer applies)."""

  def __init__(self, d_in: int, d_out: int, rank: int, *, rngs: nnx.Rngs, axes, std: float,
               hooks=None, tag: Tag | None = None):
    s = math.sqrt(std / math.sqrt(rank))
    self.a = make_param(normal_init(rngs, (d_in, rank), s), "hidden", (axes[0], None))
    self.b = make_param(normal_init(rngs, (rank, d_out), s), "hidden", (None, axes[1]))
    self.attach_hooks(hooks, tag)

  def effective_weight(self) -> jax.Array:
    return self.hooked_weight(self.a[...] @ self.b[...])

  def __call__(self, x: jax.Array) -> jax.Array:
    if not self.hooks:
      return (x @ self.a[...].astype(x.dtype)) @ self.b[...].astype(x.dtype)
    return self.hooked_matmul(x, self.a[...] @ self.b[...])


def _unit_rows(rngs: nnx.Rngs, shape) -> jax.Array:
  """Random unit vectors along the last axis."""
  e = jax.random.normal(rngs.params(), shape, jnp.float32)
  return e / jnp.linalg.norm(e, axis=-1, keepdims=True)


class CoefficientMLP(nnx.Module):
  """C [L, P, S] from a learned per-layer embedding E [L, P*S]:
  C = E + W3 gelu(W2 gelu(W1 E + b1) + b2) (3 linear layers; W3 = 0 at init, so C = E and
  every |c_l^P| = 1)."""

  def __init__(self, n_layers: int, n_proj: int, n_atoms: int, width: int, *, rngs: nnx.Rngs):
    self.shape = (n_layers, n_proj, n_atoms)
    d = n_proj * n_atoms
    self.embedding = make_param(_unit_rows(rngs, self.shape).reshape(n_layers, d), "coeff",
                                (None, None))
    self.w1 = make_param(normal_init(rngs, (d, width), d ** -0.5), "coeff", (None, None))
    self.b1 = make_param(jnp.zeros((width,), jnp.float32), "coeff", (None,))
    self.w2 = make_param(normal_init(rngs, (width, width), width ** -0.5), "coeff", (None, None))
    self.b2 = make_param(jnp.zeros((width,), jnp.float32), "coeff", (None,))
    self.w3 = make_param(jnp.zeros((width, d), jnp.float32), "coeff", (None, None))

  def __call__(self) -> jax.Array:
    e = self.embedding[...]
    h = jax.nn.gelu(e @ self.w1[...] + self.b1[...])
    h = jax.nn.gelu(h @ self.w2[...] + self.b2[...])
    return (e + h @ self.w3[...]).reshape(self.shape)


def _dict(d: dict):
  return nnx.Dict(d) if hasattr(nnx, "Dict") else d


def layer_groups(method: str, n_layers: int, groups: int) -> np.ndarray:
  """The matrix set each layer uses: sequential (0,0,1,1,..) or repeat_all_over (0,1,..,0,1)."""
  layers = np.arange(n_layers)
  if method == "sequential":
    return layers * groups // n_layers
  return layers % groups


class SharedAttentionWeights(nnx.Module):
  """The stack-level weight source of the shared projections: call it once per step for
  {slot: W [L, d_in, d_out]} (row l: layer l's weight).

  method masa: atoms[slot] [S, d_in, d_out] (role atom) and the coefficient MLP (or, folded,
  coefficients [L, P, S]); sequential / repeat_all_over: matrices[slot] [G, d_in, d_out]
  (role hidden) and a fixed layer -> set pattern."""

  def __init__(self, method: str, specs: dict[str, ProjectionSpec], *, n_layers: int,
               n_atoms: int, mlp_width: int, folded: bool, rngs: nnx.Rngs):
    self.method, self.slots, self.n_layers = method, tuple(specs), n_layers
    self.tag = Tag("shared_attention")
    if method == "masa":
      self.atoms = _dict({s: make_param(normal_init(rngs, (n_atoms, p.d_in, p.d_out), p.std),
                                        "atom", (None,) + tuple(p.axes))
                          for s, p in specs.items()})
      if folded:
        self.coef_mlp = None
        self.coefficients = make_param(jnp.zeros((n_layers, len(specs), n_atoms), jnp.float32),
                                       "coeff", (None, None, None))
      else:
        self.coef_mlp = CoefficientMLP(n_layers, len(specs), n_atoms, mlp_width, rngs=rngs)
        self.coefficients = None
    elif method in ("sequential", "repeat_all_over"):
      mats = {s: make_param(normal_init(rngs, (n_atoms, p.d_in, p.d_out), p.std), "hidden",
                            (None,) + tuple(p.axes)) for s, p in specs.items()}
      self.matrices = _dict(mats)
      self.pattern = tuple(int(g) for g in layer_groups(method, n_layers, n_atoms))
    else:
      raise ValueError(f"no stack-level weights for sharing method {method!r}")

  def coefficient_values(self) -> jax.Array:
    """C [L, P, S] (MASA): from the MLP, or the folded parameter."""
    if self.coefficients is not None:
      return self.coefficients[...]
    return self.coef_mlp()

  def __call__(self) -> dict[str, jax.Array]:
    if self.method == "masa":
      c_LxPxS = self.coefficient_values()
      return {s: jnp.einsum("ls,sio->lio", c_LxPxS[:, i], self.atoms[s][...])
              for i, s in enumerate(self.slots)}
    pattern = jnp.asarray(self.pattern, jnp.int32)
    return {s: jnp.take(self.matrices[s][...], pattern, axis=0) for s in self.slots}


# ---------------------------------------------------------------------------- folding


def fold(config, model, params: dict):
  """(config, params) of the folded MASA model: C computed once from the coefficient MLP and
  stored as model.masa.folded's [L, P, S] parameter, the MLP dropped. `model` is the
  FunctionalModel of `config`. A model without MASA (or already folded) comes back as is."""
  m = config.model
  if m.attention.sharing != "masa" or m.masa.folded:
    return config, params
  shared = model.module(params).blocks.shared
  c_LxPxS = shared.coefficient_values()
  blocks = dict(params["blocks"])
  folded_shared = {k: v for k, v in blocks["shared"].items() if k != "coef_mlp"}
  folded_shared["coefficients"] = c_LxPxS
  blocks["shared"] = folded_shared
  new_model = dataclasses.replace(m, masa=dataclasses.replace(m.masa, folded=True))
  return dataclasses.replace(config, model=new_model), {**params, "blocks": blocks}


# ---------------------------------------------------------------------------- accounting


def projection_shapes(dims) -> dict[str, tuple[int, int]]:
  """(d_in, d_out) of each attention projection slot."""
  d, h, kv, hd = dims.d_model, dims.n_heads, dims.n_kv_heads, dims.head_dim
  return {"q": (d, h * hd), "k": (d, kv * hd), "v": (d, kv * hd), "o": (h * hd, d)}


def lowrank_rank(config, dims) -> int:
  return config.masa.rank or max(1, dims.d_model // 3)


def coef_mlp_params(n_layers: int, n_proj: int, n_atoms: int, width: int) -> int:
  d = n_proj * n_atoms
  return n_layers * d + d * width + width + width * width + width + width * d


def attention_param_counts(config, dims) -> dict[str, int]:
  """Attention parameters by formula (config: the ModelConfig). Per slot (q, k, v, o): all
  layers' parameters of that projection; 'coef': the MASA coefficient MLP (or folded C);
  'total'; 'dense': the same model without sharing."""
  shapes, L = projection_shapes(dims), dims.n_layers
  shared = shared_slots(config)
  method, masa = config.attention.sharing, config.masa
  out = {}
  for slot, (i, o) in shapes.items():
    if slot not in shared:
      out[slot] = L * i * o
    elif method == "lowrank":
      out[slot] = L * lowrank_rank(config, dims) * (i + o)
    elif method == "masa":
      out[slot] = masa.resolved_atoms(L) * i * o
    else:
      out[slot] = masa.resolved_groups(L) * i * o
  out["coef"] = 0
  if method == "masa":
    s = masa.resolved_atoms(L)
    out["coef"] = (L * len(shared) * s if masa.folded else
                   coef_mlp_params(L, len(shared), s, masa.coef_mlp_width))
  out["total"] = sum(out[s] for s in shapes) + out["coef"]
  out["dense"] = sum(L * i * o for i, o in shapes.values())
  return out


def attention_matmul_params(config, dims) -> int:
  """Attention-projection matmul parameters one token touches in one layer (MASA and the
  matrix-set baselines apply full d_in x d_out weights; low-rank applies A then B)."""
  shared = shared_slots(config) if config.attention.sharing == "lowrank" else ()
  r = lowrank_rank(config, dims)
  return sum(r * (i + o) if slot in shared else i * o
             for slot, (i, o) in projection_shapes(dims).items())


def weight_build_flops(config, dims) -> float:
  """Forward FLOPs per step of building every layer's weights (not per token): MASA's einsum
  'ls,sio->lio' (2 L S d_in d_out per projection type) and the coefficient MLP (three matmuls
  over L rows); 0 for the other methods (a gather)."""
  if config.attention.sharing != "masa":
    return 0.0
  L, masa, shared = dims.n_layers, config.masa, shared_slots(config)
  s = masa.resolved_atoms(L)
  shapes = projection_shapes(dims)
  einsum = sum(2 * L * s * shapes[slot][0] * shapes[slot][1] for slot in shared)
  if masa.folded:
    return float(einsum)
  d, w = len(shared) * s, masa.coef_mlp_width
  return float(einsum + 2 * L * (d * w + w * w + w * d))


def flop_terms(config, dims, train) -> dict:
  """flops_per_token's keyword arguments for attention sharing ({} without it); config: the
  ModelConfig, train: the TrainConfig (tokens per step = batch_size x seq_len)."""
  if config.attention.sharing == "none":
    return {}
  return {"attn_proj_params": attention_matmul_params(config, dims),
          "weight_build_flops": weight_build_flops(config, dims),
          "tokens_per_step": train.batch_size * train.seq_len}
