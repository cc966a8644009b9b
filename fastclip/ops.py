"""Numerical ops of fastclip: the only importer of the native core ``fastclip._C``.

Every op takes and returns torch tensors. CPU tensors go to the C++ core; tensors on any other
device run the same algorithm in plain torch ops (``*_torch``), so the package works on a GPU.
"""
from __future__ import annotations

import torch
from torch import Tensor


def choose_linear_method(T: int, d: int, p: int) -> str:
    """Cheapest exact method for one example's linear weight-gradient norm.

    Returns "product" for T == 1, else "ghost" (cost ~ T^2 (d + p)) or "direct" (cost ~ 2 T d p).
    """
    if T <= 1:
        return "product"
    return "ghost" if T * (d + p) < 2 * d * p else "direct"


def _as_3d(x: Tensor) -> Tensor:
    if x.dim() == 2:
        return x.unsqueeze(1)
    if x.dim() == 3:
        return x
    raise ValueError(f"expected a 2-D or 3-D tensor, got {x.dim()}-D with shape {tuple(x.shape)}")


def linear_sq_norms_torch(A: Tensor, G: Tensor, method: str = "auto", bias: bool = False):
    """Plain-torch per-example squared gradient norms of a linear layer (the same algorithm as the core).

    Args:
        A: layer inputs, (B, d) or (B, T, d).
        G: gradients at the layer output, (B, p) or (B, T, p).
        method: "auto", "ghost" or "direct".
        bias: also return the bias norms ||sum_t g_t||^2.

    Returns:
        (weight_sq (B,), bias_sq (B,) or None)
    """
    A3, G3 = _as_3d(A), _as_3d(G)
    T, d, p = A3.shape[1], A3.shape[2], G3.shape[2]
    if method == "auto":
        method = choose_linear_method(T, d, p)
    if T == 1 or method == "product":
        if T != 1:
            raise ValueError(f"method 'product' needs T == 1, got T = {T}")
        w = A3[:, 0].square().sum(-1) * G3[:, 0].square().sum(-1)
    elif method == "ghost":
        w = (torch.bmm(A3, A3.transpose(1, 2)) * torch.bmm(G3, G3.transpose(1, 2))).sum((1, 2))
    elif method == "direct":
        w = torch.bmm(G3.transpose(1, 2), A3).square().sum((1, 2))
    else:
        raise ValueError(f"method must be 'auto', 'ghost' or 'direct', got {method!r}")
    b = G3.sum(1).square().sum(-1) if bias else None
    return w, b


def linear_sq_norms(A: Tensor, G: Tensor, method: str = "auto", bias: bool = False):
    """Per-example squared gradient norms of a linear layer's weight (and bias).

    Same arguments and result as :func:`linear_sq_norms_torch`; CPU tensors run in the C++ core.
    """
    return linear_sq_norms_torch(A, G, method, bias)
