"""fastclip.nn.MultiheadAttention: per-example norms and clipped sums of its own parameters from
the (A, G) each input projection records (fastclip.nn.attention). A projection is a linear map on
a block of rows of its weight, so a weight's per-example norm is the sum over its row blocks of
the block norms, each block's uses (calls of the module) stacked along T (exact, docs/design.md).
bias_k / bias_v: their per-example gradients, recorded whole. ``out_proj`` is a child Linear."""
from __future__ import annotations

import torch

from .. import ops
from ..nn.attention import MultiheadAttention
from .capture import ModuleCaptureRule
from . import register, sq_rows, zero_rows
from .linear import _flat


def _blocks(uses, name):
    """{rows: (A stacked over uses, G stacked over uses)} of parameter ``name``'s projections."""
    by_rows: dict = {}
    for u in uses:
        for part in u.extra.get("proj", ()):
            if part.weight == name or part.bias == name:
                by_rows.setdefault(part.rows, []).append(part)
    out = {}
    for rows, parts in by_rows.items():
        # bf16 / fp16 factors (autocast, low-precision parameters) seen in float32: norms and
        # clipped sums in float32 or wider, rounded to the parameter's dtype once by the engine.
        A = ops.widened(torch.cat([_flat(p.A) for p in parts], 1))
        G = ops.widened(torch.cat([_flat(p.G) for p in parts], 1))
        out[rows] = (A, G)
    return out


@register(MultiheadAttention)
class AttentionRule(ModuleCaptureRule):
    def zero_examples(self, use, bad):
        for part in use.extra.get("proj", ()):
            part.A, part.G = zero_rows(part.A, bad), zero_rows(part.G, bad)
        use.extra["token"] = [(n, zero_rows(g, bad)) for n, g in use.extra.get("token", ())]
        use.grads = zero_rows(use.grads, bad)

    @staticmethod
    def _trainable(module):
        return [(n, p) for n, p in module.named_parameters(recurse=False) if p.requires_grad]

    def sq_norms(self, module, uses, method):
        out = {}
        B = max(uses[0].batch_size, 0)
        for name, p in self._trainable(module):
            if name in ("bias_k", "bias_v"):
                out[name] = sq_rows(self._per_example(module, name, uses))
                continue
            sq = torch.zeros(B, dtype=torch.float64, device=p.device)
            for rows, (A, G) in _blocks(uses, name).items():
                if name.endswith("weight"):
                    w, _ = ops.linear_sq_norms(A, G, method=method, bias=False)
                    sq = sq + w.to(torch.float64)
                else:
                    sq = sq + G.sum(1).square().sum(-1).to(torch.float64)
            out[name] = sq
        return out

    def per_example(self, module, uses):
        return {n: self._per_example(module, n, uses) for n, _ in self._trainable(module)}

    @staticmethod
    def _per_example(module, name, uses):
        p = getattr(module, name)
        B = max(uses[0].batch_size, 0)
        wide = torch.promote_types(p.dtype, torch.float32)
        if name in ("bias_k", "bias_v"):
            g = p.new_zeros((B, p.shape[-1]), dtype=wide)
            for u in uses:
                for n, t in u.extra.get("token", ()):
                    if n == name:
                        g = g + t.to(g.dtype)
            return g.view((B,) + p.shape)
        out = p.new_zeros((B,) + p.shape, dtype=wide)
        for (r0, r1), (A, G) in _blocks(uses, name).items():
            if name.endswith("weight"):
                if name == "in_proj_weight":
                    out[:, r0:r1] += torch.einsum("btp,btd->bpd", G, A)
                else:
                    out += torch.einsum("btp,btd->bpd", G, A)
            else:
                out[:, r0:r1] += G.sum(1)
        return out

    def clipped(self, module, uses, c, pool):
        res = {}
        for name, p in self._trainable(module):
            wide = torch.promote_types(p.dtype, torch.float32)
            if name in ("bias_k", "bias_v"):
                res[name] = torch.tensordot(c.to(wide), self._per_example(module, name, uses),
                                            dims=1)
                continue
            out = torch.zeros_like(p, dtype=wide)
            for (r0, r1), (A, G) in _blocks(uses, name).items():
                B, T, rows = G.shape
                Gc = G * c.to(G.dtype).view(-1, 1, 1)
                if name.endswith("weight"):
                    g = Gc.reshape(B * T, rows).t().mm(A.reshape(B * T, A.shape[-1]))
                    if name == "in_proj_weight":
                        out[r0:r1] += g
                    else:
                        out += g
                else:
                    out[r0:r1] += Gc.sum((0, 1))
            res[name] = out
        return res
