"""NanoBatch clip-and-accumulate: the per-example norms of a nanobatch by clipping group, and the
clipped sum added into the accumulators.

Mirrors csrc/clip.h and src/nanobatch.pyx (``fastclip._nanobatch``, Cython, parallel over the
parameter vector); ``clip_accumulate_torch`` is the same in torch ops. Used by
fastclip/nanobatch.py.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from ._common import _nanobatch, _native, cast_margin


def _check_clip_parts(grads, accs, groups, bounds, scale):
    if len(groups) != len(grads):
        raise ValueError(f"groups has {len(groups)} entries for {len(grads)} gradients")
    if accs is not None and len(accs) != len(grads):
        raise ValueError(f"accs has {len(accs)} entries for {len(grads)} gradients")
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be a finite number > 0, got {scale}")
    k = None
    for i, g in enumerate(grads):
        if not isinstance(g, Tensor) or not g.is_floating_point() or g.dim() != 2:
            raise ValueError(f"grads[{i}] must be a 2-D floating-point tensor (k, n)")
        if k is not None and g.shape[0] != k:
            raise ValueError(f"grads[{i}] holds {g.shape[0]} examples, grads[0] holds {k}")
        k = g.shape[0]
        if accs is not None and (accs[i].shape != (g.shape[1],) or accs[i].dtype != g.dtype):
            raise ValueError(f"accs[{i}] must be ({g.shape[1]},) {g.dtype}, got "
                             f"{tuple(accs[i].shape)} {accs[i].dtype}")
    L = len(bounds) if bounds is not None else max((int(g) for g in groups), default=0) + 1
    for i, g in enumerate(groups):
        if not 0 <= int(g) < L:
            raise ValueError(f"groups[{i}] must be in [0, {L}), got {g}")
    return k or 0, L


def clip_accumulate_torch(grads, accs, groups, bounds, scale: float):
    """:func:`clip_accumulate` in plain torch ops (any device and floating dtype)."""
    k, L = _check_clip_parts(grads, accs, groups, bounds, scale)
    device = grads[0].device if grads else torch.device("cpu")
    sq = torch.zeros(k, L, dtype=torch.float64, device=device)
    for g, grp in zip(grads, groups):
        sq[:, int(grp)] += g.to(torch.float64).square().sum(1)
    sq *= scale * scale
    if accs is None:
        return sq, None
    norms = sq.sqrt()
    b = torch.as_tensor(bounds, dtype=torch.float64, device=device) * (1.0 - _accs_margin(accs))
    factors = torch.where(norms > b, b / norms, torch.ones_like(norms)) * scale
    factors = torch.where(torch.isfinite(norms), factors, torch.zeros_like(factors))
    keep = factors != 0
    for g, a, grp in zip(grads, accs, groups):
        f, rows = factors[:, int(grp)], keep[:, int(grp)]
        # Rows with factor 0 are left out, not multiplied: 0 * NaN is NaN. The product and the
        # sum over the nanobatch in float32 or wider, rounded to the accumulator's dtype once.
        wide = torch.promote_types(g.dtype, torch.float32)
        a += (f[rows].to(wide).unsqueeze(1) * g[rows].to(wide)).sum(0).to(a.dtype)
    return sq, factors


def _accs_margin(accs) -> float:
    """The cast margin of the narrowest accumulator dtype (see :func:`cast_margin`)."""
    return max((cast_margin(a.dtype) for a in accs), default=0.0)


def clip_accumulate(grads, accs, groups, bounds, scale: float = 1.0, num_threads: int = 1):
    """Clip the k examples of a nanobatch group by group and add the clipped sum into ``accs``.

    Example i's true gradient is ``scale * grads[p][i]`` (``scale`` = B undoes a loss averaged
    over the batch); its part in group l (the parameters p with ``groups[p] == l``) is clipped to
    ``bounds[l]``: factor ``f_il = scale * min(1, bounds[l] / norm_il)``, 0 for a non-finite
    norm (that example then adds nothing to group l).

    Args:
        grads: P tensors (k, n_p): each parameter's per-example gradients.
        accs: P tensors (n_p,) of the grads' dtypes, updated in place, or None (norms only).
        groups: P ints in [0, L).
        bounds: L bounds > 0, or None with ``accs=None``.
        scale: > 0.
        num_threads: threads over the parameter vector (CPU only).

    Returns:
        (sq (k, L) float64 squared norms of the true per-example gradients by group,
        factors (k, L) float64 or None).
    """
    # One parameter's gradients may be float32 and another's float64: each part is typed alone.
    if not _native(*grads, core=_nanobatch, one_dtype=False):
        return clip_accumulate_torch(grads, accs, groups, bounds, scale)
    # The binding checks every argument itself (tests/engine/test_nanobatch.py's hostile inputs).
    shrink = 1.0 if accs is None else 1.0 - _accs_margin(accs)
    sq, factors = _nanobatch.clip_accumulate_nanobatch(
        [g.detach().contiguous().numpy() for g in grads],
        None if accs is None else [a.detach().numpy() for a in accs],
        [int(g) for g in groups], None if bounds is None else [float(b) * shrink for b in bounds],
        float(scale), int(num_threads))
    return torch.from_numpy(sq), None if factors is None else torch.from_numpy(factors)
