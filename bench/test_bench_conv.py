"""Conv per-example norm kernel: native core vs the same algorithm in plain torch ops (unfold + bmm)
and Opacus' per-sample conv gradients (whose norms are then taken), on the CNN workload's layers.

    pytest bench/test_bench_conv.py --benchmark-only      # times; torch/native ratios at the end
    python bench/test_bench_conv.py                        # peak memory of each implementation

Groups are ``conv|B{B}-C{C}-O{O}-{H}x{W}-k{k}``. Peak memory is what torch allocates during one call
(the profiler's allocation events) plus, for the native core, its per-thread scratch (one example's
unfold, the Gram tiles or one group's Og x K gradient), which torch cannot see; it is stored in
each benchmark's ``extra_info``.
"""
import functools

import pytest
import torch

from fastclip import ops
from fastclip.benchmark import peak_step_memory_mib

# (B, C_in, C_out, H, W, k, padding): the three Conv2d layers of the `cnn` e2e workload, batch 128.
SHAPES = [
    (128, 3, 32, 32, 32, 3, 1),
    (128, 32, 64, 16, 16, 3, 1),
    (128, 64, 128, 8, 8, 3, 1),
]
METHODS = ("auto", "ghost", "direct")


def _opacus_norms(x, g, weight_shape, stride, padding, dilation, groups, method, bias):
    from opacus.grad_sample.conv import compute_conv_grad_sample
    layer = torch.nn.Conv2d(weight_shape[1] * groups, weight_shape[0], weight_shape[2:], stride,
                            padding, dilation, groups, bias=bias)
    gs = compute_conv_grad_sample(layer, [x], g)
    w = gs[layer.weight].flatten(1).square().sum(1)
    return w, (gs[layer.bias].square().sum(1) if bias else None)


try:
    import opacus.grad_sample.conv  # noqa: F401
    HAVE_OPACUS = True
except ImportError:
    HAVE_OPACUS = False

IMPLS = {"native": ops.conv_sq_norms, "torch": ops.conv_sq_norms_torch}
if HAVE_OPACUS:
    IMPLS["opacus"] = _opacus_norms

CASES = [(s, m, i) for s in SHAPES for m in METHODS for i in IMPLS if not (i == "opacus" and m != "auto")]


def _id(s):
    B, C, O, H, W, k, p = s
    return f"B{B}-C{C}-O{O}-{H}x{W}-k{k}"


@functools.lru_cache(maxsize=1)
def inputs(shape):
    B, C, O, H, W, k, p = shape
    g = torch.Generator().manual_seed(0)
    Ho, Wo = H + 2 * p - k + 1, W + 2 * p - k + 1
    return torch.randn(B, C, H, W, generator=g), torch.randn(B, O, Ho, Wo, generator=g)


def native_scratch_mib(shape, method, threads):
    """The core's per-thread buffers (not visible to torch's allocator), in MiB."""
    B, C, O, H, W, k, p = shape
    Ho, Wo = H + 2 * p - k + 1, W + 2 * p - k + 1
    P, K = Ho * Wo, C * k * k
    m = ops.choose_conv_method(P, K, O) if method == "auto" else method
    elems = min(K * P, 1 << 22) + (2 * 256 * 256 if m == "ghost" else O * K)
    return threads * elems * 4 / 2**20


def peak_mib(shape, method, impl):
    x, g = inputs(shape)
    B, C, O, H, W, k, p = shape
    fn = IMPLS[impl]
    peak = peak_step_memory_mib(lambda *_: fn(x, g, (O, C, k, k), 1, p, 1, 1, method, True),
                                (None, None), torch.device("cpu"))
    if impl == "native":
        peak += native_scratch_mib(shape, method, torch.get_num_threads())
    return peak


@pytest.mark.parametrize("shape,method,impl", CASES, ids=[f"{_id(s)}-{m}-{i}" for s, m, i in CASES])
def test_conv_sq_norms(benchmark, shape, method, impl):
    x, g = inputs(shape)
    B, C, O, H, W, k, p = shape
    fn = IMPLS[impl]
    benchmark.group = f"conv|{_id(shape)}"
    benchmark.extra_info.update(impl=impl, method=method,
                                peak_mib=round(peak_mib(shape, method, impl), 2))
    benchmark.pedantic(fn, args=(x, g, (O, C, k, k), 1, p, 1, 1, method, True), rounds=15,
                       warmup_rounds=2, iterations=1)


if __name__ == "__main__":
    print(f"threads {torch.get_num_threads()}; peak MiB during one call "
          "(native: torch allocations + the core's per-thread scratch)")
    print(f"{'shape':28s} {'method':7s} " + " ".join(f"{i:>9s}" for i in IMPLS))
    for s in SHAPES:
        for m in METHODS:
            row = [f"{peak_mib(s, m, i):9.2f}" if (i != "opacus" or m == "auto") else f"{'-':>9s}"
                   for i in IMPLS]
            print(f"{_id(s):28s} {m:7s} " + " ".join(row))
