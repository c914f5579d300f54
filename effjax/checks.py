"""Config checks that need the package, run after each section's own (`config.validate`).

config.py is a leaf; what it cannot know is checked here, above models and parallel:
  * model.moe: the balance, layers and topk_schedule mini-languages (models/moe.py);
  * model.scan_layers: identical layers (no MoE layer subset, no per-layer top-k);
  * optim.no_decay_roles: the parameter roles (models/layers.py);
  * mesh.rules, and given a device count the mesh shape, its DCN split and the batch
    shards (parallel/sharding.py);
  * model.attention.impl: a named Pallas kernel needs its platform on the target devices;
  * train.tensorboard: tensorboardX is installed (the extra); train.wandb_project: wandb is.
Entry points call `load` (command line) or `validate` (a Config); a ConfigError names the
keys involved and the CLIs exit 2 on it.
"""

from __future__ import annotations

import importlib.util
from typing import Optional

import jax

from effjax import config as config_lib
from effjax.config import Config, ConfigError
from effjax.models import moe as moe_lib
from effjax.models.layers import ROLES
from effjax.parallel import sharding


def _check_roles(config: Config) -> None:
  for key in ("optim.no_decay_roles", "optim.muon_roles", "constraints.roles"):
    section, name = key.split(".")
    unknown = set(getattr(getattr(config, section), name)) - set(ROLES)
    if unknown:
      raise ConfigError(f"{key} has unknown roles {sorted(unknown)}; valid roles: "
                        f"{', '.join(ROLES)}.")


def _check_moe(config: Config) -> None:
  e = config.model.moe
  if not e.num_experts:
    return
  try:
    moe_lib.balance_methods(e)
    moe_lib.topk_schedule(e, config.model.n_layers, config.train.steps)
  except ValueError as err:
    raise ConfigError(str(err)) from None
  if e.topk_schedule and int(e.topk_schedule.split(":")[1]) > e.num_experts:
    raise ConfigError(f"model.moe.topk_schedule asks for k above model.moe.num_experts "
                      f"({e.num_experts}).")


def _check_scan(config: Config) -> None:
  """model.scan_layers runs one traced block for every layer: the layers must be identical
  (QAT is: every layer gets the same hooks; learned positions are outside the stack)."""
  m = config.model
  if not m.scan_layers or not m.moe.num_experts:
    return
  e = m.moe
  n_moe = len(moe_lib.moe_layer_indices(e, m.n_layers))
  problems = [msg for bad, msg in (
      (n_moe != m.n_layers, f"model.moe.layers={e.layers!r} puts MoE in {n_moe} of "
                            f"{m.n_layers} layers (dense FFN in the others; use 'all')"),
      (bool(e.topk_schedule), f"model.moe.topk_schedule={e.topk_schedule!r} gives layers "
                              f"different top-k")) if bad]
  if problems:
    raise ConfigError("model.scan_layers=true needs identical layers: " + "; ".join(problems)
                      + "; or set model.scan_layers=false.")


def _check_platform(config: Config, platform: Optional[str]) -> None:
  """A named Pallas implementation must run on the target platform (the kernels' table
  says which: pallas_kernels/attention/api.py)."""
  from pallas_kernels.attention import api  # pylint: disable=g-import-not-at-top (pulls in Pallas)
  impl = config.model.attention.impl
  if impl not in api.BACKENDS or api.BACKENDS[impl].platform is None:
    return  # auto, xla and the interpret modes run anywhere
  # Only here is a backend started (a sweep's parent process must not take the TPU).
  why = api.unavailable_reason(impl, platform or jax.devices()[0].platform)
  if why:
    raise ConfigError(f"model.attention.impl={impl} {why}")


def _check_mesh(config: Config, num_devices: int, rules: dict) -> None:
  sizes = sharding.resolve_mesh_shape(config.mesh, num_devices)
  sharding.dcn_sizes(config.mesh, sizes)
  shards = sharding.batch_shards(sizes, rules)
  micro = config.train.batch_size // config.train.grad_accum
  if micro % shards:
    raise ConfigError(
        f"The micro-batch (train.batch_size / train.grad_accum = {micro}) must be divisible by "
        f"the batch shards (mesh axes of the 'batch' rule: {rules['batch']}) = {shards}.")


def _check_extras(config: Config) -> None:
  """Optional packages the config asks for (pyproject.toml's extras)."""
  if config.train.wandb_project and importlib.util.find_spec("wandb") is None:
    raise ConfigError(f"train.wandb_project={config.train.wandb_project!r} needs wandb: pip "
                      "install -e '.[wandb]' (or leave train.wandb_project empty).")
  if config.train.tensorboard and importlib.util.find_spec("tensorboardX") is None:
    raise ConfigError("train.tensorboard=true needs tensorboardX: pip install -e "
                      "'.[tensorboard]' (or set train.tensorboard=false).")


def _check(config: Config, num_devices: Optional[int], platform: Optional[str]) -> Config:
  _check_roles(config)
  _check_extras(config)
  _check_moe(config)
  _check_scan(config)
  rules = sharding.rules_for(config.mesh)  # raises ConfigError naming the bad part
  _check_platform(config, platform)
  if num_devices is not None:
    _check_mesh(config, num_devices, rules)
  return config


def validate(config: Config, num_devices: Optional[int] = None,
             platform: Optional[str] = None) -> Config:
  """`config.validate` plus the checks above. num_devices: check the mesh for that many
  devices (None: no mesh check); platform: the target devices' platform, 'cpu', 'gpu' or
  'tpu' (None: this host's)."""
  return _check(config_lib.validate(config), num_devices, platform)


def load(argv: list[str], default_path: Optional[str] = None, num_devices: Optional[int] = None,
         platform: Optional[str] = None) -> tuple[Config, list[str]]:
  """`config.load` (--config=FILE and --config.key=value overrides) plus the checks above."""
  config, rest = config_lib.load(argv, default_path)
  return _check(config, num_devices, platform), rest
