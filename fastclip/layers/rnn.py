"""fastclip.nn.RNN / GRU / LSTM: per-example norms and clipped sums from the factors each layer
and direction records in its backward (fastclip.nn.rnn): for weight_ih A = the layer inputs,
for weight_hh A = the previous states, G = gate pre-activation gradients, the time steps stacked
as the uses of one weight (exact, docs/design.md). bias_ih and bias_hh see the same G (GRU: their own)
and are separate parameters: each gets its own norm, ||sum_t g_t||^2."""
from __future__ import annotations

import re
import torch

from .. import ops
from ..nn.rnn import GRU, LSTM, RNN, RecurrentPart
from .capture import ModuleCaptureRule
from .linear import clipped_product
from . import register, trainable

_NAME = re.compile(r"^(weight|bias)_(ih|hh)_l(\d+)(_reverse)?$")


def _parse(name: str):
    m = _NAME.match(name)
    if m is None:
        raise ValueError(f"unexpected recurrent parameter name {name!r}")
    return m.group(1), m.group(2), (int(m.group(3)), 1 if m.group(4) else 0)


def _factors(part, which: str):
    """(A, G) of weight_ih (which="ih") or weight_hh ("hh") of one layer/direction part."""
    return (part.x, part.g_ih) if which == "ih" else (part.h_prev, part.g_hh)


def _wide(part):
    """The part with bf16 / fp16 factors seen in float32 (ops.widened): norms and clipped sums
    are formed in float32 or wider and rounded to the parameter's dtype once, by the engine."""
    if part is None or part.x.dtype not in (torch.float16, torch.bfloat16):
        return part
    w = ops.widened
    gi = w(part.g_ih)
    return RecurrentPart(w(part.x), w(part.h_prev), gi, gi if part.shared_g else w(part.g_hh),
                         w(part.g_sum), w(part.g_hh_sum))


@register(RNN, GRU, LSTM)
class RecurrentRule(ModuleCaptureRule):
    def check(self, module):
        if getattr(module, "proj_size", 0):
            return "proj_size > 0 is not supported"
        return None

    def sq_norms(self, module, uses, method):
        out = {}
        B = uses[0].batch_size
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad or name in out:
                continue
            kind, which, key = _parse(name)
            parts = [_wide(u.extra[key]) for u in uses if key in u.extra]
            if not parts:  # no gradient reached this layer/direction: its gradient is zero
                out[name] = torch.zeros(max(B, 0), dtype=torch.float64, device=p.device)
            elif kind == "bias":  # ||sum over uses and steps of g_t||^2, from the backward's sums
                g = sum(q.g_sum if which == "ih" else q.g_hh_sum for q in parts)
                out[name] = g.square().sum(-1)
            else:
                out.update(self._weight_sq_norms(module, name[len("weight_ih"):], parts, method))
        return out

    @staticmethod
    def _weight_sq_norms(module, suffix, parts, method):
        """{weight_ih, weight_hh}{suffix}'s norms, the uses' steps stacked: with the ghost
        method both from one pass (the Gram of G serves the two)."""
        n_ih, n_hh = "weight_ih" + suffix, "weight_hh" + suffix
        cat = lambda ts: ts[0] if len(ts) == 1 else torch.cat(ts, 1)
        x, hp, gi = cat([p.x for p in parts]), cat([p.h_prev for p in parts]), cat([p.g_ih for p in parts])
        shared = all(p.shared_g for p in parts)
        gh = gi if shared else cat([p.g_hh for p in parts])
        T, p_ = gi.shape[1], gi.shape[2]
        out = {}
        if trainable(module, n_ih):
            ghost = method == "ghost" or (method == "auto" and T > 1 and
                                          ops.choose_linear_method(T, x.shape[2], p_) == "ghost" and
                                          ops.choose_linear_method(T, hp.shape[2], p_) == "ghost")
            if ghost:
                out[n_ih], w_hh = ops.rnn_ghost_sq_norms(x, hp, gi, None if shared else gh)
                if trainable(module, n_hh):
                    out[n_hh] = w_hh
                return out
            out[n_ih] = ops.linear_sq_norms(x, gi, method=method)[0]
        if trainable(module, n_hh):
            out[n_hh] = ops.linear_sq_norms(hp, gh, method=method)[0]
        return out

    @staticmethod
    def _each(module, uses, one, empty):
        """{name: sum over uses of one(kind, which, part)} of the trainable parameters; empty(p)
        for a layer/direction no gradient reached."""
        out = {}
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad:
                continue
            kind, which, key = _parse(name)
            total = None
            for u in uses:
                part = _wide(u.extra.get(key))
                if part is not None:
                    g = one(kind, which, part)
                    total = g if total is None else total + g
            out[name] = empty(p) if total is None else total
        return out

    def per_example(self, module, uses):
        B = max(uses[0].batch_size, 0)

        def one(kind, which, part):
            if kind == "bias":
                return part.g_sum if which == "ih" else part.g_hh_sum
            A, G = _factors(part, which)
            return torch.einsum("btp,btd->bpd", G, A)

        return self._each(module, uses, one, lambda p: torch.zeros(
            (B,) + tuple(p.shape), dtype=p.dtype, device=p.device))

    def clipped(self, module, uses, c, pool):
        def one(kind, which, part):
            A, G = _factors(part, which)
            B, T, p = G.shape
            cg = c.to(G.dtype)
            if kind == "bias":
                return cg.matmul(part.g_sum if which == "ih" else part.g_hh_sum)
            # G^T diag(c) A over all (example, step) rows, as a Linear's clipped sum.
            return clipped_product(A, G, c, pool)

        return self._each(module, uses, one, lambda p: torch.zeros(
            p.shape, dtype=p.dtype, device=p.device))
