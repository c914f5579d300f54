"""Quantized export (issue 6): integer weight codes + scales for every quantized block linear,
everything else in fp32, and the convention needed to turn codes back into weights.

  meta = export(config, params, "w4a4.npz", model.index)
  params_deq, meta = load("w4a4.npz")   # then build with quant.weights_on_grid=true

Per kernel W [in, out] (rows = output units over fan-in, docs/qat.md):
  quest   codes k in [-2^(b-1), 2^(b-1)), step [1, out]; rotated value (k + 1/2) step; the
          weight is H (that) with H the block Hadamard of size `block` along fan-in (H = H^T =
          H^-1, 1/sqrt(block) normalised), or no rotation when block = 0.
  statsq  codes k, scale s/2^(b-1) [1, out]; value (k + 1/2) scale.
  lsq     codes k in [-Q_n, Q_p], step [out]; value k step.
Loading gives params whose kernels are the dequantized weights (for quant.hadamard=half: in
the rotated basis, where that model multiplies); build the model with
`quant.weights_on_grid=true` (inputs still quantized) and it computes the QAT model's function.
"""

from __future__ import annotations

import io
import json

import jax
import jax.numpy as jnp
import numpy as np

from effjax import paths
from effjax.models.index import flatten, unflatten
from effjax.quant import methods
from effjax.quant.hooks import WEIGHT


def _key(path) -> str:
  return "/".join(str(p) for p in path)


def quantize_kernel(quantizer, w, state=None) -> dict:
  """{'codes', 'scale', 'block', 'offset'} of one kernel, from its quantizer object."""
  w = jnp.asarray(w, jnp.float32)
  codes, scale = quantizer.codes(w, state or {})
  return {"codes": codes, "scale": scale, "block": quantizer.block(w.shape[0]),
          "offset": quantizer.offset}


def dequantize(entry: dict, rotate_back: bool = True) -> np.ndarray:
  """Weights from codes; rotate_back=False keeps QuEST values in the rotated basis (what a
  quant.hadamard=half model multiplies with)."""
  return np.asarray(methods.dequantize(entry["codes"], entry["scale"], entry["offset"],
                                       entry["block"], rotate_back))


def export(config, params, path: str, index) -> dict:
  """Writes `path` (.npz) with codes/scales of the quantized kernels (the model index's
  quantized linears) and fp32 for the rest; returns the metadata (also stored in the file
  under '__meta__')."""
  if index.stacked:
    raise ValueError("quantized export reads per-layer kernels: a model.scan_layers=true "
                     "model is not exported yet; convert its params with "
                     "effjax.models.stack.unstack_layers and export them with the index of the "
                     "same model built with model.scan_layers=false")
  if any(e.module in ("SharedLinear", "LowRankLinear") for e in index.entries):
    raise ValueError("quantized export reads stored Linear kernels: a model with "
                     "model.attention.sharing (MASA, low-rank or shared matrix sets) builds its "
                     "attention weights from shared parameters, which the export does not "
                     "quantize yet (docs/masa.md, Limits)")
  flat = flatten(jax.device_get(params))
  arrays, meta = {}, {"quant": {k: (list(v) if isinstance(v, tuple) else v)
                                for k, v in vars(config.quant).items()},
                      "kernels": {}, "hadamard": "block Sylvester / sqrt(block) along fan-in "
                                                 "(axis 0); weight = H @ rotated values"}
  for linear in index.quantized():
    kpath = linear.at("kernel")
    step = flat.get(linear.at(WEIGHT, "step"))
    entry = quantize_kernel(linear.quantizer, flat.pop(kpath),
                            None if step is None else {"step": step})
    arrays[_key(kpath) + "#codes"] = np.asarray(entry["codes"], np.int8)
    arrays[_key(kpath) + "#scale"] = np.asarray(entry["scale"], np.float32)
    meta["kernels"][_key(kpath)] = {"block": int(entry["block"]), "offset": entry["offset"],
                                    "path": [p if isinstance(p, str) else int(p) for p in kpath]}
  meta["dense"] = {}
  for p, v in flat.items():
    arrays[_key(p)] = np.asarray(v, np.float32)
    meta["dense"][_key(p)] = [x if isinstance(x, str) else int(x) for x in p]
  buf = io.BytesIO()  # to any path (local, file:// or cloud: effjax/paths.py), as written
  np.savez(buf, __meta__=np.frombuffer(json.dumps(meta).encode(), np.uint8), **arrays)
  paths.write_bytes(path, buf.getvalue())
  return meta


def load(path: str) -> tuple[dict, dict]:
  """(params with dequantized kernels, metadata) from an export."""
  with np.load(io.BytesIO(paths.as_path(path).read_bytes())) as f:
    meta = json.loads(bytes(f["__meta__"]).decode())
    flat = {tuple(p): f[key] for key, p in meta["dense"].items()}
    half = meta["quant"]["hadamard"] == "half"
    for key, k in meta["kernels"].items():
      flat[tuple(k["path"])] = dequantize({"codes": f[key + "#codes"],
                                           "scale": f[key + "#scale"], "block": k["block"],
                                           "offset": k["offset"]}, rotate_back=not half)
  return unflatten({p: jnp.asarray(v) for p, v in flat.items()}), meta


# ----------------------------------------------------------------------------- command line


def _eval_loss(model, params, buffers, batches) -> float:
  from effjax.train.step import make_eval_step, summarize_eval  # pylint: disable=g-import-not-at-top
  step = jax.jit(make_eval_step(model, None))
  sums = [step(params, buffers, {k: jnp.asarray(v) for k, v in b.items()}) for b in batches]
  total = {k: sum(float(s[k]) for s in sums) for k in ("nll_sum", "tokens", "bytes")}
  return float(summarize_eval(total)["eval/loss"])


def main(argv=None) -> int:
  """python -m effjax.quant.export --workdir=runs/w4a4 [--out=FILE] [--step=N] [--eval_batches=4]

  Exports a QAT run's checkpoint (latest, or --step) to FILE (default WORKDIR/quantized.npz),
  then loads it back into a model with quant.weights_on_grid=true and prints both models'
  loss on the run's validation batches: they must agree."""
  import argparse  # pylint: disable=g-import-not-at-top
  import dataclasses  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  from effjax import checks  # pylint: disable=g-import-not-at-top
  from effjax import config as config_lib  # pylint: disable=g-import-not-at-top
  from effjax import data as data_lib  # pylint: disable=g-import-not-at-top
  from effjax import models  # pylint: disable=g-import-not-at-top
  from effjax.parallel import make_mesh, sharding  # pylint: disable=g-import-not-at-top
  from effjax.train.plan import plan_state  # pylint: disable=g-import-not-at-top
  from effjax.train.checkpoint import Checkpointer  # pylint: disable=g-import-not-at-top
  from effjax.train.trainer import load_data  # pylint: disable=g-import-not-at-top

  parser = argparse.ArgumentParser(description="Quantized export of a QAT run")
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--out", default=None)
  parser.add_argument("--step", type=int, default=None)
  parser.add_argument("--eval_batches", type=int, default=4)
  args = parser.parse_args(argv)
  fail = lambda msg: (print(f"export: {msg}", file=sys.stderr), 2)[1]
  workdir = paths.as_path(args.workdir)  # a local folder, file:// or a cloud URL
  config_path = workdir / "config.json"
  if not config_path.exists():
    return fail(f"{config_path} not found: --workdir must be a training run's workdir")
  config = config_lib.from_dict(paths.read_json(config_path))
  if config.quant.method == "none":
    return fail(f"the run in {args.workdir} has quant.method=none: nothing to export")
  if config.model.scan_layers:
    return fail(f"the run in {args.workdir} has model.scan_layers=true: its kernels are stacked "
                f"over layers, which the export does not read yet")
  # One host device and the attention kernel it has: the export is a host-side file.
  model_config = dataclasses.replace(config.model, attention=dataclasses.replace(
      config.model.attention, impl="auto"))
  config = dataclasses.replace(config, mesh=config_lib.MeshConfig(data=1), model=model_config)
  try:
    config = checks.validate(config, 1)
  except config_lib.ConfigError as e:
    return fail(f"{config_path}: {e}")
  bundle = load_data(config)
  vocab = bundle.tokenizer.vocab_size
  ckpt = Checkpointer(workdir / "checkpoints", keep=10**6)
  saved = sorted(ckpt.manager.all_steps())
  step = args.step or (saved[-1] if saved else None)
  if step not in saved:
    ckpt.close()
    return fail(f"no checkpoint at step {step} in {ckpt.directory} (saved steps: "
                f"{', '.join(map(str, saved)) or 'none'})")
  mesh, rules = make_mesh(config.mesh, jax.devices()[:1]), sharding.rules_for(config.mesh)
  plan = plan_state(config, vocab, mesh, rules)
  state = ckpt.restore(step, plan.abstract())
  ckpt.close()
  qat = plan.model
  out = paths.as_path(args.out) if args.out else workdir / "quantized.npz"
  meta = export(config, state.params, out, qat.index)
  print(f"export: step {step} -> {out} ({out.stat().length / 2**20:.2f} MiB; "
        f"{len(meta['kernels'])} quantized kernels as int8 codes + scales)", file=sys.stderr)
  on_grid = dataclasses.replace(config, quant=dataclasses.replace(config.quant,
                                                                  weights_on_grid=True))
  loaded, _ = load(out)
  t = config.train
  kw = dict(seq_len=t.seq_len, batch_size=t.batch_size, num_batches=args.eval_batches,
            eos_id=bundle.tokenizer.eos_id)
  if isinstance(bundle.corpus, data_lib.Mixture):  # data.sources: every source's batches
    batches = [b for per_source in data_lib.mixture_eval_batches(bundle.corpus, **kw).values()
               for b in per_source]
  else:
    batches = data_lib.eval_batches(bundle.corpus.val_tokens, **kw)
  before = _eval_loss(qat, state.params, state.buffers, batches)
  after = _eval_loss(models.build(on_grid, vocab, batch_groups=1), loaded, state.buffers, batches)
  print(f"| model | eval loss ({len(batches)} batches) |\n|---|---|\n| QAT checkpoint | {before:.6f} |"
        f"\n| loaded export (weights_on_grid) | {after:.6f} |")
  if not abs(after - before) <= 1e-4 * abs(before):
    return fail(f"the loaded export's loss {after:.6f} differs from the QAT model's {before:.6f}")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
