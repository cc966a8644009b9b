"""Linear layers: per-example squared weight / bias gradient norms from the layer's (A, G)
factors, the ghost / direct choice, the BLAS the core uses, and the clipped sum by the core's
AVX-512 kernel (``clipped_gemm``).

Mirrors csrc/linear.h (+ csrc/blas.h) and src/bind_linear.cpp; ``linear_sq_norms_torch`` is the
same algorithm in torch ops, for other devices and dtypes. Used by fastclip/layers/linear.py.
"""
from __future__ import annotations

import glob
import math
import os

import torch
from torch import Tensor

from ._common import _C, _check_pair, _native, _numpy_view


def _load_blas() -> bool:
    """Points the core at the OpenBLAS of the scipy-openblas32 wheel, once, at import.

    Without it the core uses its own loops, which give the same results.
    """
    if _C is None:
        return False
    try:
        import scipy_openblas32
    except ImportError:
        return False
    lib_dir = scipy_openblas32.get_lib_dir()
    for path in sorted(glob.glob(os.path.join(lib_dir, f"lib{scipy_openblas32.get_library()}.*"))):
        if _C.set_blas_library(path):
            return True
    return False


HAS_BLAS = _load_blas()


def blas_info() -> str:
    """Which BLAS the native core uses (or why there is none)."""
    return _C.blas_info() if _C is not None else "native core not built: plain torch ops"



def choose_linear_method(T: int, d: int, p: int) -> str:
    """Cheapest exact method for one example's linear weight-gradient norm.

    Returns "product" for T <= 1, else "ghost" (cost ~ T^2 (d + p)) or "direct" (cost ~ 2 T d p).
    The native core and the torch ops use this same choice.
    """
    if _C is not None:
        return _C.choose_linear_method(T, d, p)
    if T <= 1:
        return "product"
    return "ghost" if T * T * (d + p + 2) < (2 * T + 2) * d * p else "direct"


def _as_3d(x: Tensor) -> Tensor:
    if x.dim() == 3:
        return x
    if x.dim() == 2:
        return x.unsqueeze(1)
    return x.reshape(x.shape[0], math.prod(x.shape[1:-1]), x.shape[-1])


def _flatten_positions(A: Tensor, G: Tensor) -> tuple[Tensor, Tensor]:
    """(B, *, d) / (B, *, p) -> (B, T, d) / (B, T, p) views (reshape stays a view when it can): the
    middle dims are all positions. Done here, not in the binding, which sees only the flattened
    views, so a mismatch is named with the shapes the caller passed."""
    A3, G3 = _as_3d(A), _as_3d(G)
    if A3.shape[1] != G3.shape[1]:
        raise ValueError(f"positions differ: activations {tuple(A.shape)} has T = {A3.shape[1]}, "
                         f"gradients {tuple(G.shape)} has T = {G3.shape[1]}")
    return A3, G3


def _check_linear(A: Tensor, G: Tensor) -> tuple[Tensor, Tensor]:
    """Validates a linear layer's (A, G) pair off the native path (the binding checks the same
    on it) and flattens it to (B, T, d) / (B, T, p) views."""
    _check_pair(A, G, "activations", "gradients")
    for name, x in (("activations", A), ("gradients", G)):
        if x.dim() < 2:
            raise ValueError(f"{name} must be (B, d) or (B, *, d), got {x.dim()}-D "
                             f"with shape {tuple(x.shape)}")
    return _flatten_positions(A, G)


def linear_sq_norms_torch(A: Tensor, G: Tensor, method: str = "auto", bias: bool = False):
    """Plain-torch per-example squared gradient norms of a linear layer (the same algorithm as the core).

    Args:
        A: layer inputs, (B, d) or (B, *, d) (all middle dims are positions T).
        G: gradients at the layer output, (B, p) or (B, *, p).
        method: "auto", "product" (T == 1 only), "ghost" or "direct".
        bias: also return the bias norms ||sum_t g_t||^2.

    Returns:
        (weight_sq (B,), bias_sq (B,) or None), in the dtype of the inputs.
    """
    A3, G3 = _check_linear(A, G)
    T, d, p = A3.shape[1], A3.shape[2], G3.shape[2]
    if method not in ("auto", "product", "ghost", "direct"):
        raise ValueError(f"method must be 'auto', 'product', 'ghost' or 'direct', got {method!r}")
    if method == "product" and T > 1:
        raise ValueError(f"method 'product' needs T == 1, got T = {T}")
    if method == "auto":
        method = choose_linear_method(T, d, p)
    A3, G3 = A3.detach(), G3.detach()
    if T <= 1:
        w = A3.square().sum((1, 2)) * G3.square().sum((1, 2))
    elif method == "ghost":
        w = (torch.bmm(A3, A3.transpose(1, 2)) * torch.bmm(G3, G3.transpose(1, 2))).sum((1, 2))
    else:
        w = torch.bmm(G3.transpose(1, 2), A3).square().sum((1, 2))
    b = G3.sum(1).square().sum(-1) if bias else None
    return w, b



def linear_sq_norms(A: Tensor, G: Tensor, method: str = "auto", bias: bool = False):
    """Per-example squared gradient norms of a linear layer's weight (and bias).

    Same arguments and result as :func:`linear_sq_norms_torch`; CPU float32/float64 tensors run in
    the C++ core on ``torch.get_num_threads()`` threads.

    Args:
        A: layer inputs, (B, d) or (B, *, d).
        G: gradients at the layer output, (B, p) or (B, *, p).
        method: "auto", "product" (T == 1 only), "ghost" or "direct".
        bias: also return the bias norms ||sum_t g_t||^2.

    Returns:
        (weight_sq (B,), bias_sq (B,) or None), in the dtype of the inputs.
    """
    if not _native(A, G):
        return linear_sq_norms_torch(A, G, method, bias)
    # The binding checks ranks, batch sizes, the method and 'product' with T > 1; a tensor below
    # 2-D goes to it as it is, to be refused there.
    if A.dim() >= 2 and G.dim() >= 2:
        A, G = _flatten_positions(A, G)
    w, b = _C.linear_sq_norms(_numpy_view(A), _numpy_view(G), method, bool(bias),
                              torch.get_num_threads())
    return torch.from_numpy(w), (torch.from_numpy(b) if b is not None else None)


_GEMM_KINDS = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def clipped_gemm_runs(A: Tensor, G: Tensor) -> bool:
    """Whether :func:`clipped_gemm` takes ``(A, G)``: CPU tensors of one dtype among float32,
    bfloat16 and float16, and the core's AVX-512 GEMM kernels run here and are preferred
    (csrc/gemm_avx512.h; ``fastclip._C.gemm_kernels_enabled()``: ``isa()`` is "avx512" and the
    core issues 512-bit FMAs at full width, or FASTCLIP_GEMM_KERNELS=1)."""
    return (_C is not None and isinstance(A, Tensor) and isinstance(G, Tensor)
            and A.dtype == G.dtype and A.dtype in _GEMM_KINDS
            and A.is_cpu and G.is_cpu and _C.gemm_kernels_enabled())


def _gemm_view(t: Tensor):
    """A 2-D float32 / bf16 / fp16 tensor as the numpy array the kernel reads in place: float32
    as it is, the 16-bit types as their raw bits (numpy has no bfloat16)."""
    if t.dtype == torch.float32:
        return _numpy_view(t)
    return _numpy_view(t.detach().resolve_neg().view(torch.int16))


def clipped_gemm(A: Tensor, G: Tensor, c: Tensor) -> Tensor:
    """The clipped sum of a linear map, ``sum_i c_i G_i^T A_i`` (p, d) float32, from A (B, T, d),
    G (B, T, p) and the clip factors c (B,), in the core's AVX-512 kernel: each G row widened to
    float32 and rescaled there by its example's factor (the value ``widened(G) * c`` gives),
    products accumulated in float32 over the B T rows in order, without the rescaled copy, the
    float32 copies of half-precision captures or the transposes a torch GEMM needs (a bf16 capture
    gives bit for bit what its float32 copy gives). Twice torch's CPU matmul rate where MKL or
    OpenBLAS run AVX2 kernels on a core with full-width AVX-512 (bench/README.md). Only where
    :func:`clipped_gemm_runs`; callers keep the torch form for the rest.
    """
    B, T, p = G.shape
    d = A.shape[-1]
    A2, G2 = A.reshape(B * T, d), G.reshape(B * T, p)
    cf = c.detach().to(torch.float32).contiguous()
    # Allocated through torch, so a memory profile of the step sees the sum (as it sees mm's).
    out = torch.empty((p, d), dtype=torch.float32)
    _C.clipped_gemm(_gemm_view(A2), _gemm_view(G2), cf.numpy(), T, _GEMM_KINDS[A.dtype],
                    torch.get_num_threads(), out.numpy())
    return out
