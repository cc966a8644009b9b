"""Slow, obviously-correct references: float64, one backward per example."""
from __future__ import annotations

import copy

import torch
from torch import nn


def _to64(x):
    return x.double() if isinstance(x, torch.Tensor) and x.is_floating_point() else x


def _slice(x, i, B):
    if isinstance(x, torch.Tensor) and x.dim() > 0 and x.shape[0] == B:
        return x[i:i + 1]
    return x


def per_example_grads(model: nn.Module, loss_fn, inputs, targets):
    """Per-example gradients in float64: a list over trainable parameters (named like the model)
    of tensors (B, *shape). One forward and backward per example on a float64 copy."""
    inputs = inputs if isinstance(inputs, tuple) else (inputs,)
    B = inputs[0].shape[0]
    m = copy.deepcopy(model).double()
    names = [n for n, p in m.named_parameters() if p.requires_grad]
    params = [p for n, p in m.named_parameters() if p.requires_grad]
    out = {n: torch.zeros((B,) + p.shape, dtype=torch.float64) for n, p in zip(names, params)}
    for i in range(B):
        xi = tuple(_to64(_slice(x, i, B)) for x in inputs)
        ti = _slice(targets, i, B)
        loss = loss_fn(m(*xi), _to64(ti) if isinstance(ti, torch.Tensor) and ti.is_floating_point() else ti).sum()
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        for n, g in zip(names, grads):
            if g is not None:
                out[n][i] = g
    return out


def norms(model, loss_fn, inputs, targets):
    """(B,) float64 per-example gradient norms over all trainable parameters."""
    g = per_example_grads(model, loss_fn, inputs, targets)
    B = (inputs if isinstance(inputs, tuple) else (inputs,))[0].shape[0]
    sq = torch.zeros(B, dtype=torch.float64)
    for t in g.values():
        sq += t.reshape(B, -1).square().sum(1)
    return sq.sqrt()


def clipped_sum(model, loss_fn, inputs, targets, C):
    """{name: sum_i clip(g_i)} in float64 with flat clipping to norm C."""
    g = per_example_grads(model, loss_fn, inputs, targets)
    n = norms(model, loss_fn, inputs, targets)
    c = torch.clamp(C / n, max=1.0)
    c[n == 0] = 1.0
    return {k: torch.tensordot(c, v, dims=1) for k, v in g.items()}
