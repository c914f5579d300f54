"""The model index: tagged modules by kind, built once from the module tree.

Extensions, the QAT export and diagnostics look up what they need here ("every quantized
linear", "every MoE layer") and get its path in the params/buffers dicts, instead of
matching dict paths such as ("blocks", i, "ffn"). A structural change (a recursion stack,
shared projections) changes the paths the index reports, not the code that reads them.

A scanned stack (model.scan_layers) holds one module per slot for all layers, its leaves
stacked on a leading layer axis: the index gives it back as one entry per layer, whose
`at(...)` paths end in a `LayerSlice` that get_path / set_path read as "row i of every leaf".
"""

from __future__ import annotations

import dataclasses

import jax
from flax import nnx

from effjax.models.layers import Linear, Tag
from effjax.models.stack import ScannedStack


@dataclasses.dataclass(frozen=True)
class LayerSlice:
  """The last key of a path into a stacked (scanned) module: row `index` of every leaf."""
  index: int


@dataclasses.dataclass(frozen=True)
class Entry:
  """A tagged module: its path in the params/buffers dicts, its tag and its class name.
  quantizer: the weight quantizer of a quantized Linear (or QKR product), else None.
  stacked: in a scanned stack, the entry's row of the leading layer axis, else None."""
  path: tuple
  tag: Tag
  module: str
  quantizer: object = None
  stacked: int | None = None

  def at(self, *keys) -> tuple:
    """The path of a child, e.g. entry.at("kernel") (ending in the layer's LayerSlice for a
    stacked entry)."""
    return self.path + keys + (() if self.stacked is None else (LayerSlice(self.stacked),))


def tagged(module: nnx.Module):
  """(path, node, tag, stacked) of every tagged module in tree order; a module inside a
  scanned stack comes once per layer, with tag.layer and `stacked` set to that layer."""
  nodes = list(nnx.iter_graph(module))
  stacks = [tuple(p) for p, n in nodes if isinstance(n, ScannedStack)]
  pending = []  # (iter_graph is post-order: a stack's members come before the stack itself)
  for path, node in nodes:
    path = tuple(path)
    if path in stacks:
      for i in range(node.n_layers):
        for p, n, tag in pending:
          yield p, n, dataclasses.replace(tag, layer=i), i
      pending = []
    tag = getattr(node, "tag", None) if isinstance(node, nnx.Module) else None
    if not isinstance(tag, Tag):
      continue
    if any(path[:len(s)] == s for s in stacks):
      pending.append((path, node, tag))
    else:
      yield path, node, tag, None


class ModelIndex:
  """Tagged modules of a model, in tree order."""

  def __init__(self, module: nnx.Module):
    from effjax.quant.hooks import WEIGHT  # pylint: disable=g-import-not-at-top (quant imports models.layers)
    self.entries = []
    for path, node, tag, stacked in tagged(module):
      hook = getattr(node, WEIGHT, None) if isinstance(node, Linear) else getattr(
          node, "qk_" + WEIGHT, None)
      self.entries.append(Entry(path, tag, type(node).__name__,
                                getattr(hook, "quantizer", None), stacked))

  def of(self, kind: str) -> list[Entry]:
    return [e for e in self.entries if e.tag.kind == kind]

  def quantized(self, kinds=None) -> list[Entry]:
    """Quantized block linears with a stored kernel (kinds: tag kinds to keep)."""
    return [e for e in self.entries if e.quantizer is not None and e.module == "Linear"
            and (kinds is None or e.tag.kind in kinds)]

  @property
  def stacked(self) -> bool:
    """Whether the model has a scanned stack (entries with a layer row)."""
    return any(e.stacked is not None for e in self.entries)


def get_path(tree: dict, path: tuple):
  """tree[path[0]][path[1]]... for an index path into a params/buffers dict (a LayerSlice
  key takes that row of every leaf below)."""
  for key in path:
    if isinstance(key, LayerSlice):
      tree = jax.tree.map(lambda x, i=key.index: x[i], tree)
    else:
      tree = tree[key]
  return tree


def set_path(tree: dict, path: tuple, value) -> dict:
  """A copy of the nested dict `tree` with the leaf at `path` replaced (untouched branches
  are shared, not copied). A final LayerSlice key replaces that row of every leaf below."""
  if not path:
    return value
  if isinstance(path[0], LayerSlice):
    if len(path) > 1:
      raise ValueError(f"a LayerSlice must be the last key of a path; got {path}")
    return jax.tree.map(lambda x, v, i=path[0].index: x.at[i].set(v), tree, value)
  out = dict(tree)
  out[path[0]] = set_path(tree[path[0]], path[1:], value)
  return out


def flatten(tree, prefix: tuple = ()) -> dict:
  """{path: leaf} of a nested dict."""
  if isinstance(tree, dict):
    out = {}
    for k, v in tree.items():
      out.update(flatten(v, prefix + (k,)))
    return out
  return {prefix: tree}


def unflatten(flat: dict) -> dict:
  tree: dict = {}
  for path, value in flat.items():
    node = tree
    for p in path[:-1]:
      node = node.setdefault(p, {})
    node[path[-1]] = value
  return tree
