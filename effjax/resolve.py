"""`resolve(config, devices)`: every `auto` fixed for the devices the program will run on.

The platform is the target devices' (`devices[0].platform`: cpu, gpu or tpu), not this
host's backend, so `compile_check --topology=v5p-128` on a CPU host builds the program a
TPU runs. What `auto` becomes:

  model.compute_dtype    float32 on CPU, bfloat16 elsewhere
  model.attention.impl   xla on CPU, and wherever the model takes the XLA path anyway
                         (log_n_scale, quant.qkr); on TPU / GPU 'auto:tpu' / 'auto:gpu':
                         the kernel dispatch's own auto for that platform
                         (pallas_kernels.attention.attention(implementation='auto',
                         platform=...)), i.e. its Pallas kernel where the kernel supports the
                         call's shapes, else the XLA reference, decided per call at trace time
  model.moe.dispatch     blocks on CPU, ragged_dot elsewhere (MoE sections only, as below);
                         an explicit gmm becomes gmm:<kernel> for the platform (megablox on
                         TPU, mgpu on a Hopper GPU, megablox_interpret on CPU; refused on
                         other GPUs): effjax/models/grouped_matmul.py
  model.moe.renormalize  true for a sigmoid router with top_k > 1, else false (left auto
                         under model.moe.topk_schedule, where k changes per layer and phase)
  model.max_positions    train.seq_len for learned positions (config.validate does it too)

Model code reads these values; an `auto` that reaches it unresolved takes the portable
path (float32, XLA attention, block dispatch), and `models.build` resolves for the local
devices. The user's config, autos included, is what a run's config.json keeps (so resume
compares like with like); `changes` lists what was fixed, for run_info.json.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

from effjax import config as config_lib
from effjax.config import Config

KERNEL_PLATFORMS = ("tpu", "gpu")  # platforms with Pallas attention kernels


def platform_of(devices: Sequence[Any]) -> str:
  """'cpu', 'gpu' or 'tpu' of the first device (a mesh's devices share one platform)."""
  devices = list(devices)
  if not devices:
    raise ValueError("resolve needs the target devices; got none")
  return devices[0].platform


def resolve(config: Config, devices: Sequence[Any]) -> Config:
  """`config` with each auto fixed for `devices` (see the module docstring); idempotent."""
  platform = platform_of(devices)
  cpu = platform == "cpu"
  m = config.model
  a, e = m.attention, m.moe
  if m.compute_dtype == "auto":
    m = dataclasses.replace(m, compute_dtype="float32" if cpu else "bfloat16")
  if a.impl == "auto":
    xla = a.log_n_scale or config.quant.qkr or platform not in KERNEL_PLATFORMS
    m = dataclasses.replace(m, attention=dataclasses.replace(
        a, impl="xla" if xla else f"auto:{platform}"))
  if e.num_experts and e.dispatch == "auto":
    e = dataclasses.replace(e, dispatch="blocks" if cpu else "ragged_dot")
  if e.num_experts and e.dispatch == "gmm":
    from effjax.models import grouped_matmul  # pylint: disable=g-import-not-at-top  (cycle)
    kernel = grouped_matmul.backend_for(platform, getattr(devices[0], "device_kind", ""))
    if kernel is None:
      raise config_lib.ConfigError(
          f"model.moe.dispatch=gmm: no grouped-matmul kernel for "
          f"{getattr(devices[0], 'device_kind', platform)} (megablox on TPU, Mosaic GPU on "
          "Hopper); use dispatch=ragged_dot or blocks.")
    e = dataclasses.replace(e, dispatch=f"gmm:{kernel}")
  if e.num_experts and e.renormalize == "auto" and not e.topk_schedule:
    renorm = e.router == "sigmoid" and e.top_k > 1
    e = dataclasses.replace(e, renormalize="true" if renorm else "false")
  m = dataclasses.replace(m, moe=e)
  if m.position == "learned" and not m.max_positions:
    m = dataclasses.replace(m, max_positions=config.train.seq_len)
  return dataclasses.replace(config, model=m)


def _flat(d: dict, prefix: str = "") -> dict:
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flat(v, f"{prefix}{k}."))
    else:
      out[prefix + k] = v
  return out


def changes(config: Config, resolved: Config) -> dict[str, Any]:
  """{dotted key: resolved value} for each key `resolve` changed."""
  before = _flat(config_lib.to_dict(config))
  after = _flat(config_lib.to_dict(resolved))
  return {k: v for k, v in after.items() if before[k] != v}
