"""Numerical ops of fastclip: the only importer of the native core ``fastclip._C``.

Every op takes and returns torch tensors. CPU float32/float64 tensors go to the C++ core (zero-copy
numpy views of the tensors' memory); tensors on any other device, or of another floating dtype,
run the same algorithm in plain torch ops (``*_torch``), so the package works on a GPU.
"""
from __future__ import annotations

import glob
import math
import os

import torch
from torch import Tensor

try:
    from . import _C
except ImportError:  # a source checkout that was never built: every op runs in plain torch
    _C = None
    import warnings

    warnings.warn("fastclip's native core (fastclip._C) is not built, so every op runs in plain "
                  "torch (exact, but slower); install the package (pip install .) to build it",
                  RuntimeWarning, stacklevel=2)

_NATIVE_DTYPES = (torch.float32, torch.float64)


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


HAS_NATIVE = _C is not None
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


def _check_linear(A: Tensor, G: Tensor) -> tuple[Tensor, Tensor]:
    """Validates a linear layer's (A, G) pair and flattens it to (B, T, d) / (B, T, p) views."""
    for name, x in (("activations", A), ("gradients", G)):
        if not isinstance(x, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if not x.dtype.is_floating_point:
            raise TypeError(f"{name} must have a floating dtype, got {x.dtype}")
        if x.dim() < 2:
            raise ValueError(f"{name} must be (B, d) or (B, *, d), got {x.dim()}-D "
                             f"with shape {tuple(x.shape)}")
    if A.dtype != G.dtype:
        raise TypeError(f"activations and gradients dtypes differ: {A.dtype} vs {G.dtype}")
    if A.device != G.device:
        raise ValueError(f"activations and gradients devices differ: {A.device} vs {G.device}")
    if A.shape[0] != G.shape[0]:
        raise ValueError(f"batch sizes differ: {A.shape[0]} vs {G.shape[0]}")
    # (B, *, d) -> (B, T, d): the middle dims are all positions; reshape stays a view when it can.
    A3, G3 = _as_3d(A), _as_3d(G)
    if A3.shape[1] != G3.shape[1]:
        raise ValueError(f"positions differ: activations {tuple(A.shape)} has T = {A3.shape[1]}, "
                         f"gradients {tuple(G.shape)} has T = {G3.shape[1]}")
    return A3, G3


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


def _numpy_view(x: Tensor):
    # The core reads the tensor's memory in place; it needs a contiguous last dim (one BLAS leading
    # dimension per example). A transposed last dim is the one case copied, deliberately, here.
    x = x.detach()
    if x.is_neg():
        x = x.resolve_neg()
    if x.stride(-1) != 1 and x.shape[-1] > 1:
        x = x.contiguous()
    return x.numpy()


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
    A3, G3 = _check_linear(A, G)
    if _C is None or A3.device.type != "cpu" or A3.dtype not in _NATIVE_DTYPES:
        return linear_sq_norms_torch(A3, G3, method, bias)
    w, b = _C.linear_sq_norms(_numpy_view(A3), _numpy_view(G3), method, bool(bias),
                              torch.get_num_threads())
    return torch.from_numpy(w), (torch.from_numpy(b) if b is not None else None)


def add_gaussian_noise_(x: Tensor, std: float, scale: float = 1.0, seed: int = 0) -> Tensor:
    """In place: ``x = (x + std * z) * scale`` with ``z ~ N(0, I)``, one fused pass.

    CPU float32/float64 contiguous tensors use the core's counter-based (Philox4x32-10) stream:
    the values depend only on ``seed`` and the position, not on the thread count. Other tensors
    draw from a torch generator seeded with ``seed``.

    Args:
        x: the tensor to perturb (e.g. a clipped gradient sum), any shape.
        std: noise standard deviation >= 0.
        scale: multiplier applied after the noise (e.g. 1 / batch size).
        seed: 64-bit seed of the noise stream.

    Returns:
        x
    """
    if not isinstance(x, Tensor) or not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got "
                        f"{x.dtype if isinstance(x, Tensor) else type(x).__name__}")
    std, scale = float(std), float(scale)
    if not (std >= 0 and math.isfinite(std)) or not math.isfinite(scale):
        raise ValueError(f"std must be finite and >= 0 and scale finite, got std={std}, scale={scale}")
    seed = int(seed) % (1 << 64)
    if (_C is not None and x.device.type == "cpu" and x.dtype in _NATIVE_DTYPES
            and x.is_contiguous() and not x.requires_grad):
        _C.add_gaussian_noise(x.numpy(), std, scale, seed, torch.get_num_threads())
        return x
    with torch.no_grad():
        if std > 0:
            gen = torch.Generator(device=x.device).manual_seed(seed % (1 << 63))
            x.add_(torch.randn(x.shape, generator=gen, device=x.device, dtype=x.dtype), alpha=std)
        if scale != 1.0:
            x.mul_(scale)
    return x
