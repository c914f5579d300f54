"""Typed config schema, config files, dotted overrides and validation.

A config file is a Python file with `get_config()` returning a (possibly partial)
`ml_collections.ConfigDict` or nested dict; it is applied on top of the defaults
below, then `--config.section.key=value` overrides are applied, and each section
checks itself (its `check` method). Every error is a `ConfigError` that names the
key (and the valid choices, or the closest valid key for a typo).

This module is a leaf: it imports nothing from effjax. Checks that need the package
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


class ConfigError(ValueError):
  """A bad config key or value. The message names the key(s) involved."""


def _field(default, choices=None, doc=""):
  meta = {"doc": doc}
  if choices is not None:
    meta["choices"] = tuple(choices)
  if isinstance(default, (list, dict)):
    raise TypeError("use tuples for sequence defaults")
  return dataclasses.field(default=default, metadata=meta)


# ----------------------------------------------------------------------------- schema


@dataclasses.dataclass(frozen=True)
class AttentionConfig:
  score: str = _field("softmax", ("softmax", "lssa", "lssar"),
                      "attention score function (docs/attention.md)")
  impl: str = _field("auto", ("auto", "xla", "pallas_tpu", "pallas_gpu", "pallas_mgpu",
                              "interpret", "interpret_mgpu", "interpret_tpu"),
                     "attention kernel implementation (pallas_kernels/attention/api.py); "
                     "auto: see effjax/resolve.py")
  qk_norm: bool = _field(False, doc="RMS-normalise q and k per head (learned gains)")
  log_n_scale: bool = _field(False, doc="softmax baseline: multiply logits by log(position)")
  eval_score: str = _field("", ("", "softmax", "lssa", "lssar"),
                           "score at evaluation and sampling ('' = score); e.g. score=lssa with "
                           "eval_score=lssar applies the re-weighting at inference only")
  lssar_p: float = _field(15.0, doc="LSSAR re-weighting power p")
  lssar_offset_rows: int = _field(3, doc="rows i <= this use offset O_i = 0")
  doc_mask: bool = _field(True, doc="restrict attention to the token's own packed document")

  def check(self, config: Config) -> None:
    del config
    if self.log_n_scale and (self.score != "softmax" or self.impl not in ("auto", "xla")):
      raise ConfigError(f"model.attention.log_n_scale=true is the softmax + log-n baseline: it "
                        f"needs model.attention.score=softmax (got {self.score}) and impl auto or "
                        f"xla (got {self.impl}); the Pallas kernels do not scale logits by log n.")


@dataclasses.dataclass(frozen=True)
class MoEConfig:
  """Mixture-of-Experts in the FFN slot (docs/moe.md). num_experts = 0: dense FFN."""
  num_experts: int = _field(0, doc="routed experts per MoE layer (0: dense MLP everywhere)")
  top_k: int = _field(2, doc="experts per token (target sparsity)")
  num_shared: int = _field(0, doc="always-on shared experts (each of size expert_dim)")
  expert_dim: int = _field(0, doc="hidden size of one expert (0: mlp_dim // top_k)")
  router: str = _field("sigmoid", ("sigmoid", "softmax"),
                       "sigmoid (DeepSeek-V3) or softmax (Switch/Mixtral/Sigma-MoE)")
  renormalize: str = _field("auto", ("auto", "true", "false"),
                            "renormalise the top-k gates (auto: sigmoid with k > 1)")
  route_scale: float = _field(1.0, doc="gate multiplier (DeepSeek-V3 uses 2.5)")
  balance: str = _field("none", doc="'+'-joined subset of none, aux, seq_aux, global_aux, alf, "
                        "top1_lbl (e.g. alf+seq_aux)")
  aux_coef: float = _field(1e-2, doc="alpha of the Switch / global-batch balance loss "
                           "(global_aux: f from the counts of the whole data-parallel batch of "
                           "one micro-batch; not synchronised across micro-batches)")
  seq_aux_coef: float = _field(1e-4, doc="alpha of the sequence-wise balance loss")
  top1_lbl_coef: float = _field(1e-2, doc="alpha of the top-1 LBL (Sigma-MoE)")
  top1_lbl_tau: float = _field(0.1, doc="softmax temperature of the top-1 LBL")
  bias_update_rate: float = _field(1e-3, doc="ALF-LB step u")
  bias_update: str = _field("sign", ("sign", "proportional"), "ALF-LB update rule")
  bias_decay: str = _field("none", ("none", "sqrt", "linear"),
                           "ALF-LB step-size decay: u_t = u, u/sqrt(t), u/t (t in steps, from 1)")
  bias_freeze: float = _field(1.0, doc="fraction of training after which u = 0 (V3: 0.97)")
  layers: str = _field("all", doc="MoE layers: 'all', a slice 'START:STOP', or indices '1,3'")
  topk_schedule: str = _field("", doc="Sigma-MoE progressive sparsification "
                              "'LOW_FRAC:K_LOW:SWITCH_FRAC', e.g. 0.25:4:0.3 = lowest 25% of "
                              "layers use k=4 until 30% of training, then top_k everywhere")
  capacity_factor: float = _field(0.0, doc="0: dropless; > 0: token-dropping baseline")
  dispatch: str = _field("auto", ("auto", "ragged_dot", "blocks"),
                         "grouped matmul: lax.ragged_dot, or block-gathered batched matmul "
                         "(auto: ragged_dot on TPU/GPU, blocks on CPU)")
  block_size: int = _field(64, doc="token block size of the 'blocks' grouped matmul")

  def check(self, config: Config) -> None:
    """The numeric rules; the mini-languages (balance, layers, topk_schedule) are parsed by
    effjax/models/moe.py and checked in effjax/checks.py."""
    del config
    if not self.num_experts:
      return
    if self.num_experts < 0 or not 1 <= self.top_k <= self.num_experts:
      raise ConfigError(f"model.moe.top_k ({self.top_k}) must be between 1 and "
                        f"model.moe.num_experts ({self.num_experts}).")
    for key, value in {"model.moe.num_shared": self.num_shared,
                       "model.moe.expert_dim": self.expert_dim,
                       "model.moe.block_size": self.block_size - 1}.items():
      if value < 0:
        raise ConfigError(f"{key} must be >= 0 (block_size >= 1); got {value}.")
    if not 0 <= self.bias_freeze <= 1:
      raise ConfigError(f"model.moe.bias_freeze must be in [0, 1]; got {self.bias_freeze}.")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  vocab_size: int = _field(0, doc="0: from the tokenizer, padded to a multiple of 128")
  d_model: int = 128
  n_layers: int = 4
  n_heads: int = 4
  n_kv_heads: int = _field(0, doc="0: same as n_heads (no GQA)")
  head_dim: int = _field(0, doc="0: d_model // n_heads")
  mlp_dim: int = _field(0, doc="0: SwiGLU 8/3 * d_model rounded up to a multiple of 64")
  tie_embeddings: bool = False
  position: str = _field("rope", ("rope", "learned"),
                         "rope, or learned absolute positions added to the token embedding")
  max_positions: int = _field(0, doc="learned positions: table size (0: train.seq_len)")
  rope_theta: float = 10000.0
  norm_eps: float = 1e-6
  init_std: float = _field(0.02, doc="std of embedding and hidden-matrix init")
  compute_dtype: str = _field("auto", ("auto", "float32", "bfloat16"),
                              "auto: bfloat16 on TPU/GPU, float32 on CPU (the target "
                              "devices, effjax/resolve.py)")
  remat: bool = _field(False, doc="rematerialise each block in the backward pass")
  scan_layers: bool = _field(False, doc="run the blocks as one jax.lax.scan over parameters "
                             "stacked on a leading 'layers' axis (compile time on deep models); "
                             "needs identical layers (effjax/checks.py)")
  param: str = _field("sp", ("sp", "mup"), "standard parameterisation or muP (docs/mup.md)")
  base_width: int = _field(0, doc="muP proxy width d0 (0: d_model, i.e. width multiplier 1)")
  output_mult: float = _field(1.0, doc="muP alpha_out: logits = alpha_out * (W h) / m")
  attn_mult: float = _field(1.0, doc="muP alpha_attn: attention logits scaled by alpha/d_head")
  zero_init_query: bool = _field(False, doc="initialise the query projection at zero")
  zero_init_readout: bool = _field(False, doc="initialise the untied LM head at zero")
  attention: AttentionConfig = dataclasses.field(default_factory=AttentionConfig)
  moe: MoEConfig = dataclasses.field(default_factory=MoEConfig)

  def check(self, config: Config) -> None:
    positive = {"model.d_model": self.d_model, "model.n_layers": self.n_layers,
                "model.n_heads": self.n_heads}
    _check_sign(positive, {"model.vocab_size": self.vocab_size,
                           "model.n_kv_heads": self.n_kv_heads,
                           "model.head_dim": self.head_dim, "model.mlp_dim": self.mlp_dim})
    if self.head_dim == 0 and self.d_model % self.n_heads:
      raise ConfigError(f"model.d_model ({self.d_model}) must be divisible by model.n_heads "
                        f"({self.n_heads}), or set model.head_dim explicitly.")
    n_kv = self.n_kv_heads or self.n_heads
    if self.n_heads % n_kv:
      raise ConfigError(f"model.n_heads ({self.n_heads}) must be divisible by model.n_kv_heads "
                        f"({n_kv}).")
    head_dim = self.head_dim or self.d_model // self.n_heads
    if head_dim % 2 and self.position == "rope":
      raise ConfigError(f"head dimension ({head_dim}, from model.d_model / model.n_heads or "
                        f"model.head_dim) must be even for RoPE.")
    seq_len = config.train.seq_len
    if self.position == "rope" and self.max_positions:
      raise ConfigError(f"model.max_positions={self.max_positions} sizes the learned position "
                        f"table: it needs model.position=learned (this is rope).")
    if self.position == "learned" and self.max_positions and self.max_positions < seq_len:
      raise ConfigError(f"model.max_positions ({self.max_positions}) is smaller than "
                        f"train.seq_len ({seq_len}); set it >= seq_len or 0 (= seq_len).")
    self.attention.check(config)
    self.moe.check(config)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  steps: int = 1000
  batch_size: int = _field(16, doc="global batch size in sequences")
  seq_len: int = 256
  grad_accum: int = _field(1, doc="micro-batches per step; batch_size must divide evenly")
  lr: float = 3e-3
  schedule: str = _field("cosine", ("cosine", "wsd", "constant"))
  warmup_steps: int = 100
  min_lr_ratio: float = _field(0.1, doc="final lr / peak lr for cosine and wsd")
  decay_fraction: float = _field(0.2, doc="wsd: fraction of steps in the final decay")
  eval_every: int = 200
  eval_batches: int = 8
  log_every: int = 10
  checkpoint_every: int = 500
  keep_checkpoints: int = 3
  sample_tokens: int = _field(200, doc="tokens sampled at the end of a run (0: none)")
  sample_prompt: str = "def "
  sample_temperature: float = 0.8
  tensorboard: bool = _field(False, doc="also write TensorBoard event files (needs tensorboardX)")
  profile_steps: tuple = _field((), doc="e.g. 20,25: capture a jax.profiler trace of steps [20, 25)")
  plot: bool = True
  log_spectral: bool = _field(True, doc="log the top singular value per matrix type at each eval")

  def check(self, config: Config) -> None:
    del config
    _check_sign({"train.steps": self.steps, "train.batch_size": self.batch_size,
                 "train.seq_len": self.seq_len, "train.grad_accum": self.grad_accum,
                 "train.eval_every": self.eval_every, "train.log_every": self.log_every,
                 "train.checkpoint_every": self.checkpoint_every,
                 "train.keep_checkpoints": self.keep_checkpoints},
                {"train.warmup_steps": self.warmup_steps, "train.eval_batches": self.eval_batches,
                 "train.sample_tokens": self.sample_tokens})
    if self.batch_size % self.grad_accum:
      raise ConfigError(f"train.batch_size ({self.batch_size}) must be divisible by "
                        f"train.grad_accum ({self.grad_accum}).")
    if self.lr <= 0:
      raise ConfigError(f"train.lr must be positive; got {self.lr}.")
    if not 0 <= self.min_lr_ratio <= 1:
      raise ConfigError(f"train.min_lr_ratio must be in [0, 1]; got {self.min_lr_ratio}.")
    if not 0 < self.decay_fraction <= 1:
      raise ConfigError(f"train.decay_fraction must be in (0, 1]; got {self.decay_fraction}.")
    if self.warmup_steps > self.steps:
      raise ConfigError(f"train.warmup_steps ({self.warmup_steps}) exceeds train.steps "
                        f"({self.steps}).")
    p = self.profile_steps
    if p and (len(p) != 2 or not all(isinstance(s, int) for s in p) or p[0] >= p[1]):
      raise ConfigError(f"train.profile_steps must be 'START,STOP' with START < STOP; got "
                        f"{p!r}.")


@dataclasses.dataclass(frozen=True)
class OptimConfig:
  name: str = _field("adamw", ("adamw",))
  b1: float = 0.9
  b2: float = 0.95
  eps: float = 1e-8
  weight_decay: float = 0.1
  grad_clip: float = _field(1.0, doc="global-norm clip; 0 disables")
  no_decay_roles: tuple = _field(("vector",), doc="parameter roles that get no weight decay")
  wd_rule: str = _field("none", ("none", "mup", "layerwise", "power_lines"),
                        "weight-decay scaling rule across widths (docs/mup.md)")
  wd_exponent: float = _field(0.5, doc="layerwise rule: lambda_2 = lambda * (d / d0)^e; Fan et "
                              "al. 2025: e = 1/2 (e = 1 is the mup rule on every matrix)")
  wd_tau: float = _field(0.0, doc="power_lines: target AdamW timescale tau = B/(lr*wd*D) "
                         "(fraction of training); sets wd from lr, batch and steps when > 0")


@dataclasses.dataclass(frozen=True)
class DataConfig:
  corpus: str = _field("builtin", ("builtin", "text", "tokens"))
  paths: str = _field("", doc="files or globs (comma separated) for corpus=text|tokens")
  tokenizer: str = _field("byte", doc="'byte' or a path to a Hugging Face tokenizer.json")
  eos_token: str = _field("", doc="EOS token string for HF tokenizers ('' = auto-detect)")
  val_percent: int = 5
  token_dtype: str = _field("uint16", ("uint16", "uint32"), "dtype of pre-tokenised shards")
  cache_dir: str = _field("", doc="'' = ~/.cache/effjax/corpora")

  def check(self, config: Config) -> None:
    del config
    if self.corpus in ("text", "tokens") and not self.paths:
      raise ConfigError(f"data.corpus={self.corpus} needs data.paths (files or globs).")
    if not 0 <= self.val_percent < 100:
      raise ConfigError(f"data.val_percent must be in [0, 100); got {self.val_percent}.")


@dataclasses.dataclass(frozen=True)
class QuantConfig:
  """Quantization-aware training (docs/qat.md; effjax/quant)."""
  method: str = _field("none", ("none", "quest", "statsq", "lsq"),
                       "quest: QuEST weights+inputs; statsq: StatsQ weights + LSQ inputs; "
                       "lsq: LSQ weights + LSQ inputs")
  weight_bits: int = _field(4, doc="weight bits (QuEST/StatsQ 1-8, LSQ 2-8)")
  act_bits: int = _field(4, doc="input-activation bits (0: weights only)")
  hadamard: str = _field("auto", ("auto", "none", "full", "half"),
                         "QuEST rotation: full (rotate back), half (matmul in the rotated "
                         "basis), none; auto = full for quest, none otherwise")
  trust: float = _field(1.0, doc="QuEST trust radius, as a factor on half a grid step")
  layers: tuple = _field(("qkv", "attn_out", "mlp"), doc="block linears to quantize")
  weights_on_grid: bool = _field(False, doc="weights are already quantized (a loaded export, "
                                           "effjax.quant.export): skip weight quantization")
  cga_start: float = _field(0.0, doc="CGA (StatsQ): start of the final phase as a fraction of "
                                      "train.steps; 0 = off")
  cga_br: float = _field(0.005, doc="CGA boundary range: weights within BR of a rounding "
                                    "boundary keep training, the others are frozen")
  qkr: bool = _field(False, doc="OFQ query-key reparameterisation: quantize the per-head "
                                "W_q W_k^T instead of W_q and W_k (needs model.position=learned)")

  def check(self, config: Config) -> None:
    if self.method == "none" and not self.qkr:
      return
    valid_layers = ("qkv", "attn_out", "mlp")
    bad = [x for x in self.layers if x not in valid_layers]
    if bad or not self.layers:
      raise ConfigError(f"quant.layers has {bad or 'nothing'}; valid: {', '.join(valid_layers)}.")
    low = 2 if self.method == "lsq" else 1
    if not low <= self.weight_bits <= 8:
      raise ConfigError(f"quant.weight_bits must be in [{low}, 8] for quant.method="
                        f"{self.method}; got {self.weight_bits}.")
    act_low = 1 if self.method == "quest" else 2  # LSQ inputs need Q_p = 2^(b-1) - 1 >= 1
    if self.act_bits and not act_low <= self.act_bits <= 8:
      raise ConfigError(f"quant.act_bits must be 0 or in [{act_low}, 8] for quant.method="
                        f"{self.method}; got {self.act_bits}.")
    if self.method != "quest" and self.hadamard not in ("auto", "none"):
      raise ConfigError(f"quant.hadamard={self.hadamard} applies to quant.method=quest only; "
                        f"set --config.quant.hadamard=none for {self.method}.")
    if self.trust <= 0:
      raise ConfigError(f"quant.trust must be > 0 (a factor on half a grid step); got "
                        f"{self.trust}.")
    if self.cga_start and (self.method != "statsq" or not 0 < self.cga_start < 1
                           or self.cga_br <= 0):
      raise ConfigError(f"quant.cga_start={self.cga_start} needs quant.method=statsq, a fraction "
                        f"in (0, 1) and quant.cga_br > 0 (got method={self.method}, cga_br="
                        f"{self.cga_br}).")
    if self.qkr:
      a = config.model.attention
      problems = [msg for bad, msg in (
          (self.method == "none", "quant.method is none (nothing to quantize)"),
          ("qkv" not in self.layers, "quant.layers lacks qkv"),
          (config.model.position != "learned",
           f"model.position={config.model.position} (RoPE sits between q and k; use learned)"),
          (a.qk_norm, "model.attention.qk_norm is on (the norm sits between q and k)"),
          (a.score != "softmax", f"model.attention.score={a.score} (QKR is softmax-only)"),
          (a.impl not in ("auto", "xla"), f"model.attention.impl={a.impl} (QKR runs the XLA "
                                          "reference: use auto or xla)")) if bad]
      if problems:
        raise ConfigError("quant.qkr=true cannot run here: " + "; ".join(problems) + ".")
    if config.model.moe.num_experts and "mlp" in self.layers:
      raise ConfigError("quant.layers includes mlp but model.moe.num_experts > 0: MoE expert "
                        "weights are not quantized yet; drop mlp from quant.layers.")


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


@dataclasses.dataclass(frozen=True)
class Config:
  seed: int = 0
  model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
  train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
  optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
  data: DataConfig = dataclasses.field(default_factory=DataConfig)
  mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
  quant: QuantConfig = dataclasses.field(default_factory=QuantConfig)


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


def _get(d: dict, dotted: str):
  for part in dotted.split("."):
    if not isinstance(d, dict) or part not in d:
      return None
    d = d[part]
  return list(d) if isinstance(d, tuple) else d


def diff(old: dict, config: Config) -> dict:
  """{dotted key: [old, new]} where a config.json dict `old` and `config` differ."""
  new = json.loads(to_json(config))
  return {k: [_get(old, k), _get(new, k)] for k in valid_keys() if _get(old, k) != _get(new, k)}


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


def _check_sign(positive: dict, nonneg: dict) -> None:
  for key, value in positive.items():
    if value <= 0:
      raise ConfigError(f"{key} must be positive; got {value}.")
  for key, value in nonneg.items():
    if value < 0:
      raise ConfigError(f"{key} must be >= 0; got {value}.")


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
