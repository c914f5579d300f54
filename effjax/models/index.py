"""The model index: tagged modules by kind, built once from the module tree.

Extensions, the QAT export and diagnostics look up what they need here ("every quantized
linear", "every MoE layer") and get its path in the params/buffers dicts, instead of
matching dict paths such as ("blocks", i, "ffn"). A structural change (a recursion stack,
shared projections) changes the paths the index reports, not the code that reads them.
"""

from __future__ import annotations

import dataclasses

from flax import nnx

from effjax.models.layers import Linear, Tag


@dataclasses.dataclass(frozen=True)
class Entry:
  """A tagged module: its path in the params/buffers dicts, its tag and its class name.
  quantizer: the weight quantizer of a quantized Linear (or QKR product), else None."""
  path: tuple
  tag: Tag
  module: str
  quantizer: object = None

  def at(self, *keys) -> tuple:
    """The path of a child, e.g. entry.at("kernel")."""
    return self.path + keys


class ModelIndex:
  """Tagged modules of a model, in tree order."""

  def __init__(self, module: nnx.Module):
    from effjax.quant.hooks import WEIGHT  # pylint: disable=g-import-not-at-top (quant imports models.layers)
    self.entries = []
    for path, node in nnx.iter_graph(module):
      tag = getattr(node, "tag", None) if isinstance(node, nnx.Module) else None
      if not isinstance(tag, Tag):
        continue
      hook = getattr(node, WEIGHT, None) if isinstance(node, Linear) else getattr(
          node, "qk_" + WEIGHT, None)
      self.entries.append(Entry(tuple(path), tag, type(node).__name__,
                                getattr(hook, "quantizer", None)))

  def of(self, kind: str) -> list[Entry]:
    return [e for e in self.entries if e.tag.kind == kind]

  def quantized(self, kinds=None) -> list[Entry]:
    """Quantized block linears with a stored kernel (kinds: tag kinds to keep)."""
    return [e for e in self.entries if e.quantizer is not None and e.module == "Linear"
            and (kinds is None or e.tag.kind in kinds)]

  def layers(self, kind: str) -> list[int]:
    return [e.tag.layer for e in self.of(kind)]


def get_path(tree: dict, path: tuple):
  """tree[path[0]][path[1]]... for an index path into a params/buffers dict."""
  for key in path:
    tree = tree[key]
  return tree


def set_path(tree: dict, path: tuple, value) -> dict:
  """A copy of the nested dict `tree` with the leaf at `path` replaced (untouched branches
  are shared, not copied)."""
  if not path:
    return value
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
