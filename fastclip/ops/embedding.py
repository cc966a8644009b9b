"""Embeddings: per-example squared weight-gradient norms by the unique-token method, and the
cross term <E_i, L_i> of a weight tied between an embedding and an output projection.

Mirrors csrc/embedding.h and src/bind_embedding.cpp; the ``*_torch`` twins run the same algorithm
in torch ops. Used by fastclip/layers/embedding.py (and the engine's tied-weight cross terms).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from ._common import _C, _native, _numpy_view
from .linear import _check_linear


def _check_ids(ids: Tensor, num_embeddings: int, bounds: bool = True) -> Tensor:
    if not isinstance(ids, Tensor):
        raise TypeError(f"ids must be a torch.Tensor, got {type(ids).__name__}")
    if ids.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"ids must be int64 or int32, got {ids.dtype}")
    if ids.dim() < 1:
        raise ValueError(f"ids must be (B,) or (B, *), got a 0-D tensor")
    if bounds and ids.numel() and (ids.min() < 0 or ids.max() >= num_embeddings):
        bad = ((ids < 0) | (ids >= num_embeddings)).nonzero()[0].tolist()
        raise ValueError(f"ids{bad} = {int(ids[tuple(bad)])} is out of range: token ids must be in "
                         f"[0, num_embeddings = {num_embeddings})")
    return ids


def _padding(padding_idx, num_embeddings: int):
    if padding_idx is None:
        return None
    if isinstance(padding_idx, bool) or not isinstance(padding_idx, int):
        raise TypeError(f"padding_idx must be None or an int, got {type(padding_idx).__name__}")
    if not -num_embeddings <= padding_idx < num_embeddings:
        raise ValueError(f"padding_idx must be in [-{num_embeddings}, {num_embeddings}), got {padding_idx}")
    return padding_idx + num_embeddings if padding_idx < 0 else padding_idx


def _check_embedding(ids: Tensor, g: Tensor, num_embeddings: int, name: str = "gradients",
                     bounds: bool = True):
    """ids (B, *) and g (B, *, p) -> views ids (B, T), g (B, T, p)."""
    if not isinstance(g, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(g).__name__}")
    if not g.dtype.is_floating_point:
        raise TypeError(f"{name} must have a floating dtype, got {g.dtype}")
    num_embeddings = int(num_embeddings)
    if num_embeddings < 0:
        raise ValueError(f"num_embeddings must be >= 0, got {num_embeddings}")
    _check_ids(ids, num_embeddings, bounds)
    if g.dim() != ids.dim() + 1 or g.shape[:-1] != ids.shape:
        raise ValueError(f"{name} must be ids.shape + (p,) = {tuple(ids.shape)} + (p,), "
                         f"got {tuple(g.shape)}")
    if ids.device != g.device:
        raise ValueError(f"ids and {name} devices differ: {ids.device} vs {g.device}")
    B, p = g.shape[0], g.shape[-1]
    T = math.prod(ids.shape[1:])
    return ids.reshape(B, T), g.reshape(B, T, p)


def embedding_sq_norms_torch(ids: Tensor, g: Tensor, num_embeddings: int, padding_idx=None) -> Tensor:
    """Plain-torch per-example squared weight-gradient norms of an embedding (unique-token method).

    Example i's gradient has row ``v`` = sum of ``g[i, t]`` over positions with ``ids[i, t] == v``;
    rows are summed per (example, token) with one ``index_add`` over unique keys, O(B T p).

    Args:
        ids: token ids (B,) or (B, *), int64/int32, in [0, num_embeddings).
        g: gradients at the embedding output, ids.shape + (p,).
        num_embeddings: V, the number of rows of the weight.
        padding_idx: positions holding this id contribute nothing (None: no padding).

    Returns:
        (B,) squared norms in g's dtype.
    """
    ids2, g3 = _check_embedding(ids, g, num_embeddings)
    pad = _padding(padding_idx, int(num_embeddings))
    B, T, p = g3.shape
    g3 = g3.detach()
    keys = (torch.arange(B, device=ids2.device).unsqueeze(1) * max(int(num_embeddings), 1)
            + ids2.long()).reshape(-1)
    rows = g3.reshape(B * T, p)
    if pad is not None:
        keep = (ids2 != pad).reshape(-1)
        keys, rows = keys[keep], rows[keep]
    uniq, inv = torch.unique(keys, return_inverse=True)
    sums = rows.new_zeros(uniq.shape[0], p).index_add_(0, inv, rows)
    out = g3.new_zeros(B)
    return out.index_add_(0, uniq // max(int(num_embeddings), 1), sums.square().sum(1))


def embedding_sq_norms(ids: Tensor, g: Tensor, num_embeddings: int, padding_idx=None) -> Tensor:
    """Per-example squared weight-gradient norms of an embedding (unique-token method).

    Same arguments and result as :func:`embedding_sq_norms_torch`; CPU float32/float64 tensors run
    in the C++ core (sort per example, O(B T (p + log T))) on ``torch.get_num_threads()`` threads.

    Args:
        ids: token ids (B,) or (B, *), int64/int32, in [0, num_embeddings).
        g: gradients at the embedding output, ids.shape + (p,).
        num_embeddings: V.
        padding_idx: positions holding this id contribute nothing (None: no padding).

    Returns:
        (B,) squared norms in g's dtype.

    Raises:
        ValueError: an id out of range, or shapes that do not match.
    """
    native = _native(g)
    # The ids' range is the one check left to the binding: the Python checks give the reshape to
    # (B, T) and name the torch dtypes and shapes the caller passed.
    ids2, g3 = _check_embedding(ids, g, num_embeddings, bounds=not native)
    pad = _padding(padding_idx, int(num_embeddings))
    if not native:
        return embedding_sq_norms_torch(ids2, g3, num_embeddings, pad)
    return torch.from_numpy(_C.embedding_sq_norms(ids2.detach().numpy(), _numpy_view(g3),
                                                  int(num_embeddings), pad, torch.get_num_threads()))


def _check_cross(ids, g_emb, h, g_out, bounds=True):
    for name, x in (("activations", h), ("output gradients", g_out)):
        if not isinstance(x, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    V = g_out.shape[-1] if g_out.dim() else 0
    ids2, ge3 = _check_embedding(ids, g_emb, V, "embedding gradients", bounds)
    h3, go3 = _check_linear(h, g_out)
    if not (g_emb.dtype == h.dtype == g_out.dtype):
        raise TypeError(f"dtypes differ: embedding gradients {g_emb.dtype}, activations {h.dtype}, "
                        f"output gradients {g_out.dtype}")
    if h3.shape[0] != ge3.shape[0]:
        raise ValueError(f"batch sizes differ: embedding gradients {ge3.shape[0]} vs activations {h3.shape[0]}")
    if h3.shape[-1] != ge3.shape[-1]:
        raise ValueError(f"widths differ: embedding gradients have d = {ge3.shape[-1]}, "
                         f"activations d = {h3.shape[-1]}")
    return ids2, ge3, h3, go3, V


def embedding_linear_cross_torch(ids: Tensor, g_emb: Tensor, h: Tensor, g_out: Tensor,
                                 padding_idx=None) -> Tensor:
    """Plain-torch per-example <E_i, L_i> for a weight W (V, d) tied between an embedding and an
    output projection ``y = h W^T`` (the language-model pattern ``lm_head.weight = embed.weight``).

    ``E_i`` (V, d) is the embedding's gradient (rows at the example's tokens), ``L_i = Go_i^T H_i``
    the projection's. ``<E_i, L_i> = sum_t sum_s Go_i[s, x_t] (g_t . h_s)`` is formed without any
    V x d matrix: ``M = g_emb H^T`` (Te x To) and a gather of Go at the tokens, O(B Te To d).

    Args:
        ids: embedding ids (B,) or (B, *), in [0, V).
        g_emb: gradients at the embedding output, ids.shape + (d,).
        h: projection inputs (B, d) or (B, *, d).
        g_out: gradients at the projection output (B, V) or (B, *, V).
        padding_idx: embedding positions holding this id contribute nothing.

    Returns:
        (B,) in the inputs' dtype.
    """
    ids2, ge3, h3, go3, V = _check_cross(ids, g_emb, h, g_out)
    pad = _padding(padding_idx, V)
    ge3, h3, go3 = ge3.detach(), h3.detach(), go3.detach()
    if pad is not None:
        ge3 = ge3 * (ids2 != pad).unsqueeze(-1).to(ge3.dtype)
    M = torch.bmm(ge3, h3.transpose(1, 2))                                 # (B, Te, To)
    idx = ids2.long().unsqueeze(1).expand(-1, go3.shape[1], -1)           # (B, To, Te)
    gx = go3.gather(2, idx)                                                # (B, To, Te): Go[s, x_t]
    return (M * gx.transpose(1, 2)).sum((1, 2))


def embedding_linear_cross(ids: Tensor, g_emb: Tensor, h: Tensor, g_out: Tensor,
                           padding_idx=None) -> Tensor:
    """Per-example <E_i, L_i> for a weight tied between an embedding and an output projection.

    Same arguments and result as :func:`embedding_linear_cross_torch`; CPU float32/float64 tensors
    run in the C++ core, which first sums the embedding gradient over each example's U distinct
    tokens: O(B (Te d + U To d)).
    """
    native = _native(g_emb, h, g_out)
    ids2, ge3, h3, go3, V = _check_cross(ids, g_emb, h, g_out, bounds=not native)
    pad = _padding(padding_idx, V)
    if not native:
        return embedding_linear_cross_torch(ids2, ge3, h3, go3, pad)
    return torch.from_numpy(_C.embedding_linear_cross(
        ids2.detach().numpy(), _numpy_view(ge3), _numpy_view(h3), _numpy_view(go3), pad,
        torch.get_num_threads()))

