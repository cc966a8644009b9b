"""Clipping configurations: one bound over the whole model ("flat") or one bound per layer
("per_layer"), and the L2 sensitivity each gives the clipped sum.

A *layer* is a set of leaf modules joined by shared trainable parameters (a module alone in
the common case; an embedding tied to an output projection is one layer with both modules'
parameters), holding every trainable parameter those modules own. Parameters a parent module
uses in its own forward (a position table) form the parent's layer. Layers are ordered by the
first appearance of their modules in ``model.named_modules()``, the order a list of per-layer
bounds follows; ``Engine.layers`` lists them by name.

Per-layer clipping bounds example i's gradient restricted to layer l by C_l, so adding or
removing one example moves the clipped sum by at most sqrt(sum_l C_l^2) in L2: that is the
sensitivity the optimizer's noise is scaled to. A single float C is split evenly,
C_l = C / sqrt(L), so the sensitivity stays C.
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence, Tuple, Union

from torch import nn

CLIPPINGS = ("flat", "per_layer")

Bound = Union[float, Sequence[float]]


class Layer:
    """One clipping group: ``name`` (module paths joined by '+'), its modules and parameters."""

    __slots__ = ("name", "modules", "params")

    def __init__(self, name: str, modules: List[nn.Module], params: List[nn.Parameter]):
        self.name, self.modules, self.params = name, modules, params

    def __repr__(self):
        return f"Layer({self.name!r}, {len(self.params)} parameters)"


def check_clipping(clipping: str) -> str:
    if clipping not in CLIPPINGS:
        raise ValueError(f"clipping must be 'flat' or 'per_layer', got {clipping!r}")
    return clipping


def _positive(value, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{what} must be a number, got {type(value).__name__}")
    value = float(value)
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"{what} must be a finite number > 0, got {value}")
    return value


def group_layers(params: Dict[nn.Module, List[Tuple[str, nn.Parameter]]],
                 paths: Dict[nn.Module, str]) -> List[Layer]:
    """The layers of a model from ``params`` (module -> its own trainable (name, parameter)
    pairs, in ``named_modules`` order) and ``paths`` (module -> qualified name)."""
    modules = list(params)
    parent = list(range(len(modules)))   # union-find over modules sharing a parameter

    def find(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    owner: Dict[int, int] = {}
    for i, m in enumerate(modules):
        for _, p in params[m]:
            j = owner.setdefault(id(p), i)
            if j != i:
                a, b = find(i), find(j)
                parent[max(a, b)] = min(a, b)
    groups: Dict[int, List[int]] = {}
    for i in range(len(modules)):
        groups.setdefault(find(i), []).append(i)
    layers = []
    for root in sorted(groups):
        ms = [modules[i] for i in groups[root]]
        seen, ps = set(), []
        for m in ms:
            for _, p in params[m]:
                if id(p) not in seen:
                    seen.add(id(p))
                    ps.append(p)
        layers.append(Layer("+".join(paths[m] for m in ms), ms, ps))
    return layers


def resolve_bounds(max_grad_norm: Optional[Bound], clipping: str,
                   layers: Sequence[Layer]) -> Tuple[Optional[Tuple[float, ...]], Optional[float]]:
    """(per-layer bounds or None for flat clipping, sensitivity) from the user's arguments.

    Flat: ``max_grad_norm`` is one float C; sensitivity C. Per-layer: a float C split evenly
    over the L layers (C / sqrt(L) each), or a sequence of L floats; sensitivity
    sqrt(sum_l C_l^2). ``max_grad_norm=None`` (norms only): (None, None).
    """
    check_clipping(clipping)
    if max_grad_norm is None:
        return None, None
    if clipping == "flat":
        if isinstance(max_grad_norm, (list, tuple)):
            raise TypeError("a list of bounds (one per layer) needs clipping='per_layer'; "
                            "flat clipping takes one float max_grad_norm")
        return None, _positive(max_grad_norm, "max_grad_norm")
    L = len(layers)
    if isinstance(max_grad_norm, (list, tuple)):
        if len(max_grad_norm) != L:
            names = ", ".join(layer.name for layer in layers)
            raise ValueError(f"clipping='per_layer' with a list needs one bound per layer: the model "
                             f"has {L} layers ({names}), got {len(max_grad_norm)} bounds")
        bounds = tuple(_positive(c, f"max_grad_norm[{i}] (layer '{layers[i].name}')")
                       for i, c in enumerate(max_grad_norm))
    else:
        C = _positive(max_grad_norm, "max_grad_norm")
        bounds = (C / math.sqrt(L),) * L if L else ()
    return bounds, math.sqrt(sum(c * c for c in bounds))
