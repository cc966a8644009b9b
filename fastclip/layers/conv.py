"""nn.Conv1d / nn.Conv2d / nn.Conv3d and their subclasses that keep the base forward.

Capture: the module's ``F.conv{1,2,3}d`` call (after the ``F.pad`` of a non-zero
``padding_mode``, so the captured input is the padded one) records the input x and the output
gradient G. Norms: per group, grad_W_i = G_i U_i^T with U_i the unfolded input; the native core
unfolds one example at a time and picks ghost or direct per layer (``ops.conv_sq_norms``). Clipped
sum: torch's own weight-gradient convolution with the rescaled gradient G * c (DESIGN.md).

Kept: where the direct method runs (it forms every per-example gradient (B, groups, K, Og) to
take its norm), the gradients are kept for the clipped sum (``c @ (B, O K)``, no second
weight-gradient convolution). A kept use is reduced as soon as its backward records it
(:meth:`ConvRule.on_record`): its norms and per-example weight / bias gradients are formed there
and the activation-sized input and output gradient dropped, instead of being held to the end of
the backward. The step ledger (:data:`fastclip.layers.keep.KEEP_STEP_BYTES`, one budget with the
linear rules) is charged only what the kept gradients add over the output gradient they replace:
nothing for the early layers (B O K << B O P), so they keep whatever the budget (12 MiB by default).
"""
from __future__ import annotations

import math
import weakref
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import ops
from . import Use, keep as _keep, register, scaled_rows, trainable, zero_rows
from .capture import FunctionalRule

_DIMS = {F.conv1d: 1, F.conv2d: 2, F.conv3d: 3}
_WEIGHT_GRAD = {1: torch.nn.grad.conv1d_weight, 2: torch.nn.grad.conv2d_weight,
                3: torch.nn.grad.conv3d_weight}
_BASES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
# The direct method forms every per-example gradient (B x C_out x K) to take its norm; kept within
# the step ledger (keep.KEEP_STEP_BYTES, shared with the linear rules), the clipped sum is then one
# (B,) x (B, C_out K) product (~2 B O K flops) instead of a second weight-gradient convolution
# (~2 B P O K flops: P times more).
# The clipping mode of the engine that captured each module (on_record has no engine).
_MODES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


class _Eager:
    """``use.memo`` of a use reduced by :meth:`ConvRule.on_record`: the per-example weight
    gradients ``kept`` (B, groups, K, Og), bias gradients ``gb`` (B, O) or None, and the squared
    norms ``w``, ``b`` of this use alone; ``token`` holds their bytes in the step ledger."""

    __slots__ = ("kept", "gb", "w", "b", "token")

    def __init__(self, kept, gb, w, b, token):
        self.kept, self.gb, self.w, self.b, self.token = kept, gb, w, b, token


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
        _MODES[module] = engine.mode
        return super().capture_call(engine, module, func, bound)

    def on_record(self, use):
        # Where the direct method keeps this use's per-example gradients within the step budget,
        # form them (and the norms) now, in the backward, and drop the activation-sized input
        # and output gradient: flat clipping would otherwise hold them to the backward's end.
        module = use.module
        if isinstance(use.extra, dict):
            use.extra.pop("eager", None)
        x, gs = use.inputs, use.grads
        if (not isinstance(x, Tensor) or not gs or len(gs) != 1 or not isinstance(gs[0], Tensor)
                or not trainable(module, "weight")):
            return
        g = gs[0]
        weight = module.weight
        _, kernel, stride, pads, dilation, groups = _opts(use, weight.shape)
        B, O = g.shape[:2]
        K = math.prod(weight.shape[1:])
        if not ops.conv_keeps_per_example(x, g, math.prod(g.shape[2:]), K, O // groups,
                                          _MODES.get(module, "auto")):
            return
        with_bias = trainable(module, "bias")
        # Charged: the bytes kept beyond the output gradient dropped here (held to the end of
        # the step otherwise). Not from keep.ARENA: it rewinds when the ledger holds nothing.
        nbytes = max(0, (B * O * K + (B * O if with_bias else 0) - g.numel()) * g.element_size())
        if nbytes and not _keep.fits(nbytes):
            return
        kept = torch.empty((B, groups, K, O // groups), dtype=g.dtype)
        token = _keep.Kept(None, None, False, nbytes)
        gb = torch.empty((B, O), dtype=g.dtype) if with_bias else None
        w, b = ops.conv_sq_norms(x, g, tuple(weight.shape), stride, ops.pads_to_arg(pads),
                                 dilation, groups, "direct", with_bias, per_example=kept,
                                 bias_grads=gb)
        use.memo = _Eager(kept, gb, w, b, token)
        use.inputs = use.grads = None   # set again by the capture's backward

    def zero_examples(self, use, bad):
        m = use.memo
        if not isinstance(m, _Eager):
            return super().zero_examples(use, bad)
        # The engine drops memos after zeroing: what replaced the input and output gradient
        # moves to ``extra`` with the rows zeroed (read by clipped when the memo is gone).
        use.extra["eager"] = _Eager(zero_rows(m.kept, bad),
                                    None if m.gb is None else zero_rows(m.gb, bad),
                                    None, None, m.token)

    @staticmethod
    def _eager(use):
        m = use.memo
        if isinstance(m, _Eager):
            return m
        return use.extra.get("eager") if isinstance(use.extra, dict) else None

    def release(self, use):
        if isinstance(use.extra, dict):
            use.extra.pop("eager", None)
        use.memo = None
        super().release(use)

    def sq_norms(self, module, uses, method):
        # ``module`` may be a stand-in holding ``weight`` and ``bias`` (the operation rule's).
        out = {}
        with_bias = trainable(module, "bias")
        if not trainable(module, "weight"):
            return {"bias": self._bias_sum(uses).square().sum(1)} if with_bias else out
        weight = module.weight
        eager = [self._eager(u) for u in uses]
        if any(e is not None for e in eager):
            if len(uses) == 1 and eager[0].w is not None:
                w, b = eager[0].w, eager[0].b
            else:
                # The module's per-example gradient is the sum over its uses (exact).
                kept, gb = None, None
                for u, e in zip(uses, eager):
                    k, kb = (e.kept, e.gb) if e is not None else self._form(u, weight, with_bias)
                    kept = k if kept is None else kept + k
                    if with_bias:
                        gb = kb if gb is None else gb + kb
                Bk = kept.shape[0]
                w = torch.linalg.vector_norm(kept.reshape(Bk, -1), dim=1).square()
                b = gb.square().sum(1) if with_bias else None
        elif len(uses) == 1:
            use = uses[0]
            _, kernel, stride, pads, dilation, groups = _opts(use, weight.shape)
            x, g = use.inputs, use.grads[0]
            B, O = g.shape[:2]
            K = math.prod(weight.shape[1:])
            keep, token = None, None
            nbytes = B * O * K * g.element_size()
            if (_keep.fits(nbytes)
                    and ops.conv_keeps_per_example(x, g, math.prod(g.shape[2:]), K, O // groups,
                                                   method)):
                # Per example and group the K x Og transpose (the core's faster GEMM orientation),
                # its bytes held in the step ledger while the memo lives.
                keep = torch.empty((B, groups, K, O // groups), dtype=g.dtype)
                token = _keep.Kept(None, None, False, nbytes)
            # The per-example bias gradients (B, O): the bias norm forms them anyway, and the
            # clipped bias sum is then c @ them instead of a second pass over g.
            gb = torch.empty((B, O), dtype=g.dtype) if with_bias and ops.conv_native(x, g) else None
            w, b = ops.conv_sq_norms(x, g, tuple(weight.shape), stride, ops.pads_to_arg(pads),
                                     dilation, groups, method, with_bias, per_example=keep,
                                     bias_grads=gb)
            if keep is not None or gb is not None:
                # For the clipped sum of this step (the engine drops memos when the step ends,
                # and when an example is zeroed for a non-finite norm).
                use.memo = (keep, gb, token)
        else:
            w = self._stacked_sq_norms(uses, weight.shape, method)
            b = self._bias_sum(uses).square().sum(1) if with_bias else None
        out["weight"] = w
        if with_bias:
            out["bias"] = b
        return out

    @staticmethod
    def _form(use, weight, with_bias):
        """(per-example weight gradients (B, groups, K, Og), bias gradients (B, O) or None) of
        one use that still holds its input and output gradient."""
        _, kernel, stride, pads, dilation, groups = _opts(use, weight.shape)
        x, g = use.inputs, use.grads[0]
        B, O = g.shape[:2]
        K = math.prod(weight.shape[1:])
        if ops.conv_native(x, g):
            kept = torch.empty((B, groups, K, O // groups), dtype=g.dtype)
            gb = torch.empty((B, O), dtype=g.dtype) if with_bias else None
            ops.conv_sq_norms(x, g, tuple(weight.shape), stride, ops.pads_to_arg(pads), dilation,
                              groups, "direct", with_bias, per_example=kept, bias_grads=gb)
            return kept, gb
        U, G = _grouped(use, weight.shape)
        kept = torch.einsum("bgop,bgkp->bgko", G, U)
        return kept, (g.flatten(2).sum(2) if with_bias else None)

    @classmethod
    def _bias_sum(cls, uses: Sequence[Use]) -> Tensor:
        out = None
        for u in uses:
            e = cls._eager(u)
            s = e.gb if e is not None else u.grads[0].flatten(2).sum(2)
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
                e = self._eager(u)
                if e is not None:
                    B, groups, K, Og = e.kept.shape
                    g = e.kept.transpose(2, 3).reshape(B, *weight.shape)
                else:
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
        memos = []
        for u in uses:
            e = self._eager(u)
            if e is not None:     # reduced at record: it holds all the clipped sum needs
                memos.append((e.kept, e.gb))
                continue
            kept, gb, token = u.memo or (None, None, None)
            memos.append((kept, gb))
            rest = (None if want_w else kept, None if want_b else gb)
            u.memo = (rest + (token,)) if any(r is not None for r in rest) else None
        if want_w:
            grad = None
            for u, (kept, _) in zip(uses, memos):
                g = self._clipped_weight(module.weight, u, kept, c, pool)
                grad = g if grad is None else grad + g
            out["weight"] = grad
        if want_b:
            gbs = [gb for _, gb in memos]
            bias_sum = sum(gbs) if all(gb is not None for gb in gbs) else self._bias_sum(uses)
            out["bias"] = ops.cast(c, bias_sum.dtype).matmul(bias_sum)
        return out

    @staticmethod
    def _clipped_weight(weight, use, kept, c, pool) -> Tensor:
        if kept is not None:
            # sum_i c_i grad_W_i from the gradients the direct norm pass formed.
            B, groups, K, Og = kept.shape   # B = 0 (an empty Poisson batch) gives a zero sum
            total = ops.cast(c, kept.dtype).matmul(kept.reshape(B, weight.numel()))
            return total.view(groups, K, Og).transpose(1, 2).reshape(weight.shape)
        g = use.grads[0]
        c = ops.cast(c, g.dtype)
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
