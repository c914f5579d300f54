"""Mixture-of-Experts FFN (docs/moe.md): fine-grained SwiGLU experts, fp32 router,
dropless grouped-matmul dispatch (or a capacity-factor baseline), balance losses and
the auxiliary-loss-free (ALF-LB) bias.

References: Switch Transformer (Fedus et al. 2021) balance loss; DeepSeek-V3 (2024)
sigmoid router, sequence-wise loss and ALF-LB (Wang et al. 2024, "Auxiliary-Loss-Free
Load Balancing"); Sigma-MoE-Tiny top-1 LBL and progressive sparsification.

The layer returns (y, aux). aux keys:
  loss/moe_*        balance losses (added to the training loss)
  stat/moe_counts   [E] tokens per expert (summed over micro-batches; drives ALF-LB)
  stat/moe_probs    [E] router probabilities summed over tokens (for f-versus-p)
  moe/*             scalar metrics (maxvio, zero experts, dropped fraction, bias spread)
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx

from effjax.config import MoEConfig
from effjax.models import grouped_matmul
from effjax.models.layers import Buffer, Tag, make_param, normal_init, plain_linear
from effjax.models.mlp import SwiGLU

BALANCE_CHOICES = ("none", "aux", "seq_aux", "global_aux", "alf", "top1_lbl")


def balance_methods(cfg: MoEConfig) -> set[str]:
  methods = {m.strip() for m in cfg.balance.split("+") if m.strip()}
  bad = methods - set(BALANCE_CHOICES)
  if bad:
    raise ValueError(f"model.moe.balance has unknown method(s) {sorted(bad)}; valid: "
                     f"{', '.join(BALANCE_CHOICES)} joined with '+'")
  return methods - {"none"}


def moe_layer_indices(cfg: MoEConfig, n_layers: int) -> tuple[int, ...]:
  """Parses model.moe.layers: 'all', 'START:STOP' (python slice) or '1,3,5'."""
  if cfg.num_experts == 0:
    return ()
  spec = cfg.layers.strip()
  try:
    if spec == "all":
      idx = range(n_layers)
    elif ":" in spec:
      start, stop = (int(p) if p else None for p in spec.split(":", 1))
      idx = range(n_layers)[start:stop]
    else:
      idx = [int(p) for p in spec.split(",") if p.strip()]
  except ValueError:
    raise ValueError(f"model.moe.layers must be 'all', 'START:STOP' or '1,3'; got {spec!r}") from None
  idx = tuple(sorted(set(idx)))
  if any(i < 0 or i >= n_layers for i in idx):
    raise ValueError(f"model.moe.layers {spec!r} names layers outside 0..{n_layers - 1}")
  return idx


def topk_schedule(cfg: MoEConfig, n_layers: int, total_steps: int):
  """Per-layer top-k as a function of step (Sigma-MoE progressive sparsification).

  Returns (switch_step, k_before, k_after): tuples over layers. Without a schedule
  switch_step is None and k_before == k_after.
  """
  layers = moe_layer_indices(cfg, n_layers)
  final = tuple(cfg.top_k if i in layers else 0 for i in range(n_layers))
  if not cfg.topk_schedule:
    return None, final, final
  try:
    low_frac, k_low, switch_frac = cfg.topk_schedule.split(":")
    low_frac, k_low, switch_frac = float(low_frac), int(k_low), float(switch_frac)
  except ValueError:
    raise ValueError("model.moe.topk_schedule must be 'LOW_FRAC:K_LOW:SWITCH_FRAC', e.g. "
                     f"'0.25:4:0.3'; got {cfg.topk_schedule!r}") from None
  n_low = max(1, int(round(low_frac * n_layers)))
  before = tuple(k_low if (i in layers and i < n_low) else k for i, k in enumerate(final))
  return int(round(switch_frac * total_steps)), before, final


def route(scores_TxE: jax.Array, bias_E: jax.Array | None, k: int, renormalize: bool,
          scale: float) -> tuple[jax.Array, jax.Array]:
  """Top-k selection on biased scores, gating on unbiased ones (ALF-LB, DeepSeek-V3).

  idx = top_k(s + b);  g = s[idx] (/ sum s[idx] if renormalize) * scale.
  """
  select_TxE = scores_TxE if bias_E is None else scores_TxE + jax.lax.stop_gradient(bias_E)
  _, idx_TxK = jax.lax.top_k(select_TxE, k)
  gates_TxK = jnp.take_along_axis(scores_TxE, idx_TxK, axis=-1)
  if renormalize:
    gates_TxK = gates_TxK / (jnp.sum(gates_TxK, axis=-1, keepdims=True) + 1e-20)
  return idx_TxK, gates_TxK * scale


def _swiglu(x, w_gate, w_up, w_down, spec_in, spec_out):
  h = jax.nn.silu(jnp.einsum(spec_in, x, w_gate)) * jnp.einsum(spec_in, x, w_up)
  return jnp.einsum(spec_out, h, w_down)


def grouped_swiglu_ragged(xs_NxD, w_gate_ExDxF, w_up_ExDxF, w_down_ExFxD, group_sizes_E,
                          matmul=jax.lax.ragged_dot):
  """Experts on rows sorted by expert, via a grouped matmul (jax.lax.ragged_dot, or a
  kernel from effjax/models/grouped_matmul.py)."""
  g = matmul(xs_NxD, w_gate_ExDxF, group_sizes_E)
  u = matmul(xs_NxD, w_up_ExDxF, group_sizes_E)
  return matmul(jax.nn.silu(g) * u, w_down_ExFxD, group_sizes_E)


def grouped_swiglu_blocks(xs_NxD, w_gate_ExDxF, w_up_ExDxF, w_down_ExFxD, group_sizes_E,
                          block: int):
  """Experts on rows sorted by expert, as a batched matmul over fixed-size blocks.

  Each expert's rows are padded to a multiple of `block`; every block then belongs to
  one expert, whose weights are gathered per block. Exact (padding rows are zero and
  discarded); costs at most E x (block - 1) padding rows. Fast on CPU, where
  ragged_dot falls back to dense work over all groups.
  """
  n, d = xs_NxD.shape
  e = group_sizes_E.shape[0]
  nb = -(-(n + e * (block - 1)) // block)  # static bound on the number of blocks
  padded_E = -(-group_sizes_E // block) * block
  start_pad_E = jnp.cumsum(padded_E) - padded_E
  start_E = jnp.cumsum(group_sizes_E) - group_sizes_E
  expert_N = jnp.repeat(jnp.arange(e), group_sizes_E, total_repeat_length=n)
  dest_N = start_pad_E[expert_N] + jnp.arange(n) - start_E[expert_N]
  buf = jnp.zeros((nb * block, d), xs_NxD.dtype).at[dest_N].set(xs_NxD)
  block_expert = jnp.searchsorted(jnp.cumsum(padded_E), jnp.arange(nb) * block, side="right")
  block_expert = jnp.minimum(block_expert, e - 1)
  y = _swiglu(buf.reshape(nb, block, d), w_gate_ExDxF[block_expert], w_up_ExDxF[block_expert],
              w_down_ExFxD[block_expert], "nbd,ndf->nbf", "nbf,nfd->nbd")
  return y.reshape(nb * block, -1)[dest_N]


class MoE(nnx.Module):
  """Routed fine-grained SwiGLU experts (+ optional shared experts) in the FFN slot."""

  def __init__(self, d_model: int, cfg: MoEConfig, *, expert_dim: int, init_std: float,
               n_layers: int, batch_groups: int = 1, rngs: nnx.Rngs, shared_linear=None,
               tag: Tag | None = None):
    """shared_linear: the projection factory for the shared experts (a SwiGLU); tag: the
    builder's (kind "moe", layer i), which the model index and ctx.moe_top_k use."""
    e, f = cfg.num_experts, expert_dim
    self.cfg, self.batch_groups, self.tag = cfg, batch_groups, tag
    self.methods = balance_methods(cfg)
    self.router = make_param(normal_init(rngs, (d_model, e), init_std), "router",
                             ("embed", "experts"))
    down_std = init_std / math.sqrt(2 * n_layers)
    self.w_gate = make_param(normal_init(rngs, (e, d_model, f), init_std), "expert",
                             ("experts", "embed", "mlp"))
    self.w_up = make_param(normal_init(rngs, (e, d_model, f), init_std), "expert",
                           ("experts", "embed", "mlp"))
    self.w_down = make_param(normal_init(rngs, (e, f, d_model), down_std), "expert",
                             ("experts", "mlp", "embed"))
    self.bias = Buffer(jnp.zeros((e,), jnp.float32))  # ALF-LB, updated outside autodiff
    self.shared = (SwiGLU(d_model, cfg.num_shared * f, init_std=init_std, n_layers=n_layers,
                          linear=shared_linear or plain_linear(rngs)) if cfg.num_shared else None)

  def __call__(self, x_BxLxD: jax.Array, ctx=None, *, top_k: int | None = None):
    """top_k: this call's k (default ctx.moe_top_k[layer] when the context sets a per-layer
    schedule, else model.moe.top_k)."""
    cfg, methods = self.cfg, self.methods
    if top_k is None and ctx is not None and ctx.moe_top_k and self.tag is not None:
      top_k = ctx.moe_top_k[self.tag.layer]
    k = top_k or cfg.top_k
    b, l, d = x_BxLxD.shape
    e = cfg.num_experts
    x_TxD = x_BxLxD.reshape(b * l, d)
    t = x_TxD.shape[0]

    logits_TxE = x_TxD.astype(jnp.float32) @ self.router[...]
    scores_TxE = (jax.nn.sigmoid(logits_TxE) if cfg.router == "sigmoid"
                  else jax.nn.softmax(logits_TxE, axis=-1))
    renorm = {"true": True, "false": False}.get(cfg.renormalize,
                                                cfg.router == "sigmoid" and k > 1)
    bias = self.bias[...] if "alf" in methods else None
    idx_TxK, gates_TxK = route(scores_TxE, bias, k, renorm, cfg.route_scale)

    flat_e = idx_TxK.reshape(-1)
    counts_E = jnp.bincount(flat_e, length=e).astype(jnp.float32)
    dtype = x_BxLxD.dtype
    w = [self.w_gate[...].astype(dtype), self.w_up[...].astype(dtype),
         self.w_down[...].astype(dtype)]
    aux = {}
    if cfg.capacity_factor > 0:
      out_TxKxD, dropped = self._capacity_dispatch(x_TxD, flat_e, w, k)
      aux["moe/dropped_frac"] = dropped / (t * k)
    else:
      order = jnp.argsort(flat_e, stable=True)
      xs = x_TxD[order // k]
      group_sizes = counts_E.astype(jnp.int32)
      if cfg.dispatch == "ragged_dot":  # effjax.resolve fixes auto; unresolved: blocks
        ys = grouped_swiglu_ragged(xs, *w, group_sizes)
      elif cfg.dispatch.startswith("gmm"):  # resolved to gmm:<kernel>; unresolved: local
        kernel = cfg.dispatch.partition(":")[2] or grouped_matmul.local_backend()
        ys = grouped_swiglu_ragged(xs, *w, group_sizes, functools.partial(
            grouped_matmul.grouped_matmul, backend=kernel))
      else:
        ys = grouped_swiglu_blocks(xs, *w, group_sizes, cfg.block_size)
      out_TxKxD = jnp.zeros_like(ys).at[order].set(ys).reshape(t, k, d)
    y_TxD = jnp.einsum("tkd,tk->td", out_TxKxD, gates_TxK.astype(dtype))
    if self.shared is not None:
      y_shared, _ = self.shared(x_TxD)
      y_TxD = y_TxD + y_shared

    # ---- balance losses (f from counts: no gradient; P from probabilities: gradient)
    probs_TxE = scores_TxE / jnp.sum(scores_TxE, axis=-1, keepdims=True)
    sel_TxE = jax.nn.one_hot(idx_TxK, e, dtype=jnp.float32).sum(axis=1)
    if "aux" in methods or "global_aux" in methods:
      groups = {"aux": self.batch_groups, "global_aux": 1}
      for name in {"aux", "global_aux"} & methods:
        g = groups[name] if b % groups[name] == 0 else 1
        f_GxE = sel_TxE.reshape(g, -1, e).mean(axis=1) / k
        p_GxE = probs_TxE.reshape(g, -1, e).mean(axis=1)
        aux[f"loss/moe_{name}"] = cfg.aux_coef * e * jnp.mean(jnp.sum(f_GxE * p_GxE, axis=-1))
    if "seq_aux" in methods:  # DeepSeek-V3: within each sequence
      f_BxE = sel_TxE.reshape(b, l, e).sum(axis=1) * e / (k * l)
      p_BxE = probs_TxE.reshape(b, l, e).mean(axis=1)
      aux["loss/moe_seq_aux"] = cfg.seq_aux_coef * jnp.mean(jnp.sum(f_BxE * p_BxE, axis=-1))
    if "top1_lbl" in methods:  # Sigma-MoE: N sum_i fhat_i^2 / pbar, both from softmax(z/tau)
      tempered_TxE = jax.nn.softmax(logits_TxE / cfg.top1_lbl_tau, axis=-1)
      fhat_E = tempered_TxE.mean(axis=0)
      pbar = jnp.sum(tempered_TxE * sel_TxE, axis=-1).mean()  # at the routed expert(s)
      aux["loss/moe_top1_lbl"] = cfg.top1_lbl_coef * e * jnp.sum(fhat_E ** 2) / pbar

    mean_c = jnp.mean(counts_E)
    aux.update({
        "stat/moe_counts": counts_E,
        "stat/moe_probs": jnp.sum(probs_TxE, axis=0),
        "moe/maxvio": (jnp.max(counts_E) - mean_c) / mean_c,
        "moe/zero_experts": jnp.sum(counts_E == 0).astype(jnp.float32),
        "moe/bias_spread": jnp.max(self.bias[...]) - jnp.min(self.bias[...]),
    })
    return y_TxD.reshape(b, l, d), aux

  def _capacity_dispatch(self, x_TxD, flat_e, w, k):
    """Token-dropping baseline: each expert takes at most C = ceil(cf * T * k / E) tokens,
    in token order; the rest get no expert output (the residual carries them)."""
    e = self.cfg.num_experts
    t, d = x_TxD.shape
    cap = int(math.ceil(self.cfg.capacity_factor * t * k / e))
    onehot_NxE = jax.nn.one_hot(flat_e, e, dtype=jnp.int32)
    pos_N = jnp.sum((jnp.cumsum(onehot_NxE, axis=0) - 1) * onehot_NxE, axis=-1)
    keep_N = pos_N < cap
    slot_N = jnp.where(keep_N, pos_N, cap)  # index `cap` is out of range: dropped by the scatter
    xs = x_TxD[jnp.arange(t * k) // k]
    buf_ExCxD = jnp.zeros((e, cap, d), x_TxD.dtype).at[flat_e, slot_N].set(xs, mode="drop")
    h = _swiglu(buf_ExCxD, *w, "ecd,edf->ecf", "ecf,efd->ecd")
    out_N = h.at[flat_e, slot_N].get(mode="fill", fill_value=0) * keep_N[:, None].astype(h.dtype)
    return out_N.reshape(t, k, d), jnp.sum(~keep_N).astype(jnp.float32)


def alf_bias_update(bias_E, counts_E, *, rate, rule: str):
  """ALF-LB (Wang et al. 2024): b_i <- b_i + u * sign(mean(c) - c_i); or proportional."""
  mean_c = jnp.mean(counts_E)
  err_E = mean_c - counts_E
  delta = jnp.sign(err_E) if rule == "sign" else err_E / jnp.maximum(mean_c, 1e-9)
  return bias_E + rate * delta


def alf_rate(cfg: MoEConfig, step, total_steps: int):
  """u_t: constant, 1/sqrt(t) or 1/t decay (t = optimizer step from 1), 0 after the freeze."""
  t = jnp.asarray(step, jnp.float32) + 1.0
  u = cfg.bias_update_rate * {"none": 1.0, "sqrt": jax.lax.rsqrt(t), "linear": 1.0 / t}[
      cfg.bias_decay]
  return jnp.where(t <= cfg.bias_freeze * total_steps, u, 0.0)
