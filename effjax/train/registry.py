"""The trainer's extensions, in the order their hooks run. Adding a technique that needs
the loop is one line here (its class says when it is on: `enabled(config)`)."""

from __future__ import annotations

from effjax.train.constraints_extension import ConstraintsExtension
from effjax.train.extensions import Extension
from effjax.train.moe_extension import MoEExtension
from effjax.train.mor_extension import MoRExtension
from effjax.train.quant_extension import QuantExtension
from effjax.train.spectral import SpectralExtension

EXTENSIONS: tuple[type[Extension], ...] = (SpectralExtension, QuantExtension, MoEExtension,
                                           MoRExtension, ConstraintsExtension)


def build_extensions(config, model) -> list[Extension]:
  """The extensions `config` switches on, built for `model` (its index and specs)."""
  return [cls(config, model) for cls in EXTENSIONS if cls.enabled(config)]
