"""Device-mesh sections."""

from __future__ import annotations

import dataclasses

from effjax.config.base import _field


@dataclasses.dataclass(frozen=True)
class DcnConfig:
  """Multi-slice: the part of each mesh axis that crosses slices over DCN (1: inside a slice)."""
  data: int = _field(1, doc="slices along mesh.data (must divide mesh.data)")
  fsdp: int = 1
  tensor: int = 1
  expert: int = 1


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  data: int = _field(-1, doc="-1: all devices not used by the other axes")
  fsdp: int = 1
  tensor: int = 1
  expert: int = 1
  rules: str = _field("", doc="logical-axis -> mesh-axis overrides, e.g. 'mlp=fsdp,embed=none,"
                              "batch=data+fsdp' (defaults: effjax/parallel/sharding.py)")
  dcn: DcnConfig = dataclasses.field(default_factory=DcnConfig)
