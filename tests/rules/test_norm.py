"""Normalisation layers (LayerNorm, RMSNorm, GroupNorm, InstanceNorm1d/2d/3d): per-example norms
and clipped gradients through the engine vs tests/reference.py (float64, one backward per
example), the op vs autograd, and hostile input to the bindings."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastclip
import harness
import reference as R
from conftest import DTYPES, tol
from harness import mse
from fastclip import _C, ops
from fastclip.engine import Engine


def randomise(model):
    """Non-trivial affine parameters and running statistics (ones/zeros hide mistakes)."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm, nn.modules.instancenorm._InstanceNorm)):
                for p in m.parameters(recurse=False):
                    p.copy_(torch.randn_like(p) * 0.5 + 1.0)
                if getattr(m, "running_mean", None) is not None:
                    m.running_mean.copy_(torch.randn_like(m.running_mean))
                    m.running_var.copy_(torch.rand_like(m.running_var) + 0.5)
    return model


def check(model, x, y, dtype, C=None, rule="NormRule"):
    """``exact`` on the randomised model in ``dtype``, after asserting that the norm layers are
    covered by ``rule`` once the first forward has resolved them."""
    model = randomise(model).to(dtype)
    x, y = x.to(dtype), y.to(dtype)
    eng = Engine(model)
    try:
        model(x)    # a leaf without a registered rule has its rule from its first forward
        assert all(r == rule for n, r in eng.covered() if n.startswith("norm")), eng.covered()
    finally:
        eng.detach()
    exact(model, x, y, dtype, C)


def exact(model, x, y, dtype, C):
    """harness.check in modes auto and nanobatch (clipped sums within 10 atol; norms only when
    C is None), and nanobatch's norms (whole-model per-example gradients) equal the native
    rules'. Returns mode auto's norms."""
    rtol, atol = tol(dtype)
    norms = harness.check(model, x, y, loss=mse, modes=("auto", "nanobatch"), C=C, dtype=dtype,
                          grad_tol=(rtol, atol * 10))
    torch.testing.assert_close(norms["nanobatch"], norms["auto"], rtol=rtol, atol=atol)
    return norms["auto"]


class Seq(nn.Module):
    def __init__(self, d, norm, out=3):
        super().__init__()
        self.inp, self.norm, self.out = nn.Linear(d, d), norm, nn.Linear(d, out)

    def forward(self, x):
        return self.out(torch.tanh(self.norm(self.inp(x))))


BS = [0, 1, 5]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B", BS)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("T", [None, 7])
def test_layer_norm_last_dim(dtype, B, bias, T):
    shape = (B, 6) if T is None else (B, T, 6)
    check(Seq(6, nn.LayerNorm(6, bias=bias)), torch.randn(shape) * 2 + 0.5,
          torch.randn(shape[:-1] + (3,)), dtype, C=1.0)


class TwoDims(nn.Module):
    def __init__(self, bias=True):
        super().__init__()
        self.inp, self.norm, self.out = nn.Linear(5, 5), nn.LayerNorm((4, 5), bias=bias), nn.Linear(20, 3)

    def forward(self, x):  # x (B, T, 4, 5)
        return self.out(self.norm(self.inp(x)).flatten(2))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B", BS)
def test_layer_norm_two_trailing_dims(dtype, B):
    check(TwoDims(), torch.randn(B, 3, 4, 5), torch.randn(B, 3, 3), dtype, C=0.5)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B", BS)
@pytest.mark.parametrize("eps", [None, 1e-3])
def test_rms_norm(dtype, B, eps):
    check(Seq(6, nn.RMSNorm(6, eps=eps)), torch.randn(B, 7, 6), torch.randn(B, 7, 3), dtype, C=1.0)


def test_rms_norm_two_dims_and_no_affine_bias():
    check(nn.Sequential(nn.Linear(5, 5), nn.RMSNorm((4, 5)), nn.Flatten(), nn.Linear(20, 2)),
          torch.randn(3, 4, 5), torch.randn(3, 2), torch.float64, C=0.3)


def cnn(norm, dim=2, C=8):
    conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dim]
    return nn.Sequential(conv(3, C, 3), norm, nn.ReLU(), nn.Flatten(), nn.LazyLinear(3))


def cnn_check(norm, dim, B, dtype, C=None, spatial=5, eval_mode=False):
    model = cnn(norm, dim)
    x = torch.randn((B, 3) + (spatial,) * dim)
    model(torch.randn((1, 3) + (spatial,) * dim))  # materialise the lazy Linear
    if eval_mode:
        model.eval()
    check_named(model, x, torch.randn(B, 3), dtype, C)


def check_named(model, x, y, dtype, C, idx="1"):
    # names are "1.weight" in a Sequential: make sure the norm layer is covered natively
    eng = Engine(model)
    rules = dict(eng.covered())
    eng.detach()
    assert rules[f"{idx}.weight"] == "NormRule"
    model = randomise(model).to(dtype)
    x, y = x.to(dtype), y.to(dtype)
    exact(model, x, y, dtype, C)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B", BS)
@pytest.mark.parametrize("groups", [1, 4, 8])
def test_group_norm(dtype, B, groups):
    cnn_check(nn.GroupNorm(groups, 8), 2, B, dtype, C=1.0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B", BS)
@pytest.mark.parametrize("groups", [1, 3, 6])
def test_group_norm_linear_front(dtype, B, groups):
    """GroupNorm on (B, C, L) from a Linear (no conv rule involved), the empty batch included."""
    model = nn.Sequential(nn.Linear(4, 24), nn.Unflatten(1, (6, 4)), nn.GroupNorm(groups, 6),
                          nn.Flatten(), nn.Linear(24, 3))
    model(torch.randn(1, 4))
    check_named(model, torch.randn(B, 4), torch.randn(B, 3), dtype, C=1.0, idx="2")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dim", [1, 2, 3])
@pytest.mark.parametrize("B", [0, 1, 4])
@pytest.mark.parametrize("track", [False, True])
@pytest.mark.parametrize("eval_mode", [False, True])
def test_instance_norm(dtype, dim, B, track, eval_mode):
    cls = {1: nn.InstanceNorm1d, 2: nn.InstanceNorm2d, 3: nn.InstanceNorm3d}[dim]
    if B == 0:  # torch's instance_norm itself cannot run on an empty batch (any mode)
        norm = cls(8, affine=True, track_running_stats=track)
        norm.train(not eval_mode)
        with pytest.raises((IndexError, RuntimeError, ValueError)):
            norm(torch.randn((0, 8) + (4,) * dim))
        return
    cnn_check(cls(8, affine=True, track_running_stats=track), dim, B, dtype, C=1.0,
              spatial=4 if dim == 3 else 5, eval_mode=eval_mode)


def test_instance_norm_eval_uses_running_stats_snapshot():
    """Eval mode with running stats: the stats of the forward count, even if changed before backward."""
    torch.manual_seed(1)
    model = cnn(nn.InstanceNorm2d(8, affine=True, track_running_stats=True), 2)
    model(torch.randn(1, 3, 5, 5))
    model = randomise(model).double().eval()
    x, y = torch.randn(3, 3, 5, 5, dtype=torch.float64), torch.randn(3, 3, dtype=torch.float64)
    want = R.norms(model, mse, x, y)
    eng = Engine(model, loss_reduction="sum")
    eng.keep_norms = True
    loss = mse(model(x), y).sum()
    model[1].running_mean.add_(5.0)
    loss.backward()
    eng.detach()
    torch.testing.assert_close(eng.norms_log[0], want, rtol=1e-10, atol=1e-12)


class Twice(nn.Module):
    """One LayerNorm called twice in a forward: one per-example gradient, the sum of both uses."""

    def __init__(self):
        super().__init__()
        self.a, self.norm, self.b = nn.Linear(6, 6), nn.LayerNorm(6), nn.Linear(6, 2)

    def forward(self, x):
        return self.b(self.norm(torch.tanh(self.a(self.norm(x)))))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B", [1, 4])
def test_called_twice(dtype, B):
    check(Twice(), torch.randn(B, 5, 6), torch.randn(B, 5, 2), dtype, C=0.7)


class GroupTwice(nn.Module):
    def __init__(self):
        super().__init__()
        self.c, self.norm, self.f = nn.Conv2d(4, 4, 3, padding=1), nn.GroupNorm(2, 4), nn.Linear(64, 2)

    def forward(self, x):
        return self.f(self.norm(self.c(self.norm(x))).flatten(1))


def test_group_norm_called_twice():
    check(GroupTwice(), torch.randn(3, 4, 4, 4), torch.randn(3, 2), torch.float64, C=1.0)


def test_frozen_bias_and_no_affine():
    m = Seq(6, nn.LayerNorm(6))
    m.norm.bias.requires_grad_(False)
    check(m, torch.randn(3, 6), torch.randn(3, 3), torch.float64, C=1.0)
    # No affine parameters: nothing for the rule to do, the Linears stay exact.
    m = nn.Sequential(nn.Linear(6, 6), nn.LayerNorm(6, elementwise_affine=False), nn.Linear(6, 2))
    check(m, torch.randn(3, 6), torch.randn(3, 2), torch.float64, C=1.0)


def test_subclass_with_own_forward_is_generic():
    class Odd(nn.LayerNorm):
        def forward(self, x):
            return super().forward(x) * 2

    # F.layer_norm is not one of the operation rule's ops: the generic rule after its first forward
    m = nn.Sequential(nn.Linear(4, 4), Odd(4))
    eng = Engine(m)
    m(torch.randn(3, 4))
    assert dict(eng.covered())["1.weight"] == "GenericRule"
    eng.detach()
    check(Seq(4, Odd(4)), torch.randn(3, 4), torch.randn(3, 3), torch.float64, rule="GenericRule")


def test_unbatched_layer_norm_input_is_a_clear_error():
    m = nn.Sequential(nn.LayerNorm(4))
    with pytest.raises(ValueError, match="batch dimension first"):
        fastclip.per_sample_grad_norms(m, lambda o, y: o.sum(-1, keepdim=True)[:1], torch.randn(4), None)


def test_model_left_as_found():
    m = randomise(cnn(nn.GroupNorm(2, 8), 2))
    m(torch.randn(1, 3, 5, 5))
    before = {k: v.clone() for k, v in m.state_dict().items()}
    fastclip.clipped_grad(m, mse, torch.randn(2, 3, 5, 5), torch.randn(2, 3), max_grad_norm=1.0)
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())
    assert not m[1]._forward_hooks and not m[1]._forward_pre_hooks


# -- the op itself vs autograd ------------------------------------------------------------------

def autograd_grads(kind, x, g, eps, k=1, groups=1, rm=None, rv=None):
    """Per-example (gw, gb) by autograd of torch's own functional op, in x's dtype."""
    gws, gbs = [], []
    for i in range(x.shape[0]):
        xi = x[i:i + 1]
        shp = x.shape[x.dim() - k:] if kind in ("layer_norm", "rms_norm") else x.shape[1:2]
        w = torch.ones(shp, dtype=x.dtype, requires_grad=True)
        b = torch.zeros(shp, dtype=x.dtype, requires_grad=True)
        if kind == "layer_norm":
            y = F.layer_norm(xi, shp, w, b, eps)
        elif kind == "rms_norm":
            y = F.rms_norm(xi, shp, w, eps) + b
        elif kind == "group_norm":
            y = F.group_norm(xi, groups, w, b, eps)
        else:
            y = F.instance_norm(xi, rm, rv, w, b, use_input_stats=rm is None, eps=eps)
        gw, gb = torch.autograd.grad(y, (w, b), g[i:i + 1])
        gws.append(gw.flatten())
        gbs.append(gb.flatten())
    return torch.stack(gws), torch.stack(gbs)


OP_CASES = [("layer_norm", (3, 5, 8), dict(k=1)), ("layer_norm", (2, 4, 3, 6), dict(k=2)),
            ("layer_norm", (3, 16), dict(k=1)), ("rms_norm", (3, 5, 8), dict(k=1)),
            ("group_norm", (3, 8, 5, 5), dict(groups=2)), ("group_norm", (2, 6, 7), dict(groups=6)),
            ("instance_norm", (3, 4, 3, 3, 3), dict())]


@pytest.mark.parametrize("impl", ["native", "torch"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind,shape,kw", OP_CASES)
def test_op_vs_autograd(impl, dtype, kind, shape, kw):
    fn = ops.norm_affine_grads if impl == "native" else ops.norm_affine_grads_torch
    x = (torch.randn(shape, dtype=torch.float64) * 3 + 2)
    g = torch.randn(shape, dtype=torch.float64)
    want = autograd_grads(kind, x, g, 1e-5, **kw)
    gw, gb = fn(kind, x.to(dtype), g.to(dtype), eps=1e-5, normalized_ndim=kw.get("k", 1),
                num_groups=kw.get("groups", 1))
    assert gw.dtype == dtype
    rtol, atol = (1e-4, 1e-5) if dtype == torch.float32 else (1e-10, 1e-12)
    torch.testing.assert_close(gw.double(), want[0], rtol=rtol, atol=atol)
    torch.testing.assert_close(gb.double(), want[1], rtol=rtol, atol=atol)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_eps_none_matches_torch_exactly(dtype):
    # Inputs so small that eps = finfo(dtype).eps dominates mean(x^2): any other default shows.
    scale = 1e-4 if dtype == torch.float32 else 1e-8
    x = torch.randn(3, 4, 8, dtype=torch.float64) * scale
    g = torch.randn(3, 4, 8, dtype=torch.float64)
    want = autograd_grads("rms_norm", x, g, torch.finfo(dtype).eps)
    gw, _ = ops.norm_affine_grads("rms_norm", x.to(dtype), g.to(dtype), eps=None)
    rtol = 1e-4 if dtype == torch.float32 else 1e-10
    torch.testing.assert_close(gw.double(), want[0], rtol=rtol, atol=0)
    if dtype == torch.float64:  # and torch's own float64 op with eps=None agrees
        torch.testing.assert_close(gw, autograd_grads("rms_norm", x, g, None)[0], rtol=1e-10, atol=0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_instance_norm_running_stats_op(dtype):
    x, g = torch.randn(3, 5, 6, dtype=torch.float64), torch.randn(3, 5, 6, dtype=torch.float64)
    rm, rv = torch.randn(5, dtype=torch.float64), torch.rand(5, dtype=torch.float64) + 0.1
    want = autograd_grads("instance_norm", x, g, 1e-3, rm=rm, rv=rv)
    for fn in (ops.norm_affine_grads, ops.norm_affine_grads_torch):
        gw, gb = fn("instance_norm", x.to(dtype), g.to(dtype), eps=1e-3, running_mean=rm.to(dtype),
                    running_var=rv.to(dtype))
        rtol = 1e-4 if dtype == torch.float32 else 1e-10
        torch.testing.assert_close(gw.double(), want[0], rtol=rtol, atol=1e-6)
        torch.testing.assert_close(gb.double(), want[1], rtol=rtol, atol=1e-6)


def test_op_layouts_and_threads():
    """Non-contiguous inputs (channels_last, sliced, transposed), one thread and many, big and
    small shapes (the serial cut-off and the per-example row split) all agree with the twin."""
    x = torch.randn(4, 16, 9, 9).to(memory_format=torch.channels_last)
    g = torch.randn(4, 16, 9, 9)
    ref = ops.norm_affine_grads_torch("group_norm", x.contiguous(), g, num_groups=4)
    got = ops.norm_affine_grads("group_norm", x, g, num_groups=4)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    xs, gs = torch.randn(2, 300, 130)[:, ::2, 1:129], torch.randn(2, 128, 150).transpose(1, 2)
    ref = ops.norm_affine_grads_torch("layer_norm", xs.contiguous(), gs.contiguous())
    threads = torch.get_num_threads()
    try:
        for n in (1, 2, 7):
            torch.set_num_threads(n)
            torch.testing.assert_close(ops.norm_affine_grads("layer_norm", xs, gs), ref,
                                       rtol=1e-4, atol=1e-4)
    finally:
        torch.set_num_threads(threads)


def test_op_empty_dims():
    for kind, shape in (("layer_norm", (0, 3, 4)), ("layer_norm", (2, 0, 4)), ("group_norm", (2, 4, 0)),
                        ("group_norm", (0, 4, 3)), ("rms_norm", (2, 3, 0))):
        x = torch.randn(shape)
        gw, gb = ops.norm_affine_grads(kind, x, torch.randn(shape), num_groups=2)
        k = shape[-1] if kind != "group_norm" else shape[1]
        assert gw.shape == (shape[0], k) and gb.shape == (shape[0], k)
        assert torch.all(gw == 0) and torch.all(gb == 0)


def test_op_non_float_dtype_runs_in_torch():
    x, g = torch.randn(2, 3, 8, dtype=torch.bfloat16), torch.randn(2, 3, 8, dtype=torch.bfloat16)
    gw, gb = ops.norm_affine_grads("rms_norm", x, g, eps=None)
    ref = ops.norm_affine_grads_torch("rms_norm", x.float(), g.float(), eps=torch.finfo(torch.float32).eps)
    torch.testing.assert_close(gw, ref[0])


# -- hostile input to the bindings and to ops.py ------------------------------------------------

f32, f64 = np.float32, np.float64


def arr(*shape, dtype=f32):
    return np.random.default_rng(0).standard_normal(shape).astype(dtype)


LAST = lambda x, g, **kw: _C.last_dims_affine_grads(x, g, kw.pop("eps", 1e-5), **kw)  # noqa: E731
CHAN = lambda x, g, **kw: _C.channel_affine_grads(x, g, kw.pop("groups", 1), kw.pop("eps", 1e-5), **kw)  # noqa: E731
BINDINGS = [LAST, CHAN]


@pytest.mark.parametrize("fn", BINDINGS)
@pytest.mark.parametrize("obj,name", [([[[1.0]]], "list"), (None, "NoneType"),
                                      (torch.zeros(2, 3, 4), "Tensor"), (3.0, "float")])
def test_not_an_array(fn, obj, name):
    with pytest.raises(TypeError, match=f"x must be a numpy.ndarray, got {name}"):
        fn(obj, arr(2, 3, 4))
    with pytest.raises(TypeError, match=f"g must be a numpy.ndarray, got {name}"):
        fn(arr(2, 3, 4), obj)


@pytest.mark.parametrize("fn", BINDINGS)
@pytest.mark.parametrize("shape,rank", [((3,), 1), ((2, 3), 2), ((2, 3, 4, 5), 4), ((), 0)])
def test_wrong_rank(fn, shape, rank):
    with pytest.raises(ValueError, match=f"x must be (2-D or )?3-D.*got {rank}-D"):
        fn(np.zeros(shape, f32), arr(2, 3, 4))


@pytest.mark.parametrize("fn", BINDINGS)
def test_mismatches(fn):
    with pytest.raises(ValueError, match="batch sizes differ: 32 vs 31"):
        fn(arr(32, 2, 4), arr(31, 2, 4))
    with pytest.raises(ValueError, match=r"shapes differ: \(2, 3, 4\) vs \(2, 3, 5\)"):
        fn(arr(2, 3, 4), arr(2, 3, 5))
    with pytest.raises(TypeError, match="dtypes differ: float32 vs float64"):
        fn(arr(2, 3, 4), arr(2, 3, 4, dtype=f64))
    huge = np.broadcast_to(np.zeros((1, 2, 4), f32), (10**9, 2, 4))
    with pytest.raises(ValueError, match=f"batch sizes differ: {10**9} vs 3"):
        fn(huge, arr(3, 2, 4))


@pytest.mark.parametrize("fn", BINDINGS)
@pytest.mark.parametrize("dtype", [np.int32, np.float16, np.complex64, np.dtype(">f4"), object])
def test_non_float_dtypes(fn, dtype):
    with pytest.raises(TypeError, match="x must be float32 or float64"):
        fn(np.zeros((2, 3, 4), dtype=dtype), arr(2, 3, 4))


@pytest.mark.parametrize("fn", BINDINGS)
@pytest.mark.parametrize("eps", [-1e-5, float("nan"), float("inf")])
def test_bad_eps(fn, eps):
    with pytest.raises(ValueError, match="eps must be finite and >= 0"):
        fn(arr(2, 3, 4), arr(2, 3, 4), eps=eps)


@pytest.mark.parametrize("fn", BINDINGS)
def test_strides(fn):
    with pytest.raises(ValueError, match="unit stride on its last dim"):
        fn(arr(2, 4, 3).transpose(0, 2, 1), arr(2, 3, 4))
    with pytest.raises(ValueError, match="negative stride"):
        fn(arr(2, 3, 4)[:, ::-1], arr(2, 3, 4))
    with pytest.raises(ValueError, match="num_threads must be >= 1, got 0"):
        fn(arr(2, 3, 4), arr(2, 3, 4), num_threads=0)
    # Legal strided views (sliced batch / rows) are read in place and give the twin's answer.
    x, g = arr(4, 6, 8)[::2, 1::2], arr(4, 6, 8)[1::2, ::2] * 0.5
    got = fn(x, g)
    fn(np.ascontiguousarray(x), np.ascontiguousarray(g))
    np.testing.assert_allclose(got[0], fn(np.ascontiguousarray(x), np.ascontiguousarray(g))[0], rtol=1e-6)


def test_channel_specific_arguments():
    x = arr(2, 6, 5)
    with pytest.raises(ValueError, match=r"groups \(4\) must divide the number of channels \(6\)"):
        CHAN(x, x, groups=4)
    for bad in (0, -2):
        with pytest.raises(ValueError, match=f"groups must be >= 1, got {bad}"):
            CHAN(x, x, groups=bad)
    m = np.zeros(6)
    with pytest.raises(ValueError, match="both mean and var, or neither"):
        CHAN(x, x, groups=6, mean=m)
    with pytest.raises(ValueError, match="per-channel statistics need groups == channels"):
        CHAN(x, x, groups=3, mean=m, var=m + 1)
    with pytest.raises(ValueError, match=r"mean has 5 entries, expected one per channel \(6\)"):
        CHAN(x, x, groups=6, mean=np.zeros(5), var=np.ones(5))
    with pytest.raises(TypeError, match="mean must be float64"):
        CHAN(x, x, groups=6, mean=np.zeros(6, f32), var=np.ones(6))
    with pytest.raises(TypeError, match="var must be None or a numpy.ndarray, got list"):
        CHAN(x, x, groups=6, mean=m, var=[1.0] * 6)
    with pytest.raises(ValueError, match="mean must be 1-D, got 2-D"):
        CHAN(x, x, groups=6, mean=np.zeros((6, 1)), var=np.ones(6))
    with pytest.raises(ValueError, match="mean must be contiguous"):
        CHAN(x, x, groups=6, mean=np.zeros(12)[::2], var=np.ones(6))
    gw, gb = CHAN(x, x, groups=6, mean=m, var=m + 1, bias=False)
    assert gw.shape == (2, 6) and gb is None


def test_ops_arguments():
    x = torch.randn(2, 4, 3)
    with pytest.raises(ValueError, match="kind must be one of"):
        ops.norm_affine_grads("batch_norm", x, x)
    with pytest.raises(TypeError, match="x must be a torch.Tensor, got ndarray"):
        ops.norm_affine_grads("layer_norm", x.numpy(), x)
    with pytest.raises(TypeError, match="g must have a floating dtype, got torch.int64"):
        ops.norm_affine_grads("layer_norm", x, x.long())
    with pytest.raises(ValueError, match="batch sizes differ: 2 vs 3"):
        ops.norm_affine_grads("layer_norm", x, torch.randn(3, 4, 3))
    with pytest.raises(ValueError, match="eps=None is only meaningful for rms_norm"):
        ops.norm_affine_grads("layer_norm", x, x, eps=None)
    with pytest.raises(ValueError, match="eps must be finite and >= 0, got -1.0"):
        ops.norm_affine_grads("layer_norm", x, x, eps=-1.0)
    with pytest.raises(ValueError, match="2 normalized dim"):
        ops.norm_affine_grads("layer_norm", x[0], x[0], normalized_ndim=2)
    with pytest.raises(ValueError, match="num_groups must be >= 1 and divide the number of channels 4"):
        ops.norm_affine_grads("group_norm", x, x, num_groups=3)
    with pytest.raises(ValueError, match=r"running_mean must have shape \(4,\)"):
        ops.norm_affine_grads("instance_norm", x, x, running_mean=torch.zeros(3), running_var=torch.ones(3))
    # eps = 0 is legal in torch (nn.LayerNorm(eps=0)) and here
    gw, _ = ops.norm_affine_grads("layer_norm", x, x, eps=0.0)
    assert torch.isfinite(gw).all()


@pytest.mark.parametrize("kind,shape,kw", [("layer_norm", (3, 4, 40), {}),
                                           ("group_norm", (3, 6, 50), dict(num_groups=2))])
@pytest.mark.parametrize("case", ["outlier_first", "large_mean", "constant"])
def test_op_ill_conditioned_statistics(kind, shape, kw, case):
    """The core's one-pass shifted moments hand over to exact two-pass statistics when they would
    cancel: an outlier as the first value of a row/group, a mean far from zero against the
    spread, a constant input (var = 0, x_hat = 0)."""
    x = torch.randn(shape, dtype=torch.float64)
    if case == "outlier_first":
        x.view(shape[0], -1)[:, 0] = 1e6
        if kind == "layer_norm":
            x[..., 0] = 1e6
    elif case == "large_mean":
        x = x + 1e3  # condition |mean| / std = 1e3: float64 keeps ~1e-13 of x - mean
    else:
        x = torch.full(shape, 3.0, dtype=torch.float64)
    g = torch.randn(shape, dtype=torch.float64)
    k = dict(groups=kw["num_groups"]) if kw else {}
    want = autograd_grads(kind, x, g, 1e-5, **k)
    gw, gb = ops.norm_affine_grads(kind, x, g, **kw)
    torch.testing.assert_close(gw, want[0], rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(gb, want[1], rtol=1e-12, atol=1e-12)
    gw32, _ = ops.norm_affine_grads(kind, x.float(), g.float(), **kw)
    want32 = autograd_grads(kind, x.float().double(), g.float().double(), 1e-5, **k)
    torch.testing.assert_close(gw32.double(), want32[0], rtol=1e-4, atol=1e-4)


# -- BatchNorm in eval mode (running statistics: a per-channel affine map) -------------------

def bn_model(dim, affine=True):
    """A conv of the right dimension, BatchNorm, tanh, then a Linear head; in eval mode with
    non-trivial running statistics and affine parameters."""
    conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dim]
    bn = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[dim]
    m = nn.Sequential(conv(2, 4, 3, padding=1), bn(4, affine=affine), nn.Tanh(), nn.Flatten(),
                      nn.Linear(4 * 3 ** dim, 3))
    with torch.no_grad():
        norm = m[1]
        norm.running_mean.copy_(torch.randn(4))
        norm.running_var.copy_(torch.rand(4) + 0.5)
        if affine:
            norm.weight.copy_(torch.randn(4) * 0.5 + 1.0)
            norm.bias.copy_(torch.randn(4))
    return m.eval()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dim", [1, 2, 3])
@pytest.mark.parametrize("B", [0, 1, 5])
def test_batch_norm_eval_is_exact(dtype, dim, B):
    m = bn_model(dim).to(dtype)
    x, y = torch.randn((B, 2) + (3,) * dim, dtype=dtype), torch.randn(B, 3, dtype=dtype)
    eng = Engine(m)
    assert dict(eng.covered())["1.weight"] == "NormRule"
    eng.detach()
    got = exact(m, x, y, dtype, C=0.5)
    for mode in ("ghost", "direct"):
        torch.testing.assert_close(fastclip.per_sample_grad_norms(m, mse, x, y, mode=mode), got,
                                   rtol=tol(dtype)[0], atol=tol(dtype)[1])


def test_batch_norm1d_on_features_and_frozen_backbone():
    """BatchNorm1d on (B, C) features; a frozen (pretrained) backbone with a frozen BatchNorm and a
    trainable head; and a BatchNorm without affine parameters."""
    m = nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 3)).double()
    with torch.no_grad():
        m[1].running_mean.normal_()
        m[1].running_var.uniform_(0.5, 2.0)
    m.eval()
    x, y = torch.randn(4, 5, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)
    exact(m, x, y, torch.float64, C=0.5)
    for p in list(m[0].parameters()) + list(m[1].parameters()):
        p.requires_grad_(False)
    exact(m, x, y, torch.float64, C=0.5)
    m = nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6, affine=False), nn.Linear(6, 3)).double().eval()
    exact(m, x, y, torch.float64, C=0.5)


def test_batch_norm_in_training_mode_is_refused_naming_every_module():
    m = nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4),
                      nn.Sequential(nn.Flatten(), nn.Linear(4, 2), nn.BatchNorm1d(2)))
    for mode in ("auto", "nanobatch"):
        with pytest.raises(ValueError, match=r"3 module.*'1' \(BatchNorm2d\), '3' \(BatchNorm2d\), "
                                             r"'4\.2' \(BatchNorm1d\).*eval mode.*fastclip\.fix"):
            Engine(m, mode=mode)
    # track_running_stats=False normalises with batch statistics in eval mode too
    m = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3, track_running_stats=False)).eval()
    with pytest.raises(ValueError, match="track_running_stats=False"):
        Engine(m)


@pytest.mark.parametrize("mode", ["auto", "nanobatch"])
def test_batch_norm_switched_to_training_mode_is_refused_at_the_forward(mode):
    m = bn_model(2)
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    m, opt, _ = fastclip.make_private(m, opt, None, noise_multiplier=0.0, max_grad_norm=1.0,
                                      mode=mode)
    x, y = torch.randn(3, 2, 3, 3), torch.randn(3, 3)
    stats = m[1].running_mean.clone()
    m.train()   # the usual start of an epoch: puts the BatchNorm in training mode too
    with pytest.raises(RuntimeError, match="BatchNorm2d was switched to training mode.*eval"):
        m(x)
    assert torch.equal(m[1].running_mean, stats)    # refused before the statistics moved
    m[1].eval()                                      # the fine-tuning recipe: BN stays in eval
    before = [p.detach().clone() for p in m.parameters()]
    opt.zero_grad()
    mse(m(x), y).mean().backward()
    opt.step()
    assert any(not torch.equal(a, p) for a, p in zip(before, m.parameters()))
    assert torch.equal(m[1].running_mean, stats)


def test_fix_replaces_every_batch_norm_by_group_norm():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(3, 48, 3), nn.BatchNorm2d(48))
            self.block = nn.Sequential(nn.Conv2d(48, 64, 3), nn.BatchNorm2d(64, eps=1e-3))
            self.head = nn.Sequential(nn.Flatten(), nn.Linear(64, 3), nn.BatchNorm1d(3, affine=False))

        def forward(self, x):
            return self.head(self.block(self.stem(x)))

    net = Net()
    w48 = net.stem[1].weight
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    changes = fastclip.fix(net)
    assert [(n, type(a).__name__, type(b).__name__) for n, a, b in changes] == [
        ("stem.1", "BatchNorm2d", "GroupNorm"), ("block.1", "BatchNorm2d", "GroupNorm"),
        ("head.2", "BatchNorm1d", "GroupNorm")]
    gn = net.stem[1]
    assert (gn.num_groups, gn.num_channels) == (16, 48) and gn.weight is w48   # same Parameter
    assert (net.block[1].num_groups, net.block[1].eps) == (32, 1e-3)
    assert net.head[2].num_groups == 1 and not net.head[2].affine
    assert fastclip.fix(net) == []
    # trainable now, with the optimizer built before the fix
    net, opt, _ = fastclip.make_private(net.train(), opt, None, noise_multiplier=0.0,
                                        max_grad_norm=1.0)
    x = torch.randn(2, 3, 5, 5)
    opt.zero_grad()
    net(x).square().sum(1).mean().backward()
    opt.step()
    assert w48.grad is not None
    with pytest.raises(TypeError, match="GroupNorm"):
        fastclip.fix(nn.BatchNorm1d(4))
