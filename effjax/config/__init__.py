"""Typed config schema, config files, dotted overrides and validation.

A config file is a Python file with `get_config()` returning a (possibly partial)
`ml_collections.ConfigDict` or nested dict; it is applied on top of the defaults
below, then `--config.section.key=value` overrides are applied, and each section
checks itself (its `check` method). Every error is a `ConfigError` that names the
key (and the valid choices, or the closest valid key for a typo).

This package is a leaf: it imports nothing from the rest of effjax. Checks that need the package
(MoE layer specs, mesh rules and device counts, parameter roles, kernels on the target
platform) are in effjax/checks.py; effjax/resolve.py fixes each `auto` for the target
devices.

Sections are frozen dataclasses, so a `Config` is hashable and can be closed over by
jitted functions.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import json
import os
import types
import typing
from typing import Any, Optional


from effjax.config.base import ConfigError, _check_sign, _field  # noqa: F401
from effjax.config.constraints import ConstraintsConfig  # noqa: F401
from effjax.config.masa import MasaConfig  # noqa: F401
from effjax.config.mesh import DcnConfig, MeshConfig  # noqa: F401
from effjax.config.model import AttentionConfig, ModelConfig, MoEConfig  # noqa: F401
from effjax.config.mor import MoRConfig  # noqa: F401
from effjax.config.train import DataConfig, OptimConfig, QuantConfig, TrainConfig  # noqa: F401

# ----------------------------------------------------------------------------- schema

@dataclasses.dataclass(frozen=True)
class Config:
  seed: int = 0
  model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
  train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
  optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
  data: DataConfig = dataclasses.field(default_factory=DataConfig)
  mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
  quant: QuantConfig = dataclasses.field(default_factory=QuantConfig)
  constraints: ConstraintsConfig = dataclasses.field(default_factory=ConstraintsConfig)


# ----------------------------------------------------------------------------- keys


def _is_section(tp) -> bool:
  return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _field_types(cls) -> dict[str, Any]:
  hints = typing.get_type_hints(cls)
  return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def valid_keys(cls=Config, prefix="") -> list[str]:
  """All dotted leaf keys of the schema, e.g. 'model.attention.score'."""
  keys = []
  for name, tp in _field_types(cls).items():
    if _is_section(tp):
      keys += valid_keys(tp, f"{prefix}{name}.")
    else:
      keys.append(prefix + name)
  return keys


def _unknown_key_error(key: str) -> ConfigError:
  keys = valid_keys()
  close = difflib.get_close_matches(key, keys, n=1, cutoff=0.5)
  if not close:  # a typo in the last component only
    last = key.rsplit(".", 1)[-1]
    close = [k for k in keys if difflib.get_close_matches(last, [k.rsplit(".", 1)[-1]], cutoff=0.75)]
  hint = f" Did you mean '{close[0]}'?" if close else ""
  section = key.rsplit(".", 1)[0] if "." in key else ""
  in_section = [k for k in keys if section and k.startswith(section + ".")]
  listing = f" Valid keys in '{section}': {', '.join(in_section)}." if in_section else ""
  return ConfigError(f"Unknown config key '{key}'.{hint}{listing}")


def _lookup_type(key: str):
  cls, parts = Config, key.split(".")
  for i, part in enumerate(parts):
    types_ = _field_types(cls)
    if part not in types_:
      raise _unknown_key_error(key)
    tp = types_[part]
    if i == len(parts) - 1:
      if _is_section(tp):
        raise ConfigError(f"'{key}' is a config section; set one of its keys, e.g. "
                          f"'{key}.{next(iter(_field_types(tp)))}'.")
      return cls, part, tp
    if not _is_section(tp):
      raise _unknown_key_error(key)
    cls = tp
  raise _unknown_key_error(key)


def _coerce(key: str, tp, value):
  """Converts `value` (a Python value or a command-line string) to type `tp`."""
  origin = typing.get_origin(tp)
  if origin in (typing.Union, types.UnionType):
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if value is None or (isinstance(value, str) and value.lower() == "none"):
      return None
    return _coerce(key, args[0], value)
  try:
    if tp is bool:
      if isinstance(value, bool):
        return value
      if isinstance(value, str) and value.lower() in ("true", "1", "yes"):
        return True
      if isinstance(value, str) and value.lower() in ("false", "0", "no"):
        return False
      raise ValueError
    if tp is int:
      if isinstance(value, bool):
        raise ValueError
      if isinstance(value, float) and value.is_integer():
        return int(value)
      if isinstance(value, int):
        return value
      if isinstance(value, str):
        f = float(value)
        if f.is_integer():
          return int(f)
      raise ValueError
    if tp is float:
      if isinstance(value, bool):
        raise ValueError
      return float(value)
    if tp is str:
      if not isinstance(value, str):
        raise ValueError
      return value
    if tp is tuple or origin is tuple:
      if isinstance(value, str):
        items = [v.strip() for v in value.split(",") if v.strip()]
        return tuple(int(v) if v.lstrip("-").isdigit() else v for v in items)
      return tuple(value)
  except (TypeError, ValueError):
    pass
  name = getattr(tp, "__name__", str(tp))
  raise ConfigError(f"Config key '{key}' expects {name}, got {value!r}.")


def _set(config: Config, key: str, value) -> Config:
  cls, name, tp = _lookup_type(key)
  value = _coerce(key, tp, value)
  choices = {f.name: f.metadata.get("choices") for f in dataclasses.fields(cls)}[name]
  if choices is not None and value not in choices:
    raise ConfigError(f"Config key '{key}' must be one of {', '.join(map(str, choices))}; "
                      f"got {value!r}.")
  parts = key.split(".")

  def rebuild(node, i):
    if i == len(parts) - 1:
      return dataclasses.replace(node, **{parts[i]: value})
    return dataclasses.replace(node, **{parts[i]: rebuild(getattr(node, parts[i]), i + 1)})

  return rebuild(config, 0)


def _flatten(d, prefix=""):
  if hasattr(d, "to_dict"):  # ml_collections.ConfigDict
    d = d.to_dict()
  if dataclasses.is_dataclass(d):
    d = dataclasses.asdict(d)
  for k, v in d.items():
    if isinstance(v, dict) or hasattr(v, "to_dict"):
      yield from _flatten(v, f"{prefix}{k}.")
    else:
      yield prefix + k, v


def apply_overrides(config: Config, overrides: dict[str, Any] | Any) -> Config:
  """Sets dotted keys (from a dict, a ConfigDict or a nested dict), with validation."""
  for key, value in _flatten(overrides):
    config = _set(config, key, value)
  return config


def to_dict(config: Config) -> dict:
  return dataclasses.asdict(config)


def from_dict(d: dict) -> Config:
  return validate(apply_overrides(Config(), d))


def to_json(config: Config) -> str:
  return json.dumps(to_dict(config), indent=2, sort_keys=True)


_MISSING = object()


def _get(d: dict, dotted: str, missing=None):
  for part in dotted.split("."):
    if not isinstance(d, dict) or part not in d:
      return missing
    d = d[part]
  return list(d) if isinstance(d, tuple) else d


def diff(old: dict, config: Config) -> dict:
  """{dotted key: [old, new]} where a config.json dict `old` and `config` differ. A key that
  `old` lacks (written before the key existed) counts as its default value, so a run made
  before a new key was added resumes when the key is left at its default."""
  new = json.loads(to_json(config))
  default = json.loads(to_json(Config()))
  out = {}
  for k in valid_keys():
    was = _get(old, k, _MISSING)
    was = _get(default, k) if was is _MISSING else was
    if was != _get(new, k):
      out[k] = [was, _get(new, k)]
  return out


# ----------------------------------------------------------------------------- loading


def load_config_file(path: str) -> Config:
  """Loads `path` (a Python file with get_config()) on top of the defaults."""
  if not os.path.isfile(path):
    here = os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs")
    avail = sorted(f for f in os.listdir(here) if f.endswith(".py")) if os.path.isdir(here) else []
    raise ConfigError(f"Config file '{path}' not found. Available in configs/: {', '.join(avail)}.")
  spec = importlib.util.spec_from_file_location("_effjax_config_file", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not hasattr(module, "get_config"):
    raise ConfigError(f"Config file '{path}' defines no get_config().")
  try:
    return apply_overrides(Config(), module.get_config())
  except ConfigError as e:
    raise ConfigError(f"In config file '{path}': {e}") from None


def parse_override_args(argv: list[str]) -> tuple[Optional[str], dict[str, str], list[str]]:
  """Splits argv into (--config path, {dotted key: string value}, remaining args)."""
  config_path, overrides, rest = None, {}, []
  i = 0
  while i < len(argv):
    arg = argv[i]
    if arg.startswith("--config.") or arg.startswith("--config="):
      body = arg[2:]
      if "=" in body:
        key, value = body.split("=", 1)
      elif i + 1 < len(argv):
        key, value = body, argv[i + 1]
        i += 1
      else:
        raise ConfigError(f"Missing value for '{arg}'.")
      if key == "config":
        config_path = value
      else:
        overrides[key[len("config."):]] = value
    else:
      rest.append(arg)
    i += 1
  return config_path, overrides, rest


# ----------------------------------------------------------------------------- validation


def validate(config: Config) -> Config:
  """Runs each section's `check` (ConfigError names the keys involved) and fills
  model.max_positions = 0 with train.seq_len for learned positions.

  Checks that need the package (MoE layer specs, mesh rules and device counts, parameter
  roles, attention kernels on the target platform) are in effjax/checks.py, which runs
  these first.
  """
  for f in dataclasses.fields(config):
    section = getattr(config, f.name)
    if hasattr(section, "check"):
      section.check(config)
  m = config.model
  if m.position == "learned" and not m.max_positions:
    config = dataclasses.replace(config, model=dataclasses.replace(
        m, max_positions=config.train.seq_len))
  return config


def load(argv: list[str], default_path: Optional[str] = None) -> tuple[Config, list[str]]:
  """Config from command-line args: --config=FILE and --config.key=value overrides, checked
  section by section (effjax.checks.load adds the package's and the devices' checks)."""
  path, overrides, rest = parse_override_args(argv)
  path = path or default_path
  config = load_config_file(path) if path else Config()
  config = apply_overrides(config, overrides)
  return validate(config), rest
