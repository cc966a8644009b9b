"""Per-example weight gradients of a linear map, kept from the norm pass for the clipped sum.

A linear map's per-example weight gradient is ``grad_i = G_i^T A_i`` (A: (B, T, d) inputs, G:
(B, T, p) output gradients). Its norm is taken today by the ghost form ``<A_i A_i^T, G_i G_i^T>``
(or the tiled direct product), and the clipped sum is then a second full GEMM ``G^T diag(c) A``:
about 1.6-2.1 weight-gradient products for T ~ 128. Kept instead: the per-example gradients
(B, p, d) by one batched product (the weight gradient's flops, at near-GEMM rate since each
product is T x p x d), their squared norms one pass over them, and the clipped sum ``c @ (B, p d)``
one more (no second GEMM). It costs B p d elements of memory, so:

* a layer keeps only while the bytes kept by every layer at once stay within
  :data:`KEEP_STEP_BYTES` (:class:`Kept` holds its bytes in the ledger until it is dropped: under
  flat clipping every layer's kept gradients live until all norms are known and its clipped sum
  is formed; per-layer clipping frees them layer by layer), else the ghost / direct norm and the
  GEMM as before;
* and only where it is the cheaper one (:func:`keep_wins`): not for T = 1 or short sequences
  (the product norm or ghost is then nearly free), and never in mode "ghost".

Used by the Linear rule (``linear.py``), the attention rule's projections (``attention.py``) and
the operation rule's linear calls (``ops_rule.py``: Hugging Face GPT-2's Conv1D).
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor

from .. import ops

# The most bytes of per-example gradients kept at once (all layers of a clipping step together,
# the linear and the conv rules); 0 keeps nothing. 12 MiB by default: small against any real
# model's step, and enough for the layers where keeping pays most: a conv layer kept in the
# backward drops its output gradient and is charged only what it adds beyond it (cnn's conv2:
# +1 MiB saves its 7 ms weight-gradient conv at 2 threads; resnet's three 64-channel layers:
# +8 MiB save ~7 ms), where a linear layer is charged its whole B x p x d (A and G stay). Measured
# (issue 15, CPU, 1 thread) with everything kept: the transformers' step 5-8% faster (transformer
# 470 -> 447 ms, bert 524 -> 482) for +190 MiB (bert's step peak 155 -> 325 MiB, non-private
# 140); 64 MiB already lifts bert's peak to 1.37x the non-private one (target 1.3x). On CPU the
# arena that holds the linear ones stays allocated between steps (page faults otherwise cost
# what keeping saves). Raise it where memory allows: ``fastclip.layers.keep.KEEP_STEP_BYTES =
# 256 << 20``; 0 turns keeping off.
KEEP_STEP_BYTES = 12 << 20

# Cost model of one example, in units of one flop of a large GEMM (measured at 1 thread, float32,
# AVX-512 Xeon, OpenBLAS core vs torch's bmm; T ~ 64-128, d, p 192-1024):
#   ghost norm (native): T^2 (d + p) flops by SYRK at ~0.55x GEMM rate; below 128 positions the
#       Gram tile is a full GEMM (twice the flops);
#   direct norm (native, tiled): 2 T d p at ~0.85x GEMM rate;
#   clipped-sum GEMM: 2 T d p;
#   kept: the batched product 2 T d p at ~0.95x GEMM rate, plus per element of the (p, d)
#       gradient about _KEEP_ELEMENT flops' worth of memory traffic (its write, the norm pass and
#       the c @ (B, p d) product).
_GHOST_RATE = 0.55
_DIRECT_RATE = 0.85
_KEPT_RATE = 0.95
_KEEP_ELEMENT = 48.0


def _ghost_cost(T: int, d: int, p: int) -> float:
    flops = float(T) * T * (d + p + 2)
    return flops * (2.0 if T < 128 else 1.0) / _GHOST_RATE


def keep_wins(T: int, d: int, p: int, method: str) -> bool:
    """Whether keeping the per-example gradients (module doc) is cheaper than the norm ``method``
    ("auto": the cheaper of ghost and direct; "direct"; "ghost" never keeps) plus the clipped-sum
    GEMM, for one example with T positions, d inputs, p outputs."""
    if T <= 1 or method not in ("auto", "direct"):
        return False
    product = 2.0 * T * d * p
    norm = product / _DIRECT_RATE
    if method == "auto":
        norm = min(norm, _ghost_cost(T, d, p))
    return product / _KEPT_RATE + _KEEP_ELEMENT * d * p < norm + product


class _Ledger:
    """Bytes of per-example gradients held by live :class:`Kept` memos (process-wide)."""

    __slots__ = ("live", "peak")

    def __init__(self):
        self.live = 0
        self.peak = 0


LEDGER = _Ledger()


def fits(nbytes: int) -> bool:
    """Whether ``nbytes`` more kept bytes stay within :data:`KEEP_STEP_BYTES` with what is kept."""
    return LEDGER.live + nbytes <= KEEP_STEP_BYTES


class Kept:
    """A memo (``Use.memo``) holding one module's kept per-example gradients for its clipped sum:
    ``w`` (B, p, d), or (B, d, p) when ``transposed``, summed over the module's uses, and the
    per-example bias gradients ``b`` (B, p) or None. Its bytes count in the ledger until the memo
    is dropped (the engine drops memos when the step ends or examples are zeroed; ``clipped``
    drops it once used)."""

    __slots__ = ("w", "b", "transposed", "nbytes")

    def __init__(self, w: Tensor, b: Optional[Tensor], transposed: bool, nbytes: int):
        self.w, self.b, self.transposed, self.nbytes = w, b, transposed, nbytes
        LEDGER.live += nbytes
        LEDGER.peak = max(LEDGER.peak, LEDGER.live)

    def __del__(self):
        LEDGER.live -= self.nbytes


def keeps(B: int, T: int, d: int, p: int, dtype: torch.dtype, method: str,
          force: Optional[bool] = None) -> bool:
    """Whether a linear map of this shape keeps its per-example gradients now: cheaper
    (:func:`keep_wins`, or ``force``) and within :data:`KEEP_STEP_BYTES` with what is kept."""
    if T <= 1 or method not in ("auto", "direct"):
        return False
    if not (keep_wins(T, d, p, method) if force is None else force):
        return False
    return fits(B * d * p * torch.empty((), dtype=dtype).element_size())


class _Arena:
    """Step-long storage of the kept gradients, reused across steps: a fresh (B, p, d) tensor
    per layer and step costs its first-touch page faults every step (tens of MiB: large blocks
    go back to the OS when freed), about what keeping saves. One buffer per (dtype, device),
    handed out front to back while the ledger holds anything and rewound when it holds nothing
    (every kept gradient of the previous step dropped); sized to the most a step asked of it,
    which :data:`KEEP_STEP_BYTES` bounds. A request that does not fit gets a tensor of its own
    this step, and the buffer grows to fit at the next rewind. :func:`release` frees it."""

    __slots__ = ("bufs", "used", "want")

    def __init__(self):
        self.bufs = {}
        self.used = {}
        self.want = {}

    def take(self, shape, dtype: torch.dtype, device: torch.device) -> Tensor:
        key = (dtype, device)
        n = 1
        for k in shape:
            n *= int(k)
        if LEDGER.live == 0:   # nothing kept is alive: rewind (and grow to last step's need)
            want = self.want.get(key, 0)
            buf = self.bufs.get(key)
            if want and (buf is None or buf.numel() < want):
                self.bufs[key] = None   # the old buffer goes before the new one is allocated
                self.bufs[key] = torch.empty(want, dtype=dtype, device=device)
            self.used[key] = 0
        used = self.used.get(key, 0)
        self.want[key] = max(self.want.get(key, 0), used + n)
        buf = self.bufs.get(key)
        if buf is None or used + n > buf.numel():
            return torch.empty(shape, dtype=dtype, device=device)
        self.used[key] = used + n
        return buf[used:used + n].view(shape)


ARENA = _Arena()


def release() -> None:
    """Free the buffers kept gradients are formed in (they are allocated again when needed)."""
    ARENA.bufs.clear()
    ARENA.used.clear()
    ARENA.want.clear()


def form(pairs: Sequence[Tuple[Tensor, Tensor]], bias: bool) -> Kept:
    """The kept per-example gradients of a linear map from its uses' (A (B, T, d), G (B, T, p))
    pairs (same B, d, p; T may differ): ``sum_u G_u^T A_u`` per example by batched products,
    and with ``bias``
    the per-example bias gradients ``sum_u sum_t G_u``."""
    A0, G0 = pairs[0]
    B, d, p = G0.shape[0], A0.shape[-1], G0.shape[-1]
    # (B, p, d), the weight's own layout: measured as fast as or faster than (B, d, p) for
    # T 128, d, p 256-1024 (1 thread, interleaved); the transposed layout stays supported.
    transposed = False
    w = ARENA.take((B, d, p) if transposed else (B, p, d), G0.dtype, G0.device)
    for i, (A, G) in enumerate(pairs):
        x, y = (A, G) if transposed else (G, A)
        if i == 0:
            torch.bmm(x.transpose(1, 2), y, out=w)
        else:
            w.baddbmm_(x.transpose(1, 2), y)
    b = None
    if bias:
        for _, G in pairs:
            s = G.sum(1)
            b = s if b is None else b + s
    nbytes = w.numel() * w.element_size() + (b.numel() * b.element_size() if b is not None else 0)
    return Kept(w, b, transposed, nbytes)


def sq_norms(kept: Kept) -> Tuple[Tensor, Optional[Tensor]]:
    """(weight squared norms (B,), bias squared norms (B,) or None) of the kept gradients."""
    w = kept.w
    B, r, s = w.shape
    wsq = torch.linalg.vector_norm(w.reshape(B, r * s), dim=1).square()
    bsq = kept.b.square().sum(-1) if kept.b is not None else None
    return wsq, bsq


def clipped_weight(kept: Kept, c: Tensor) -> Tensor:
    """``sum_i c_i grad_i`` (p, d) from the kept weight gradients."""
    w = kept.w
    B, r, s = w.shape
    out = ops.cast(c, w.dtype).matmul(w.reshape(B, r * s)).view(r, s)
    return out.t().contiguous() if kept.transposed else out


def clipped_bias(kept: Kept, c: Tensor) -> Tensor:
    """``sum_i c_i b_i`` (p,) from the kept bias gradients."""
    return ops.cast(c, kept.b.dtype).matmul(kept.b)
