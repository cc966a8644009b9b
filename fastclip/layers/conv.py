"""nn.Conv1d / nn.Conv2d / nn.Conv3d and their subclasses that keep the base forward.

Capture: the module's ``F.conv{1,2,3}d`` call (after the ``F.pad`` of a non-zero
``padding_mode``, so the captured input is the padded one) records the input x and the output
gradient G. Norms: per group, grad_W_i = G_i U_i^T with U_i the unfolded input; the native core
unfolds one example at a time and picks ghost or direct per layer (``ops.conv_sq_norms``). Clipped
sum: torch's own weight-gradient convolution with the rescaled gradient G * c (DESIGN.md).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import ops
from . import Use, register, scaled_rows, trainable
from .capture import FunctionalRule

_DIMS = {F.conv1d: 1, F.conv2d: 2, F.conv3d: 3}
_WEIGHT_GRAD = {1: torch.nn.grad.conv1d_weight, 2: torch.nn.grad.conv2d_weight,
                3: torch.nn.grad.conv3d_weight}
_BASES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
# The direct method forms every per-example gradient (B x C_out x K) to take its norm; kept up to
# this many bytes per layer, the clipped sum is then one (B,) x (B, C_out K) product (~2 B O K
# flops) instead of a second weight-gradient convolution (~2 B P O K flops: P times more).
KEEP_PER_EXAMPLE_BYTES = 64 << 20


def _parse(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    return {"input": input, "weight": weight, "bias": bias, "stride": stride, "padding": padding,
            "dilation": dilation, "groups": groups}


def _opts(use, weight_shape):
    """(d, kernel, stride, pads ((lo, hi), ...), dilation, groups) of one captured call."""
    e = use.extra
    d = _DIMS[e["func"]]
    kernel = tuple(weight_shape[2:])
    stride = ops._conv_tuple(e["stride"], d, "stride")
    dilation = ops._conv_tuple(e["dilation"], d, "dilation")
    pads = ops.conv_padding(e["padding"], kernel, stride, dilation)
    return d, kernel, stride, pads, dilation, int(e["groups"])


def _grouped(use, weight_shape):
    """(U (B, groups, K, P), G (B, groups, Og, P)) of one use, U materialised in torch."""
    d, kernel, stride, pads, dilation, groups = _opts(use, weight_shape)
    x, g = use.inputs, use.grads[0]
    U = ops.conv_unfold_torch(x, kernel, stride, pads, dilation, groups)
    B, O = g.shape[:2]
    G = g.reshape(B, groups, O // groups, math.prod(g.shape[2:]))
    return U, G


@register(nn.Conv1d, nn.Conv2d, nn.Conv3d)
class ConvRule(FunctionalRule):
    functions = {F.conv1d: _parse, F.conv2d: _parse, F.conv3d: _parse}

    def supports(self, module):
        # A subclass with its own forward (or _conv_forward) may compute something else: the
        # generic rule covers it exactly.
        for base in _BASES:
            if isinstance(module, base):
                return (type(module).forward is base.forward
                        and type(module)._conv_forward is base._conv_forward)
        return False

    def capture_call(self, engine, module, func, bound):
        x = bound["input"]
        d = _DIMS[func]
        if isinstance(x, Tensor) and x.dim() != d + 2:
            raise ValueError(
                f"{type(module).__name__} got a {x.dim()}-D input {tuple(x.shape)}; per-example "
                f"gradients need a batched (B, C, *spatial) input, {d + 2}-D")
        return super().capture_call(engine, module, func, bound)

    def sq_norms(self, module, uses, method):
        # ``module`` may be a stand-in holding ``weight`` and ``bias`` (the operation rule's).
        out = {}
        with_bias = trainable(module, "bias")
        if not trainable(module, "weight"):
            return {"bias": self._bias_sum(uses).square().sum(1)} if with_bias else out
        weight = module.weight
        if len(uses) == 1:
            use = uses[0]
            _, kernel, stride, pads, dilation, groups = _opts(use, weight.shape)
            x, g = use.inputs, use.grads[0]
            B, O = g.shape[:2]
            K = math.prod(weight.shape[1:])
            keep = None
            if (B * O * K * g.element_size() <= KEEP_PER_EXAMPLE_BYTES
                    and ops.conv_keeps_per_example(x, g, math.prod(g.shape[2:]), K, O // groups,
                                                   method)):
                # Per example and group the K x Og transpose (the core's faster GEMM orientation).
                keep = torch.empty((B, groups, K, O // groups), dtype=g.dtype)
            # The per-example bias gradients (B, O): the bias norm forms them anyway, and the
            # clipped bias sum is then c @ them instead of a second pass over g.
            gb = torch.empty((B, O), dtype=g.dtype) if with_bias and ops.conv_native(x, g) else None
            w, b = ops.conv_sq_norms(x, g, tuple(weight.shape), stride, ops.pads_to_arg(pads),
                                     dilation, groups, method, with_bias, per_example=keep,
                                     bias_grads=gb)
            if keep is not None or gb is not None:
                # For the clipped sum of this step (the engine drops memos when the step ends,
                # and when an example is zeroed for a non-finite norm).
                use.memo = (keep, gb)
        else:
            w = self._stacked_sq_norms(uses, weight.shape, method)
            b = self._bias_sum(uses).square().sum(1) if with_bias else None
        out["weight"] = w
        if with_bias:
            out["bias"] = b
        return out

    @staticmethod
    def _bias_sum(uses: Sequence[Use]) -> Tensor:
        out = None
        for u in uses:
            g = u.grads[0]
            s = g.flatten(2).sum(2)
            out = s if out is None else out + s
        return out

    @staticmethod
    def _stacked_sq_norms(uses, weight_shape, method) -> Tensor:
        # A weight used k times has one per-example gradient, the sum over uses: stacking the uses'
        # positions (each unfolded to the same K rows) before the norm makes it exact (DESIGN.md).
        Us, Gs = zip(*(_grouped(u, weight_shape) for u in uses))
        U, G = torch.cat(Us, 3), torch.cat(Gs, 3)
        B, groups, K, P = U.shape
        Og = G.shape[2]
        A = U.transpose(2, 3).reshape(B * groups, P, K)
        Gt = G.transpose(2, 3).reshape(B * groups, P, Og)
        lin = method if method in ("ghost", "direct") and P > 1 else "auto"
        w, _ = ops.linear_sq_norms(A.contiguous(), Gt.contiguous(), method=lin)
        return w.reshape(B, groups).sum(1)

    def per_example(self, module, uses):
        out = {}
        if trainable(module, "weight"):
            weight, grad = module.weight, None
            for u in uses:
                U, G = _grouped(u, weight.shape)
                g = torch.einsum("bgop,bgkp->bgok", G, U).reshape(G.shape[0], *weight.shape)
                grad = g if grad is None else grad + g
            out["weight"] = grad
        if trainable(module, "bias"):
            out["bias"] = self._bias_sum(uses)
        return out

    def clipped(self, module, uses, c, pool):
        out = {}
        # What the norm pass kept per use: (per-example weight gradients, bias gradients). Each
        # is taken by the parameter it serves (the operation rule asks for weight and bias apart).
        want_w, want_b = trainable(module, "weight"), trainable(module, "bias")
        memos = [u.memo or (None, None) for u in uses]
        for u, (kept, gb) in zip(uses, memos):
            rest = (None if want_w else kept, None if want_b else gb)
            u.memo = rest if any(r is not None for r in rest) else None
        if want_w:
            grad = None
            for u, (kept, _) in zip(uses, memos):
                g = self._clipped_weight(module.weight, u, kept, c, pool)
                grad = g if grad is None else grad + g
            out["weight"] = grad
        if want_b:
            gbs = [gb for _, gb in memos]
            bias_sum = sum(gbs) if all(gb is not None for gb in gbs) else self._bias_sum(uses)
            out["bias"] = c.to(uses[0].grads[0].dtype).matmul(bias_sum)
        return out

    @staticmethod
    def _clipped_weight(weight, use, kept, c, pool) -> Tensor:
        g = use.grads[0]
        c = c.to(g.dtype)
        if kept is not None:
            # sum_i c_i grad_W_i from the gradients the direct norm pass formed.
            B, groups, K, Og = kept.shape   # B = 0 (an empty Poisson batch) gives a zero sum
            total = c.to(kept.dtype).matmul(kept.reshape(B, weight.numel()))
            return total.view(groups, K, Og).transpose(1, 2).reshape(weight.shape)
        d, kernel, stride, pads, dilation, groups = _opts(use, weight.shape)
        x = use.inputs
        if any(lo != hi for lo, hi in pads):
            # torch's weight-gradient conv takes symmetric padding: pad the extra after by hand
            # (padding="same" with an even dilated kernel), as torch's own forward does.
            x = F.pad(x, [p for lo, hi in reversed(pads) for p in (0, hi - lo)])
        # sum_i c_i grad_W_i is the weight-gradient conv of (x, G) with either factor's examples
        # rescaled by c: rescale the smaller one (usually x: fewer channels or more positions).
        if x.numel() <= g.numel():
            x = scaled_rows(x, c, pool)
        else:
            g = scaled_rows(g, c, pool)
        return _WEIGHT_GRAD[d](x, tuple(weight.shape), g, stride, tuple(lo for lo, _ in pads),
                               dilation, groups)
