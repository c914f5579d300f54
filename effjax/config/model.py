"""Model sections: the transformer, its attention and its MoE FFN."""

from __future__ import annotations

import dataclasses
import typing

from effjax.config.base import ConfigError, _check_sign, _field
from effjax.config.mor import MoRConfig
from effjax.config.masa import SHARING, MasaConfig

if typing.TYPE_CHECKING:
  from effjax.config import Config


@dataclasses.dataclass(frozen=True)
class AttentionConfig:
  score: str = _field("softmax", ("softmax", "lssa", "lssar"),
                      "attention score function (docs/attention.md)")
  impl: str = _field("auto", ("auto", "xla", "pallas_tpu", "pallas_gpu", "pallas_mgpu",
                              "pallas_mgpu_ws", "interpret", "interpret_mgpu",
                              "interpret_mgpu_ws", "interpret_tpu", "cudnn", "splash",
                              "interpret_splash"),
                     "attention kernel implementation (pallas_kernels/attention/api.py); "
                     "cudnn / splash: the vendors' softmax kernels (GPU / TPU); "
                     "auto: see effjax/resolve.py")
  qk_norm: bool = _field(False, doc="RMS-normalise q and k per head (learned gains)")
  log_n_scale: bool = _field(False, doc="softmax baseline: multiply logits by log(position)")
  eval_score: str = _field("", ("", "softmax", "lssa", "lssar"),
                           "score at evaluation and sampling ('' = score); e.g. score=lssa with "
                           "eval_score=lssar applies the re-weighting at inference only")
  lssar_p: float = _field(15.0, doc="LSSAR re-weighting power p")
  lssar_offset_rows: int = _field(3, doc="rows i <= this use offset O_i = 0")
  doc_mask: bool = _field(True, doc="restrict attention to the token's own packed document")
  query_chunk: int = _field(0, doc="the XLA reference path: evaluate this many queries at a time "
                            "(memory linear in length, for long evaluation; 0: all at once; "
                            "not the log_n_scale baseline)")
  sharing: str = _field("none", SHARING, "attention parameter sharing: MASA or a baseline, "
                        "sized by model.masa.* (docs/masa.md)")

  def check(self, config: Config) -> None:
    del config
    if self.query_chunk < 0:
      raise ConfigError(f"model.attention.query_chunk must be >= 0 (0: off); got "
                        f"{self.query_chunk}.")
    if self.lssar_p <= 0:   # p = 0 would give masked keys weight 0**0 = 1
      raise ConfigError(f"model.attention.lssar_p must be > 0; got {self.lssar_p}.")
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
  dispatch: str = _field("auto", ("auto", "ragged_dot", "blocks", "gmm"),
                         "grouped matmul: lax.ragged_dot, block-gathered batched matmul, or "
                         "gmm: a grouped-matmul Pallas kernel (megablox on TPU, Mosaic GPU on "
                         "Hopper, interpret mode on CPU) (auto: ragged_dot on TPU/GPU, blocks "
                         "on CPU)")
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
  arch: str = _field("standard", ("standard", "lipschitz"), "lipschitz: no norms, convex "
                     "residuals, 1/d logits, GELU/1.1289 MLP (docs/constraints.md)")
  param: str = _field("sp", ("sp", "mup"), "standard parameterisation or muP (docs/mup.md)")
  base_width: int = _field(0, doc="muP proxy width d0 (0: d_model, i.e. width multiplier 1)")
  output_mult: float = _field(1.0, doc="muP alpha_out: logits = alpha_out * (W h) / m")
  attn_mult: float = _field(1.0, doc="muP alpha_attn: attention logits scaled by alpha/d_head")
  zero_init_query: bool = _field(False, doc="initialise the query projection at zero")
  zero_init_readout: bool = _field(False, doc="initialise the untied LM head at zero")
  loss_chunk: int = _field(0, doc="LM head + cross-entropy in chunks of this many sequence "
                           "positions (x batch tokens), never materialising [B, L, V] logits "
                           "(effjax/models/lm_head.py); 0: whole sequence at once")
  attention: AttentionConfig = dataclasses.field(default_factory=AttentionConfig)
  moe: MoEConfig = dataclasses.field(default_factory=MoEConfig)
  mor: MoRConfig = dataclasses.field(default_factory=MoRConfig)
  masa: MasaConfig = dataclasses.field(default_factory=MasaConfig)

  def check(self, config: Config) -> None:
    positive = {"model.d_model": self.d_model, "model.n_layers": self.n_layers,
                "model.n_heads": self.n_heads}
    _check_sign(positive, {"model.vocab_size": self.vocab_size,
                           "model.n_kv_heads": self.n_kv_heads,
                           "model.head_dim": self.head_dim, "model.mlp_dim": self.mlp_dim,
                           "model.loss_chunk": self.loss_chunk})
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
    self.mor.check(config)
    self.masa.check(config)
