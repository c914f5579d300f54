"""The certified Lipschitz bound of a model.arch=lipschitz transformer from its weight norms
(Newhouse et al. 2025, two passes; docs/constraints.md).

Norms: per token, RMS; over a sequence, the max over tokens (attention averages values, so
it is 1-Lipschitz in this norm and not in l2 over the sequence). Weights: RMS->RMS operator
norms ||W|| = sqrt(fan_in/fan_out) sigma_max, taken per head for q, k, v (a head's logits
and values see only its own columns, whose norm can be sqrt(H) times the whole matrix's).
With alpha = 1/(2 n_layers) and the residual stream bounded by a at a block's input:

  pass 1 (activations)  a <- (1-alpha) a + alpha (||W_o|| ||W_v|| / 3) a        attention
                        a <- (1-alpha) a + alpha (||W_out|| ||W_in|| / 1.1289) a  MLP
  pass 2 (Lipschitz)    L <- ((1-alpha) + alpha L_block) L, with
        L_att = ||W_o|| / 3 (||W_v|| + 2 a^2 ||W_q|| ||W_k|| ||W_v||)
        L_mlp = ||W_out|| ||W_in|| / 1.1289
  then x ||unembed|| x |output_mult|.

L_att's second term: logits q.k/d_head = mean(q*k) move by at most 2 a^2 ||W_q|| ||W_k|| per unit
of input change (both endpoints within a); softmax moves the probabilities by at most half the
range of the logit change in l1 (the mean absolute deviation), times values of norm <= ||W_v|| a.
a starts at the largest token-embedding RMS norm (+ the largest learned position's).

`lipschitz_bound_residual` bounds the map from the residual-stream input (the embedding
output) to the logits; `lipschitz_bound` multiplies in ||embed|| (the table as a vocab -> d map).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from effjax.constraints.projections import rms_norms
from effjax.models.index import get_path
from effjax.models.lipschitz import ATTENTION_OUT, GELU_LIPSCHITZ, token_rms


def _norm(w) -> jax.Array:
  return jnp.max(rms_norms(w))


def _head_norm(w_DxHK, head_dim: int) -> jax.Array:
  """Max over heads of the RMS->RMS norm of a head's columns of w [D, H * head_dim]."""
  d = w_DxHK.shape[0]
  heads = jnp.swapaxes(w_DxHK.reshape(d, -1, head_dim), 0, 1)  # [H, D, head_dim]
  return jnp.max(rms_norms(heads))


def _kernels(model, params) -> dict:
  """{layer: {slot: kernel}} of the attention (q, k, v, o) and MLP (up, down) linears."""
  out = {}
  for entry in model.index.entries:
    if entry.tag.kind in ("qkv", "attn_out", "mlp"):
      out.setdefault(entry.tag.layer, {})[entry.tag.slot] = get_path(params, entry.at("kernel"))
  return out


TERMS = ("value", "softmax", "mlp", "unembed")


def certified_bound(model, params, a0=None, omit: tuple = ()) -> dict:
  """{'constraints/lipschitz_bound', ..._residual, activation_bound (the largest a of pass 1),
  per-block terms}.
  a0: the bound on the residual-stream input (default: from the embedding tables).
  omit: terms of TERMS to leave out (only for tests showing that each one is needed)."""
  keep = {t: float(t not in omit) for t in TERMS}
  dims = model.dims
  hd, alpha = dims.head_dim, 1.0 / (2 * dims.n_layers)
  mod = model.module(params)
  table = params["embed"]["table"]
  if a0 is None:
    a0 = jnp.max(token_rms(table))
    if "positions" in params and params["positions"] is not None:
      a0 = a0 + jnp.max(token_rms(params["positions"]["table"]))
  logit_c = 1.0  # the builder scales a Lipschitz model's logits by exactly 1/d_head
  out, a, lip = {}, jnp.asarray(a0, jnp.float32), jnp.float32(1.0)
  a_max = a
  for layer, w in sorted(_kernels(model, params).items()):
    n_q, n_k, n_v = (_head_norm(w[s], hd) for s in ("q", "k", "v"))
    n_o, n_in, n_out = _norm(w["o"]), _norm(w["up"]), _norm(w["down"])
    l_att = ATTENTION_OUT * n_o * (keep["value"] * n_v
                                   + keep["softmax"] * 2 * a ** 2 * n_q * n_k * n_v * logit_c)
    a = (1 - alpha) * a + alpha * ATTENTION_OUT * n_o * n_v * a
    a_max = jnp.maximum(a_max, a)
    l_mlp = n_out * n_in / GELU_LIPSCHITZ
    a = (1 - alpha) * a + alpha * l_mlp * a
    a_max = jnp.maximum(a_max, a)
    l_mlp = keep["mlp"] * l_mlp
    lip = lip * ((1 - alpha) + alpha * l_att) * ((1 - alpha) + alpha * l_mlp)
    out[f"constraints/lipschitz/attn/layer{layer}"] = l_att
    out[f"constraints/lipschitz/mlp/layer{layer}"] = l_mlp
  head = params["head"]["kernel"] if params.get("head") else table.T
  residual = lip * (_norm(head) if keep["unembed"] else 1.0) * abs(mod.output_mult)
  out["constraints/activation_bound"] = a_max  # on every activation of the residual stream
  out["constraints/lipschitz_bound_residual"] = residual
  out["constraints/lipschitz_bound"] = residual * _norm(table)
  return out


def logits_from_residual(model, params, buffers, x_BxLxD):
  """The logits of a Lipschitz model from a given residual-stream input (after the embedding)."""
  mod = model.module(params, buffers)
  from effjax.models.stack import Context  # pylint: disable=g-import-not-at-top
  b, l, _ = x_BxLxD.shape
  positions = jnp.broadcast_to(jnp.arange(l, dtype=jnp.int32), (b, l))
  x, _ = mod.blocks(x_BxLxD, positions, None, Context())
  logits = mod.embed.attend(x) if mod.head is None else mod.head(x)
  return logits * mod.output_mult


def max_activation_norm(model, params, buffers, ids_BxL) -> jax.Array:
  """The largest per-token RMS norm of the residual stream (embedding and every sub-block
  output) on a batch, to set beside the certified activation bound."""
  mod = model.module(params, buffers)
  emb = jnp.max(token_rms(mod.embed(ids_BxL, jnp.float32)))
  _, aux = model.apply(params, buffers, ids_BxL)
  acts = [v for k, v in aux.items() if k.startswith("lipschitz/act_max")]
  return jnp.max(jnp.stack([emb, *acts]))
