"""Linear per-example norm kernel: native core vs the same algorithm in plain torch ops.

    pytest bench/test_bench_linear.py --benchmark-only

Groups are ``linear|B{B}-T{T}-d{d}-p{p}``; within a group each method runs natively
(``fastclip.ops.linear_sq_norms``) and in torch ops (``linear_sq_norms_torch``); the summary at the
end prints torch/native time ratios measured in the same run.
"""
import functools

import pytest
import torch

from fastclip import ops

BATCHES = (64, 256, 512)
POSITIONS = (1, 16, 256)
WIDTHS = ((64, 64), (256, 1024), (1024, 1024))
METHODS = ("ghost", "direct", "auto")
IMPLS = {"native": ops.linear_sq_norms, "torch": ops.linear_sq_norms_torch}

# Shape-major order, so the inputs of one shape are made once (see `inputs`).
CASES = [(B, T, d, p, method, impl)
         for B in BATCHES for T in POSITIONS for d, p in WIDTHS
         for method in METHODS for impl in IMPLS]


@functools.lru_cache(maxsize=1)
def inputs(B, T, d, p):
    g = torch.Generator().manual_seed(0)
    return torch.randn(B, T, d, generator=g), torch.randn(B, T, p, generator=g)


def rounds_for(B, T, d, p, method):
    # Enough rounds for a stable minimum on small shapes, few on the multi-second ones.
    m = ops.choose_linear_method(T, d, p) if method == "auto" else method
    flops = B * (d + p if T == 1 else T * T * (d + p) if m == "ghost" else 2 * T * d * p)
    return int(min(200, max(3, 2e9 / max(flops, 1))))


@pytest.mark.parametrize("B,T,d,p,method,impl", CASES,
                         ids=[f"B{B}-T{T}-d{d}-p{p}-{m}-{i}" for B, T, d, p, m, i in CASES])
def test_linear_sq_norms(benchmark, B, T, d, p, method, impl):
    A, G = inputs(B, T, d, p)
    fn = IMPLS[impl]
    benchmark.group = f"linear|B{B}-T{T}-d{d}-p{p}"
    benchmark.extra_info.update(impl=impl, method=method)
    benchmark.pedantic(fn, args=(A, G, method), rounds=rounds_for(B, T, d, p, method),
                       warmup_rounds=1, iterations=1)


@pytest.mark.parametrize("scale", (1.0, 1e-20), ids=("unit", "tiny"))
def test_linear_ghost_tiny_gradients(benchmark, scale):
    # Output gradients of ~1e-20 (confidently classified examples late in training) make every
    # Gram product subnormal; the core flushes them (csrc/common.cpp FlushSubnormals), so "tiny"
    # runs as fast as "unit" (without the flush: 75 vs 1.4 ms at 2 threads, B16 T128 d256 p256).
    A, G = inputs(16, 128, 256, 256)
    benchmark.group = "linear|ghost-subnormal-grams"
    benchmark.extra_info.update(scale=scale)
    benchmark.pedantic(ops.linear_sq_norms, args=(A, G * scale, "ghost"), rounds=20,
                       warmup_rounds=1, iterations=1)
