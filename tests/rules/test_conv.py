"""Conv1d/2d/3d: native norms and clipped sums against tests/reference.py (float64, one backward
per example), the conv ops against each other, and hostile inputs to the binding."""
import math
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastclip
from conftest import DTYPES
from harness import MODES, assert_close, check
from fastclip import ops
from fastclip.layers import rule_for
from fastclip.layers.conv import ConvRule
from fastclip.layers.generic import GenericRule

CONVS = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
FCONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
METHODS = ["auto", "ghost", "direct"]           # the conv kernel's methods (engine modes: MODES)


def loss_fn(out, y):
    return (out.flatten(1) - 0.1).square().sum(1) * y


def check_model(model, x, dtype, mode):
    """harness.check in ``mode`` with positive per-example weights as targets and the median
    reference norm as the bound (about half the examples clipped)."""
    y = torch.rand(x.shape[0], dtype=dtype) + 0.5
    check(model, x, y, loss=loss_fn, modes=(mode,), dtype=dtype, C=lambda ref: float(ref.median()))


def random_case(seed):
    rng = random.Random(seed)
    d = (1, 2, 3)[seed % 3]
    groups_kind = rng.choice(["one", "two", "depthwise"])
    C = rng.choice([2, 4]) if d == 3 else rng.choice([2, 4, 6])
    groups = {"one": 1, "two": 2, "depthwise": C}[groups_kind]
    O = groups * rng.choice([1, 2])
    k = tuple(rng.choice([1, 2, 3]) for _ in range(d))
    dil = tuple(rng.choice([1, 2]) for _ in range(d))
    padding = rng.choice(["int", "tuple", "same", "valid"])
    stride = tuple(rng.choice([1, 2, 3]) for _ in range(d)) if padding != "same" else 1
    if padding == "int":
        padding = rng.choice([0, 1, 2])
    elif padding == "tuple":
        padding = tuple(rng.choice([0, 1, 2]) for _ in range(d))
    mode = rng.choice(["zeros", "reflect", "replicate", "circular"])
    size = {1: [rng.randint(6, 12)], 2: [rng.randint(5, 9), rng.randint(5, 9)],
            3: [rng.randint(5, 6) for _ in range(3)]}[d]
    return dict(d=d, C=C, O=O, k=k, stride=stride, padding=padding, dilation=dil, groups=groups,
                padding_mode=mode, bias=rng.random() < 0.6, size=size)


@pytest.mark.parametrize("seed", range(36))
def test_random_convs(seed):
    case = random_case(seed)
    dtype = DTYPES[seed % 2]
    mode = MODES[(seed // 2) % len(MODES)]
    B = (0, 1, 3, 4)[seed % 4]
    conv = CONVS[case["d"]](case["C"], case["O"], case["k"], stride=case["stride"],
                            padding=case["padding"], dilation=case["dilation"], groups=case["groups"],
                            bias=case["bias"], padding_mode=case["padding_mode"]).to(dtype)
    assert isinstance(rule_for(conv), ConvRule)
    model = nn.Sequential(conv, nn.Tanh())
    x = torch.randn(B, case["C"], *case["size"], dtype=dtype)
    check_model(model, x, dtype, mode)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", MODES)
def test_cnn(dtype, mode):
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Conv2d(8, 8, 3, stride=2, groups=2, bias=False), nn.ReLU(),
                          nn.Conv2d(8, 8, 3, padding="same", groups=8), nn.Flatten(),
                          nn.Linear(8 * 3 * 3, 5)).to(dtype)
    check_model(model, torch.randn(5, 3, 14, 14, dtype=dtype), dtype, mode)


class Twice(nn.Module):
    def __init__(self, conv):
        super().__init__()
        self.conv = conv

    def forward(self, x):
        return self.conv(torch.tanh(self.conv(x)))


@pytest.mark.parametrize("d", [1, 2, 3])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", MODES)
def test_conv_called_twice(d, dtype, mode):
    conv = CONVS[d](4, 4, 3, padding=1, groups=2, bias=True).to(dtype)
    x = torch.randn(3, 4, *([5] * d), dtype=dtype)
    check_model(Twice(conv), x, dtype, mode)


class SharedWeight(nn.Module):
    """A leaf module using a Conv2d's weight through its own F.conv2d call (generic rule)."""

    def __init__(self, weight):
        super().__init__()
        self.weight = weight

    def forward(self, x):
        return F.conv2d(x, self.weight, padding=1)


@pytest.mark.parametrize("dtype", DTYPES)
def test_weight_shared_with_other_rule(dtype):
    conv = nn.Conv2d(3, 3, 3, padding=1).to(dtype)
    other = SharedWeight(conv.weight)
    model = nn.Sequential(conv, nn.Tanh(), other)
    assert rule_for(other) is None  # the generic rule: per_example + cross term
    check_model(model, torch.randn(3, 3, 6, 6, dtype=dtype), dtype, "auto")


def test_subclasses():
    class Keeps(nn.Conv2d):
        pass

    class Own(nn.Conv2d):
        def forward(self, x):
            return super().forward(x) * 2

    assert isinstance(rule_for(Keeps(2, 2, 3)), ConvRule)
    assert rule_for(Own(2, 2, 3)) is None  # the generic rule covers it
    model = nn.Sequential(Keeps(2, 3, 3), nn.Tanh(), Own(3, 2, 2)).double()
    check_model(model, torch.randn(3, 2, 7, 7, dtype=torch.float64), torch.float64, "auto")


def test_unbatched_input_refused():
    conv = nn.Conv2d(2, 2, 3)
    with pytest.raises(ValueError, match="batched"):
        fastclip.per_sample_grad_norms(conv, lambda o, y: o.sum().reshape(1), torch.randn(2, 5, 5),
                                       torch.zeros(1))


# ---------------------------------------------------------------------------------------------
# ops
# ---------------------------------------------------------------------------------------------

def per_example_ref(x, g, w_shape, stride, padding, dilation, groups):
    d = x.dim() - 2
    x, g = x.double(), g.double()
    out = []
    for i in range(x.shape[0]):
        w = torch.zeros(w_shape, dtype=torch.float64, requires_grad=True)
        (FCONV[d](x[i:i + 1], w, None, stride, padding, dilation, groups) * g[i:i + 1]).sum().backward()
        out.append(w.grad.square().sum())
    return torch.stack(out) if out else torch.zeros(0, dtype=torch.float64)


OP_CASES = [
    # d, B, C, O, size, k, stride, padding, dilation, groups
    (1, 3, 3, 5, (40,), (4,), 1, "same", 3, 1),
    (2, 2, 4, 6, (9, 11), (3, 2), (2, 1), (1, 0), (1, 2), 2),
    (2, 3, 6, 6, (8, 8), (3, 3), 1, "valid", 1, 6),
    (3, 2, 2, 4, (4, 5, 6), (2, 3, 1), (1, 2, 1), 1, 1, 1),
    (2, 2, 3, 4, (30, 30), (3, 3), 1, 1, 1, 1),     # P = 900: several ghost tiles
    (2, 1, 2, 2, (1, 1), (1, 1), 1, 0, 1, 1),       # P = 1
    (2, 2, 2, 2, (2, 2), (3, 3), 1, 0, 1, 1),       # no output positions
    (1, 2, 0, 0, (5,), (2,), 1, 0, 1, 1),           # no channels
    # stride 1, one tile: ghost from the padded input's Gram matrix (csrc/conv.cpp)
    (2, 3, 8, 6, (8, 8), (3, 3), 1, 1, 1, 2),
    (3, 2, 4, 4, (4, 4, 4), (3, 3, 3), 1, 1, 1, 1),
    (2, 2, 16, 4, (6, 7), (3, 3), 1, "same", 2, 1),
]


@pytest.mark.parametrize("case", OP_CASES, ids=[str(i) for i in range(len(OP_CASES))])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("impl", ["native", "torch"])
def test_op_vs_reference(case, dtype, method, impl):
    d, B, C, O, size, k, stride, padding, dilation, groups = case
    x = torch.randn(B, C, *size, dtype=dtype)
    w_shape = (O, C // groups, *k)
    st, dl = ops._conv_tuple(stride, d, "s"), ops._conv_tuple(dilation, d, "d")
    pads = ops.conv_padding(padding, k, st, dl)
    out = [max(0, (n + lo + hi - dd * (kk - 1) - 1) // s + 1)
           for n, (lo, hi), kk, s, dd in zip(size, pads, k, st, dl)]
    g = torch.randn(B, O, *out, dtype=dtype)
    fn = ops.conv_sq_norms if impl == "native" else ops.conv_sq_norms_torch
    w, b = fn(x, g, w_shape, stride, padding, dilation, groups, method, True)
    assert w.dtype == dtype and w.shape == (B,)
    if C and all(out):
        ref = per_example_ref(x, g, w_shape, stride, padding, dilation, groups)
    else:
        ref = torch.zeros(B, dtype=torch.float64)  # torch's conv refuses these shapes
    assert_close(w, ref, dtype)
    assert_close(b, g.double().flatten(2).sum(2).square().sum(1), dtype)


def test_op_strided_inputs_and_threads():
    x = torch.randn(4, 6, 12, 10, dtype=torch.float64).transpose(2, 3)  # strided input, read in place
    w_shape = (4, 3, 3, 3)
    g = torch.randn(4, 4, 10, 12, dtype=torch.float64)
    ref = per_example_ref(x, g, w_shape, 1, 1, 1, 2)
    g_cl = g.contiguous(memory_format=torch.channels_last)  # spatial dims not contiguous: copied
    g_ch = torch.randn(4, 8, 10, 12, dtype=torch.float64)[:, ::2]  # strided channels: in place
    g_ch.copy_(g)
    for method in METHODS:
        for gg in (g, g_cl, g_ch, -g):
            assert_close(ops.conv_sq_norms(x, gg, w_shape, 1, 1, 1, 2, method)[0], ref, torch.float64)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = ops.conv_sq_norms(x, g, w_shape, 1, 1, 1, 2)[0]
        torch.set_num_threads(2)
        two = ops.conv_sq_norms(x, g, w_shape, 1, 1, 1, 2)[0]
    finally:
        torch.set_num_threads(old)
    assert torch.equal(one, two)


def test_big_unfold_is_chunked():
    # K * P > the per-thread unfold budget (2^22): direct chunks positions, ghost unfolds per tile.
    x = torch.randn(1, 64, 40, 40, dtype=torch.float64)
    w_shape = (8, 64, 9, 9)
    y = F.conv2d(x, torch.zeros(w_shape, dtype=torch.float64), None, 1, 4)
    g = torch.randn_like(y)
    ref = ops.conv_sq_norms_torch(x, g, w_shape, 1, 4, 1, 1, "direct")[0]
    for method in ("ghost", "direct"):
        assert_close(ops.conv_sq_norms(x, g, w_shape, 1, 4, 1, 1, method)[0], ref, torch.float64)


@pytest.mark.parametrize("blas", [True, False])
def test_many_lines_and_blas_fallback(blas):
    # 3000 output lines of one column (W = 1): the unfold takes its lines in blocks, ghost spans
    # several tiles (SYRK on the diagonal ones); with BLAS off the loop fallbacks run instead.
    x = torch.randn(2, 3, 3000, 1, dtype=torch.float64)
    w_shape = (4, 3, 3, 1)
    g = torch.randn(2, 4, 3000, 1, dtype=torch.float64)
    ref = per_example_ref(x, g, w_shape, 1, (1, 0), 1, 1)
    old = fastclip._C.set_blas_enabled(blas)
    try:
        for method in ("ghost", "direct"):
            assert_close(ops.conv_sq_norms(x, g, w_shape, 1, (1, 0), 1, 1, method)[0], ref,
                         torch.float64)
    finally:
        fastclip._C.set_blas_enabled(old)


@pytest.mark.parametrize("groups", [1, 2])
def test_kept_per_example_layout(groups):
    # per_example receives, per example and group, the K x Og transpose of the weight gradient.
    x = torch.randn(3, 4, 7, 6, dtype=torch.float64)
    w_shape = (6, 4 // groups, 3, 3)
    g = torch.randn(3, 6, 7, 6, dtype=torch.float64)
    K, Og = math.prod(w_shape[1:]), 6 // groups
    keep = torch.empty(3, groups, K, Og, dtype=torch.float64)
    w, _ = ops.conv_sq_norms(x, g, w_shape, 1, 1, 1, groups, "direct", per_example=keep)
    ref = torch.stack([torch.autograd.grad((F.conv2d(x[i:i + 1], wt, None, 1, 1, 1, groups)
                                            * g[i:i + 1]).sum(), wt)[0]
                       for i in range(3)
                       for wt in [torch.zeros(w_shape, dtype=torch.float64, requires_grad=True)]])
    got = keep.transpose(2, 3).reshape(3, *w_shape)
    assert_close(got, ref, torch.float64)
    assert_close(w, ref.flatten(1).square().sum(1), torch.float64)
    # bias_grads receives the per-example bias gradients the bias norm forms.
    gb = torch.empty(3, 6, dtype=torch.float64)
    _, b = ops.conv_sq_norms(x, g, w_shape, 1, 1, 1, groups, "auto", True, bias_grads=gb)
    assert_close(gb, g.sum((2, 3)), torch.float64)
    assert_close(b, g.sum((2, 3)).square().sum(1), torch.float64)
    with pytest.raises(ValueError, match="bias_grads needs bias=True"):
        ops.conv_sq_norms(x, g, w_shape, 1, 1, 1, groups, "auto", False, bias_grads=gb)
    with pytest.raises(ValueError, match=r"bias_grads must be \(B, C_out\)"):
        ops.conv_sq_norms(x, g, w_shape, 1, 1, 1, groups, "auto", True, bias_grads=gb[:2])


# The float32 direct kernel (csrc/conv_direct.h): every column block (Og 1 .. 130: one to four
# 16-wide vectors, tails, several 64-column blocks), row tails (K not a multiple of the row block),
# strides, dilations, asymmetric padding, 1-D and 3-D, groups, x strided along W and G with strided
# channels, the per-example gradients it keeps; lines shorter than 4 take the BLAS path.
FUSED_CASES = [
    # d, B, C, O, size, k, stride, padding, dilation, groups
    (2, 3, 3, 1, (9, 10), (3, 3), 1, 1, 1, 1),
    (2, 2, 5, 17, (8, 12), (3, 2), (1, 2), ((2, 0), (1, 3)), (2, 1), 1),
    (2, 2, 4, 32, (7, 9), (3, 3), 1, "same", 1, 1),
    (2, 2, 6, 40, (6, 8), (1, 1), 2, 0, 1, 2),
    (2, 2, 3, 64, (5, 11), (2, 3), 1, 1, 1, 1),
    (2, 2, 2, 70, (6, 6), (3, 3), 1, 1, 1, 1),
    (2, 1, 2, 130, (5, 7), (3, 3), 1, 1, 1, 1),
    (1, 3, 4, 12, (40,), (5,), 2, 3, 2, 2),
    (3, 2, 2, 20, (3, 4, 9), (2, 2, 3), (1, 2, 1), 1, (1, 1, 2), 1),
    (2, 2, 2, 8, (9, 3), (3, 3), 1, 1, 1, 1),   # lines of 3: the BLAS path
]


@pytest.mark.parametrize("case", FUSED_CASES, ids=[str(i) for i in range(len(FUSED_CASES))])
def test_direct_fused_kernel(case):
    if not fastclip._C.conv_direct_fused_available():
        pytest.skip("the AVX-512 direct kernel does not run on this CPU (fastclip._C.isa() is "
                    f"{fastclip._C.isa()!r})")
    d, B, C, O, size, k, stride, padding, dilation, groups = case
    torch.manual_seed(len(FUSED_CASES) + O)
    # x strided along its last dim (read in place), G with strided channels.
    x = torch.randn(B, C, *size[:-1], 2 * size[-1])[..., ::2]
    w_shape = (O, C // groups, *k)
    st, dl = ops._conv_tuple(stride, d, "s"), ops._conv_tuple(dilation, d, "d")
    pads = ops.conv_padding(padding, k, st, dl)
    out = [(n + lo + hi - dd * (kk - 1) - 1) // s + 1
           for n, (lo, hi), kk, s, dd in zip(size, pads, k, st, dl)]
    g = torch.randn(B, 2 * O, *out)[:, ::2]
    arg = ops.pads_to_arg(pads)
    K, Og = math.prod(w_shape[1:]), O // groups
    xd = F.pad(x.double(), [p for lohi in reversed(pads) for p in lohi])
    ref = torch.stack([torch.autograd.grad((FCONV[d](xd[i:i + 1], wt, None, stride, 0, dilation,
                                                     groups) * g[i:i + 1].double()).sum(), wt)[0]
                       for i in range(B)
                       for wt in [torch.zeros(w_shape, dtype=torch.float64, requires_grad=True)]])
    kept = {}
    for fused in (True, False):
        old = fastclip._C.set_conv_direct_fused(fused)
        try:
            keep = torch.full((B, groups, K, Og), float("nan"))
            w, _ = ops.conv_sq_norms(x, g, w_shape, stride, arg, dilation, groups, "direct",
                                     per_example=keep)
        finally:
            fastclip._C.set_conv_direct_fused(old)
        got = keep.transpose(2, 3).reshape(B, *w_shape)
        assert_close(got, ref, torch.float32)
        assert_close(w, ref.flatten(1).square().sum(1), torch.float32)
        kept[fused] = got
    # Both paths sum the same products in float32: they agree to float32 rounding.
    torch.testing.assert_close(kept[True], kept[False], rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# hostile inputs
# ---------------------------------------------------------------------------------------------

def _arrays(dtype=np.float32):
    x = np.random.rand(2, 4, 6, 6).astype(dtype)
    g = np.random.rand(2, 6, 4, 4).astype(dtype)
    return x, g


def _call(x, g, kernel=(3, 3), stride=(1, 1), padding=(0, 0), dilation=(1, 1), groups=1,
          method="auto", bias=False, threads=1):
    return fastclip._C.conv_sq_norms(x, g, kernel, stride, padding, dilation, groups, method, bias,
                                     threads)


def test_binding_accepts_good_input():
    x, g = _arrays()
    w, b = _call(x, g, bias=True)
    assert w.shape == (2,) and b.shape == (2,)
    w2, _ = _call(x, g, padding=(0, 0, 0, 0))
    assert np.array_equal(w, w2)


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(x="nope"), TypeError, "input must be a numpy.ndarray, got str"),
    (dict(x=np.zeros((2, 4, 6, 6), np.int32)), TypeError, "float32 or float64"),
    (dict(g=np.zeros((2, 6, 4, 4), np.float64)), TypeError, "dtypes differ"),
    (dict(x=np.zeros((2, 4), np.float32)), ValueError, "3-D, 4-D or 5-D"),
    (dict(x=np.zeros((2, 4, 6, 6, 1, 1), np.float32)), ValueError, "got 6-D"),
    (dict(g=np.zeros((2, 6, 4), np.float32)), ValueError, "ranks differ"),
    (dict(g=np.zeros((3, 6, 4, 4), np.float32)), ValueError, "batch sizes differ: 2 vs 3"),
    (dict(kernel=(3,)), ValueError, "kernel_size must have 2 entries"),
    (dict(kernel=3), TypeError, "kernel_size must be a list or tuple"),
    (dict(kernel=(3, 3.0)), TypeError, "must hold ints"),
    (dict(kernel=(3, True)), TypeError, "must hold ints"),
    (dict(kernel=(0, 3)), ValueError, "kernel sizes must be >= 1"),
    (dict(stride=(0, 1)), ValueError, "strides must be >= 1"),
    (dict(dilation=(1, -1)), ValueError, "dilations must be >= 1"),
    (dict(padding=(-1, 0)), ValueError, "paddings must be >= 0"),
    (dict(padding=(0, 0, 0)), ValueError, "padding must have 2 or 4 entries"),
    (dict(padding=(1, 1)), ValueError, "output size .* does not match"),
    (dict(groups=0), ValueError, "groups must be >= 1, got 0"),
    (dict(groups=3), ValueError, "input channels \\(4\\) are not divisible by groups \\(3\\)"),
    (dict(groups=4), ValueError, "output channels \\(6\\) are not divisible by groups \\(4\\)"),
    (dict(groups="2"), TypeError, "groups must be an int"),
    (dict(method="fast"), ValueError, "method must be 'auto', 'ghost' or 'direct', got 'fast'"),
    (dict(threads=0), ValueError, "num_threads must be >= 1, got 0"),
    (dict(x=np.random.rand(2, 4, 6, 6).astype(np.float32)[:, :, ::-1]), ValueError, "negative stride"),
    (dict(g=np.random.rand(2, 6, 4, 8).astype(np.float32)[..., ::2]), ValueError,
     "grad_output must be contiguous over its spatial dims"),
])
def test_binding_hostile(kwargs, exc, match):
    x, g = _arrays()
    x = kwargs.pop("x", x)
    g = kwargs.pop("g", g)
    with pytest.raises(exc, match=match):
        _call(x, g, **kwargs)


def test_binding_strided_input_is_read_in_place():
    x, g = _arrays(np.float64)
    big = np.zeros((2, 8, 6, 12))
    big[:, ::2, :, ::2] = x
    view = big[:, ::2, :, ::2]
    assert np.allclose(_call(view, g)[0], _call(x, g)[0])


@pytest.mark.parametrize("args,exc,match", [
    (dict(x="a"), TypeError, "input must be a torch.Tensor"),
    (dict(x=torch.zeros(2, 4, 6, 6, dtype=torch.int64)), TypeError, "floating dtype"),
    (dict(weight_shape=(6, 3, 3, 3)), ValueError, "input has 4 channels"),
    (dict(weight_shape=(5, 4, 3, 3)), ValueError, "grad_output has 6 channels"),
    (dict(weight_shape=(6, 4, 3)), ValueError, "weight_shape must be"),
    (dict(stride=(1, 1, 1)), ValueError, "stride must be an int or 2 ints"),
    (dict(padding="full"), ValueError, "padding must be 'same', 'valid' or ints"),
    (dict(padding="same", stride=2), ValueError, "padding='same' needs stride 1"),
    (dict(padding=1), ValueError, "does not match the output size"),
    (dict(groups=0), ValueError, "groups must be an int >= 1"),
    (dict(method="x"), ValueError, "method must be"),
    (dict(g=torch.zeros(3, 6, 4, 4)), ValueError, "batch sizes differ: 2 vs 3"),
])
@pytest.mark.parametrize("impl", ["native", "torch"])
def test_ops_hostile(args, exc, match, impl):
    a = dict(x=torch.randn(2, 4, 6, 6), g=torch.randn(2, 6, 4, 4), weight_shape=(6, 4, 3, 3),
             stride=1, padding=0, dilation=1, groups=1, method="auto")
    a.update(args)
    fn = ops.conv_sq_norms if impl == "native" else ops.conv_sq_norms_torch
    with pytest.raises(exc, match=match):
        fn(a["x"], a["g"], a["weight_shape"], a["stride"], a["padding"], a["dilation"], a["groups"],
           a["method"])
