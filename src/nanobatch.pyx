# cython: language_level=3, boundscheck=False, wraparound=False, initializedcheck=False
# distutils: language = c++
"""fastclip._nanobatch: NanoBatch mode's clip-and-accumulate loop (csrc/clip.h).

One call per nanobatch: per-example squared norms per clipping group, clip factors, and the
clipped sum added into the accumulators, with the GIL released and the parameter vector split
over the core's thread pool. Every argument is checked here; the kernel trusts its input.
"""
import math
import os

import numpy as np

from libc.math cimport isfinite, sqrt
from libc.stdint cimport int64_t
from libcpp cimport bool as cbool
from libcpp.vector cimport vector


cdef extern from "clip.h" namespace "fastclip" nogil:
    cdef struct ClipPart:
        const void* grad
        void* acc
        int64_t n
        int64_t group
        cbool f64

    void clip_sq_norms(const ClipPart* parts, int64_t n_parts, int64_t k, int64_t L, double* sq,
                       int num_threads) except +
    void clip_accumulate(const ClipPart* parts, int64_t n_parts, int64_t k, int64_t L,
                         const double* factors, int num_threads) except +


cdef inline size_t _address(arr, str what, int index) except 0:
    """Data pointer of a C-contiguous, aligned float32/float64 numpy array (1 for an empty one,
    which the kernel never reads)."""
    if not isinstance(arr, np.ndarray):
        raise TypeError(f"{what}[{index}] must be a numpy array, got {type(arr).__name__}")
    if arr.dtype != np.float32 and arr.dtype != np.float64:
        raise TypeError(f"{what}[{index}] must be float32 or float64, got {arr.dtype}")
    if not arr.flags.c_contiguous or not arr.flags.aligned:
        raise ValueError(f"{what}[{index}] must be C-contiguous and aligned, got strides "
                         f"{arr.strides} for shape {arr.shape}")
    if arr.size == 0:
        return 1
    return <size_t>arr.ctypes.data


# The same cap as fastclip._C's (src/binding.h kMaxElements): a buffer this module allocates
# from sizes it is given stays below it, so a wrong size is a ValueError, never a failed
# allocation. Products here are of Python ints, which do not overflow; the cap keeps them in int64.
_MAX_ELEMENTS = 1 << 34


def _checked_elements(n, what):
    if not 0 <= n <= _MAX_ELEMENTS:
        raise ValueError(f"{what} would hold {n} elements, more than the {_MAX_ELEMENTS} "
                         "fastclip's native core handles per buffer")


def clip_accumulate_nanobatch(grads, accs, groups, bounds, double scale, num_threads):
    """Clip k examples' gradients by group and add them into ``accs``.

    Args:
        grads: list of P arrays (k, n_p), float32/float64, C-contiguous: parameter p's gradient
            for each of the k examples, as the backward produced it.
        accs: list of P arrays (n_p,) of the same dtype as grads[p], writable, or None to
            compute norms only.
        groups: P ints in [0, L): the clipping group (layer) of each parameter.
        bounds: L positive bounds, or None with ``accs=None``.
        scale: the true per-example gradient is ``scale * grads`` (the batch size B for a loss
            averaged over the batch, 1 for a summed loss).
        num_threads: threads over the parameter vector (>= 1).

    Returns:
        (sq, factors): float64 (k, L) squared norms of the true gradients per group, and the
        factors applied, ``scale * min(1, C_l / norm)`` (0 for a non-finite norm), or None.
    """
    cdef Py_ssize_t P = len(grads), p, i, l
    cdef int64_t k = -1, L
    if not (isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be a finite number > 0, got {scale}")
    if isinstance(num_threads, bool) or not isinstance(num_threads, (int, np.integer)):
        raise TypeError(f"num_threads must be an int, got {type(num_threads).__name__}")
    if num_threads < 1:
        raise ValueError(f"num_threads must be >= 1, got {num_threads}")
    # More threads than cores only adds switching (the same cap as fastclip._C's).
    cdef int threads = min(int(num_threads), 4 * (os.cpu_count() or 1))
    if len(groups) != P:
        raise ValueError(f"groups has {len(groups)} entries for {P} gradients")
    if accs is not None and len(accs) != P:
        raise ValueError(f"accs has {len(accs)} entries for {P} gradients")
    for p in range(P):
        grp = groups[p]
        if isinstance(grp, bool) or not isinstance(grp, (int, np.integer)) or grp < 0:
            raise ValueError(f"groups[{p}] must be an integer >= 0, got {grp!r}")
    if bounds is None:
        if accs is not None:
            raise ValueError("accumulating needs bounds")
        # Group ids name layers; without bounds their count is the largest id + 1, which sizes
        # the (k, L) norms array: an id beyond the number of gradients names no layer.
        top = max([int(g) for g in groups], default=-1) + 1
        if top > max(P, 1):
            raise ValueError(f"group ids must be < the number of gradients ({P}) when no bounds "
                             f"are given, got {top - 1}")
        L = top if top > 0 else 1
    else:
        L = len(bounds)
        if L == 0:
            raise ValueError("bounds is empty")
    cdef vector[double] c_bounds
    if bounds is not None:
        for l in range(L):
            b = float(bounds[l])
            if not (math.isfinite(b) and b > 0):
                raise ValueError(f"bounds[{l}] must be a finite number > 0, got {b}")
            c_bounds.push_back(b)
    cdef vector[ClipPart] parts
    cdef ClipPart part
    for p in range(P):
        g = grads[p]
        gaddr = _address(g, "grads", p)
        if g.ndim != 2:
            raise ValueError(f"grads[{p}] must be 2-D (k, n), got shape {g.shape}")
        if k < 0:
            k = g.shape[0]
        elif g.shape[0] != k:
            raise ValueError(f"grads[{p}] holds {g.shape[0]} examples, grads[0] holds {k}")
        grp = groups[p]
        if isinstance(grp, bool) or not isinstance(grp, (int, np.integer)) or not 0 <= grp < L:
            raise ValueError(f"groups[{p}] must be an integer in [0, {L}), got {grp!r}")
        part.grad = <const void*>gaddr
        part.acc = NULL
        part.n = g.shape[1]
        part.group = grp
        part.f64 = g.dtype == np.float64
        if accs is not None:
            a = accs[p]
            aaddr = _address(a, "accs", p)
            if a.dtype != g.dtype:
                raise TypeError(f"accs[{p}] is {a.dtype} but grads[{p}] is {g.dtype}")
            if a.ndim != 1 or a.shape[0] != g.shape[1]:
                raise ValueError(f"accs[{p}] must have shape ({g.shape[1]},), got {a.shape}")
            if not a.flags.writeable:
                raise ValueError(f"accs[{p}] is read-only")
            part.acc = <void*>aaddr
        parts.push_back(part)
    if k < 0:
        k = 0
    # The kernel indexes i * n and i * L + group in int64: sizes of real arrays, but checked.
    _checked_elements(k * L, f"the norms array ({k} x {L})")
    sq = np.zeros((k, L), dtype=np.float64)
    cdef double[:, ::1] sqv = sq
    cdef double* sqp = &sqv[0, 0] if k > 0 else NULL
    cdef const ClipPart* pp = parts.data()
    cdef double s2 = scale * scale, norm
    with nogil:
        clip_sq_norms(pp, P, k, L, sqp, threads)
        for i in range(k * L):
            sqp[i] *= s2
    if accs is None:
        return sq, None
    factors = np.zeros((k, L), dtype=np.float64)
    cdef double[:, ::1] fv = factors
    for i in range(k):
        for l in range(L):
            norm = sqrt(sqv[i, l])
            if not isfinite(norm):
                fv[i, l] = 0.0
            elif norm > c_bounds[l]:
                fv[i, l] = scale * (c_bounds[l] / norm)
            else:
                fv[i, l] = scale
    cdef const double* fp = &fv[0, 0] if k > 0 else NULL
    with nogil:
        clip_accumulate(pp, P, k, L, fp, threads)
    return sq, factors
