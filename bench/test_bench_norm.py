"""Norm-layer per-example affine gradients: native core vs the same algorithm in plain torch ops
vs Opacus' grad sampler (GroupNorm / LayerNorm).

    pytest bench/test_bench_norm.py --benchmark-only

Groups are ``norm|{layer}-{shape}``: GroupNorm(8, C) at the CNN shapes (B=128, C=32/64/128 at
32x32/16x16/8x8) and LayerNorm(256) at (B=32, T=128). Within a group, ``native`` is
``fastclip.ops.norm_affine_grads``, ``torch`` is ``norm_affine_grads_torch`` and ``opacus`` is
``opacus.grad_sample``'s sampler for the layer (all return per-example weight and bias gradients
from the layer input and output gradient). The summary at the end prints torch/native ratios
(bench/conftest.py); opacus/native ratios are printed by this module's fixture.
"""
import functools

import pytest
import torch
from torch import nn

from fastclip import ops

try:
    from opacus.grad_sample.group_norm import compute_group_norm_grad_sample
    from opacus.grad_sample.layer_norm import compute_layer_norm_grad_sample
except ImportError:  # opacus is optional
    compute_group_norm_grad_sample = compute_layer_norm_grad_sample = None

SHAPES = [("group_norm", (128, 32, 32, 32)), ("group_norm", (128, 64, 16, 16)),
          ("group_norm", (128, 128, 8, 8)), ("layer_norm", (32, 128, 256))]
IMPLS = ("native", "torch", "opacus")
CASES = [(k, s, i) for k, s in SHAPES for i in IMPLS]


@functools.lru_cache(maxsize=1)
def inputs(shape):
    gen = torch.Generator().manual_seed(0)
    return torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)


def make_fn(kind, shape, impl):
    x, g = inputs(shape)
    if kind == "group_norm":
        kw = dict(num_groups=8, eps=1e-5)
        layer = nn.GroupNorm(8, shape[1])
        opacus = compute_group_norm_grad_sample
    else:
        kw = dict(normalized_ndim=1, eps=1e-5)
        layer = nn.LayerNorm(shape[-1])
        opacus = compute_layer_norm_grad_sample
    if impl == "native":
        return lambda: ops.norm_affine_grads(kind, x, g, **kw)
    if impl == "torch":
        return lambda: ops.norm_affine_grads_torch(kind, x, g, **kw)
    if opacus is None:
        pytest.skip("opacus is not installed")
    return lambda: opacus(layer, [x], g)


def group_of(kind, shape):
    name = "GroupNorm8" if kind == "group_norm" else "LayerNorm"
    return f"norm|{name}-" + "x".join(map(str, shape))


_RESULTS = {}


@pytest.mark.parametrize("kind,shape,impl", CASES,
                         ids=[f"{k}-{'x'.join(map(str, s))}-{i}" for k, s, i in CASES])
def test_norm_affine_grads(benchmark, kind, shape, impl):
    fn = make_fn(kind, shape, impl)
    benchmark.group = group_of(kind, shape)
    benchmark.extra_info.update(impl=impl, method=kind)
    with torch.no_grad():
        benchmark.pedantic(fn, rounds=30, warmup_rounds=2, iterations=1)
    _RESULTS.setdefault(benchmark.group, {})[impl] = benchmark.stats.stats.min


@pytest.fixture(scope="module", autouse=True)
def _opacus_ratios(request):
    # Printed at unconfigure (after pytest-benchmark's tables), outside output capture.
    rep = request.config.pluginmanager.get_plugin("terminalreporter")

    def report():
        lines = [f"{group:34s} native {r['native'] * 1e3:8.3f} ms  opacus {r['opacus'] * 1e3:8.3f} ms"
                 f"  ratio(min) {r['opacus'] / r['native']:6.2f}"
                 for group, r in sorted(_RESULTS.items()) if {"native", "opacus"} <= r.keys()]
        if lines and rep is not None:
            rep.write_sep("-", "opacus / native time ratios (> 1: native faster)")
            for line in lines:
                rep.write_line(line)

    request.config.add_cleanup(report)
    yield
