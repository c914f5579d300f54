"""Mixture-of-Recursions (Bae et al. 2025, arXiv 2507.10524; docs/mor.md): a recursion
schedule in the block-stack slot.

The unique blocks (model.n_layers of them) are arranged by a sharing pattern into an
optional unique prefix, N_r recursions of a shared block, and an optional unique suffix
(`recursion_schedule`). A router decides which tokens each recursion updates:

  none    plain recursion: every token gets every recursion, x <- f_r(x).
  expert  expert-choice (paper Sec. 2.2.1): recursion r has its own d -> 1 router theta_r
          and keeps the top k_r = cap_r * T tokens of each sequence among those still
          active after recursion r - 1 (hierarchical), cap_r = (N_r - r) / N_r. The
          selected tokens are gathered in sorted (causal) order with their original RoPE
          positions and document ids, the shared block runs on them alone (they attend only
          to each other), and h <- h + g * (f(h) - h) for them, g = alpha * sigmoid(theta_r h)
          (f(h) - h: the block's residual update). Auxiliary BCE between the router logits
          and the 0/1 top-k membership (mean over tokens, summed over recursions) teaches
          the causal inference rule `threshold`: a token continues iff sigma > 0.5.
  token   token-choice (Sec. 2.2.2): one d -> N_r router before the first recursion,
          softmax, top-1 picks the depth; a token with depth j gets recursions 0..j, gated
          by its chosen probability. Switch balance loss + z-loss, or the loss-free bias.

KV strategies (model.mor.kv_strategy; paper Sec. 2.3): `recursion_wise` (the default; the
model above: at recursion r the selected tokens attend only to each other, so a decode cache
per recursion keeps only the tokens that recursion selected) and `shared` (recursive KV
sharing: the keys and values each layer of recursion 0 computes for every token are reused
by the same layer position of every later recursion, which computes queries only; a
different model, trained with the sharing). Incremental decoding (`init_cache`, `decode`)
needs a causal rule: expert-choice under the threshold rule, or token-choice.

Top-k selection runs on static gathered shapes (k_r static for jit). The threshold rule and
token-choice select a data-dependent number of tokens; they run the block on all tokens with
attention restricted to the selected ones (unselected tokens get a private document id, and
their outputs are discarded), which gives the selected tokens the same result as a gather.

aux keys: loss/mor_bce, loss/mor_balance, loss/mor_z; stat/mor_selected [N_r] (selected
tokens per recursion), stat/mor_tokens, stat/mor_depth_counts [N_r] (token-choice),
stat/mor_router_agree and stat/mor_bce [N_r] (expert-choice: tokens whose threshold decision
sigma > 0.5 matches their top-k membership, and the summed per-token BCE);
mor/* scalar metrics. A block applied several times reports its aux once, under its unique
layer index: loss/ and stat/ values summed over its applications, metrics averaged.
"""

from __future__ import annotations

import math

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx

from effjax.config import MoRConfig
from effjax.models import kv_cache
from effjax.models.layers import Buffer, Linear, Tag
from effjax.models.stack import (RESIDUAL_AXES, Context, _block_forward,
                                 _remat_block_forward)
from effjax.parallel.sharding import constrain


# ----------------------------------------------------------------------------- schedule


def recursion_schedule(sharing: str, n_layers: int, recursions: int):
  """(prefix, recursions, suffix): unique-layer indices applied before the recursions, per
  recursion (a tuple of N_r tuples), and after.

  cycle:    the whole stack is the recursion block: (0..n-1) x N_r.
  sequence: each layer repeated N_r times in place (0,0,1,1,...), cut into N_r equal
            consecutive recursion blocks.
  middle_*: layer 0 and layer n-1 unique (applied once to every token), the middle layers
            shared by cycle or sequence (the paper's default is middle_cycle)."""
  if sharing.startswith("middle"):
    if n_layers < 3:
      raise ValueError(f"{sharing} sharing needs at least 3 layers; got {n_layers}")
    prefix, suffix, shared = (0,), (n_layers - 1,), tuple(range(1, n_layers - 1))
  else:
    prefix, suffix, shared = (), (), tuple(range(n_layers))
  if sharing.endswith("cycle"):
    blocks = (shared,) * recursions
  elif sharing.endswith("sequence"):
    flat = tuple(i for i in shared for _ in range(recursions))
    m = len(shared)
    blocks = tuple(flat[r * m:(r + 1) * m] for r in range(recursions))
  else:
    raise ValueError(f"unknown sharing {sharing!r}")
  return prefix, blocks, suffix


def capacities(recursions: int) -> tuple[float, ...]:
  """cap_r = (N_r - r) / N_r, r = 0..N_r-1: the fraction of the sequence recursion r keeps."""
  return tuple((recursions - r) / recursions for r in range(recursions))


def capacity_k(seq_len: int, recursions: int) -> tuple[int, ...]:
  """Static top-k per recursion: k_r = cap_r * T rounded half up (at least 1)."""
  return tuple(max(1, int(math.floor(c * seq_len + 0.5))) for c in capacities(recursions))


def layer_capacities(cfg: MoRConfig, n_layers: int) -> list[list[float]]:
  """Per unique layer, the fraction of tokens each of its applications processes (for FLOP
  accounting: router none -> 1 per application; expert/token -> cap_r of its recursion,
  token-choice at the balanced target). Off: [[1.0]] per layer."""
  if not cfg.enabled:
    return [[1.0] for _ in range(n_layers)]
  prefix, blocks, suffix = recursion_schedule(cfg.sharing, n_layers, cfg.recursions)
  caps = capacities(cfg.recursions) if cfg.router != "none" else (1.0,) * cfg.recursions
  uses: list[list[float]] = [[] for _ in range(n_layers)]
  for i in prefix + suffix:
    uses[i].append(1.0)
  for r, block in enumerate(blocks):
    for i in block:
      uses[i].append(caps[r])
  return uses


def shared_kv_reads(cfg: MoRConfig, n_layers: int) -> list[list[float]]:
  """Per unique layer, cap_r of each application that reads recursion 0's keys/values under
  recursive KV sharing (recursions r >= 1: queries only, attending over all T tokens);
  empty lists under recursion-wise caching or MoR off. A subset of layer_capacities."""
  reads: list[list[float]] = [[] for _ in range(n_layers)]
  if not cfg.enabled or cfg.kv_strategy != "shared":
    return reads
  _, blocks, _ = recursion_schedule(cfg.sharing, n_layers, cfg.recursions)
  caps = capacities(cfg.recursions) if cfg.router != "none" else (1.0,) * cfg.recursions
  for r, block in enumerate(blocks):
    for i in block:
      if r > 0:
        reads[i].append(caps[r])
  return reads


def router_params(cfg: MoRConfig, d_model: int) -> int:
  """Router parameters: N_r vectors of d (expert) or one d x N_r matrix (token)."""
  return d_model * cfg.recursions if cfg.enabled and cfg.router != "none" else 0


# ----------------------------------------------------------------------------- helpers


def _take(x_BxL, idx_BxK):
  """x[b, idx[b, k]] for [B, L] or [B, L, D] arrays."""
  if x_BxL.ndim == 3:
    return jnp.take_along_axis(x_BxL, idx_BxK[..., None], axis=1)
  return jnp.take_along_axis(x_BxL, idx_BxK, axis=1)


def select_top_k(logits_BxL, active_BxL, k: int):
  """Hierarchical expert-choice: the top k tokens of each row among the active ones, as
  sorted indices [B, k] (causal order) and a [B, L] membership mask."""
  masked = jnp.where(active_BxL, jax.lax.stop_gradient(logits_BxL), -jnp.inf)
  _, idx_BxK = jax.lax.top_k(masked, k)
  idx_BxK = jnp.sort(idx_BxK, axis=-1)
  rows = jnp.arange(logits_BxL.shape[0])[:, None]
  selected_BxL = jnp.zeros(logits_BxL.shape, bool).at[rows, idx_BxK].set(True)
  return idx_BxK, selected_BxL


def private_segments(selected_BxL, segment_ids_BxL):
  """Document ids under which selected tokens attend only to selected tokens (of their own
  document) and each unselected token only to itself (ids -1, -2, ...: never a real id)."""
  b, l = selected_BxL.shape
  base = segment_ids_BxL if segment_ids_BxL is not None else jnp.zeros((b, l), jnp.int32)
  own = -1 - jnp.broadcast_to(jnp.arange(l, dtype=base.dtype), (b, l))
  return jnp.where(selected_BxL, base, own)


@flax.struct.dataclass
class SharedKV:
  """Keys/values of the first recursion for one layer position, and which of them each
  query sees (the `kv` argument of Block / Attention)."""
  k_BxTxKxD: jax.Array
  v_BxTxKxE: jax.Array
  mask_Bx1xLxT: jax.Array


class _FirstRecursionKV:
  """Recursive KV sharing in the training forward: recursion 0 records the keys and values
  of every layer position (all tokens: cap_0 = 1); recursion r >= 1 reads them. A query in
  sequence slot s sees slots t <= s of its own packed document."""

  def __init__(self, segment_ids_BxL):
    self.segment_ids_BxL = segment_ids_BxL
    self.kv: list[tuple[jax.Array, jax.Array]] = []

  def views(self, slots_BxS, segment_ids_BxS) -> list[SharedKV]:
    t = self.kv[0][0].shape[1]
    mask = jnp.arange(t)[None, None, :] <= slots_BxS[:, :, None]
    if self.segment_ids_BxL is not None:
      mask = mask & (self.segment_ids_BxL[:, None, :] == segment_ids_BxS[:, :, None])
    return [SharedKV(k, v, mask[:, None]) for k, v in self.kv]


class _Aux:
  """Collects aux of blocks applied several times: loss/ and stat/ summed, others averaged."""

  def __init__(self):
    self.values: dict[str, list] = {}

  def add(self, aux: dict, layer: int):
    for k, v in aux.items():
      self.values.setdefault(f"{k}/layer{layer}", []).append(v)

  def result(self) -> dict:
    out = {}
    for k, vs in self.values.items():
      total = vs[0]
      for v in vs[1:]:
        total = total + v
      out[k] = total if k.startswith(("loss/", "stat/")) else total / len(vs)
    return out


# ----------------------------------------------------------------------------- the stack


class RecursionStack(nnx.Module):
  """The block-stack slot for Mixture-of-Recursions: (x, positions, segment_ids, ctx) ->
  (x, aux), like PlainStack. `blocks` are the unique layers (stored as `layers`, so their
  parameter paths and tags are PlainStack's); routers are tagged ("mor_router", r)."""

  def __init__(self, blocks, cfg: MoRConfig, *, d_model: int, init_std: float,
               rngs: nnx.Rngs, remat: bool = False):
    self.layers = nnx.List(blocks) if hasattr(nnx, "List") else list(blocks)
    self.cfg, self.remat = cfg, remat
    self.prefix, self.blocks, self.suffix = recursion_schedule(cfg.sharing, len(blocks),
                                                               cfg.recursions)
    n = cfg.recursions
    routers = router = depth_bias = None
    if cfg.router == "expert":
      routers = [Linear(d_model, 1, rngs=rngs, role="router", axes=("embed", None),
                        std=init_std, tag=Tag("mor_router", None, f"rec{r}")) for r in range(n)]
      routers = nnx.List(routers) if hasattr(nnx, "List") else routers
    elif cfg.router == "token":
      router = Linear(d_model, n, rngs=rngs, role="router", axes=("embed", None),
                      std=init_std, tag=Tag("mor_router"))
      depth_bias = Buffer(jnp.zeros((n,), jnp.float32))  # ALF-LB on depths
    self.routers, self.router, self.depth_bias = nnx.data(routers), router, depth_bias
    self.tag = Tag("mor")

  # ---- running blocks
  @property
  def kv_shared(self) -> bool:
    return self.cfg.kv_strategy == "shared"

  def _run(self, layer_ids, x_BxLxD, positions_BxL, segment_ids_BxL, ctx, acc: _Aux,
           kvs=None):
    """The layers in order; kvs: per layer, the first recursion's keys/values to attend to."""
    call = _remat_block_forward if self.remat else _block_forward
    for j, i in enumerate(layer_ids):
      kv = None if kvs is None else kvs[j]
      x_BxLxD, block_aux = call(self.layers[i], x_BxLxD, positions_BxL, segment_ids_BxL, ctx,
                                None, kv)
      x_BxLxD = constrain(x_BxLxD, RESIDUAL_AXES)
      acc.add(block_aux, i)
    return x_BxLxD

  def _recursion(self, r, x_BxSxD, positions_BxS, segment_ids_BxS, ctx, acc, first,
                 slots_BxS=None):
    """Recursion r's block on S tokens of the sequence (all of them, or gathered ones at
    sequence slots slots_BxS). first: None (recursion-wise), or the _FirstRecursionKV that
    recursion 0 fills (recording each layer's keys/values) and later recursions read."""
    if first is None:
      return self._run(self.blocks[r], x_BxSxD, positions_BxS, segment_ids_BxS, ctx, acc)
    if r > 0:
      if slots_BxS is None:
        slots_BxS = jnp.broadcast_to(jnp.arange(x_BxSxD.shape[1]), x_BxSxD.shape[:2])
      return self._run(self.blocks[r], x_BxSxD, positions_BxS, segment_ids_BxS, ctx, acc,
                       kvs=first.views(slots_BxS, segment_ids_BxS))
    for i in self.blocks[0]:  # recursion 0 takes every token (cap_0 = 1)
      block = self.layers[i]
      _, k, v = block.attn._qkv(block.attn_input(x_BxSxD), positions_BxS)  # pylint: disable=protected-access
      first.kv.append((k, v))
      x_BxSxD = self._run((i,), x_BxSxD, positions_BxS, segment_ids_BxS, ctx, acc)
    return x_BxSxD

  def _update_gathered(self, r, x_BxLxD, idx_BxK, gate_BxK, positions_BxL, segment_ids_BxL,
                       ctx, acc, first=None):
    """h <- h + g * (f(h) - h) on the gathered tokens idx (sorted), others unchanged."""
    x_sel = _take(x_BxLxD, idx_BxK)
    seg_sel = None if segment_ids_BxL is None else _take(segment_ids_BxL, idx_BxK)
    y_sel = self._recursion(r, x_sel, _take(positions_BxL, idx_BxK), seg_sel, ctx, acc, first,
                            slots_BxS=idx_BxK)
    delta = gate_BxK[..., None].astype(x_sel.dtype) * (y_sel - x_sel)
    rows = jnp.arange(x_BxLxD.shape[0])[:, None]
    return x_BxLxD.at[rows, idx_BxK].add(delta)

  def _update_masked(self, r, x_BxLxD, selected_BxL, gate_BxL, positions_BxL,
                     segment_ids_BxL, ctx, acc, first=None):
    """The same update for a data-dependent selection: the block runs on every token, the
    selected ones attending only to each other (recursion-wise) or to the first recursion's
    keys (shared); unselected tokens keep their value."""
    if first is None:
      seg = private_segments(selected_BxL, segment_ids_BxL)
      y = self._run(self.blocks[r], x_BxLxD, positions_BxL, seg, ctx, acc)
    else:
      y = self._recursion(r, x_BxLxD, positions_BxL, segment_ids_BxL, ctx, acc, first)
    g = jnp.where(selected_BxL, gate_BxL, 0.0)[..., None].astype(x_BxLxD.dtype)
    return x_BxLxD + g * (y - x_BxLxD)

  # ---- routers
  def _expert_choice(self, x_BxLxD, positions_BxL, segment_ids_BxL, ctx, acc, first):
    cfg = self.cfg
    b, l, _ = x_BxLxD.shape
    ks = capacity_k(l, cfg.recursions)
    threshold = cfg.rule == "threshold"
    active_BxL = jnp.ones((b, l), bool)
    aux, bce, sel_counts, accs = {}, [], [], []
    for r in range(cfg.recursions):
      logits_BxL = self.routers[r](x_BxLxD.astype(jnp.float32))[..., 0]
      gate_BxL = cfg.alpha * jax.nn.sigmoid(logits_BxL)
      # cap_0 = 1: every token, under either rule; top-k also when k_r rounds up to T
      # (the threshold rule stays data-dependent, so it is causal for every length)
      if r == 0 or (ks[r] >= l and not threshold):
        y_BxLxD = self._recursion(r, x_BxLxD, positions_BxL, segment_ids_BxL, ctx, acc, first)
        x_BxLxD = x_BxLxD + gate_BxL[..., None].astype(x_BxLxD.dtype) * (y_BxLxD - x_BxLxD)
        topk_BxL = selected_BxL = active_BxL
      elif threshold:
        _, topk_BxL = select_top_k(logits_BxL, active_BxL, ks[r])  # for the accuracy metric
        selected_BxL = active_BxL & (logits_BxL > 0)  # sigma > 0.5
        x_BxLxD = self._update_masked(r, x_BxLxD, selected_BxL, gate_BxL, positions_BxL,
                                      segment_ids_BxL, ctx, acc, first)
      else:
        idx_BxK, topk_BxL = select_top_k(logits_BxL, active_BxL, ks[r])
        x_BxLxD = self._update_gathered(r, x_BxLxD, idx_BxK, _take(gate_BxL, idx_BxK),
                                        positions_BxL, segment_ids_BxL, ctx, acc, first)
        selected_BxL = topk_BxL
      target = topk_BxL.astype(jnp.float32)
      bce.append(jnp.sum(sigmoid_bce(logits_BxL, target)))
      accs.append(jnp.sum(((logits_BxL > 0) == topk_BxL).astype(jnp.float32)))
      sel_counts.append(jnp.sum(selected_BxL.astype(jnp.float32)))
      aux[f"mor/selected/rec{r}"] = jnp.mean(selected_BxL.astype(jnp.float32))
      aux[f"mor/router_acc/rec{r}"] = accs[-1] / (b * l)
      if r == 1:
        aux["mor/dead_tokens"] = 1.0 - jnp.mean(selected_BxL.astype(jnp.float32))
      active_BxL = selected_BxL
    bce_sum = sum(bce[1:], bce[0]) / (b * l)  # mean over tokens, summed over recursions
    if cfg.bce_coef and not threshold:
      aux["loss/mor_bce"] = cfg.bce_coef * bce_sum
    aux["mor/bce"] = bce_sum
    routed = [a for r, a in enumerate(accs) if ks[r] < l]
    aux["mor/router_acc"] = (sum(routed[1:], routed[0]) / (len(routed) * b * l) if routed
                             else jnp.float32(1.0))
    aux["stat/mor_bce"] = jnp.stack(bce)
    aux["stat/mor_router_agree"] = jnp.stack(accs)
    aux["stat/mor_selected"] = jnp.stack(sel_counts)
    aux["stat/mor_tokens"] = jnp.float32(b * l)
    return x_BxLxD, aux

  def _token_depths(self, x_BxLxD):
    """Token-choice: (router logits, probabilities, depth j per token, gate p_j)."""
    logits_BxLxN = self.router(x_BxLxD.astype(jnp.float32))
    probs_BxLxN = jax.nn.softmax(logits_BxLxN, axis=-1)
    select = probs_BxLxN
    if self.cfg.token_balance == "alf":
      select = select + jax.lax.stop_gradient(self.depth_bias[...])
    depth_BxL = jnp.argmax(select, axis=-1)
    gate_BxL = jnp.take_along_axis(probs_BxLxN, depth_BxL[..., None], axis=-1)[..., 0]
    return logits_BxLxN, probs_BxLxN, depth_BxL, gate_BxL

  def _token_choice(self, x_BxLxD, positions_BxL, segment_ids_BxL, ctx, acc, first):
    cfg, n = self.cfg, self.cfg.recursions
    logits_BxLxN, probs_BxLxN, depth_BxL, gate_BxL = self._token_depths(x_BxLxD)
    aux, sel_counts = {}, []
    for r in range(n):
      selected_BxL = depth_BxL >= r
      x_BxLxD = self._update_masked(r, x_BxLxD, selected_BxL, gate_BxL, positions_BxL,
                                    segment_ids_BxL, ctx, acc, first)
      sel_counts.append(jnp.sum(selected_BxL.astype(jnp.float32)))
      aux[f"mor/selected/rec{r}"] = jnp.mean(selected_BxL.astype(jnp.float32))
    if n > 1:
      aux["mor/dead_tokens"] = jnp.mean((depth_BxL == 0).astype(jnp.float32))
    counts_N = jnp.bincount(depth_BxL.reshape(-1), length=n).astype(jnp.float32)
    f_N = counts_N / depth_BxL.size
    p_N = jnp.mean(probs_BxLxN.reshape(-1, n), axis=0)
    z = jnp.mean(jax.nn.logsumexp(logits_BxLxN, axis=-1) ** 2)
    if cfg.token_balance == "aux":
      aux["loss/mor_balance"] = cfg.aux_coef * n * jnp.sum(f_N * p_N)
      aux["loss/mor_z"] = cfg.z_coef * z
    aux["mor/z"] = z
    aux["mor/depth_maxvio"] = (jnp.max(counts_N) - jnp.mean(counts_N)) / jnp.mean(counts_N)
    aux["stat/mor_depth_counts"] = counts_N
    aux["stat/mor_selected"] = jnp.stack(sel_counts)
    aux["stat/mor_tokens"] = jnp.float32(depth_BxL.size)
    return x_BxLxD, aux

  def __call__(self, x_BxLxD, positions_BxL, segment_ids_BxL, ctx: Context):
    acc = _Aux()
    x_BxLxD = self._run(self.prefix, x_BxLxD, positions_BxL, segment_ids_BxL, ctx, acc)
    aux = {}
    first = _FirstRecursionKV(segment_ids_BxL) if self.kv_shared else None
    if self.cfg.router == "none":
      for r in range(self.cfg.recursions):
        x_BxLxD = self._recursion(r, x_BxLxD, positions_BxL, segment_ids_BxL, ctx, acc, first)
    elif self.cfg.router == "expert":
      x_BxLxD, aux = self._expert_choice(x_BxLxD, positions_BxL, segment_ids_BxL, ctx, acc,
                                         first)
    else:
      x_BxLxD, aux = self._token_choice(x_BxLxD, positions_BxL, segment_ids_BxL, ctx, acc,
                                        first)
    x_BxLxD = self._run(self.suffix, x_BxLxD, positions_BxL, segment_ids_BxL, ctx, acc)
    return x_BxLxD, {**acc.result(), **aux}


  # ---- incremental decoding (effjax/models/kv_cache.py; docs/mor.md "KV strategies")
  def decode_unsupported(self) -> str | None:
    """Why this stack cannot decode incrementally (None: it can)."""
    if self.cfg.router == "expert" and self.cfg.rule != "threshold":
      return ("expert-choice top-k ranks a token against later ones; incremental decoding "
              "needs model.mor.rule=threshold (the eval / sampling model sets it from "
              "model.mor.eval_rule)")
    for block in self.layers:
      if not hasattr(block, "decode"):
        return f"{type(block).__name__} has no decode"
    return None

  def _keeps_every_token(self, r: int) -> bool:
    return r == 0 or self.cfg.router == "none"

  def init_cache(self, batch: int, max_len: int, dtype):
    """(prefix caches, per-recursion caches, suffix caches). recursion_wise: one cache per
    layer application; recursion 0 (and plain recursion) keeps every token, a routed
    recursion a CompactKVCache holding only the tokens it selected (allocated at max_len
    slots: the threshold rule's counts are data-dependent). shared: recursion 0's caches
    only, read by every later recursion."""
    def full(i):
      return self.layers[i].attn.init_cache(batch, max_len, dtype)

    def compact(i):
      attn = self.layers[i].attn
      return kv_cache.CompactKVCache.zeros(batch, max_len, attn.n_kv_heads, *attn.kv_widths(),
                                           dtype)
    n_caches = 1 if self.kv_shared else self.cfg.recursions
    recs = tuple(tuple((full if self._keeps_every_token(r) else compact)(i)
                       for i in self.blocks[r]) for r in range(n_caches))
    return (tuple(full(i) for i in self.prefix), recs, tuple(full(i) for i in self.suffix))

  def _decode_run(self, layer_ids, x_BxSxD, positions_BxS, caches, ctx):
    out = []
    for i, cache in zip(layer_ids, caches):
      x_BxSxD, cache = self.layers[i].decode(x_BxSxD, positions_BxS, cache, ctx)
      out.append(cache)
    return x_BxSxD, tuple(out)

  def _decode_recursion(self, r, x_BxSxD, positions_BxS, recs, selected_BxS, ctx):
    """Recursion r's block on the new tokens against its caches: (y, recs updated)."""
    recs = list(recs)
    if self.kv_shared and r > 0:  # read recursion 0's caches (already updated this call)
      views = [kv_cache.ReadOnlyKV(c) for c in recs[0]]
      return self._decode_run(self.blocks[r], x_BxSxD, positions_BxS, views, ctx)[0], recs
    caches = recs[r]
    if not self._keeps_every_token(r):
      caches = [c.keeping(selected_BxS) for c in caches]
    y_BxSxD, recs[r] = self._decode_run(self.blocks[r], x_BxSxD, positions_BxS, caches, ctx)
    return y_BxSxD, recs

  def decode(self, x_BxSxD, positions_BxS, cache, ctx: Context):
    """The S new tokens through the schedule, routed by the causal rule (expert: sigma > 0.5
    among the tokens still active; token: the chosen depth), each recursion against its
    cache: the rows the full forward gives (same rule, same strategy)."""
    prefix, recs, suffix = cache
    x_BxSxD, prefix = self._decode_run(self.prefix, x_BxSxD, positions_BxS, prefix, ctx)
    cfg = self.cfg
    selected_BxS = jnp.ones(x_BxSxD.shape[:2], bool)
    gate_BxS = None
    if cfg.router == "token":
      _, _, depth_BxS, gate_BxS = self._token_depths(x_BxSxD)
    for r in range(cfg.recursions):
      if cfg.router == "expert":
        logits_BxS = self.routers[r](x_BxSxD.astype(jnp.float32))[..., 0]
        gate_BxS = cfg.alpha * jax.nn.sigmoid(logits_BxS)
        if r > 0:
          selected_BxS = selected_BxS & (logits_BxS > 0)
      elif cfg.router == "token":
        selected_BxS = depth_BxS >= r
      y_BxSxD, recs = self._decode_recursion(r, x_BxSxD, positions_BxS, recs, selected_BxS,
                                             ctx)
      if gate_BxS is None:  # plain recursion
        x_BxSxD = y_BxSxD
      else:
        delta = gate_BxS[..., None].astype(x_BxSxD.dtype) * (y_BxSxD - x_BxSxD)
        x_BxSxD = x_BxSxD + jnp.where(selected_BxS[..., None], delta, 0)
    x_BxSxD, suffix = self._decode_run(self.suffix, x_BxSxD, positions_BxS, suffix, ctx)
    return x_BxSxD, (prefix, tuple(recs), suffix)


def sigmoid_bce(logits, labels):
  """Binary cross-entropy of sigmoid(logits) against 0/1 labels, stable in fp32."""
  logits = logits.astype(jnp.float32)
  return jnp.maximum(logits, 0) - logits * labels + jnp.log1p(jnp.exp(-jnp.abs(logits)))
