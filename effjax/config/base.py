"""What every config section uses: the error type and the field helper.

The config package is a leaf: nothing in it imports from the rest of effjax.
"""

from __future__ import annotations

import dataclasses


class ConfigError(ValueError):
  """A bad config key or value. The message names the key(s) involved."""


def _field(default, choices=None, doc=""):
  meta = {"doc": doc}
  if choices is not None:
    meta["choices"] = tuple(choices)
  if isinstance(default, (list, dict)):
    raise TypeError("use tuples for sequence defaults")
  return dataclasses.field(default=default, metadata=meta)


def _check_sign(positive: dict, nonneg: dict) -> None:
  for key, value in positive.items():
    if value <= 0:
      raise ConfigError(f"{key} must be positive; got {value}.")
  for key, value in nonneg.items():
    if value < 0:
      raise ConfigError(f"{key} must be >= 0; got {value}.")
