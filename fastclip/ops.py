"""Numerical ops of fastclip: the only importer of the native modules ``fastclip._C`` (pybind11)
and ``fastclip._nanobatch`` (Cython).

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

try:
    from . import _nanobatch
except ImportError:  # same situation as _C above (warned there when both are missing)
    _nanobatch = None

_NATIVE_DTYPES = (torch.float32, torch.float64)


def cast_margin(dtype: torch.dtype) -> float:
    """Relative margin taken off a clipping bound C so that a clipped sum released in ``dtype``
    stays <= C when measured in float64.

    Bound: with u the unit roundoff of ``dtype`` (eps / 2: bf16 2^-8, fp16 2^-11, fp32 2^-24),
    the clipped sum passes at most four roundings to ``dtype`` (the clip factor, factor x G, the
    product's output, the sum over a parameter's uses; each at most (1 + u) elementwise), so an
    example's released part has norm <= (1 + u)^4 (1 + e) c ||g_i||, e the float32 error of its
    norm and product (<< u). With C scaled by (1 - 5u): (1 - 5u)(1 + u)^4 <= 1 - u for u <= 1/8,
    which leaves u for e. float64 is the measure itself: no margin. Only an example that is
    clipped (or near the bound) is affected: far below C its factor stays exactly 1.
    """
    if dtype == torch.float64:
        return 0.0
    return 5.0 * torch.finfo(dtype).eps / 2


def as_computed(x: Tensor, dtype: torch.dtype) -> Tensor:
    """``x`` in the dtype the op that produced an output of ``dtype`` computed in (``dtype``
    itself): under autocast a float32 input is cast to bf16/fp16 before a linear or conv (the
    weight gradient autocast forms is G^T A_bf16, not G^T A), or a bf16 input to float32 before
    an op on autocast's float32 list (CUDA layer_norm); a bf16 input times a float32 parameter is
    promoted. The cast is autocast's own (round to nearest), so A is bit for bit what the op
    saw. Integer inputs (embedding ids) are kept."""
    if x.is_floating_point() and dtype.is_floating_point and x.dtype != dtype:
        return x.to(dtype)
    return x


def widened(t):
    """``t`` in float32 or wider (a bf16 / fp16 factor for a norm or a clipped sum: the engine
    widens ``use.inputs`` / ``use.grads`` itself, a rule that keeps its factors elsewhere calls
    this); other tensors and None as they are. Exact: every bf16/fp16 value is a float32."""
    if isinstance(t, Tensor) and t.is_floating_point() and t.dtype in (torch.float16, torch.bfloat16):
        return t.float()
    return t


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


# --------------------------------------------------------------------------------------------
# convolutions (Conv1d / Conv2d / Conv3d)
# --------------------------------------------------------------------------------------------

def _conv_tuple(v, d: int, name: str) -> tuple:
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
    for name, t in (("input", x), ("grad_output", g)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.dtype.is_floating_point:
            raise TypeError(f"{name} must have a floating dtype, got {t.dtype}")
        if t.dim() not in (3, 4, 5):
            raise ValueError(f"{name} must be 3-D, 4-D or 5-D (B, C, *spatial), got {t.dim()}-D "
                             f"with shape {tuple(t.shape)}")
    if x.dtype != g.dtype:
        raise TypeError(f"input and grad_output dtypes differ: {x.dtype} vs {g.dtype}")
    if x.device != g.device:
        raise ValueError(f"input and grad_output devices differ: {x.device} vs {g.device}")
    if x.dim() != g.dim():
        raise ValueError(f"input and grad_output ranks differ: {x.dim()}-D vs {g.dim()}-D")
    if x.shape[0] != g.shape[0]:
        raise ValueError(f"batch sizes differ: {x.shape[0]} vs {g.shape[0]}")
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
                  groups: int = 1, method: str = "auto", bias: bool = False):
    """Per-example squared gradient norms of a convolution's weight (and bias).

    Same arguments and result as :func:`conv_sq_norms_torch`. CPU float32/float64 tensors run in
    the C++ core on ``torch.get_num_threads()`` threads, which unfolds one example at a time in a
    per-thread buffer. ``x`` is read in place with any strides; ``g`` is read in place when each
    (example, channel) block of positions is contiguous (as autograd produces it), otherwise it
    is copied once with ``.contiguous()`` (the same size as the layer output).

    Returns:
        (weight_sq (B,), bias_sq (B,) or None), in the dtype of the inputs.
    """
    x, g, kernel, stride, pads, dilation, groups = _check_conv(x, g, weight_shape, stride, padding,
                                                               dilation, groups)
    if method not in ("auto", "ghost", "direct"):
        raise ValueError(f"method must be 'auto', 'ghost' or 'direct', got {method!r}")
    if _C is None or x.device.type != "cpu" or x.dtype not in _NATIVE_DTYPES:
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
                            method, bool(bias), torch.get_num_threads())
    return torch.from_numpy(w), (torch.from_numpy(b) if b is not None else None)


def pads_to_arg(pads):
    """((lo, hi), ...) -> a ``padding`` argument for :func:`conv_sq_norms_torch`: ints when every
    dim is symmetric, else the pairs themselves (accepted by the ops, not by torch's convs)."""
    if all(lo == hi for lo, hi in pads):
        return tuple(lo for lo, _ in pads)
    return tuple(pads)


# -- embeddings ------------------------------------------------------------------------------

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
    native = (_C is not None and isinstance(g, Tensor) and g.device.type == "cpu"
              and g.dtype in _NATIVE_DTYPES)
    ids2, g3 = _check_embedding(ids, g, num_embeddings, bounds=not native)  # the core checks ids
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
    native = (_C is not None and isinstance(g_emb, Tensor) and g_emb.device.type == "cpu"
              and g_emb.dtype in _NATIVE_DTYPES)
    ids2, ge3, h3, go3, V = _check_cross(ids, g_emb, h, g_out, bounds=not native)
    pad = _padding(padding_idx, V)
    if not native:
        return embedding_linear_cross_torch(ids2, ge3, h3, go3, pad)
    return torch.from_numpy(_C.embedding_linear_cross(
        ids2.detach().numpy(), _numpy_view(ge3), _numpy_view(h3), _numpy_view(go3), pad,
        torch.get_num_threads()))


# -- normalisation layers --------------------------------------------------------------------

NORM_KINDS = ("layer_norm", "rms_norm", "group_norm", "instance_norm")


def _check_norm(kind, x, g, eps, normalized_ndim, num_groups, running_mean, running_var):
    """Validates a norm layer's (x, g) pair and returns (x3, g3, eps, groups, stats):
    (B, T, N) views for layer_norm / rms_norm, (B, C, S) views for group_norm / instance_norm
    (``reshape``: a view whenever the layout allows, else a copy of x / g)."""
    if kind not in NORM_KINDS:
        raise ValueError(f"kind must be one of {NORM_KINDS}, got {kind!r}")
    for name, t in (("x", x), ("g", g)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.dtype.is_floating_point:
            raise TypeError(f"{name} must have a floating dtype, got {t.dtype}")
    if x.dtype != g.dtype:
        raise TypeError(f"x and g dtypes differ: {x.dtype} vs {g.dtype}")
    if x.device != g.device:
        raise ValueError(f"x and g devices differ: {x.device} vs {g.device}")
    if x.dim() >= 1 and g.dim() >= 1 and x.shape[0] != g.shape[0]:
        raise ValueError(f"batch sizes differ: {x.shape[0]} vs {g.shape[0]}")
    if x.shape != g.shape:
        raise ValueError(f"x and g shapes differ: {tuple(x.shape)} vs {tuple(g.shape)}")
    if eps is None:
        if kind != "rms_norm":
            raise ValueError(f"eps=None is only meaningful for rms_norm, got kind {kind!r}")
        # torch: the machine epsilon of the op's compute type (float32 for half / bfloat16).
        eps = torch.finfo(x.dtype if x.dtype in _NATIVE_DTYPES else torch.float32).eps
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
    if x3.dtype not in _NATIVE_DTYPES:
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
    if _C is None or x3.device.type != "cpu" or x3.dtype not in _NATIVE_DTYPES:
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


# --------------------------------------------------------------------------------------------
# recurrent layers (RNN / GRU / LSTM): one layer and direction, forward and backward through time
# --------------------------------------------------------------------------------------------

RNN_CELLS = {"lstm": 4, "gru": 3, "rnn_tanh": 1, "rnn_relu": 1}


def _check_rnn_forward(cell, x, w_ih, w_hh, b_ih, b_hh, h0, c0, lengths):
    if cell not in RNN_CELLS:
        raise ValueError(f"cell must be one of {tuple(RNN_CELLS)}, got {cell!r}")
    if not isinstance(x, Tensor) or not x.is_floating_point():
        raise TypeError(f"input must be a floating-point tensor, got "
                        f"{x.dtype if isinstance(x, Tensor) else type(x).__name__}")
    if x.dim() != 3:
        raise ValueError(f"input must be 3-D (B, T, d), got {x.dim()}-D with shape {tuple(x.shape)}")
    B, T, d = x.shape
    if w_hh.dim() != 2:
        raise ValueError(f"w_hh must be 2-D, got shape {tuple(w_hh.shape)}")
    h = w_hh.shape[1]
    Gh = RNN_CELLS[cell] * h
    for name, t, shape in (("w_ih", w_ih, (Gh, d)), ("w_hh", w_hh, (Gh, h)), ("b_ih", b_ih, (Gh,)),
                           ("b_hh", b_hh, (Gh,)), ("h0", h0, (B, h)), ("c0", c0, (B, h))):
        if t is None:
            continue
        if tuple(t.shape) != shape:
            raise ValueError(f"{name} must have shape {shape}, got {tuple(t.shape)}")
        if t.dtype != x.dtype:
            raise TypeError(f"{name} dtype {t.dtype} differs from the input's {x.dtype}")
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device}, the input on {x.device}")
    if c0 is not None and cell != "lstm":
        raise ValueError(f"c0 is for LSTM only, got one for {cell}")
    if lengths is not None:
        lengths = torch.as_tensor(lengths, dtype=torch.int64, device="cpu")
        if tuple(lengths.shape) != (B,):
            raise ValueError(f"lengths must have shape ({B},), got {tuple(lengths.shape)}")
        if B and (int(lengths.min()) < 1 or int(lengths.max()) > T):
            raise ValueError(f"lengths must lie in [1, {T}], got min {int(lengths.min())}, "
                             f"max {int(lengths.max())}")
    return B, T, d, h, lengths


def _rnn_steps(B, T, lengths, reverse, device):
    """[(rows active at step s, their time indices)] for a left-aligned padded batch."""
    L = torch.full((B,), T, dtype=torch.int64) if lengths is None else lengths
    out = []
    for s in range(int(L.max()) if B else 0):
        rows = torch.nonzero(L > s).flatten()
        t = (L[rows] - 1 - s) if reverse else torch.full_like(rows, s)
        out.append((rows.to(device), t.to(device)))
    return out


def rnn_forward_torch(cell, x, w_ih, w_hh, b_ih=None, b_hh=None, h0=None, c0=None, lengths=None,
                      reverse=False):
    """Plain-torch :func:`rnn_forward` (the same algorithm as the core, a Python loop over time)."""
    B, T, d, h, lengths = _check_rnn_forward(cell, x, w_ih, w_hh, b_ih, b_hh, h0, c0, lengths)
    x, w_ih, w_hh = x.detach(), w_ih.detach(), w_hh.detach()
    W = h if cell.startswith("rnn") else 4 * h
    kw = dict(dtype=x.dtype, device=x.device)
    out, saved = torch.zeros(B, T, h, **kw), torch.zeros(B, T, W, **kw)
    h_prev = torch.zeros(B, T, h, **kw)
    H = h0.detach().clone() if h0 is not None else torch.zeros(B, h, **kw)
    lstm = cell == "lstm"
    C = (c0.detach().clone() if c0 is not None else torch.zeros(B, h, **kw)) if lstm else None
    c_prev = torch.zeros(B, T, h, **kw) if lstm else None
    tanh_c = torch.zeros(B, T, h, **kw) if lstm else None
    xw = x @ w_ih.t()
    if b_ih is not None:
        xw = xw + b_ih.detach()
    for rows, t in _rnn_steps(B, T, lengths, reverse, x.device):
        hp = H[rows]
        hw = hp @ w_hh.t()
        if b_hh is not None:
            hw = hw + b_hh.detach()
        xs = xw[rows, t]
        h_prev[rows, t] = hp
        if lstm:
            i, f, g, o = (xs + hw).chunk(4, 1)
            i, f, g, o = i.sigmoid(), f.sigmoid(), g.tanh(), o.sigmoid()
            cp = C[rows]
            c = f * cp + i * g
            tc = c.tanh()
            hn = o * tc
            saved[rows, t] = torch.cat([i, f, g, o], 1)
            c_prev[rows, t], tanh_c[rows, t] = cp, tc
            C[rows] = c
        elif cell == "gru":
            xr, xz, xn = xs.chunk(3, 1)
            hr, hz, hnn = hw.chunk(3, 1)
            r, z = (xr + hr).sigmoid(), (xz + hz).sigmoid()
            n = (xn + r * hnn).tanh()
            hn = (1 - z) * n + z * hp
            saved[rows, t] = torch.cat([r, z, n, hnn], 1)
        else:
            pre = xs + hw
            hn = pre.tanh() if cell == "rnn_tanh" else pre.clamp_min(0)
            saved[rows, t] = hn
        out[rows, t] = hn
        H[rows] = hn
    return out, H, C, saved, h_prev, c_prev, tanh_c


def rnn_forward(cell: str, x: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih=None, b_hh=None, h0=None,
                c0=None, lengths=None, reverse: bool = False):
    """One recurrent layer and direction, forward through time (no autograd).

    CPU float32/float64 tensors run in the C++ core: each of ``torch.get_num_threads()`` threads
    runs the whole time loop for its slice of the batch (one GEMM with W_hh per step).

    Args:
        cell: "lstm", "gru", "rnn_tanh" or "rnn_relu" (torch's gate order and equations).
        x: input (B, T, d), batch first (a strided view is fine: a contiguous last dim is enough).
        w_ih, w_hh: (gates * h, d), (gates * h, h); b_ih, b_hh: (gates * h,) or None.
        h0, c0: initial states (B, h) or None (zeros); c0 for LSTM only.
        lengths: (B,) int64 valid steps per example (left-aligned padding) or None (all T).
        reverse: run each example from its last valid step back to its first.

    Returns:
        (out (B, T, h), h_n (B, h), c_n (B, h) or None, saved, h_prev (B, T, h), c_prev, tanh_c):
        ``saved`` (B, T, 4h or h) holds the step's activations and ``h_prev`` the state each step
        started from (the A factor of W_hh); padded steps are zero everywhere.
    """
    B, T, d, h, lengths = _check_rnn_forward(cell, x, w_ih, w_hh, b_ih, b_hh, h0, c0, lengths)
    if _C is None or x.device.type != "cpu" or x.dtype not in _NATIVE_DTYPES:
        return rnn_forward_torch(cell, x, w_ih, w_hh, b_ih, b_hh, h0, c0, lengths, reverse)
    nv = lambda t: None if t is None else t.detach().contiguous().numpy()
    res = _C.rnn_forward(cell, _numpy_view(x), nv(w_ih), nv(w_hh), nv(b_ih), nv(b_hh), nv(h0),
                         nv(c0), None if lengths is None else lengths.numpy(), bool(reverse),
                         torch.get_num_threads())
    return tuple(None if r is None else torch.from_numpy(r) for r in res)


def rnn_backward_torch(cell, d_out, d_hn, d_cn, w_ih, w_hh, saved, h_prev, c_prev=None,
                       tanh_c=None, lengths=None, reverse=False, need_input_grad=True):
    """Plain-torch :func:`rnn_backward` (the same algorithm as the core)."""
    B, T, h = d_out.shape
    Gh = RNN_CELLS[cell] * h
    kw = dict(dtype=d_out.dtype, device=d_out.device)
    g_ih = torch.zeros(B, T, Gh, **kw)
    g_hh = torch.zeros(B, T, Gh, **kw) if cell == "gru" else None
    dH = d_hn.clone() if d_hn is not None else torch.zeros(B, h, **kw)
    lstm = cell == "lstm"
    dC = (d_cn.clone() if d_cn is not None else torch.zeros(B, h, **kw)) if lstm else None
    for rows, t in reversed(_rnn_steps(B, T, lengths, reverse, d_out.device)):
        sv = saved[rows, t]
        dh = dH[rows] + d_out[rows, t]
        if lstm:
            i, f, g, o = sv.chunk(4, 1)
            tc = tanh_c[rows, t]
            dc = dC[rows] + dh * o * (1 - tc * tc)
            G = torch.cat([dc * g * i * (1 - i), dc * c_prev[rows, t] * f * (1 - f),
                           dc * i * (1 - g * g), dh * tc * o * (1 - o)], 1)
            dC[rows] = dc * f
            g_ih[rows, t] = G
            dH[rows] = G @ w_hh
        elif cell == "gru":
            r, z, n, hn = sv.chunk(4, 1)
            dnp = dh * (1 - z) * (1 - n * n)
            drp = dnp * hn * r * (1 - r)
            dzp = dh * (h_prev[rows, t] - n) * z * (1 - z)
            g_ih[rows, t] = torch.cat([drp, dzp, dnp], 1)
            gh = torch.cat([drp, dzp, dnp * r], 1)
            g_hh[rows, t] = gh
            dH[rows] = dh * z + gh @ w_hh
        else:
            G = dh * (1 - sv * sv) if cell == "rnn_tanh" else dh * (sv > 0).to(dh.dtype)
            g_ih[rows, t] = G
            dH[rows] = G @ w_hh
    d_x = g_ih @ w_ih if need_input_grad else None
    return g_ih, g_hh, d_x, dH, dC, g_ih.sum(1), (g_hh.sum(1) if g_hh is not None else None)


def rnn_backward(cell: str, d_out: Tensor, d_hn, d_cn, w_ih: Tensor, w_hh: Tensor, saved: Tensor,
                 h_prev: Tensor, c_prev=None, tanh_c=None, lengths=None, reverse: bool = False,
                 need_input_grad: bool = True):
    """Backward through time of :func:`rnn_forward`.

    Args:
        d_out: gradient at the outputs (B, T, h) (a strided view is fine); d_hn, d_cn: (B, h) or None.
        the rest: as given to / returned by :func:`rnn_forward`.

    Returns:
        (g_ih (B, T, gates h), g_hh (B, T, gates h) for GRU else None, d_x (B, T, d) or None,
        d_h0 (B, h), d_c0 (B, h) or None, g_sum (B, gates h), g_hh_sum (B, gates h) for GRU else
        None): the sums over t are the per-example bias gradients. ``g_ih`` is the gradient at
        ``x W_ih^T + b_ih`` and
        ``g_hh`` at ``h W_hh^T + b_hh`` (the same for LSTM and RNN), so the weight gradients are
        ``g_ih^T x`` and ``g_hh^T h_prev`` summed over time: the engine's (A, G) factors.
    """
    if cell not in RNN_CELLS:
        raise ValueError(f"cell must be one of {tuple(RNN_CELLS)}, got {cell!r}")
    if lengths is not None:
        lengths = torch.as_tensor(lengths, dtype=torch.int64, device="cpu")
    if _C is None or d_out.device.type != "cpu" or d_out.dtype not in _NATIVE_DTYPES:
        return rnn_backward_torch(cell, d_out, d_hn, d_cn, w_ih.detach(), w_hh.detach(), saved,
                                  h_prev, c_prev, tanh_c, lengths, reverse, need_input_grad)
    nv = lambda t: None if t is None else t.detach().contiguous().numpy()
    res = _C.rnn_backward(cell, _numpy_view(d_out), nv(d_hn), nv(d_cn), nv(w_ih), nv(w_hh),
                          nv(saved), nv(h_prev), nv(c_prev), nv(tanh_c),
                          None if lengths is None else lengths.numpy(), bool(reverse),
                          bool(need_input_grad), torch.get_num_threads())
    return tuple(None if r is None else torch.from_numpy(r) for r in res)


def rnn_ghost_sq_norms_torch(x: Tensor, h_prev: Tensor, g_ih: Tensor, g_hh=None):
    """Plain-torch :func:`rnn_ghost_sq_norms`."""
    g_hh = g_ih if g_hh is None else g_hh
    gram = lambda t: torch.bmm(t, t.transpose(1, 2))
    gi = gram(g_ih)
    gh = gi if g_hh is g_ih else gram(g_hh)
    return (gram(x) * gi).sum((1, 2)), (gram(h_prev) * gh).sum((1, 2))


def rnn_ghost_sq_norms(x: Tensor, h_prev: Tensor, g_ih: Tensor, g_hh=None):
    """Per-example squared norms of one recurrent layer's weight_ih and weight_hh gradients,
    ``||g_ih_i^T x_i||^2`` and ``||g_hh_i^T h_prev_i||^2``, by the ghost identity with the (T x T)
    Gram of G formed once for both (``g_hh=None``: the same G, as in LSTM and RNN).

    Args:
        x: layer inputs (B, T, d); h_prev: previous states (B, T, h); g_ih, g_hh: (B, T, gates h).
            Strided views with a contiguous last dim are used in place.

    Returns:
        (w_ih_sq (B,), w_hh_sq (B,)) in the inputs' dtype.
    """
    ts = [x, h_prev, g_ih] + ([g_hh] if g_hh is not None else [])
    for name, t in zip(("x", "h_prev", "g_ih", "g_hh"), ts):
        if not isinstance(t, Tensor) or not t.is_floating_point() or t.dim() != 3:
            raise ValueError(f"{name} must be a 3-D floating-point tensor (B, T, n)")
        if t.shape[:2] != x.shape[:2]:
            raise ValueError(f"{name} {tuple(t.shape)} does not match x {tuple(x.shape)} in (B, T)")
        if t.dtype != x.dtype:
            raise TypeError(f"{name} dtype {t.dtype} differs from x's {x.dtype}")
    if _C is None or x.device.type != "cpu" or x.dtype not in _NATIVE_DTYPES:
        return rnn_ghost_sq_norms_torch(x, h_prev, g_ih, g_hh)
    w_ih, w_hh = _C.rnn_ghost_sq_norms(_numpy_view(x), _numpy_view(h_prev), _numpy_view(g_ih),
                                       None if g_hh is None else _numpy_view(g_hh),
                                       torch.get_num_threads())
    return torch.from_numpy(w_ih), torch.from_numpy(w_hh)


# -- NanoBatch clip-and-accumulate ---------------------------------------------------------------

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
    native = (_nanobatch is not None and all(
        g.device.type == "cpu" and g.dtype in _NATIVE_DTYPES for g in grads))
    if not native:
        return clip_accumulate_torch(grads, accs, groups, bounds, scale)
    # The binding checks every argument itself (tests/test_nanobatch.py's hostile inputs).
    shrink = 1.0 if accs is None else 1.0 - _accs_margin(accs)
    sq, factors = _nanobatch.clip_accumulate_nanobatch(
        [g.detach().contiguous().numpy() for g in grads],
        None if accs is None else [a.detach().numpy() for a in accs],
        [int(g) for g in groups], None if bounds is None else [float(b) * shrink for b in bounds],
        float(scale), int(num_threads))
    return torch.from_numpy(sq), None if factors is None else torch.from_numpy(factors)
