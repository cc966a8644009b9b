"""What the ops modules share: the native modules themselves, the one ``_native(...)`` predicate
that sends a call to the C++ core, the zero-copy tensor -> numpy view the core reads, and the
dtype helpers of mixed precision (``cast_margin``, ``as_computed``, ``widened``).

This package is the only importer of ``fastclip._C`` (pybind11, src/module.cpp + src/bind_*.cpp)
and ``fastclip._nanobatch`` (Cython, src/nanobatch.pyx); both are imported here, once.
"""
from __future__ import annotations

import torch
from torch import Tensor

try:
    from .. import _C
except ImportError:  # a source checkout that was never built: every op runs in plain torch
    _C = None
    import warnings

    warnings.warn("fastclip's native core (fastclip._C) is not built, so every op runs in plain "
                  "torch (exact, but slower); install the package (pip install .) to build it",
                  RuntimeWarning, stacklevel=2)

try:
    from .. import _nanobatch
except ImportError:  # same situation as _C above (warned there when both are missing)
    _nanobatch = None

NATIVE_DTYPES = (torch.float32, torch.float64)
HAS_NATIVE = _C is not None


def _native(*tensors, core=_C, one_dtype: bool = True) -> bool:
    """Whether a call goes to the native core ``core`` (``_C`` or ``_nanobatch``): the core is
    built and every tensor is a CPU tensor of float32 or float64, all of one dtype unless
    ``one_dtype=False`` (NanoBatch's parameters may differ). Anything else (another device or
    dtype, mixed dtypes, something that is not a tensor) runs the op's torch twin, whose checks
    name the problem; on the native path the binding is the validator."""
    if core is None:
        return False
    first = None
    for t in tensors:
        # is_cpu, not device.type: the attribute builds no device object (a few us per call,
        # several calls per layer and step).
        if not isinstance(t, Tensor) or not t.is_cpu or t.dtype not in NATIVE_DTYPES:
            return False
        if one_dtype and first is not None and t.dtype != first:
            return False
        first = t.dtype
    return True


def _check_pair(a, b, name_a: str, name_b: str) -> None:
    """The checks every two-factor op makes off the native path (its torch twin has no binding):
    both torch tensors of a floating dtype, of one dtype, on one device, with one batch size;
    the messages name the caller's torch dtypes and devices."""
    for name, t in ((name_a, a), (name_b, b)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.dtype.is_floating_point:
            raise TypeError(f"{name} must have a floating dtype, got {t.dtype}")
    if a.dtype != b.dtype:
        raise TypeError(f"{name_a} and {name_b} dtypes differ: {a.dtype} vs {b.dtype}")
    if a.device != b.device:
        raise ValueError(f"{name_a} and {name_b} devices differ: {a.device} vs {b.device}")
    if a.dim() >= 1 and b.dim() >= 1 and a.shape[0] != b.shape[0]:
        raise ValueError(f"batch sizes differ: {a.shape[0]} vs {b.shape[0]}")


def _numpy_view(x: Tensor):
    """``x`` as a numpy array over the same memory, for the core to read in place."""
    # The core reads the tensor's memory in place; it needs a contiguous last dim (one BLAS leading
    # dimension per example). A transposed last dim is the one case copied, deliberately, here.
    x = x.detach()
    if x.is_neg():
        x = x.resolve_neg()
    if x.dim() and x.stride(-1) != 1 and x.shape[-1] > 1:
        x = x.contiguous()
    return x.numpy()



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


def cast(t: Tensor, dtype: torch.dtype) -> Tensor:
    """``t.to(dtype)``, skipped when ``t`` already has that dtype: the per-layer paths of a step
    make a dozen such calls per layer, and a no-op ``.to`` still costs microseconds of argument
    parsing and dispatch (the per-layer overhead of small models)."""
    return t if t.dtype == dtype else t.to(dtype)


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

