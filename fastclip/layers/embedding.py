"""nn.Embedding: native per-example norms by the unique-token method, clipped sums by one
``index_add`` of rescaled output-gradient rows, and the cross term of a weight tied to an output
projection (``lm_head.weight = embed.weight``) without any per-example V x d matrix (docs/design.md).

Example i's weight gradient has row v = sum of g_t over the positions t holding token v (none at
padding_idx), so ||grad_i||^2 = sum over distinct tokens of ||sum_{t: x_t = v} g_t||^2.

nn.EmbeddingBag is left to the generic rule (exact, memory B x V x d): its (B, T) sum/mean form
would fit this rule (g_t = scale_i * G_i), but offsets, 1-D input and per_sample_weights do not,
and whether a call uses them is only known at call time, after the rule has been chosen.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import ops
from . import Part, Use, register, register_cross, trainable
from .capture import FunctionalRule
from .linear import LinearRule, stack_uses


def _parse_embedding(input, weight, padding_idx=None, max_norm=None, norm_type=2.0,
                     scale_grad_by_freq=False, sparse=False):
    return dict(input=input, weight=weight, padding_idx=padding_idx, max_norm=max_norm,
                norm_type=norm_type, scale_grad_by_freq=scale_grad_by_freq, sparse=sparse)


def _refusal(max_norm, scale_grad_by_freq, sparse):
    if max_norm is not None:
        return (f"max_norm={max_norm} renormalises the looked-up rows of the weight in place during "
                "the forward, which a private step cannot account for; construct it with "
                "max_norm=None (normalise the looked-up vectors in the forward instead if needed)")
    if scale_grad_by_freq:
        return ("scale_grad_by_freq=True divides each row's gradient by its token's frequency in the "
                "whole batch, so one example's gradient depends on the others and has no per-example "
                "norm; construct it with scale_grad_by_freq=False")
    if sparse:
        return ("sparse=True asks for sparse gradients, but fastclip writes dense clipped gradient "
                "sums; construct it with sparse=False")
    return None


def _flat_ids(ids: Tensor) -> Tensor:
    """(B, *) ids -> (B, T); T spelled out so B = 0 reshapes too."""
    if ids.dim() == 0:
        raise ValueError("an embedding got 0-D ids; per-example gradients need the batch dimension first")
    return ids.reshape(ids.shape[0], math.prod(ids.shape[1:]))


def _flat_grads(g: Tensor, ids: Tensor) -> Tensor:
    return g.reshape(ids.shape[0], math.prod(ids.shape[1:]), g.shape[-1])


def _pad(use) -> object:
    pad = use.extra.get("padding_idx")
    if pad is not None and pad < 0:
        pad += use.module.weight.shape[0]
    return pad


def _stack(uses: Sequence[Use]):
    """The uses of one weight stacked along T (its per-example gradient is their sum):
    ids (B, T), G (B, T, d) and the padding index, or None once padding is zeroed into G."""
    ids = [_flat_ids(u.inputs) for u in uses]
    gs = [_flat_grads(u.grads[0], u.inputs) for u in uses]
    pads = [_pad(u) for u in uses]
    if len(set(pads)) > 1:  # uses with different padding: zero their padding rows of G instead
        gs = [g if p is None else g * (i != p).unsqueeze(-1).to(g.dtype)
              for g, i, p in zip(gs, ids, pads)]
        pads = [None]
    if len(ids) == 1:
        return ids[0], gs[0], pads[0]
    return torch.cat(ids, 1), torch.cat(gs, 1), pads[0]


def _masked(use):
    ids, g = _flat_ids(use.inputs), _flat_grads(use.grads[0], use.inputs)
    pad = _pad(use)
    if pad is not None:
        g = g * (ids != pad).unsqueeze(-1).to(g.dtype)
    return ids, g


def _masked_stack(uses: Sequence[Use]):
    """ids (B, T), G (B, T, d) of the uses stacked along T, padding rows of G zeroed."""
    pairs = [_masked(u) for u in uses]
    if len(pairs) == 1:
        return pairs[0]
    return torch.cat([i for i, _ in pairs], 1), torch.cat([g for _, g in pairs], 1)


def per_example_rows(ids: Tensor, g: Tensor, V: int) -> Tensor:
    """(B, V, d) per-example gradients of an embedding table from ids (B, T), G (B, T, d)."""
    B, T, d = g.shape
    return g.new_zeros(B, V, d).scatter_add_(1, ids.long().unsqueeze(-1).expand(B, T, d), g)


def clipped_rows(ids: Tensor, g: Tensor, c: Tensor, V: int) -> Tensor:
    """sum_i c_i grad_i (V, d): one index_add of the rescaled rows of G."""
    B, T, d = g.shape
    rows = (g * c.to(g.dtype).view(B, 1, 1)).reshape(B * T, d)
    return g.new_zeros(V, d).index_add_(0, ids.reshape(-1), rows)


@register(nn.Embedding)
class EmbeddingRule(FunctionalRule):
    """Native rule of nn.Embedding (and subclasses that keep its forward)."""

    functions = {F.embedding: _parse_embedding}

    def supports(self, module):
        return type(module).forward is nn.Embedding.forward

    def check(self, module):
        return _refusal(module.max_norm, module.scale_grad_by_freq, module.sparse)

    def capture_call(self, engine, module, func, bound):
        why = _refusal(bound.get("max_norm"), bound.get("scale_grad_by_freq"),
                       bound.get("sparse"))
        if why is not None:
            raise ValueError(f"fastclip cannot make {type(module).__name__} private: {why}")
        ids, B = bound["input"], engine.current_batch_size()
        if (B is not None and not engine.is_time_major(module) and isinstance(ids, Tensor)
                and ids.dim() > 0 and ids.shape[0] != B):
            # Its output is shared by the whole batch and broadcast over it later (T5's relative
            # attention bias, looked up on (query, key) buckets): the gradient reaching it is the
            # batch's sum, never one example's.
            raise ValueError(
                f"fastclip: module '{engine.path_of(module)}' ({type(module).__name__}) "
                f"got ids of shape {tuple(ids.shape)} whose leading dimension is not the batch "
                f"size {B}: its output is shared by the batch (broadcast over it later, like T5's "
                "relative attention bias), so it has no per-example gradient there. Freeze it "
                "(module.weight.requires_grad_(False)) or use mode='nanobatch'")
        return super().capture_call(engine, module, func, bound)

    def sq_norms(self, module, uses, method):
        if not trainable(module, "weight"):
            return {}
        ids, g, pad = _stack(uses)
        return {"weight": ops.embedding_sq_norms(ids, g, module.weight.shape[0], pad)}

    def per_example(self, module, uses):
        if not trainable(module, "weight"):
            return {}
        ids, g = _masked_stack(uses)
        return {"weight": per_example_rows(ids, g, module.weight.shape[0])}

    def clipped(self, module, uses, c, pool):
        if not trainable(module, "weight"):
            return {}
        ids, g = _masked_stack(uses)
        return {"weight": clipped_rows(ids, g, c, module.weight.shape[0])}


@register_cross(EmbeddingRule, LinearRule)
def embedding_linear_cross(emb: Part, lin: Part, method: str) -> Tensor:
    """<E_i, L_i> per example for a weight tied between Embedding uses (E_i) and Linear uses
    (L_i = G_out_i^T H_i, the output projection of a language model), with no V x d matrix."""
    ids, g, pad = _stack(emb.uses)
    H, G = stack_uses(lin.uses)
    return ops.embedding_linear_cross(ids, g, H.to(g.dtype), G.to(g.dtype), pad)


@register_cross(EmbeddingRule, EmbeddingRule)
def embedding_cross(a: Part, b: Part, method: str) -> Tensor:
    """<E_a_i, E_b_i> per example for a table shared by two Embedding modules: the sum over
    position pairs holding the same token of g_t . g_s, with no V x d matrix."""
    ids1, g1 = _masked_stack(a.uses)
    ids2, g2 = _masked_stack(b.uses)
    same = (ids1.unsqueeze(2) == ids2.unsqueeze(1)).to(g1.dtype)
    return (torch.bmm(g1, g2.transpose(1, 2).to(g1.dtype)) * same).sum((1, 2))
