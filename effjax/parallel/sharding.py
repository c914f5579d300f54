"""Mesh and logical-axis rules (MaxText style): parameter placements come from the
logical axis names in each parameter's spec, never from parameter names.

* The mesh has the axes data, fsdp, tensor, expert (sizes from `mesh.*`). With
  `mesh.dcn.*` > 1 it is a hybrid mesh: that part of an axis crosses slices (DCN),
  the rest stays inside a slice (ICI) -- `mesh_utils.create_hybrid_device_mesh`.
* Rules map logical axes to mesh axes (DEFAULT_RULES, overridden by `mesh.rules`,
  e.g. 'mlp=fsdp,embed=none,batch=data+fsdp'), so a mesh experiment is config only.
* A dimension whose size is not divisible by the mesh axes it maps to stays
  replicated along that dimension (logged once), so odd sizes never fail.
* `constrain(x, logical_axes)` is the activation sharding constraint for model code:
  a no-op unless the trainer traces inside `activation_sharding(mesh, rules)`.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import math

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from effjax.config import ConfigError, MeshConfig

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


# ----------------------------------------------------------------------------- rules


def rules_from_string(text: str) -> dict[str, object]:
  """DEFAULT_RULES with overrides 'logical=mesh_axis[+mesh_axis...]|none,...' (mesh.rules)."""
  rules = dict(DEFAULT_RULES)
  for part in filter(None, (p.strip() for p in text.split(","))):
    name, eq, target = (x.strip() for x in part.partition("="))
    if not eq or name not in DEFAULT_RULES:
      raise ConfigError(f"mesh.rules: {part!r} must be LOGICAL=MESH_AXES with LOGICAL one of "
                        f"{', '.join(DEFAULT_RULES)}")
    if target == "none":
      rules[name] = None
      continue
    axes = tuple(a.strip() for a in target.split("+"))
    bad = [a for a in axes if a not in MESH_AXES]
    if bad or len(set(axes)) != len(axes):
      raise ConfigError(f"mesh.rules: {part!r}: mesh axes must be distinct names from "
                        f"{', '.join(MESH_AXES)} joined by '+', or 'none'")
    rules[name] = axes[0] if len(axes) == 1 else axes
  return rules


def rules_for(config: MeshConfig) -> dict[str, object]:
  return rules_from_string(config.rules) if config.rules else DEFAULT_RULES


def _flat(mesh_axes) -> tuple:
  if mesh_axes is None:
    return ()
  return (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes)


def batch_shards(sizes: dict, rules=None) -> int:
  """How many ways the global batch is split (product of the 'batch' rule's mesh axes)."""
  rules = DEFAULT_RULES if rules is None else rules
  return math.prod(sizes[a] for a in _flat(rules["batch"]))


# ----------------------------------------------------------------------------- mesh


def resolve_mesh_shape(mesh: MeshConfig, num_devices: int) -> dict[str, int]:
  """Mesh axis sizes with a single -1 filled in; the product must equal num_devices."""
  sizes = {"data": mesh.data, "fsdp": mesh.fsdp, "tensor": mesh.tensor, "expert": mesh.expert}
  free = [k for k, v in sizes.items() if v == -1]
  if len(free) > 1:
    raise ConfigError(f"Only one mesh axis may be -1; got {', '.join('mesh.' + k for k in free)}.")
  for k, v in sizes.items():
    if v == 0 or v < -1:
      raise ConfigError(f"mesh.{k} must be a positive size or -1; got {v}.")
  fixed = 1
  for k, v in sizes.items():
    if v != -1:
      fixed *= v
  if free:
    if num_devices % fixed:
      raise ConfigError(
          f"mesh.fsdp x mesh.tensor x mesh.expert x mesh.data (fixed part = {fixed}) does not "
          f"divide the device count {num_devices}.")
    sizes[free[0]] = num_devices // fixed
  product = sizes["data"] * sizes["fsdp"] * sizes["tensor"] * sizes["expert"]
  if product != num_devices:
    raise ConfigError(
        f"mesh.data x mesh.fsdp x mesh.tensor x mesh.expert = {sizes['data']} x {sizes['fsdp']} x "
        f"{sizes['tensor']} x {sizes['expert']} = {product}, but there are {num_devices} devices.")
  return sizes


def dcn_sizes(config: MeshConfig, sizes: dict) -> dict[str, int]:
  """The cross-slice (DCN) part of each mesh axis; each must divide the axis size."""
  dcn = {a: getattr(config.dcn, a) for a in MESH_AXES}
  for a, d in dcn.items():
    if d < 1 or sizes[a] % d:
      raise ConfigError(f"mesh.dcn.{a} ({d}) must be >= 1 and divide mesh.{a} ({sizes[a]}): "
                        f"mesh.{a} is the whole axis, mesh.dcn.{a} its part across slices.")
  return dcn


def _ici_mesh(shape: tuple, devices) -> np.ndarray:
  """Topology-aware device order within a slice (plain reshape where none is known)."""
  try:
    return mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
  except (ValueError, NotImplementedError, AssertionError) as e:
    logging.warning("mesh_utils.create_device_mesh(%s) failed (%s); using jax.devices() order",
                    shape, e)
    return np.asarray(devices).reshape(shape)


def _hybrid_mesh(ici: tuple, dcn: tuple, devices) -> np.ndarray:
  """Slices are the DCN granules on TPU (devices carry their slice_index); elsewhere (GPU
  clusters, CPU tests) processes stand in for slices."""
  granules = math.prod(dcn)
  by_process = devices[0].platform != "tpu"
  found = len({d.process_index if by_process else d.slice_index for d in devices})
  if found != granules:
    what = "process(es) (not TPU: processes stand in for slices)" if by_process else "slice(s)"
    raise ConfigError(f"mesh.dcn.* asks for {granules} slices (product of mesh.dcn.*), but the "
                      f"devices span {found} {what}.")
  return mesh_utils.create_hybrid_device_mesh(ici, dcn, devices, process_is_granule=by_process,
                                              allow_split_physical_axes=True)


def make_mesh(config: MeshConfig, devices=None) -> Mesh:
  """The (data, fsdp, tensor, expert) mesh over `devices` (default: all, every process)."""
  devices = jax.devices() if devices is None else list(devices)
  sizes = resolve_mesh_shape(config, len(devices))
  dcn = dcn_sizes(config, sizes)
  shape = tuple(sizes[a] for a in MESH_AXES)
  if math.prod(dcn.values()) > 1:
    ici = tuple(sizes[a] // dcn[a] for a in MESH_AXES)
    array = _hybrid_mesh(ici, tuple(dcn[a] for a in MESH_AXES), devices)
  else:
    array = _ici_mesh(shape, devices)
  return Mesh(array, MESH_AXES)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


# ----------------------------------------------------------------------------- placements


def _axis_size(mesh: Mesh, mesh_axes) -> int:
  return int(np.prod([mesh.shape[a] for a in _flat(mesh_axes)]))


_warned: set = set()


def logical_to_spec(axes: tuple, shape: tuple, mesh: Mesh, rules=None) -> P:
  """PartitionSpec for an array with these logical axes (None entries: replicated)."""
  rules = DEFAULT_RULES if rules is None else rules
  spec, used = [], set()
  for name, dim in zip(axes, shape):
    target = rules.get(name) if name is not None else None
    flat = _flat(target)
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


def process_batch_slot(sharding: NamedSharding, global_rows: int,
                       process_index: int | None = None) -> tuple[int, int]:
  """(slot, num_slots): this process feeds b = global_rows / num_slots rows of each global
  batch, the slot-th b-row slice of what the data pipeline yields.

  Derived from the rows each process's devices hold, so the pipeline reads exactly the
  rows its devices need whatever the device order. On topology-aware and hybrid meshes a
  process's rows are usually not contiguous (hosts interleave along the batch axis);
  `jax.make_array_from_process_local_data` places its local rows onto them in order.
  Processes whose devices hold the same rows (a batch-replicated axis across processes)
  share a slot. Slots are numbered by their smallest row. Raises ConfigError where the
  processes' row sets overlap partially or differ in size.
  """
  owned: dict[int, set] = {}
  for device, index in sharding.devices_indices_map((global_rows,)).items():
    owned.setdefault(device.process_index, set()).update(range(global_rows)[index[0]])
  distinct = sorted({frozenset(rows) for rows in owned.values()}, key=min)
  sizes = {len(rows) for rows in distinct}
  if (len(sizes) != 1 or sum(map(len, distinct)) != global_rows
      or frozenset().union(*distinct) != frozenset(range(global_rows))):
    raise ConfigError(f"under this mesh the processes' batch rows do not split the global batch "
                      f"of {global_rows} into equal disjoint parts ({len(distinct)} distinct "
                      f"row sets of sizes {sorted(sizes)}); change mesh.* or mesh.rules batch=")
  me = jax.process_index() if process_index is None else process_index
  return distinct.index(frozenset(owned[me])), len(distinct)


# ----------------------------------------------------------------------------- activations

_ACTIVATION_CONTEXT: contextvars.ContextVar = contextvars.ContextVar("effjax_activation_sharding",
                                                                     default=None)


@contextlib.contextmanager
def activation_sharding(mesh: Mesh, rules=None):
  """While tracing inside this context, `constrain` pins activations to the mesh."""
  token = _ACTIVATION_CONTEXT.set((mesh, DEFAULT_RULES if rules is None else rules))
  try:
    yield
  finally:
    _ACTIVATION_CONTEXT.reset(token)


def constrain(x: jax.Array, logical_axes: tuple) -> jax.Array:
  """with_sharding_constraint from logical axis names, e.g. ('batch', 'length', 'embed');
  the identity outside `activation_sharding` (single device, tests, sampling). Read at
  trace time: jit caches traces per function, so enter the context before the function's
  first trace (the trainer builds a fresh step function inside it)."""
  context = _ACTIVATION_CONTEXT.get()
  if context is None:
    return x
  mesh, rules = context
  spec = logical_to_spec(logical_axes, x.shape, mesh, rules)
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))
