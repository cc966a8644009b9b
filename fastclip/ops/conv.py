"""Convolutions (Conv1d / Conv2d / Conv3d): per-example squared weight / bias gradient norms
from the layer input and the gradient at its output, the ghost / direct choice, and the padding /
unfold helpers the conv rule shares.

Mirrors csrc/conv.h and src/bind_conv.cpp (the core unfolds one example at a time in a per-thread
buffer); ``conv_sq_norms_torch`` is the same algorithm with a whole-batch unfold. Used by
fastclip/layers/conv.py.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from ._common import _C, _check_pair, _native


def _conv_tuple(v, d: int, name: str) -> tuple:
    # The common spellings first (an int, or d ints as a tuple): this runs for every conv layer
    # in every step. type() is exact, so a bool still takes the checks below.
    if type(v) is int:
        return (v,) * d
    if type(v) is tuple and len(v) == d and all(type(a) is int for a in v):
        return v
    if isinstance(v, bool) or not isinstance(v, (int, tuple, list, torch.Size)):
        raise TypeError(f"{name} must be an int or a sequence of {d} ints, got {type(v).__name__}")
    t = (v,) * d if isinstance(v, int) else tuple(v)
    if len(t) == 1 and d > 1:
        t = t * d
    if len(t) != d or not all(isinstance(a, int) and not isinstance(a, bool) for a in t):
        raise ValueError(f"{name} must be an int or {d} ints for a {d}-D convolution, got {v!r}")
    return t


def conv_padding(padding, kernel, stride, dilation) -> tuple:
    """Resolves a convolution's ``padding`` to ((before, after), ...) per spatial dim.

    ``"same"`` pads ``dilation * (k - 1)`` in all, the odd element after (as torch does),
    ``"valid"`` pads nothing, ints pad symmetrically.
    """
    d = len(kernel)
    if isinstance(padding, str):
        if padding == "valid":
            return tuple((0, 0) for _ in range(d))
        if padding == "same":
            if any(s != 1 for s in stride):
                raise ValueError(f"padding='same' needs stride 1, got stride {stride}")
            tot = [dl * (k - 1) for k, dl in zip(kernel, dilation)]
            return tuple((t // 2, t - t // 2) for t in tot)
        raise ValueError(f"padding must be 'same', 'valid' or ints, got {padding!r}")
    if (isinstance(padding, (tuple, list)) and len(padding) == d and padding
            and all(isinstance(p, (tuple, list)) and len(p) == 2 for p in padding)):
        pairs = tuple((int(lo), int(hi)) for lo, hi in padding)  # already resolved (lo, hi) pairs
        return pairs
    return tuple((p, p) for p in _conv_tuple(padding, d, "padding"))


def _check_conv(x: Tensor, g: Tensor, weight_shape, stride, padding, dilation, groups):
    """Validates a conv layer's (input, grad_output) pair; returns (x, g, kernel, stride, pads,
    dilation, groups) with every option a tuple of d ints and pads ((lo, hi), ...)."""
    _check_pair(x, g, "input", "grad_output")
    for name, t in (("input", x), ("grad_output", g)):
        if t.dim() not in (3, 4, 5):
            raise ValueError(f"{name} must be 3-D, 4-D or 5-D (B, C, *spatial), got {t.dim()}-D "
                             f"with shape {tuple(t.shape)}")
    if x.dim() != g.dim():
        raise ValueError(f"input and grad_output ranks differ: {x.dim()}-D vs {g.dim()}-D")
    d = x.dim() - 2
    weight_shape = tuple(weight_shape)
    if len(weight_shape) != d + 2 or not all(isinstance(s, int) and s >= 0 for s in weight_shape):
        raise ValueError(f"weight_shape must be (C_out, C_in/groups, *kernel) with {d + 2} sizes "
                         f"for a {d}-D convolution, got {weight_shape}")
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
        raise ValueError(f"groups must be an int >= 1, got {groups!r}")
    O, Cg, kernel = weight_shape[0], weight_shape[1], weight_shape[2:]
    if g.shape[1] != O:
        raise ValueError(f"grad_output has {g.shape[1]} channels, the weight {weight_shape} has {O}")
    if x.shape[1] != Cg * groups:
        raise ValueError(f"input has {x.shape[1]} channels, the weight {weight_shape} with "
                         f"groups={groups} needs {Cg * groups}")
    if O % groups:
        raise ValueError(f"output channels ({O}) are not divisible by groups ({groups})")
    stride = _conv_tuple(stride, d, "stride")
    dilation = _conv_tuple(dilation, d, "dilation")
    if any(k < 1 for k in kernel) or any(s < 1 for s in stride) or any(dl < 1 for dl in dilation):
        raise ValueError(f"kernel sizes, strides and dilations must be >= 1, got kernel {kernel}, "
                         f"stride {stride}, dilation {dilation}")
    pads = conv_padding(padding, kernel, stride, dilation)
    if any(p < 0 for lohi in pads for p in lohi):
        raise ValueError(f"padding must be >= 0, got {padding!r}")
    spans = [n + lo + hi - dl * (k - 1) - 1
             for n, (lo, hi), k, dl in zip(x.shape[2:], pads, kernel, dilation)]
    out = tuple(sp // s + 1 if sp >= 0 else 0 for sp, s in zip(spans, stride))
    if tuple(g.shape[2:]) != out:
        raise ValueError(f"grad_output spatial size {tuple(g.shape[2:])} does not match the output "
                         f"size {out} of input {tuple(x.shape[2:])} with kernel {kernel}, stride "
                         f"{stride}, padding {padding!r}, dilation {dilation}")
    return x.detach(), g.detach(), kernel, stride, pads, dilation, groups


def conv_unfold_torch(x: Tensor, kernel, stride, pads, dilation, groups: int) -> Tensor:
    """Unfolded input of a convolution, (B, groups, C_in/groups * prod(kernel), P), P = output
    positions; rows in the weight's (C_in/groups, *kernel) order. Materialises B x K x P: this is
    the plain-torch baseline (the core unfolds one example at a time instead)."""
    d = len(kernel)
    flat_pad = [p for lohi in reversed(pads) for p in lohi]
    if any(flat_pad):
        x = torch.nn.functional.pad(x, flat_pad)
    B, C = x.shape[:2]
    sp = x.shape[2:]
    xs = x.stride()
    spans = [n - dl * (k - 1) - 1 for n, k, dl in zip(sp, kernel, dilation)]
    out = [s_ // s + 1 if s_ >= 0 else 0 for s_, s in zip(spans, stride)]
    # (B, C, *out, *kernel) view: output position o, tap j reads x[o * s + j * dl].
    size = (B, C, *out, *kernel)
    strides = (xs[0], xs[1], *[xs[2 + j] * stride[j] for j in range(d)],
               *[xs[2 + j] * dilation[j] for j in range(d)])
    v = x.as_strided(size, strides, x.storage_offset())
    perm = (0, 1, *range(2 + d, 2 + 2 * d), *range(2, 2 + d))  # (B, C, *kernel, *out)
    P, kv = math.prod(out), math.prod(kernel)
    return v.permute(perm).reshape(B, groups, (C // groups) * kv, P)


def conv_sq_norms_torch(x: Tensor, g: Tensor, weight_shape, stride=1, padding=0, dilation=1,
                        groups: int = 1, method: str = "auto", bias: bool = False):
    """Plain-torch per-example squared gradient norms of a convolution (unfold + bmm): the same
    algorithm as the core, used for non-CPU tensors and as the benchmark baseline.

    Args:
        x: layer input (B, C_in, *spatial), 1 to 3 spatial dims, before the conv's own padding.
        g: gradient at the layer output (B, C_out, *out_spatial).
        weight_shape: (C_out, C_in/groups, *kernel).
        stride, padding, dilation, groups: as for ``F.conv{1,2,3}d`` (padding may be "same"/"valid").
        method: "auto", "ghost" (<U^T U, G^T G>) or "direct" (||G U^T||^2).
        bias: also return the bias norms ||sum over positions of g||^2.

    Returns:
        (weight_sq (B,), bias_sq (B,) or None), in the dtype of the inputs.
    """
    x, g, kernel, stride, pads, dilation, groups = _check_conv(x, g, weight_shape, stride, padding,
                                                               dilation, groups)
    if method not in ("auto", "ghost", "direct"):
        raise ValueError(f"method must be 'auto', 'ghost' or 'direct', got {method!r}")
    B, O = g.shape[:2]
    P = math.prod(g.shape[2:])
    U = conv_unfold_torch(x, kernel, stride, pads, dilation, groups)   # (B, groups, K, P)
    K = U.shape[2]
    Og = O // groups
    if method == "auto":
        method = choose_conv_method(P, K, Og)
    U = U.reshape(B * groups, K, P)
    G = g.reshape(B * groups, Og, P)
    if method == "ghost":
        w = (torch.bmm(U.transpose(1, 2), U) * torch.bmm(G.transpose(1, 2), G)).sum((1, 2))
    else:
        w = torch.bmm(G, U.transpose(1, 2)).square().sum((1, 2))
    w = w.reshape(B, groups).sum(1)
    b = g.reshape(B, O, P).sum(2).square().sum(1) if bias else None
    return w, b


def choose_conv_method(P: int, K: int, Og: int) -> str:
    """'ghost' (~P^2 (K + Og) flops) or 'direct' (~2 P K Og) for one group of one example:
    P output positions, K = C_in/groups * prod(kernel), Og = C_out/groups."""
    if _C is not None:
        return _C.choose_conv_method(P, K, Og)
    if K * Og > (1 << 24):
        return "ghost"
    ghost = (K + Og + 1) * (P * P + P * min(P, 256))
    return "ghost" if ghost < (2 * P + 2) * K * Og else "direct"


def conv_sq_norms(x: Tensor, g: Tensor, weight_shape, stride=1, padding=0, dilation=1,
                  groups: int = 1, method: str = "auto", bias: bool = False,
                  per_example: Tensor | None = None, bias_grads: Tensor | None = None):
    """Per-example squared gradient norms of a convolution's weight (and bias).

    Same arguments and result as :func:`conv_sq_norms_torch`. CPU float32/float64 tensors run in
    the C++ core on ``torch.get_num_threads()`` threads, which unfolds one example at a time in a
    per-thread buffer. ``x`` is read in place with any strides; ``g`` is read in place when each
    (example, channel) block of positions is contiguous (as autograd produces it), otherwise it
    is copied once with ``.contiguous()`` (the same size as the layer output).

    ``per_example`` (native path and direct method only, see :func:`conv_keeps_per_example`): a
    contiguous (B, groups, K, C_out/groups) tensor of x's dtype, K = C_in/groups * prod(kernel),
    that receives the per-example weight gradients the direct method forms anyway, per example
    and group the K x C_out/groups transpose of that group's weight rows (the orientation the
    core's GEMM runs fastest), so a clipped sum needs no second weight-gradient convolution.

    ``bias_grads`` (native path, ``bias=True`` only): a contiguous (B, C_out) tensor of x's dtype
    that receives the per-example bias gradients (sums of ``g`` over positions), which the bias
    norm forms anyway, so the clipped bias sum needs no second pass over ``g``.

    Returns:
        (weight_sq (B,), bias_sq (B,) or None), in the dtype of the inputs.
    """
    # The weight_shape / channel / padding checks stay here on both paths: the binding is given
    # the kernel and the resolved paddings, not weight_shape or "same". It checks the method.
    x, g, kernel, stride, pads, dilation, groups = _check_conv(x, g, weight_shape, stride, padding,
                                                               dilation, groups)
    if not _native(x, g):
        if per_example is not None or bias_grads is not None:
            raise ValueError("per_example and bias_grads are kept by the native core only (CPU "
                             "float32/float64)")
        return conv_sq_norms_torch(x, g, weight_shape, stride, pads_to_arg(pads), dilation, groups,
                                   method, bias)
    # The core needs each (example, channel) row of G's positions contiguous.
    expect, ok = 1, True
    for k in range(g.dim() - 1, 1, -1):
        if g.shape[k] > 1 and g.stride(k) != expect:
            ok = False
        expect *= g.shape[k]
    if not ok or (g.shape[1] > 1 and g.stride(1) < expect and g.numel() > 0):
        g = g.contiguous()
    xa = x.resolve_neg().numpy() if x.is_neg() else x.numpy()
    ga = g.resolve_neg().numpy() if g.is_neg() else g.numpy()
    flat = [p for lohi in pads for p in lohi]
    w, b = _C.conv_sq_norms(xa, ga, list(kernel), list(stride), flat, list(dilation), int(groups),
                            method, bool(bias), torch.get_num_threads(),
                            None if per_example is None else per_example.numpy(),
                            None if bias_grads is None else bias_grads.numpy())
    return torch.from_numpy(w), (torch.from_numpy(b) if b is not None else None)


def conv_native(x: Tensor, g: Tensor) -> bool:
    """Whether :func:`conv_sq_norms` runs ``(x, g)`` in the native core (which can also keep the
    per-example bias gradients, ``bias_grads``)."""
    return _native(x, g)


def conv_keeps_per_example(x: Tensor, g: Tensor, P: int, K: int, Og: int, method: str) -> bool:
    """Whether :func:`conv_sq_norms` can keep the per-example gradients of this call: the native
    path with the direct method (chosen, or what "auto" picks for P positions, K = C_in/groups x
    prod(kernel), Og = C_out/groups)."""
    if not _native(x, g):
        return False
    return (choose_conv_method(P, K, Og) if method == "auto" else method) == "direct"


def pads_to_arg(pads):
    """((lo, hi), ...) -> a ``padding`` argument for :func:`conv_sq_norms_torch`: ints when every
    dim is symmetric, else the pairs themselves (accepted by the ops, not by torch's convs)."""
    if all(lo == hi for lo, hi in pads):
        return tuple(lo for lo, _ in pads)
    return tuple(pads)

