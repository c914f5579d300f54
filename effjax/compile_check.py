"""Ahead-of-time check: compile the train step for a device topology without those devices
and report per-device memory, so out-of-memory and sharding errors show up before a pod is
booked (issue 4).

  python -m effjax.compile_check --config=configs/NAME.py --topology=v5p-128 [--config.k=v]
  python -m effjax.compile_check --config=configs/NAME.py --topology=cpu:8

TPU topologies (e.g. v5p-128, v5e-16, or a "4x4x8" shape with --chip=v5p) come from
jax.experimental.topologies, which needs libtpu installed (pip install 'jax[tpu]'); where
that is missing the check says so and exits 2. `cpu:N` compiles for N host devices (forced,
always available): the same sharding plan, with XLA's CPU memory figures.
Multi-slice: --num_slices=N joins N copies of the TPU topology over DCN; set mesh.dcn.* to
match (e.g. --config.mesh.dcn.data=N). Only shapes are built (no weights are computed) and
the step is lowered with the mesh and shardings the trainer would use; nothing is executed.
Each `auto` is resolved for the topology's devices (effjax/resolve.py), not this host's:
for a TPU topology the step computes in bfloat16 with the TPU attention kernels and
ragged_dot MoE dispatch, as on the pod; the choices are printed.
"""

from __future__ import annotations

import argparse
import math
import os
import sys


# Chips per slice -> the physical shape: 3D tori (v4, v5p; slice names count TensorCores,
# two per chip) and 2D meshes (v5e, v6e; names count chips).
_SHAPES_3D = {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8",
              256: "4x8x8", 512: "8x8x8", 1024: "8x8x16", 2048: "8x16x16", 4096: "16x16x16"}
_SHAPES_2D = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16",
              256: "16x16"}


def tpu_topology_name(topology: str, chip: str | None = None) -> str:
  """'v5p-128' -> 'v5p:4x4x8' (jax.experimental.topologies' chip:shape form); a bare shape
  needs --chip; 'chip:shape' passes through."""
  if ":" in topology:
    return topology
  if chip:
    return f"{chip}:{topology}"
  kind, _, count = topology.rpartition("-")
  if not kind or not count.isdigit():
    raise SystemExit(f"compile_check: --topology={topology!r}: use cpu:N, a slice name like "
                     "v5p-128 / v5e-16, or a shape like 4x4x8 with --chip=v5p")
  kind = {"v5litepod": "v5e", "v6": "v6e"}.get(kind, kind)
  n = int(count)
  shapes, chips = (_SHAPES_3D, n // 2) if kind in ("v4", "v5p") else (_SHAPES_2D, n)
  if chips not in shapes:
    raise SystemExit(f"compile_check: no known shape for {topology} ({chips} chips); pass the "
                     f"shape, e.g. --topology=4x4x8 --chip={kind}")
  return f"{kind}:{shapes[chips]}"


def _tpu_devices(topology: str, chip: str | None, num_slices: int = 1):
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  name = tpu_topology_name(topology, chip)
  extra = {"num_slices": num_slices} if num_slices > 1 else {}
  try:
    return topologies.get_topology_desc(name, "tpu", **extra).devices
  except Exception as e:  # pylint: disable=broad-except
    print(f"compile_check: cannot describe TPU topology {name!r} here ({type(e).__name__}: "
          f"{str(e).splitlines()[0][:200]}). A TPU topology needs libtpu (pip install "
          "'jax[tpu]') and a JAX that supports jax.experimental.topologies for it; "
          "--topology=cpu:N works everywhere.", file=sys.stderr)
    raise SystemExit(2) from None


def _gib(x) -> str:
  return f"{x / 2**30:.3f}" if x is not None else "n/a"


def main(argv=None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", required=True)
  parser.add_argument("--topology", required=True, help="cpu:N, or a TPU topology (v5p-128)")
  parser.add_argument("--chip", default=None, help="TPU chip when --topology is a shape")
  parser.add_argument("--num_slices", type=int, default=1,
                      help="TPU multi-slice: this many slices of --topology joined over DCN "
                           "(set mesh.dcn.* to match)")
  args, overrides = parser.parse_known_args(argv)
  cpu = args.topology.startswith("cpu:")
  if cpu:  # must happen before jax is imported
    n = int(args.topology.split(":", 1)[1])
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + f" --xla_force_host_platform_device_count={n}")
    os.environ["JAX_PLATFORMS"] = "cpu"
  import jax  # pylint: disable=g-import-not-at-top
  from effjax import checks  # pylint: disable=g-import-not-at-top
  from effjax import config as config_lib  # pylint: disable=g-import-not-at-top
  from effjax import data as data_lib  # pylint: disable=g-import-not-at-top
  from effjax import resolve as resolve_lib  # pylint: disable=g-import-not-at-top
  from effjax.parallel import make_mesh, sharding  # pylint: disable=g-import-not-at-top
  from effjax.train.extensions import merged_phase  # pylint: disable=g-import-not-at-top
  from effjax.train.plan import plan_state  # pylint: disable=g-import-not-at-top
  from effjax.train.registry import build_extensions  # pylint: disable=g-import-not-at-top

  devices = jax.devices() if cpu else _tpu_devices(args.topology, args.chip, args.num_slices)
  try:
    config, _ = checks.load(["--config=" + args.config, *overrides], num_devices=len(devices),
                            platform=devices[0].platform)
    dcn = math.prod(getattr(config.mesh.dcn, a) for a in sharding.MESH_AXES)
    if args.num_slices > 1 and dcn != args.num_slices:
      raise config_lib.ConfigError(
          f"--num_slices={args.num_slices} but the product of mesh.dcn.* is {dcn}: set "
          f"mesh.dcn.<axis> so that the slices multiply to {args.num_slices} (e.g. "
          f"--config.mesh.dcn.data={args.num_slices})")
    mesh = make_mesh(config.mesh, devices)
  except config_lib.ConfigError as e:
    print(f"compile_check: config error: {e}", file=sys.stderr)
    return 2
  resolved = resolve_lib.resolve(config, devices)  # for the topology, not this host
  fixed = resolve_lib.changes(config, resolved)
  print(f"compile_check: resolved for {devices[0].platform}: "
        + (", ".join(f"{k}={v}" for k, v in fixed.items()) or "nothing to resolve"),
        file=sys.stderr, flush=True)
  config = resolved
  t = config.train
  vocab = data_lib.load_tokenizer(config.data.tokenizer,
                                  eos_token=config.data.eos_token or None).vocab_size
  plan = plan_state(config, vocab, mesh, sharding.rules_for(config.mesh))  # no weights computed
  try:  # every host of the topology must get an equal share of each global batch
    for process in sorted({d.process_index for d in devices}):
      sharding.process_batch_slot(plan.batch_sharding, t.batch_size, process)
  except config_lib.ConfigError as e:
    print(f"compile_check: config error: {e}", file=sys.stderr)
    return 2
  extensions = build_extensions(config, plan.model)
  slices = f"{args.num_slices} x " if args.num_slices > 1 else ""
  print(f"compile_check: {slices}{args.topology}: {len(devices)} devices ({devices[0].device_kind}), "
        f"mesh {dict(mesh.shape)}", file=sys.stderr, flush=True)
  compiled, _ = plan.compile_step(plan.abstract(), plan.abstract_batch(t.batch_size, t.seq_len),
                                  extensions, merged_phase(extensions, 0))
  mem = compiled.memory_analysis()
  fields = ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes",
            "generated_code_size_in_bytes")
  print("| per device (XLA memory_analysis) | GiB |\n|---|---:|")
  for f in fields:
    print(f"| {f.replace('_in_bytes', '')} | {_gib(getattr(mem, f, None)) if mem else 'n/a'} |")
  if mem is not None:
    total = sum(getattr(mem, f, 0) or 0 for f in fields[:3]) - (
        getattr(mem, "alias_size_in_bytes", 0) or 0)
    print(f"| total (arguments + outputs + temp - donated aliases) | {_gib(total)} |")
  print(f"compile_check: OK, the train step compiles for {args.topology}", file=sys.stderr)
  return 0


if __name__ == "__main__":
  sys.exit(main())
