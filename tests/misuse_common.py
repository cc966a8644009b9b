"""Shared measurement for the misuse tests: the influence of one example on a released step.

The privacy invariant, measured by its definition: run the user's loop on a batch and on the same
batch with one example removed (or replaced), with noise 0 and plain SGD at lr 1 and
``loss_reduction="sum"``, so the parameter change IS the released clipped sum; the distance
between the two changes, in float64, must be at most the sensitivity.
"""
from __future__ import annotations

import copy
from typing import Callable, Sequence

import torch
from torch import nn

import fastclip


def flat_params(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten().double() for p in model.parameters()])


def private(model: nn.Module, C: float = 1.0, mode: str = "auto", loader=None, lr: float = 1.0,
            **kwargs):
    """(model, DPOptimizer, loader) with noise 0 and SGD at ``lr``: one step moves the parameters
    by ``-lr * sum_i clip(g_i)`` ("sum" reduction unless ``loss_reduction`` is given)."""
    kwargs.setdefault("loss_reduction", "sum")
    kwargs.setdefault("noise_multiplier", 0.0)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    return fastclip.make_private(model, opt, loader, max_grad_norm=C, mode=mode, **kwargs)


def released(base: nn.Module, loop: Callable[[nn.Module], nn.Module]) -> torch.Tensor:
    """The float64 update one call of ``loop`` releases on a fresh copy of ``base``:
    ``loop(copy)`` makes the copy private, trains one step and returns the model it trained
    (make_private may return another object)."""
    m = copy.deepcopy(base)
    before = flat_params(m)
    after = flat_params(loop(m))
    return before - after


def influence(update: Callable[[Sequence[int]], torch.Tensor], B: int) -> float:
    """max over examples j of ||update(all) - update(all but j)||: how far one example moves the
    released sum. ``update(idx)`` runs the step on the examples ``idx`` of the batch."""
    full = update(list(range(B)))
    return max((full - update([i for i in range(B) if i != j])).norm().item() for j in range(B))
