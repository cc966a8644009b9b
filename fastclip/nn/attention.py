"""Drop-in MultiheadAttention whose projections the engine can see into.

``MultiheadAttention`` is torch.nn.MultiheadAttention (same constructor, parameter names and
shapes, inputs and outputs; state dicts load both ways) with its forward written out so that each
input projection is one linear map ``y = x W_j^T + b_j`` over a block of rows j of
``in_proj_weight`` (or of q/k/v_proj_weight). While the engine captures the module, each
projection runs as ``_ProjFn``, whose backward records the projection's input A (B, T, d) and
output gradient G (B, T, rows) — the factors of an exact per-example norm (docs/design.md) — and gives
the weights no autograd gradient. ``bias_k`` / ``bias_v`` are appended to the keys / values
through ``_TokenFn``, which records their per-example gradients (B, E). ``out_proj`` is a child
nn.Linear, covered by the Linear rule.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .capture import current_capture
from ..ops import as_computed


class ProjPart:
    """One projection of one call: weight/bias names, row block [r0, r1), A and G."""

    __slots__ = ("weight", "bias", "rows", "A", "G")

    def __init__(self, weight, bias, rows, A, G):
        self.weight, self.bias, self.rows, self.A, self.G = weight, bias, rows, A, G


class _ProjFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, engine, use, info, x, w, b):
        ctx.engine, ctx.use, ctx.info = engine, use, info
        engine.expect(use)  # one piece of the call's use, recorded in the backward
        ctx.save_for_backward(x, w)
        return F.linear(x, w, b)

    @staticmethod
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        use = ctx.use
        wname, bname, rows = ctx.info
        # Under autocast the projection ran in g's dtype (fastclip.layers.linear._LinearFn).
        _record(ctx.engine, use, g, "proj",
                ProjPart(wname, bname, rows, as_computed(x.detach(), g.dtype), g))
        gx = g.matmul(as_computed(w, g.dtype)) if ctx.needs_input_grad[3] else None
        return None, None, None, gx, None, None


class _TokenFn(torch.autograd.Function):
    """bias_k / bias_v as a (B, 1, E) token; the backward records its per-example gradient."""

    @staticmethod
    def forward(ctx, engine, use, name, p, B):
        ctx.engine, ctx.use, ctx.name = engine, use, name
        engine.expect(use)
        return p.detach().reshape(1, 1, -1).expand(B, 1, p.shape[-1]).clone()

    @staticmethod
    def backward(ctx, g):
        _record(ctx.engine, ctx.use, g, "token", (ctx.name, g[:, 0]))
        return None, None, None, None, None


def _record(engine, use, g, kind, part):
    parts = use.extra.setdefault(kind, [])
    parts.append(part)
    if use.grads is None:
        use.grads = (g,)
    # every piece: the use is complete when all have come. A backward the engine leaves alone
    # (torch.autograd.grad(loss, x)) adds nothing: the training backward adds the parts again.
    if not engine.record(use):
        parts.pop()


def _merge_masks(attn_mask, key_padding_mask, B, H, L, S, dtype):
    """One float mask broadcastable to (B, H, L, S), or None."""
    out = None
    if attn_mask is not None:
        m = attn_mask
        if m.dtype == torch.bool:
            m = torch.zeros(m.shape, dtype=dtype, device=m.device).masked_fill(m, float("-inf"))
        else:
            m = m.to(dtype)
        if m.dim() == 2:
            if m.shape != (L, S):
                raise RuntimeError(f"The shape of the 2D attn_mask is {tuple(m.shape)}, but should "
                                   f"be {(L, S)}.")
            m = m.view(1, 1, L, S)
        elif m.dim() == 3:
            if m.shape != (B * H, L, S):
                raise RuntimeError(f"The shape of the 3D attn_mask is {tuple(m.shape)}, but should "
                                   f"be {(B * H, L, S)}.")
            m = m.view(B, H, L, S)
        else:
            raise RuntimeError(f"attn_mask's dimension {m.dim()} is not supported")
        out = m
    if key_padding_mask is not None:
        k = key_padding_mask
        if k.shape != (B, S):
            raise RuntimeError(f"expecting key_padding_mask shape of {(B, S)}, but got "
                               f"{tuple(k.shape)}")
        if k.dtype == torch.bool:
            k = torch.zeros(k.shape, dtype=dtype, device=k.device).masked_fill(k, float("-inf"))
        else:
            k = k.to(dtype)
        k = k.view(B, 1, 1, S)
        out = k if out is None else out + k
    return out


class MultiheadAttention(nn.MultiheadAttention):
    """torch.nn.MultiheadAttention with per-example norms of its projections (module docstring).

    Same arguments, parameters, inputs and outputs as torch.nn.MultiheadAttention.
    """

    def _proj(self, x: Tensor, w: Tensor, b: Optional[Tensor], info) -> Tensor:
        cap = current_capture(self)
        if cap is not None and torch.is_grad_enabled():
            engine, use = cap
            return _ProjFn.apply(engine, use, info, x, w, b)
        return F.linear(x, w, b)

    def _token(self, name: str, p: Tensor, B: int) -> Tensor:
        cap = current_capture(self)
        if cap is not None and torch.is_grad_enabled() and p.requires_grad:
            engine, use = cap
            return _TokenFn.apply(engine, use, name, p, B)
        return p.reshape(1, 1, -1).expand(B, 1, p.shape[-1])

    def forward(self, query: Tensor, key: Tensor, value: Tensor,
                key_padding_mask: Optional[Tensor] = None, need_weights: bool = True,
                attn_mask: Optional[Tensor] = None, average_attn_weights: bool = True,
                is_causal: bool = False):
        if is_causal and attn_mask is None:
            raise RuntimeError("Need attn_mask if specifying the is_causal hint. You may use the "
                               "Transformer module method `generate_square_subsequent_mask` to "
                               "create this mask.")
        batched = query.dim() == 3
        same_qkv = query is key and key is value
        same_kv = key is value
        if not batched:
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif self.batch_first:
            pass
        if batched and self.batch_first:
            q_in, k_in, v_in = query, key, value
        else:  # (L, B, E) -> (B, L, E)
            q_in, k_in, v_in = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        if same_qkv:
            k_in = v_in = q_in
        elif same_kv:
            v_in = k_in
        B, L, E = q_in.shape
        H = self.num_heads
        hd = E // H
        b_in = self.in_proj_bias
        bq = bk = bv = None
        if b_in is not None:
            bq, bk, bv = b_in[:E], b_in[E:2 * E], b_in[2 * E:]
        bname = "in_proj_bias" if b_in is not None else None
        if self._qkv_same_embed_dim:
            W = self.in_proj_weight
            if same_qkv:
                q, k, v = self._proj(q_in, W, b_in, ("in_proj_weight", bname, (0, 3 * E))).chunk(3, -1)
            else:
                q = self._proj(q_in, W[:E], bq, ("in_proj_weight", bname, (0, E)))
                k = self._proj(k_in, W[E:2 * E], bk, ("in_proj_weight", bname, (E, 2 * E)))
                v = self._proj(v_in, W[2 * E:], bv, ("in_proj_weight", bname, (2 * E, 3 * E)))
        else:
            q = self._proj(q_in, self.q_proj_weight, bq, ("q_proj_weight", bname, (0, E)))
            k = self._proj(k_in, self.k_proj_weight, bk, ("k_proj_weight", bname, (E, 2 * E)))
            v = self._proj(v_in, self.v_proj_weight, bv, ("v_proj_weight", bname, (2 * E, 3 * E)))
        if self.bias_k is not None:
            k = torch.cat([k, self._token("bias_k", self.bias_k, B)], 1)
            v = torch.cat([v, self._token("bias_v", self.bias_v, B)], 1)
            if attn_mask is not None:
                attn_mask = F.pad(attn_mask, (0, 1))
            if key_padding_mask is not None:
                key_padding_mask = F.pad(key_padding_mask, (0, 1))
        if self.add_zero_attn:
            k = torch.cat([k, k.new_zeros(B, 1, E)], 1)
            v = torch.cat([v, v.new_zeros(B, 1, E)], 1)
            if attn_mask is not None:
                attn_mask = F.pad(attn_mask, (0, 1))
            if key_padding_mask is not None:
                key_padding_mask = F.pad(key_padding_mask, (0, 1))
        S = k.shape[1]
        q = q.reshape(B, L, H, hd).transpose(1, 2)
        k = k.reshape(B, S, H, hd).transpose(1, 2)
        v = v.reshape(B, S, H, hd).transpose(1, 2)
        mask = _merge_masks(attn_mask, key_padding_mask, B, H, L, S, q.dtype)
        scores = torch.matmul(q, k.transpose(-2, -1)) * (1.0 / math.sqrt(hd))
        if mask is not None:
            scores = scores + mask
        weights = torch.softmax(scores, -1)
        if self.dropout > 0.0 and self.training:
            weights = F.dropout(weights, p=self.dropout)
        out = torch.matmul(weights, v).transpose(1, 2).reshape(B, L, E)
        out = self.out_proj(out)
        if not (batched and self.batch_first):
            out = out.transpose(0, 1)
        if not batched:
            out = out.squeeze(1)
        if not need_weights:
            return out, None
        w = weights.mean(1) if average_attn_weights else weights
        if not batched:
            w = w.squeeze(0)
        return out, w
