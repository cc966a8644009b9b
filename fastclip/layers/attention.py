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
from . import keep, register, sq_rows, zero_rows
from .linear import _flat, clipped_product


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
        # One part (self-attention called once: the fused q/k/v projection) needs no copy.
        A = ops.widened(_cat([_flat(p.A) for p in parts]))
        G = ops.widened(_cat([_flat(p.G) for p in parts]))
        out[rows] = (A, G)
    return out


def _cat(ts):
    return ts[0] if len(ts) == 1 else torch.cat(ts, 1)


def _same_blocks(uses, weight, bias) -> bool:
    """Whether every projection that took ``weight`` took ``bias`` too, and the other way round:
    the bias's blocks are then the weight's, its norms and clipped sum come from the same (A, G)."""
    return all((part.weight == weight) == (part.bias == bias)
               for u in uses for part in u.extra.get("proj", ()))


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

    @staticmethod
    def _fused_bias(module, name):
        """The trainable in_proj_bias whose blocks are ``name``'s (a weight's), or None."""
        b = module.in_proj_bias
        return "in_proj_bias" if (name.endswith("weight") and b is not None
                                  and b.requires_grad) else None

    def sq_norms(self, module, uses, method):
        out = {}
        B = max(uses[0].batch_size, 0)
        names = self._trainable(module)
        for name, p in names:
            if name in out:
                continue
            if name in ("bias_k", "bias_v"):
                out[name] = sq_rows(self._per_example(module, name, uses))
                continue
            sq = torch.zeros(B, dtype=torch.float64, device=p.device)
            # A weight whose projections all took in_proj_bias: the bias's norms in the same pass
            # over G (the fused q/k/v projection: one kernel call for both).
            bname = self._fused_bias(module, name)
            with_bias = bname is not None and _same_blocks(uses, name, bname)
            bsq = torch.zeros(B, dtype=torch.float64, device=p.device) if with_bias else None
            for rows, (A, G) in _blocks(uses, name).items():
                if name.endswith("weight"):
                    if keep.keeps(B, A.shape[1], A.shape[2], G.shape[2], G.dtype, method):
                        # The block's per-example gradients, kept for this step's clipped sum.
                        kept = keep.form([(A, G)], with_bias)
                        memo = uses[0].memo = uses[0].memo or {}
                        memo[(name, rows)] = kept
                        w, b = keep.sq_norms(kept)
                    else:
                        w, b = ops.linear_sq_norms(A, G, method=method, bias=with_bias)
                    sq = sq + w.to(torch.float64)
                    if with_bias:
                        bsq = bsq + b.to(torch.float64)
                else:
                    sq = sq + G.sum(1).square().sum(-1).to(torch.float64)
            out[name] = sq
            if with_bias:
                out[bname] = bsq
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
        # What the norm pass kept, by (weight name, rows): taken for this call, so its bytes go
        # back to the keep budget when the call is done.
        kept = uses[0].memo if isinstance(uses[0].memo, dict) else {}
        uses[0].memo = None
        res = {}
        for name, p in self._trainable(module):
            wide = torch.promote_types(p.dtype, torch.float32)
            if name in ("bias_k", "bias_v"):
                res[name] = torch.tensordot(c.to(wide), self._per_example(module, name, uses),
                                            dims=1)
                continue
            blocks = _blocks(uses, name)
            if len(blocks) == 1 and next(iter(blocks)) == (0, p.shape[0]):
                # One block covering the parameter (the fused q/k/v projection): its sum is
                # the parameter's, with no zero-filled buffer to add it into.
                (rows, (A, G)), = blocks.items()
                res[name] = self._block_sum(name, rows, A, G, c, pool, kept).to(wide)
                continue
            out = torch.zeros_like(p, dtype=wide)
            for (r0, r1), (A, G) in blocks.items():
                g = self._block_sum(name, (r0, r1), A, G, c, pool, kept)
                if name.endswith("weight") and name != "in_proj_weight":
                    out += g
                else:
                    out[r0:r1] += g
            res[name] = out
        return res

    @staticmethod
    def _block_sum(name, rows, A, G, c, pool, kept):
        """sum_i c_i grad_i of one block: from the per-example gradients the norm pass kept
        (``kept``: {(weight name, rows): keep.Kept}), else G^T diag(c) A (rescaling the smaller
        factor) for a weight, c^T (sum_t G) for a bias."""
        if name.endswith("weight"):
            k = kept.get((name, rows))
            return keep.clipped_weight(k, c) if k is not None else clipped_product(A, G, c, pool)
        k = kept.get(("in_proj_weight", rows)) if name == "in_proj_bias" else None
        if k is not None and k.b is not None:
            return keep.clipped_bias(k, c)
        return c.to(G.dtype).matmul(G.sum(1))
