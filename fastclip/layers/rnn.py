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
from . import register, scaled_rows

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

    def sq_norms(self, entries, method, cache):
        kind, which, key = _parse(entries[0][1])
        uses = [u for _, _, u in entries]
        parts = [_wide(u.extra[key]) for u in uses if key in u.extra]
        B = uses[0].batch_size
        if not parts:  # no gradient reached this layer/direction: its gradient is zero
            return torch.zeros(max(B, 0), dtype=torch.float64,
                               device=getattr(entries[0][0], entries[0][1]).device)
        if kind == "bias":  # ||sum over uses and steps of g_t||^2, from the backward's sums
            g = sum(p.g_sum if which == "ih" else p.g_hh_sum for p in parts)
            return g.square().sum(-1)
        ck = ("rnn-weight-hh", tuple(id(u) for u in uses), key)
        if which == "hh" and ck in cache:
            return cache.pop(ck)
        cat = lambda ts: ts[0] if len(ts) == 1 else torch.cat(ts, 1)
        x, hp, gi = cat([p.x for p in parts]), cat([p.h_prev for p in parts]), cat([p.g_ih for p in parts])
        shared = all(p.shared_g for p in parts)
        gh = gi if shared else cat([p.g_hh for p in parts])
        T, p_ = gi.shape[1], gi.shape[2]
        ghost = method == "ghost" or (method == "auto" and T > 1 and
                                      ops.choose_linear_method(T, x.shape[2], p_) == "ghost" and
                                      ops.choose_linear_method(T, hp.shape[2], p_) == "ghost")
        if which == "ih" and ghost:
            # Both weights at once: the Gram of G serves weight_ih and weight_hh.
            w_ih, w_hh = ops.rnn_ghost_sq_norms(x, hp, gi, None if shared else gh)
            cache[ck] = w_hh
            return w_ih
        A, G = (x, gi) if which == "ih" else (hp, gh)
        return ops.linear_sq_norms(A, G, method=method)[0]

    def per_example_grad(self, module, name, use, cache):
        kind, which, key = _parse(name)
        part = _wide(use.extra.get(key))
        p = getattr(module, name)
        if part is None:
            return torch.zeros((max(use.batch_size, 0),) + tuple(p.shape), dtype=p.dtype,
                               device=p.device)
        A, G = _factors(part, which)
        if kind == "bias":
            return part.g_sum if which == "ih" else part.g_hh_sum
        return torch.einsum("btp,btd->bpd", G, A)

    def clipped_grad(self, module, name, use, c, cache):
        kind, which, key = _parse(name)
        part = _wide(use.extra.get(key))
        if part is None:
            p = getattr(module, name)
            return torch.zeros(p.shape, dtype=p.dtype, device=p.device)
        A, G = _factors(part, which)
        B, T, p = G.shape
        c = c.to(G.dtype)
        if kind == "bias":
            return c.matmul(part.g_sum if which == "ih" else part.g_hh_sum)
        d = A.shape[-1]
        # G^T diag(c) A over all (example, step) rows: rescale the smaller factor, then one GEMM.
        if p <= d:
            return scaled_rows(G, c, cache).reshape(B * T, p).t().mm(A.reshape(B * T, d))
        return G.reshape(B * T, p).t().mm(scaled_rows(A, c, cache).reshape(B * T, d))
