"""Mesh and logical-axis rules (MaxText style): parameter placements come from the
logical axis names in each parameter's spec, never from parameter names.

A dimension whose size is not divisible by the mesh axes it maps to stays
replicated along that dimension (logged once), so odd sizes never fail.
"""

from __future__ import annotations

import logging

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from effjax.config import MeshConfig, resolve_mesh_shape

MESH_AXES = ("data", "fsdp", "tensor", "expert")

# logical axis -> mesh axis (or tuple of mesh axes, or None = replicated)
DEFAULT_RULES: dict[str, object] = {
    "batch": ("data", "fsdp"),
    "embed": "fsdp",
    "heads": "tensor",
    "kv_heads": "tensor",
    "mlp": "tensor",
    "vocab": "tensor",
    "experts": "expert",
    "head_dim": None,
    "length": None,
    "layers": None,
}


def rules_from_string(text: str) -> dict[str, object]:
  """DEFAULT_RULES with overrides 'logical=mesh_axis[+mesh_axis...]|none,...' (mesh.rules)."""
  from effjax.config import ConfigError  # pylint: disable=g-import-not-at-top
  rules = dict(DEFAULT_RULES)
  for part in filter(None, (p.strip() for p in text.split(","))):
    name, eq, target = (x.strip() for x in part.partition("="))
    if not eq or name not in DEFAULT_RULES:
      raise ConfigError(f"mesh.rules: {part!r} must be LOGICAL=MESH_AXES with LOGICAL one of "
                        f"{', '.join(DEFAULT_RULES)}")
    axes = tuple(a.strip() for a in target.split("+"))
    if target == "none":
      rules[name] = None
      continue
    bad = [a for a in axes if a not in MESH_AXES]
    if bad or len(set(axes)) != len(axes):
      raise ConfigError(f"mesh.rules: {part!r}: mesh axes must be distinct names from "
                        f"{', '.join(MESH_AXES)} joined by '+', or 'none'")
    rules[name] = axes[0] if len(axes) == 1 else axes
  return rules


def rules_for(config: MeshConfig) -> dict[str, object]:
  return rules_from_string(config.rules) if config.rules else DEFAULT_RULES


def make_mesh(config: MeshConfig, devices=None) -> Mesh:
  devices = jax.devices() if devices is None else devices
  sizes = resolve_mesh_shape(config, len(devices))
  shape = tuple(sizes[a] for a in MESH_AXES)
  device_array = np.asarray(devices).reshape(shape)
  return Mesh(device_array, MESH_AXES)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def _axis_size(mesh: Mesh, mesh_axes) -> int:
  if mesh_axes is None:
    return 1
  if isinstance(mesh_axes, str):
    mesh_axes = (mesh_axes,)
  return int(np.prod([mesh.shape[a] for a in mesh_axes]))


_warned: set = set()


def logical_to_spec(axes: tuple, shape: tuple, mesh: Mesh, rules=None) -> P:
  rules = DEFAULT_RULES if rules is None else rules
  spec, used = [], set()
  for name, dim in zip(axes, shape):
    target = rules.get(name) if name is not None else None
    flat = (target,) if isinstance(target, str) else tuple(target or ())
    if target is None or any(a in used for a in flat) or dim % _axis_size(mesh, target):
      if target is not None and dim % _axis_size(mesh, target) and (name, dim) not in _warned:
        _warned.add((name, dim))
        logging.info("logical axis %r (size %d) not divisible by mesh %r: replicated", name, dim,
                     target)
      spec.append(None)
    else:
      used.update(flat)
      spec.append(target)
  return P(*spec)


def param_shardings(specs: dict, shapes: dict, mesh: Mesh, rules=None) -> dict:
  """NamedSharding per parameter from its ParamSpec's logical axes."""
  return jax.tree.map(
      lambda spec, x: NamedSharding(mesh, logical_to_spec(spec.axes, x.shape, mesh, rules)),
      specs, shapes, is_leaf=lambda s: hasattr(s, "axes"))


def batch_sharding(mesh: Mesh, rules=None) -> NamedSharding:
  """Leading (batch) dimension over the rule for 'batch' (data x fsdp by default)."""
  rules = DEFAULT_RULES if rules is None else rules
  return NamedSharding(mesh, P(rules["batch"]))
