"""nn.Linear and its subclasses: native per-example norms from the layer input A and output
gradient G, and the clipped sum as one GEMM with a rescaled G (docs/design.md)."""
from __future__ import annotations

import math
from typing import Dict, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import ops
from ..ops import as_computed
from . import Entry, Rule, bias_in_same_pass, keep_bias, register, scaled_rows, take_bias
from .capture import CaptureMode


class _LinearFn(torch.autograd.Function):
    """y = x W^T + b whose backward records (A, G) and skips the non-private weight-gradient
    product: W and b get no autograd gradient; the engine writes their clipped sums."""

    @staticmethod
    def forward(ctx, engine, use, x, weight, bias):
        ctx.engine, ctx.use = engine, use
        # Saved through autograd so an in-place change of x before backward is an error,
        # not a silently wrong norm.
        ctx.save_for_backward(x, weight)
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, g):
        x, weight = ctx.saved_tensors
        use = ctx.use
        # Under autocast F.linear ran in g's dtype on x and the weight cast to it: record A as
        # the product saw it, and form the input gradient as autocast's own graph does
        # (g @ W_bf16, widened to x's dtype by autograd), whatever the autocast state of the
        # backward itself.
        use.inputs = as_computed(x.detach(), g.dtype)
        use.grads = (g,)
        ctx.engine.record(use)
        gx = g.matmul(as_computed(weight, g.dtype)) if ctx.needs_input_grad[2] else None
        return None, None, gx, None, None


class _Capture(CaptureMode):
    """Active only during one Linear's forward: routes its F.linear call to _LinearFn."""

    def match(self, func, args, kwargs):
        if func is F.linear:
            x = args[0] if args else kwargs["input"]
            w = args[1] if len(args) > 1 else kwargs.get("weight")
            b = args[2] if len(args) > 2 else kwargs.get("bias")
            if w is self.module.weight:
                if x.dim() < 2:
                    raise ValueError(
                        f"{type(self.module).__name__} got a {x.dim()}-D input {tuple(x.shape)}; "
                        "per-example gradients need the batch dimension first")
                return _LinearFn.apply(self.engine, self.engine.new_use(self.module), x, w, b)
        return NotImplemented


def _flat(t: Tensor) -> Tensor:
    """(B, *, n) -> (B, T, n); T spelled out so B = 0 reshapes too."""
    return t.reshape(t.shape[0], math.prod(t.shape[1:-1]), t.shape[-1])


def stack_uses(entries: Sequence[Entry]):
    """(A, G) of a Linear weight's uses, stacked along T: (B, sum T, d), (B, sum T, p).

    A weight used k times has one per-example gradient, the sum over uses: stacking the uses
    along T before the norm makes it exact (docs/design.md)."""
    As = [_flat(u.inputs) for _, _, u in entries]
    Gs = [_flat(u.grads[0]) for _, _, u in entries]
    if len(As) == 1:
        return As[0], Gs[0]
    return torch.cat(As, 1), torch.cat(Gs, 1)


@register(nn.Linear)
class LinearRule(Rule):
    def supports(self, module):
        # A subclass with its own forward may compute something else: the generic rule covers it.
        return type(module).forward is nn.Linear.forward

    def pre_forward(self, engine, module, args, kwargs):
        mode = _Capture(engine, module)
        mode.__enter__()
        return mode

    def post_forward(self, engine, module, state, args, kwargs, output):
        state.__exit__(None, None, None)
        return None

    def release(self, use):
        use.inputs = use.grads = None  # both set again by _LinearFn.backward

    def sq_norms(self, entries, method, cache):
        name = entries[0][1]
        if name == "bias":
            b = take_bias(entries, cache)
            if b is not None:
                return b
        A, G = stack_uses(entries)
        if name == "weight":
            with_bias = bias_in_same_pass(entries)
            w, b = ops.linear_sq_norms(A, G, method=method, bias=with_bias)
            if with_bias:
                keep_bias(entries, cache, b)
            return w
        return G.sum(1).square().sum(-1)

    def per_example_grad(self, module, name, use, cache):
        G = _flat(use.grads[0])
        if name == "weight":
            return torch.einsum("btp,btd->bpd", G, _flat(use.inputs))
        return G.sum(1)

    def clipped_grad(self, module, name, use, c, cache):
        G = _flat(use.grads[0])
        if name == "weight":
            return clipped_product(_flat(use.inputs), G, c, cache)
        return c.to(G.dtype).matmul(G[:, 0] if G.shape[1] == 1 else G.sum(1))


def clipped_product(A: Tensor, G: Tensor, c: Tensor, cache: Dict) -> Tensor:
    """``sum_i c_i G_i^T A_i`` (p, d) from A (B, T, d), G (B, T, p), c (B,): G^T diag(c) A,
    rescaling whichever factor is smaller, then one GEMM."""
    B, T, p = G.shape
    d = A.shape[-1]
    c = c.to(G.dtype)
    if p <= d:
        return scaled_rows(G, c, cache).reshape(B * T, p).t().mm(A.reshape(B * T, d))
    return G.reshape(B * T, p).t().mm(scaled_rows(A, c, cache).reshape(B * T, d))
