"""Training sections: the loop, the optimizer, the data and quantization-aware training."""

from __future__ import annotations

import dataclasses
import typing

from effjax.config.base import ConfigError, _check_sign, _field

if typing.TYPE_CHECKING:
  from effjax.config import Config


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
  wandb_project: str = _field("", doc="also log to this Weights & Biases project ('' = off; "
                              "needs wandb: pip install -e '.[wandb]'; WANDB_MODE=offline logs "
                              "to <workdir>/wandb without an account)")
  profile_steps: tuple = _field((), doc="e.g. 20,25: capture a jax.profiler trace of steps [20, 25)")
  plot: bool = True
  log_spectral: bool = _field(True, doc="log the top singular value per matrix type at each eval")
  reweight: str = _field("none", ("none", "linear", "softmax", "linupper"),
                         "dynamic loss-based sample reweighting (docs/data.md); linupper: the "
                         "paper's best")
  reweight_temperature: float = _field(1.0, doc="softmax / linupper temperature")
  reweight_warmup: int = _field(0, doc="steps of uniform weights before reweighting starts")
  snapshot_every: int = _field(0, doc="in-memory snapshot of the state every N steps for "
                               "rollback (0: none; docs/fault-tolerance.md)")
  on_nan: str = _field("stop", ("stop", "rollback"),
                       "on a non-finite loss or a failing step: stop (exit 3) or roll back to "
                       "the newest snapshot and skip the batch (needs snapshot_every > 0)")
  max_rollbacks: int = _field(3, doc="rollbacks allowed per run before stopping")
  local_checkpoint_dir: str = _field("", doc="multi-process: fast per-host storage (e.g. "
                                     "/dev/shm/run1) for frequent local checkpoints, recovered "
                                     "from a peer after a lost process ('' = off; "
                                     "docs/fault-tolerance.md)")
  local_checkpoint_every: int = _field(0, doc="steps between local checkpoints (needs "
                                       "train.local_checkpoint_dir)")

  def check(self, config: Config) -> None:
    _check_sign({"train.steps": self.steps, "train.batch_size": self.batch_size,
                 "train.seq_len": self.seq_len, "train.grad_accum": self.grad_accum,
                 "train.eval_every": self.eval_every, "train.log_every": self.log_every,
                 "train.checkpoint_every": self.checkpoint_every,
                 "train.keep_checkpoints": self.keep_checkpoints},
                {"train.warmup_steps": self.warmup_steps, "train.eval_batches": self.eval_batches,
                 "train.sample_tokens": self.sample_tokens})
    if self.snapshot_every < 0 or self.max_rollbacks < 0:
      raise ConfigError(f"train.snapshot_every ({self.snapshot_every}) and train.max_rollbacks "
                        f"({self.max_rollbacks}) must be >= 0.")
    if self.on_nan == "rollback" and not self.snapshot_every:
      raise ConfigError("train.on_nan=rollback needs in-memory snapshots: set "
                        "train.snapshot_every > 0 (e.g. 10).")
    _check_local_tier(self, config)
    if self.batch_size % self.grad_accum:
      raise ConfigError(f"train.batch_size ({self.batch_size}) must be divisible by "
                        f"train.grad_accum ({self.grad_accum}).")
    if self.lr <= 0:
      raise ConfigError(f"train.lr must be positive; got {self.lr}.")
    if self.reweight_temperature <= 0 or self.reweight_warmup < 0:
      raise ConfigError(f"train.reweight_temperature must be > 0 and train.reweight_warmup >= 0; "
                        f"got {self.reweight_temperature}, {self.reweight_warmup}.")
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


def _check_local_tier(t: TrainConfig, config: Config) -> None:
  """The local checkpoint tier's keys (the process count and mesh are checked at start-up,
  effjax/train/local_tier.py)."""
  if t.local_checkpoint_every < 0:
    raise ConfigError(f"train.local_checkpoint_every must be >= 0; got "
                      f"{t.local_checkpoint_every}.")
  if bool(t.local_checkpoint_dir) != bool(t.local_checkpoint_every):
    raise ConfigError("train.local_checkpoint_dir and train.local_checkpoint_every go together: "
                      f"got dir={t.local_checkpoint_dir!r}, every={t.local_checkpoint_every} "
                      "(set both, e.g. /dev/shm/run1 and 10, or neither).")
  if not t.local_checkpoint_dir:
    return
  if "://" in t.local_checkpoint_dir:
    raise ConfigError(f"train.local_checkpoint_dir={t.local_checkpoint_dir!r} must be a local "
                      "path on each host (a RAM disk or local SSD); cloud storage is for "
                      "--workdir, which holds the persistent checkpoints.")
  if config is not None and config.mesh.data == 1:
    raise ConfigError("train.local_checkpoint_dir needs >= 2 data-parallel replicas, one per "
                      "process (a peer keeps the copy); mesh.data=1 has one. Use mesh.data=-1 or "
                      "the number of processes, or set train.local_checkpoint_dir=''.")


# model.arch=lipschitz: embedding rows start (and stay) at unit RMS, 50x the standard 0.02
# init, so the AdamW embedding and readout need a larger step for the same relative change;
# 10 equals Muon's default multiplier (the paper trains every part at one lr scale).
LIPSCHITZ_IO_LR_MULT = 10.0


@dataclasses.dataclass(frozen=True)
class OptimConfig:
  name: str = _field("adamw", ("adamw", "muon"),
                      "muon: Muon for the matrices of optim.muon_roles, AdamW for the rest "
                      "(docs/constraints.md)")
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
  muon_roles: tuple = _field(("hidden", "expert"), doc="muon: parameter roles whose matrices "
                             "Muon trains (the others: AdamW)")
  muon_lr_mult: float = _field(10.0, doc="muon: Muon's lr = train.lr x this (its updates have "
                               "RMS->RMS norm ~ lr)")
  muon_beta: float = _field(0.95, doc="muon: momentum")
  muon_nesterov: bool = _field(True, doc="muon: Nesterov momentum")
  muon_ns: str = _field("quintic", ("quintic", "cubic"), "muon: Newton-Schulz coefficients")
  muon_ns_steps: int = _field(5, doc="muon: Newton-Schulz iterations")
  io_lr_mult: float = _field(0.0, doc="lr multiplier of the embedding and readout roles; 0: "
                             "auto, 1 for the standard model and LIPSCHITZ_IO_LR_MULT (10) "
                             "under model.arch=lipschitz, whose embedding rows have unit RMS "
                             "(docs/constraints.md)")

  def resolved_io_lr_mult(self, arch: str) -> float:
    """The embedding and readout lr multiplier (io_lr_mult, or its auto value for `arch`)."""
    if self.io_lr_mult > 0:
      return self.io_lr_mult
    return LIPSCHITZ_IO_LR_MULT if arch == "lipschitz" else 1.0

  def check(self, config: Config) -> None:
    del config
    if self.io_lr_mult < 0:
      raise ConfigError(f"optim.io_lr_mult must be >= 0 (0: auto); got {self.io_lr_mult}.")
    if self.name != "muon":
      return
    if self.wd_rule != "none":
      raise ConfigError(f"optim.wd_rule={self.wd_rule} is derived for AdamW's timescale "
                        "(docs/mup.md); with optim.name=muon use optim.wd_rule=none.")
    if self.muon_lr_mult <= 0 or self.muon_ns_steps < 1 or not 0 <= self.muon_beta < 1:
      raise ConfigError(f"optim.muon_lr_mult must be > 0 (got {self.muon_lr_mult}), "
                        f"optim.muon_ns_steps >= 1 (got {self.muon_ns_steps}) and "
                        f"optim.muon_beta in [0, 1) (got {self.muon_beta}).")
    if not self.muon_roles:
      raise ConfigError("optim.muon_roles is empty: name the roles Muon trains, e.g. hidden.")


@dataclasses.dataclass(frozen=True)
class DataConfig:
  corpus: str = _field("builtin", ("builtin", "text", "tokens"))
  paths: str = _field("", doc="files or globs (comma separated) for corpus=text|tokens")
  tokenizer: str = _field("byte", doc="'byte', a path to a Hugging Face tokenizer.json, or "
                          "bpe:N (a BPE of N tokens trained on the built-in corpus and cached)")
  eos_token: str = _field("", doc="EOS token string for HF tokenizers ('' = auto-detect)")
  val_percent: int = 5
  token_dtype: str = _field("uint16", ("uint16", "uint32"), "dtype of pre-tokenised shards")
  cache_dir: str = _field("", doc="'' = ~/.cache/effjax/corpora")
  sources: str = _field("", doc="a weighted mixture '[name=]spec[:weight],...' of builtin, "
                        "prepared dirs and text globs (docs/data.md); '' = data.corpus")

  def check(self, config: Config) -> None:
    del config
    if self.corpus in ("text", "tokens") and not self.paths:
      raise ConfigError(f"data.corpus={self.corpus} needs data.paths (files or globs).")
    if self.sources:
      if self.corpus != "builtin" or self.paths:
        raise ConfigError("data.sources replaces data.corpus and data.paths; set one or the "
                          "other (a single source is data.sources='SPEC').")
      for entry in (e.strip() for e in self.sources.split(",") if e.strip()):
        weight = entry.rsplit(":", 1)[1] if ":" in entry else "1"
        try:
          ok = float(weight) > 0
        except ValueError:
          ok = True  # a colon inside a path: the loader names the entry if it is wrong
        if not ok:
          raise ConfigError(f"data.sources entry '{entry}': the weight must be > 0 "
                            "(format '[name=]spec[:weight],...').")
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
