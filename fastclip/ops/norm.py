"""Normalisation layers (LayerNorm, RMSNorm, GroupNorm, InstanceNorm): per-example gradients of
the affine weight and bias, x_hat recomputed with the layer's own statistics.

Mirrors csrc/norm.h and src/bind_norm.cpp; ``norm_affine_grads_torch`` recomputes x_hat with
torch's own normalisation ops. Used by fastclip/layers/norm.py.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from ._common import NATIVE_DTYPES, _C, _check_pair, _native, _numpy_view


NORM_KINDS = ("layer_norm", "rms_norm", "group_norm", "instance_norm")


def _check_norm(kind, x, g, eps, normalized_ndim, num_groups, running_mean, running_var):
    """Validates a norm layer's (x, g) pair and returns (x3, g3, eps, groups, stats):
    (B, T, N) views for layer_norm / rms_norm, (B, C, S) views for group_norm / instance_norm
    (``reshape``: a view whenever the layout allows, else a copy of x / g)."""
    if kind not in NORM_KINDS:
        raise ValueError(f"kind must be one of {NORM_KINDS}, got {kind!r}")
    _check_pair(x, g, "x", "g")
    if x.shape != g.shape:
        raise ValueError(f"x and g shapes differ: {tuple(x.shape)} vs {tuple(g.shape)}")
    if eps is None:
        if kind != "rms_norm":
            raise ValueError(f"eps=None is only meaningful for rms_norm, got kind {kind!r}")
        # torch: the machine epsilon of the op's compute type (float32 for half / bfloat16).
        eps = torch.finfo(x.dtype if x.dtype in NATIVE_DTYPES else torch.float32).eps
    if isinstance(eps, bool) or not isinstance(eps, (int, float)):
        raise TypeError(f"eps must be a number, got {type(eps).__name__}")
    eps = float(eps)
    if not (math.isfinite(eps) and eps >= 0):
        raise ValueError(f"eps must be finite and >= 0, got {eps}")
    stats = None
    if kind in ("layer_norm", "rms_norm"):
        k = int(normalized_ndim)
        if k < 1 or x.dim() < k + 1:
            raise ValueError(f"{kind}: x must be (B, *, *normalized_shape) with {k} normalized "
                             f"dim(s) after the batch dim, got {x.dim()}-D with shape {tuple(x.shape)}")
        B, N = x.shape[0], math.prod(x.shape[x.dim() - k:])
        T = math.prod(x.shape[1:x.dim() - k])
        return x.reshape(B, T, N), g.reshape(B, T, N), eps, 1, None
    if x.dim() < 2:
        raise ValueError(f"{kind}: x must be (B, C, *), got {x.dim()}-D with shape {tuple(x.shape)}")
    B, C = x.shape[0], x.shape[1]
    S = math.prod(x.shape[2:])
    if kind == "group_norm":
        if isinstance(num_groups, bool) or not isinstance(num_groups, int):
            raise TypeError(f"num_groups must be an int, got {type(num_groups).__name__}")
        if num_groups < 1 or C % num_groups:
            raise ValueError(f"num_groups must be >= 1 and divide the number of channels {C}, "
                             f"got {num_groups}")
        groups = num_groups
    else:
        groups = C
        if (running_mean is None) != (running_var is None):
            raise ValueError("give both running_mean and running_var, or neither")
        if running_mean is not None:
            for name, t in (("running_mean", running_mean), ("running_var", running_var)):
                if not isinstance(t, Tensor) or not t.dtype.is_floating_point:
                    raise TypeError(f"{name} must be a floating torch.Tensor, got "
                                    f"{t.dtype if isinstance(t, Tensor) else type(t).__name__}")
                if t.shape != (C,):
                    raise ValueError(f"{name} must have shape ({C},), got {tuple(t.shape)}")
            stats = (running_mean.detach(), running_var.detach())
    return x.reshape(B, C, S), g.reshape(B, C, S), eps, groups, stats


def norm_affine_grads_torch(kind: str, x: Tensor, g: Tensor, *, eps=1e-5, normalized_ndim: int = 1,
                            num_groups: int = 1, running_mean=None, running_var=None,
                            bias: bool = True):
    """Plain-torch per-example affine-parameter gradients of a normalisation layer.

    x_hat is recomputed by torch's own normalisation op without affine (so the statistics, the
    biased variance and ``eps`` are torch's), then ``gw = sum g * x_hat``, ``gb = sum g`` over
    the positions. Half / bfloat16 inputs are computed in float32.

    Args: as :func:`norm_affine_grads`.

    Returns:
        (gw (B, K), gb (B, K) or None): K = prod(normalized_shape) for layer_norm / rms_norm, C
        for group_norm / instance_norm; float32/float64 as the input (float32 for lower precision).
    """
    x3, g3, eps, groups, stats = _check_norm(kind, x, g, eps, normalized_ndim, num_groups,
                                            running_mean, running_var)
    x3, g3 = x3.detach(), g3.detach()
    if x3.dtype not in NATIVE_DTYPES:
        x3, g3 = x3.float(), g3.float()
    if kind == "layer_norm":
        xh = torch.nn.functional.layer_norm(x3, x3.shape[-1:], eps=eps)
    elif kind == "rms_norm":
        xh = torch.nn.functional.rms_norm(x3, x3.shape[-1:], eps=eps)
    elif stats is not None:
        m, v = (s.to(torch.float64) for s in stats)
        xh = ((x3.to(torch.float64) - m[:, None]) * (v[:, None] + eps).rsqrt()).to(x3.dtype)
    else:
        xh = torch.nn.functional.group_norm(x3, groups, eps=eps)
    red = 1 if kind in ("layer_norm", "rms_norm") else 2
    gw = (g3 * xh).sum(red)
    gb = g3.sum(red) if bias else None
    return gw, gb


def norm_affine_grads(kind: str, x: Tensor, g: Tensor, *, eps=1e-5, normalized_ndim: int = 1,
                      num_groups: int = 1, running_mean=None, running_var=None, bias: bool = True):
    """Per-example gradients of a normalisation layer's weight and bias.

    One fused pass per example recomputes x_hat with the layer's own statistics (computed in
    double): layer_norm ``(x - mean) / sqrt(var + eps)`` (biased variance) and rms_norm
    ``x / sqrt(mean(x^2) + eps)`` over the normalized (last) dims; group_norm over groups of
    C / num_groups channels x all positions; instance_norm per channel, or with the running
    statistics if given (eval mode with ``track_running_stats``). Then
    ``gw[i] = sum over positions of g * x_hat`` and ``gb[i] = sum over positions of g``.
    CPU float32/float64 tensors run in the C++ core on ``torch.get_num_threads()`` threads; a
    layout that cannot be viewed as (B, T, N) / (B, C, S) with a contiguous last dim (e.g.
    channels_last) is copied once to a contiguous one. Other tensors run
    :func:`norm_affine_grads_torch`.

    Args:
        kind: "layer_norm", "rms_norm", "group_norm" or "instance_norm".
        x: the layer input, (B, *, *normalized_shape) or (B, C, *).
        g: the gradient at the layer output, shaped like x.
        eps: the layer's eps (>= 0); None for rms_norm means torch's default,
            ``torch.finfo(x.dtype).eps``.
        normalized_ndim: len(normalized_shape) (layer_norm / rms_norm).
        num_groups: the number of groups (group_norm).
        running_mean, running_var: (C,) statistics to normalise with (instance_norm), or None.
        bias: also return the bias gradients.

    Returns:
        (gw (B, K), gb (B, K) or None) in x's dtype: K = prod(normalized_shape) or C.
    """
    x3, g3, eps, groups, stats = _check_norm(kind, x, g, eps, normalized_ndim, num_groups,
                                            running_mean, running_var)
    # The checks above stay on the native path: they form the (B, T, N) / (B, C, S) views the
    # binding reads, and name the caller's shapes and torch dtypes.
    if not _native(x3, g3):
        return norm_affine_grads_torch(kind, x, g, eps=eps, normalized_ndim=normalized_ndim,
                                       num_groups=num_groups, running_mean=running_mean,
                                       running_var=running_var, bias=bias)
    threads = torch.get_num_threads()
    if kind in ("layer_norm", "rms_norm"):
        gw, gb = _C.last_dims_affine_grads(_numpy_view(x3), _numpy_view(g3), eps,
                                           kind == "rms_norm", bool(bias), threads)
    else:
        m = v = None
        if stats is not None:
            m, v = (s.to(torch.float64).contiguous().numpy() for s in stats)
        gw, gb = _C.channel_affine_grads(_numpy_view(x3), _numpy_view(g3), groups, eps, m, v,
                                         bool(bias), threads)
    return torch.from_numpy(gw), (torch.from_numpy(gb) if gb is not None else None)

