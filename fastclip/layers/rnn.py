"""fastclip.nn.RNN / GRU / LSTM: per-example norms and clipped sums from the factors each layer
and direction records in its backward (fastclip.nn.rnn): for weight_ih A = the layer inputs,
for weight_hh A = the previous states, G = gate pre-activation gradients, the time steps stacked
as the uses of one weight (exact, DESIGN.md). bias_ih and bias_hh see the same G (GRU: their own)
and are separate parameters: each gets its own norm, ||sum_t g_t||^2."""
from __future__ import annotations

import re
from typing import Dict

import torch
from torch import Tensor

from .. import ops
from ..nn.rnn import GRU, LSTM, RNN, pop_capture, push_capture
from . import Rule, Use, register, scaled_rows

_NAME = re.compile(r"^(weight|bias)_(ih|hh)_l(\d+)(_reverse)?$")


def _parse(name: str):
    m = _NAME.match(name)
    if m is None:
        raise ValueError(f"unexpected recurrent parameter name {name!r}")
    return m.group(1), m.group(2), (int(m.group(3)), 1 if m.group(4) else 0)


def _factors(part, which: str):
    """(A, G) of weight_ih (which="ih") or weight_hh ("hh") of one layer/direction part."""
    return (part.x, part.g_ih) if which == "ih" else (part.h_prev, part.g_hh)


@register(RNN, GRU, LSTM)
class RecurrentRule(Rule):
    def check(self, module):
        if getattr(module, "proj_size", 0):
            return "proj_size > 0 is not supported"
        return None

    def pre_forward(self, engine, module, args, kwargs):
        use = Use(module, extra={})
        push_capture(module, engine, use)
        return use

    def post_forward(self, engine, module, state, args, kwargs, output):
        pop_capture(module)
        return None

    def sq_norms(self, entries, method, cache):
        kind, which, key = _parse(entries[0][1])
        uses = [u for _, _, u in entries]
        parts = [u.extra[key] for u in uses if key in u.extra]
        B = uses[0].batch_size
        if not parts:  # no gradient reached this layer/direction: its gradient is zero
            return torch.zeros(max(B, 0), dtype=torch.float64)
        ck = ("rnn-bias", tuple(id(u) for u in uses), key, which)
        if kind == "bias":
            if ck in cache:
                return cache.pop(ck)
            G = sum(_factors(p, which)[1].sum(1) for p in parts)
            return G.square().sum(-1)
        fs = [_factors(p, which) for p in parts]
        A = fs[0][0] if len(fs) == 1 else torch.cat([a for a, _ in fs], 1)
        G = fs[0][1] if len(fs) == 1 else torch.cat([g for _, g in fs], 1)
        w, b = ops.linear_sq_norms(A, G, method=method, bias=True)
        cache[ck] = b  # the bias of the same G, from the same pass
        return w

    def per_example_grad(self, module, name, use, cache):
        kind, which, key = _parse(name)
        part = use.extra.get(key)
        p = getattr(module, name)
        if part is None:
            return torch.zeros((max(use.batch_size, 0),) + tuple(p.shape), dtype=p.dtype,
                               device=p.device)
        A, G = _factors(part, which)
        if kind == "bias":
            return G.sum(1)
        return torch.einsum("btp,btd->bpd", G, A)

    def clipped_grad(self, module, name, use, c, cache):
        kind, which, key = _parse(name)
        part = use.extra.get(key)
        if part is None:
            p = getattr(module, name)
            return torch.zeros(p.shape, dtype=p.dtype, device=p.device)
        A, G = _factors(part, which)
        B, T, p = G.shape
        c = c.to(G.dtype)
        if kind == "bias":
            return c.matmul(G.sum(1))
        d = A.shape[-1]
        # G^T diag(c) A over all (example, step) rows: rescale the smaller factor, then one GEMM.
        if p <= d:
            return scaled_rows(G, c, cache).reshape(B * T, p).t().mm(A.reshape(B * T, d))
        return G.reshape(B * T, p).t().mm(scaled_rows(A, c, cache).reshape(B * T, d))
