"""nn.Linear and its subclasses: native per-example norms from the layer input A and output
gradient G, and the clipped sum as one GEMM with a rescaled G (docs/design.md)."""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import ops
from ..ops import as_computed, widened
from . import Part, Pool, Rule, Use, register, register_cross, scaled_rows
from . import keep
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


def stack_uses(uses: Sequence[Use]):
    """(A, G) of a Linear's uses, stacked along T: (B, sum T, d), (B, sum T, p).

    A weight used k times has one per-example gradient, the sum over uses: stacking the uses
    along T before the norm makes it exact (docs/design.md)."""
    if len(uses) == 1:
        u = uses[0]
        return _flat(u.inputs), _flat(u.grads[0])
    As = [_flat(u.inputs) for u in uses]
    Gs = [_flat(u.grads[0]) for u in uses]
    return torch.cat(As, 1), torch.cat(Gs, 1)


def _trainable(module: nn.Module):
    """(weight trainable, bias trainable): read from ``_parameters`` (no Module.__getattr__)."""
    ps = module._parameters
    b = ps.get("bias")
    return ps["weight"].requires_grad, b is not None and b.requires_grad


@register(nn.Linear)
class LinearRule(Rule):
    # A bf16 / fp16 capture's clipped sum: the rescaled factor widened in the rescaling pass,
    # only the other one copied to float32 (mlp-bf16's step peak 1.35x -> 1.19x of the
    # non-private one, bench/README.md).
    widens_in_clipped = True

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

    def sq_norms(self, module, uses, method):
        A, G = stack_uses(uses)
        with_weight, with_bias = _trainable(module)
        if not with_weight:
            return {"bias": G.sum(1).square().sum(-1)} if with_bias else {}
        if keep.keeps(G.shape[0], G.shape[1], A.shape[2], G.shape[2], G.dtype, method):
            # The per-example gradients, kept for this step's clipped sum (layers/keep.py).
            kept = uses[0].memo = keep.form([(A, G)], with_bias)
            w, b = keep.sq_norms(kept)
        else:
            # The bias's norms come from the same pass over G as the weight's.
            w, b = ops.linear_sq_norms(A, G, method=method, bias=with_bias)
        return {"weight": w, "bias": b} if with_bias else {"weight": w}

    def per_example(self, module, uses):
        A, G = stack_uses(uses)
        with_w, with_b = _trainable(module)
        out = {"weight": torch.einsum("btp,btd->bpd", G, A)} if with_w else {}
        if with_b:
            out["bias"] = G.sum(1)
        return out

    def clipped(self, module, uses, c, pool):
        w = b = None
        with_w, with_b = _trainable(module)
        kept = uses[0].memo
        if isinstance(kept, keep.Kept):
            uses[0].memo = None   # its bytes go back to the keep budget once this call is done
            if with_w:
                w = keep.clipped_weight(kept, c)
            if with_b and kept.b is not None:
                b = keep.clipped_bias(kept, c)
            if not with_b or b is not None:
                return {"weight": w, "bias": b} if with_b else {"weight": w}
            with_w = False   # only the bias is left to sum from the uses
        for u in uses:
            G = _flat(u.grads[0])
            gb = None
            if with_w:
                # The bias sum comes with the product where it is free (rescaled G rows).
                g, gb = clipped_products(_flat(u.inputs), G, c, pool, with_b)
                w = g if w is None else w + g
            if with_b:
                if gb is None:
                    wide = torch.promote_types(G.dtype, torch.float32)
                    gb = ops.cast(c, wide).matmul(widened(G[:, 0]) if G.shape[1] == 1
                                                  else G.sum(1, dtype=wide))
                b = gb if b is None else b + gb
        out = {"weight": w} if w is not None else {}
        if with_b:
            out["bias"] = b
        return out


@register_cross(LinearRule, LinearRule)
def linear_cross(a: Part, b: Part, method: str) -> Tensor:
    """<g_a, g_b> per example of a weight (or bias) shared by two Linear modules, without the
    per-example gradients when the ghost form is cheaper."""
    A1, G1 = stack_uses(a.uses)
    A2, G2 = stack_uses(b.uses)
    if a.name == "bias":
        return (G1.sum(1) * G2.sum(1)).sum(-1)
    T1, T2, p, d = G1.shape[1], G2.shape[1], G1.shape[2], A1.shape[2]
    if method == "ghost" or (method != "direct" and T1 * T2 * (p + d) <= (T1 + T2) * p * d):
        return (torch.bmm(A1, A2.transpose(1, 2)) * torch.bmm(G1, G2.transpose(1, 2))).sum((1, 2))
    ga = torch.einsum("btp,btd->bpd", G1, A1)
    return (ga * torch.einsum("btp,btd->bpd", G2, A2)).sum((1, 2))


def clipped_products(A: Tensor, G: Tensor, c: Tensor, pool: Optional[Pool],
                     bias: bool = False):
    """(``sum_i c_i G_i^T A_i`` (p, d), and with ``bias`` the bias's ``sum_i c_i sum_t G_i[t]``
    (p,) where it comes free, else None) from A (B, T, d), G (B, T, p), c (B,):
    G^T diag(c) A. CPU tensors where the core's AVX-512 kernel is preferred
    (``ops.clipped_gemm_runs``): that kernel (``ops.clipped_gemm``). Otherwise torch: rescaling
    whichever factor is smaller (in ``pool``'s scratch buffer when one is given), then one GEMM,
    in float32 or wider: half / bfloat16 factors are widened, the rescaled one in the rescaling
    pass itself. Where G is the rescaled factor, the bias sum is the column sum of its rows,
    read while they are fresh, instead of a pass over G."""
    if ops.clipped_gemm_runs(A, G):
        return ops.clipped_gemm(A, G, c), None
    B, T, p = G.shape
    d = A.shape[-1]
    c = ops.cast(c, torch.promote_types(G.dtype, torch.float32))
    if p <= d:
        Gc = scaled_rows(G, c, pool).reshape(B * T, p)
        return Gc.t().mm(widened(A).reshape(B * T, d)), (Gc.sum(0) if bias else None)
    return widened(G).reshape(B * T, p).t().mm(scaled_rows(A, c, pool).reshape(B * T, d)), None


def clipped_product(A: Tensor, G: Tensor, c: Tensor, pool: Optional[Pool]) -> Tensor:
    """``sum_i c_i G_i^T A_i`` (p, d) from A (B, T, d), G (B, T, p), c (B,): the weight's part
    of :func:`clipped_products`."""
    return clipped_products(A, G, c, pool)[0]
