"""Weight constraints (docs/constraints.md): which matrices are constrained (by parameter
role), their power-iteration buffers, and the projection of a params tree after a step.

The power-iteration state of a constrained matrix `<name>` [..., in, out] is a Buffer
`<name>_sv` [..., out] on the same module (its top right-singular vector from the previous
step), so it is checkpointed, sharded along the matrix's output axis and stacked with it in a
scanned stack like every other buffer.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from effjax.config.constraints import POWER_METHODS
from effjax.constraints import projections as P
from effjax.models.index import flatten, get_path, set_path
from effjax.models.layers import Buffer, layer_stacked

SV_SUFFIX = "_sv"


def is_matrix(spec) -> bool:
  return len(spec.axes) - layer_stacked(spec.axes) >= 2


def constrained_paths(config, specs: dict) -> list[tuple]:
  """Param paths of the matrices constraints.method projects (roles in constraints.roles)."""
  c = config.constraints
  if c.method == "none":
    return []
  return [path for path, spec in flatten(specs).items()
          if spec.role in c.roles and is_matrix(spec)]


def sv_path(path: tuple) -> tuple:
  return path[:-1] + (path[-1] + SV_SUFFIX,)


def attach_power_buffers(module: nnx.Module, config) -> None:
  """Adds the `<name>_sv` buffer next to every constrained matrix (power-iteration methods)."""
  c = config.constraints
  if c.method not in POWER_METHODS:
    return
  for _, node in list(nnx.iter_graph(module)):
    if not isinstance(node, nnx.Module):
      continue
    for name, value in list(vars(node).items()):
      if not isinstance(value, nnx.Param):
        continue
      axes = value.get_metadata().get("axes")
      if value.get_metadata().get("role") not in c.roles or len(axes) - layer_stacked(axes) < 2:
        continue
      shape = value.get_value().shape
      v0 = jax.random.normal(jax.random.PRNGKey(0), shape[:-2] + shape[-1:], jnp.float32)
      setattr(node, name + SV_SUFFIX, Buffer(v0 / jnp.linalg.norm(v0, axis=-1, keepdims=True),
                                             axes=tuple(axes[:-2]) + (axes[-1],)))


COLD_START_ITERS = 8  # x constraints.power_iters on the first step (the buffer is not warm yet)


def project(w: jax.Array, v, config, *, alpha=None, cold=False):
  """(projected w, new v) for one constrained matrix under constraints.method. cold (a bool
  array): the buffer holds no previous step's vector yet, so iterate longer."""
  c = config.constraints
  s = c.w_max / P.rms_scale(w.shape)  # the bound on sigma_max
  if c.method in POWER_METHODS:
    iters = jnp.where(cold, COLD_START_ITERS * c.power_iters, c.power_iters)
    sigma, u, v = P.power_iteration(w, v, iters)
    if c.method == "spectral_normalize":
      w = P.spectral_normalize(w, sigma, s)
    elif c.method == "spectral_hammer":
      w = P.spectral_hammer(w, sigma, u, v, s)
    else:
      w = P.spectral_weight_decay(w, sigma, u, v, c.spectral_wd)
    return w, v
  if c.method == "soft_cap":
    return P.soft_cap(w, alpha), v
  if c.method == "hard_cap":
    return P.hard_cap(w, s, c.hard_cap_steps), v
  if c.method == "svd_clip":
    return P.svd_clip(w, s), v
  raise ValueError(f"unknown constraints.method {c.method!r}")


def project_params(params: dict, buffers: dict, paths, config, alphas=None, cold=False):
  """(params, buffers) with every matrix at `paths` projected (alphas: soft cap, per path;
  cold: the first step)."""
  power = config.constraints.method in POWER_METHODS
  for path in paths:
    w0 = get_path(params, path)
    v = get_path(buffers, sv_path(path)) if power else None
    w, v = project(w0, v, config, alpha=None if alphas is None else alphas[path], cold=cold)
    params = set_path(params, path, w.astype(w0.dtype))
    if power:
      buffers = set_path(buffers, sv_path(path), v)
  return params, buffers
