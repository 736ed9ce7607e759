"""Pytree helpers on optree.

evo's containers are dicts and NamedTuples, which both optree and ``torch.utils._pytree`` (and so
``torch.func``) understand. Paths are dotted strings: ``{"layers": {"0": {"wq": t}}}`` and a flat
``{"layers.0.wq": t}`` name the leaf the same way.

optree sorts dict keys when it flattens; every helper here that rebuilds a dict keeps the caller's
insertion order instead, so a params dict comes back in the order the model created it.
"""
from __future__ import annotations

from typing import Any, Callable

import optree
import torch

Tree = Any

# None is a value in evo's containers (an absent optional field), never a leaf to map over.
_NONE_IS_NODE = dict(none_is_leaf=False, namespace="")


def _path_str(path: tuple) -> str:
    return ".".join(str(p) for p in path)


def flatten(tree: Tree) -> dict[str, Any]:
    """Leaves keyed by dotted path, in the tree's own order: ``{"opt.mu.embed": t, ...}``."""
    paths, leaves, _ = optree.tree_flatten_with_path(tree, **_NONE_IS_NODE)
    flat = {_path_str(p): leaf for p, leaf in zip(paths, leaves)}
    order = _insertion_order(tree)
    return {k: flat[k] for k in order} if order is not None and set(order) == set(flat) else flat


def _insertion_order(tree: Tree, prefix: str = "") -> list[str] | None:
    """Dotted paths in insertion order for trees of dicts, tuples and NamedTuples."""
    if isinstance(tree, dict):
        out: list[str] = []
        for k, v in tree.items():
            sub = _insertion_order(v, f"{prefix}{k}.")
            if sub is None:
                return None
            out.extend(sub)
        return out
    if isinstance(tree, tuple) and hasattr(tree, "_fields"):
        out = []
        for k in tree._fields:
            sub = _insertion_order(getattr(tree, k), f"{prefix}{k}.")
            if sub is None:
                return None
            out.extend(sub)
        return out
    if isinstance(tree, (list, tuple)):
        out = []
        for i, v in enumerate(tree):
            sub = _insertion_order(v, f"{prefix}{i}.")
            if sub is None:
                return None
            out.extend(sub)
        return out
    if tree is None:
        return []
    return [prefix[:-1]]


def map_with_path(fn: Callable[[str, Any], Any], tree: Tree, *rest: Tree) -> Tree:
    """``fn(path, leaf, *other_leaves)`` over every leaf; the result keeps the tree's structure."""
    if isinstance(tree, dict) and not rest:
        # Fast path and order-preserving for the common case: a flat params dict.
        if all(not isinstance(v, (dict, tuple, list)) for v in tree.values()):
            return {k: fn(k, v) for k, v in tree.items()}
    out = optree.tree_map_with_path(lambda p, x, *r: fn(_path_str(p), x, *r), tree, *rest,
                                    **_NONE_IS_NODE)
    return _reorder_like(tree, out)


def map(fn: Callable[..., Any], tree: Tree, *rest: Tree) -> Tree:  # noqa: A001 - mirrors jax.tree.map
    """``fn(leaf, *other_leaves)`` over every leaf."""
    return map_with_path(lambda _, x, *r: fn(x, *r), tree, *rest)


def _reorder_like(ref: Tree, tree: Tree) -> Tree:
    if isinstance(ref, dict) and isinstance(tree, dict):
        return {k: _reorder_like(ref[k], tree[k]) for k in ref}
    if isinstance(ref, tuple) and hasattr(ref, "_fields"):
        return type(ref)(*(_reorder_like(a, b) for a, b in zip(ref, tree)))
    return tree


def leaves(tree: Tree) -> list[Any]:
    return list(flatten(tree).values())


def cast(tree: Tree, dtype: torch.dtype, *, only_floating: bool = True) -> Tree:
    """Every floating tensor leaf cast to ``dtype`` (integer leaves, such as step counters, kept)."""
    def _cast(x):
        if isinstance(x, torch.Tensor) and (x.is_floating_point() or not only_floating):
            return x.to(dtype)
        return x
    return map(_cast, tree)


def zeros_like(tree: Tree, dtype: torch.dtype | None = None) -> Tree:
    return map(lambda x: torch.zeros_like(x, dtype=dtype), tree)


def clone(tree: Tree) -> Tree:
    return map(lambda x: x.clone() if isinstance(x, torch.Tensor) else x, tree)


def global_norm(tree: Tree) -> torch.Tensor:
    """L2 norm over every tensor leaf, accumulated in at least fp32: a 0-dim tensor."""
    ts = [x for x in leaves(tree) if isinstance(x, torch.Tensor)]
    if not ts:
        return torch.zeros((), dtype=torch.float32)
    norms = torch._foreach_norm([_at_least_fp32(t) for t in ts], 2.0)
    dtype = torch.promote_types(torch.float32, norms[0].dtype)
    return torch.linalg.vector_norm(torch.stack([n.to(dtype) for n in norms]), 2.0)


def _at_least_fp32(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


def num_bytes(tree: Tree) -> int:
    return sum(x.numel() * x.element_size() for x in leaves(tree) if isinstance(x, torch.Tensor))


def num_elements(tree: Tree) -> int:
    return sum(x.numel() for x in leaves(tree) if isinstance(x, torch.Tensor))
