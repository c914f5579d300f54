"""Basic layers. Every parameter is created with a role and logical axis names.

The role map is the single source of truth for per-parameter treatment: the
optimizer derives lr / weight-decay multipliers from roles (effjax/optim), the
sharding rules derive placements from logical axes (effjax/parallel), and weight
constraints pick matrices by role. Roles are listed in `ROLES` below:

  embedding  token embedding table            hidden  matrices inside blocks
  readout    LM head (untied)                 vector  gains, biases
  router     MoE / MoR routers                expert  MoE expert weights
  atom       MASA dictionary atoms            coeff   MASA coefficient MLPs

`HookedLinear` (the base of `Linear` and of the attention-sharing projections) is the
meeting point of weight hooks (quantizers, reparameterisations) and input hooks (activation
quantizers): see `LinearHook`.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

# Parameter roles: the one role map (the optimizer, sharding and constraints read it).
ROLES = ("embedding", "hidden", "readout", "vector", "router", "expert", "atom", "coeff")
# The logical axis a scanned stack (effjax/models/stack.py) puts in front of each per-layer
# parameter and buffer; the role is unchanged, so per-matrix rules read the trailing dims.
LAYER_AXIS = "layers"


def layer_stacked(axes) -> bool:
  """Whether a variable with these logical axes is stacked over layers (leading LAYER_AXIS)."""
  return bool(axes) and axes[0] == LAYER_AXIS


class Buffer(nnx.Variable):
  """Non-trainable model state (MoE biases, freeze masks, EMAs, ...).

  Lives in the train state next to the params, is updated inside the train step
  and is checkpointed with everything else.
  """


def make_param(value: jax.Array, role: str, axes: Sequence[str | None]) -> nnx.Param:
  """An nnx.Param tagged with its role and one logical axis name per dim."""
  if role not in ROLES:
    raise ValueError(f"unknown parameter role {role!r}; valid: {ROLES}")
  axes = tuple(axes)
  if len(axes) != value.ndim:
    raise ValueError(f"axes {axes} do not match the parameter's shape {value.shape}")
  return nnx.Param(value, role=role, axes=axes)


def normal_init(rngs: nnx.Rngs, shape, std: float) -> jax.Array:
  return std * jax.random.normal(rngs.params(), shape, jnp.float32)


@dataclasses.dataclass(frozen=True)
class Tag:
  """What a module is, set by the model builder: `kind` (qkv, attn_out, mlp, qk, moe, block,
  model, ...), the `layer` it belongs to (None: not per layer) and its `slot` name. The model
  index (effjax/models/index.py) is built from tags, so techniques find their state by what
  it is, not by where it sits in the parameter tree."""
  kind: str
  layer: int | None = None
  slot: str = ""


class LinearHook(nnx.Module):
  """Hook interface for `HookedLinear`s: transform the weight and/or the input.

  Quantizers (QuEST, StatsQ, LSQ) and reparameterisations (weight conditioning,
  weight normalisation) subclass this; both methods default to the identity.
  """

  def weight(self, w_IxO: jax.Array) -> jax.Array:
    return w_IxO

  def input(self, x: jax.Array) -> jax.Array:
    return x


class HookedLinear(nnx.Module):
  """Base of every projection that carries LinearHooks (`Linear`, and the attention-sharing
  `SharedLinear` / `LowRankLinear` in effjax/models/masa.py): y = hooks.input(x) @
  hooks.weight(W). Subclasses own how W is stored; this class owns the hook plumbing.

  hooks: named LinearHooks, applied in order (e.g. {"weight_quant": ..., "input_quant": ...});
  each is an attribute of that name, so its state has a stable name in the parameter tree.
  """

  def attach_hooks(self, hooks: Mapping[str, LinearHook] | None, tag: Tag | None):
    """Set the module's tag and its hooks (call once, after the weights are created)."""
    self.tag = tag
    self.hook_names = tuple(hooks or ())
    for name, hook in (hooks or {}).items():
      setattr(self, name, hook)

  @property
  def hooks(self) -> list[LinearHook]:
    return [getattr(self, name) for name in self.hook_names]

  def hooked_weight(self, w_IxO: jax.Array) -> jax.Array:
    """W through every hook's `weight`, in order."""
    for hook in self.hooks:
      w_IxO = hook.weight(w_IxO)
    return w_IxO

  def hooked_input(self, x: jax.Array) -> jax.Array:
    """x through every hook's `input`, in order."""
    for hook in self.hooks:
      x = hook.input(x)
    return x

  def hooked_matmul(self, x: jax.Array, w_IxO: jax.Array) -> jax.Array:
    """hooks.input(x) @ hooks.weight(w_IxO), in x's dtype (the input hooks run first)."""
    x = self.hooked_input(x)
    return jnp.einsum("...i,io->...o", x, self.hooked_weight(w_IxO).astype(x.dtype))


class Linear(HookedLinear):
  """y = hooks.input(x) @ hooks.weight(W) (+ b). W is stored (in, out), fp32 (hooks: see
  `HookedLinear`)."""

  def __init__(self, d_in: int, d_out: int, *, rngs: nnx.Rngs, role: str = "hidden",
               axes: tuple[str | None, str | None] = ("embed", "mlp"), std: float | None = None,
               use_bias: bool = False, zero_init: bool = False,
               hooks: Mapping[str, LinearHook] | None = None, tag: Tag | None = None):
    std = d_in ** -0.5 if std is None else std
    w = jnp.zeros((d_in, d_out), jnp.float32) if zero_init else normal_init(rngs, (d_in, d_out), std)
    self.kernel = make_param(w, role, axes)
    self.bias = make_param(jnp.zeros((d_out,), jnp.float32), "vector", axes[1:]) if use_bias else None
    self.attach_hooks(hooks, tag)

  def effective_weight(self) -> jax.Array:
    return self.hooked_weight(self.kernel[...])

  def __call__(self, x: jax.Array) -> jax.Array:
    y = self.hooked_matmul(x, self.kernel[...])
    if self.bias is not None:
      y = y + self.bias[...].astype(y.dtype)
    return y


def plain_linear(rngs: nnx.Rngs):
  """A projection factory (kind, d_in, d_out, *, slot, **Linear kwargs) -> Linear without
  hooks or tags (the builder's factory adds both)."""

  def make(kind, d_in, d_out, *, slot="", **kwargs):
    del kind, slot
    return Linear(d_in, d_out, rngs=rngs, **kwargs)
  return make


class Embed(nnx.Module):
  """Token embedding table [vocab, d]; `attend` gives tied-readout logits."""

  def __init__(self, vocab: int, d: int, *, rngs: nnx.Rngs, std: float,
               axes: tuple = ("vocab", "embed")):
    self.table = make_param(normal_init(rngs, (vocab, d), std), "embedding", axes)

  def __call__(self, ids_BxL: jax.Array, dtype) -> jax.Array:
    return jnp.take(self.table[...], ids_BxL, axis=0).astype(dtype)

  def attend(self, x_BxLxD: jax.Array) -> jax.Array:
    return jnp.einsum("bld,vd->blv", x_BxLxD, self.table[...].astype(x_BxLxD.dtype))


class RMSNorm(nnx.Module):
  """RMSNorm (Zhang & Sennrich 2019): x / rms(x) * g, computed in fp32."""

  def __init__(self, d: int, *, eps: float = 1e-6, axis_name: str = "embed"):
    self.scale = make_param(jnp.ones((d,), jnp.float32), "vector", (axis_name,))
    self.eps = eps

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (y * self.scale[...]).astype(x.dtype)
