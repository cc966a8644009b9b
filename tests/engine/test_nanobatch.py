"""NanoBatch mode (fastclip/nanobatch.py) and its native clip-and-accumulate loop, against
tests/reference.py; the other test files run their models in mode="nanobatch" too."""
import copy

import numpy as np
import pytest
import torch
from torch import nn

import fastclip
import reference as R
from conftest import DTYPES
from harness import CE, assert_close, check
from fastclip import ops

def mlp(dtype=torch.float64):
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 8), nn.ReLU(),
                         nn.Linear(8, 3)).to(dtype)


def cnn(dtype=torch.float64):
    return nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.GroupNorm(2, 4), nn.ReLU(),
                         nn.MaxPool2d(2), nn.Flatten(), nn.Linear(4 * 3 * 3, 3)).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B", [0, 1, 5, 9])
@pytest.mark.parametrize("size", [1, 2, 4, 16])
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_mlp_sizes_and_threads(dtype, B, size, threads):
    model = mlp(dtype)
    x, y = torch.randn(B, 6, dtype=dtype), torch.randint(0, 3, (B,))
    check(model, x, y, modes=("nanobatch",), C=0.2, dtype=dtype, nanobatch_size=size,
          num_threads=threads)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("size", [1, 3])
def test_cnn(dtype, size):
    model = cnn(dtype)
    x, y = torch.randn(5, 2, 6, 6, dtype=dtype), torch.randint(0, 3, (5,))
    check(model, x, y, modes=("nanobatch",), C=0.5, dtype=dtype, nanobatch_size=size, num_threads=2)


def test_same_threads_same_bits():
    model = mlp(torch.float32)
    x, y = torch.randn(33, 6), torch.randint(0, 3, (33,))
    grads = []
    for _ in range(3):
        fastclip.clipped_grad(model, CE, x, y, 0.1, mode="nanobatch", num_threads=2)
        grads.append([p.grad.clone() for p in model.parameters()])
    for g in grads[1:]:
        for a, b in zip(grads[0], g):
            assert torch.equal(a, b)


class DropNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.drop, self.b = nn.Linear(5, 16), nn.Dropout(0.5), nn.Linear(16, 3)

    def forward(self, x):
        return self.b(self.drop(torch.tanh(self.a(x))))


def test_dropout_differentiates_the_forward_that_made_the_loss():
    """The loss comes from the nanobatch forwards themselves: each example's gradient is taken
    through the very dropout mask that produced its loss (replayed here with the same seed:
    with nanobatch_size 1 the examples' forwards run in order, one mask draw each)."""
    model = DropNet().double().train()
    x, y = torch.randn(6, 5, dtype=torch.float64), torch.randint(0, 3, (6,))
    ref_model = copy.deepcopy(model)
    C = 0.3
    torch.manual_seed(11)
    engine = fastclip.Engine(model, mode="nanobatch", max_grad_norm=C, loss_reduction="sum",
                             nanobatch_size=1, num_threads=2)
    out = model(x)
    CE(out, y).sum().backward()
    engine.detach()
    torch.manual_seed(11)
    params = list(ref_model.parameters())
    total = [torch.zeros_like(p) for p in params]
    for i in range(6):
        o = ref_model(x[i:i + 1])
        torch.testing.assert_close(o, out[i:i + 1].detach())   # the same masks
        g = torch.autograd.grad(CE(o, y[i:i + 1]).sum(), params)
        n = torch.sqrt(sum(t.square().sum() for t in g))
        for acc, t in zip(total, g):
            acc += t * min(1.0, C / float(n))
    for p, want in zip(model.parameters(), total):
        assert_close(p.grad, want)


class TwoInputs(nn.Module):
    """A batched input, a broadcast input and a keyword argument; a tuple output with an integer
    tensor among the outputs."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3)
        self.scale = nn.Parameter(torch.ones(3))

    def forward(self, x, offset, *, gain=1.0):
        out = self.lin(x + offset) * self.scale * gain
        return out, out.argmax(1)


def test_inputs_kwargs_and_tuple_outputs():
    model = TwoInputs().double()
    x, y = torch.randn(5, 4, dtype=torch.float64), torch.randint(0, 3, (5,))
    offset = torch.randn(1, 4, dtype=torch.float64)   # broadcast over the batch, not split

    def loss(out, t):
        return CE(out[0], t)

    engine = fastclip.Engine(model, mode="nanobatch", max_grad_norm=0.3, loss_reduction="sum",
                             nanobatch_size=2)
    engine.keep_norms = True
    out, idx = model(x, offset, gain=2.0)
    assert idx.dtype == torch.long and idx.shape == (5,)
    loss((out, idx), y).sum().backward()
    engine.detach()

    class Bound(nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, x):
            return self.m(x, offset, gain=2.0)

    wrapped = Bound(model)
    assert_close(engine.norms_log[0], R.norms(wrapped, loss, x, y))
    ref = R.clipped_sum(wrapped, loss, x, y, 0.3)
    for name, p in model.named_parameters():
        assert_close(p.grad, ref["m." + name])


def test_two_calls_before_one_backward():
    """A siamese loss: example i's gradient is the sum over both calls, clipped once."""
    model = mlp()
    x1, x2 = torch.randn(4, 6, dtype=torch.float64), torch.randn(4, 6, dtype=torch.float64)
    y = torch.randint(0, 3, (4,))

    class Siamese(nn.Module):
        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, a, b):
            return torch.cat([self.net(a), self.net(b)], 1)

    def loss(out, t):
        return CE(out[:, :3], t) + CE(out[:, 3:], t)

    ref = R.clipped_sum(Siamese(model), loss, (x1, x2), y, 0.2)
    engine = fastclip.Engine(model, mode="nanobatch", max_grad_norm=0.2, loss_reduction="sum")
    (CE(model(x1), y) + CE(model(x2), y)).sum().backward()
    engine.detach()
    for name, p in model.named_parameters():
        assert_close(p.grad, ref["net." + name])


class Branchy(nn.Module):
    """Data-dependent control flow: cannot be vmapped."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3)

    def forward(self, x):
        out = self.lin(x)
        if float(out.detach().sum()) > 0:
            out = out * 2
        return out


def test_unvmappable_model_falls_back_exactly():
    model = Branchy().double()
    x, y = torch.randn(6, 4, dtype=torch.float64), torch.randint(0, 3, (6,))
    with pytest.warns(RuntimeWarning, match="vmap"):
        n = fastclip.per_sample_grad_norms(model, CE, x, y, mode="nanobatch", nanobatch_size=3)
    assert_close(n, R.norms(model, CE, x, y))


def test_model_left_as_found_and_eval_runs_batched():
    model = mlp()
    x, y = torch.randn(3, 6, dtype=torch.float64), torch.randint(0, 3, (3,))
    fastclip.per_sample_grad_norms(model, CE, x, y, mode="nanobatch")
    assert "forward" not in model.__dict__
    engine = fastclip.Engine(model, mode="nanobatch", max_grad_norm=1.0)
    with torch.no_grad():  # evaluation: the model's own batched forward, no graph
        out = model(x)
    assert not out.requires_grad
    engine.detach()
    assert "forward" not in model.__dict__
    assert torch.equal(out, model(x).detach())


def test_make_private_step_and_covered():
    model = mlp()
    before = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    model, opt, _ = fastclip.make_private(model, opt, None, noise_multiplier=0.0, max_grad_norm=0.2,
                                          mode="nanobatch", nanobatch_size=2, num_threads=2)
    assert {r for _, r in opt.engine.covered()} == {"NanoBatch"}
    x, y = torch.randn(5, 6, dtype=torch.float64), torch.randint(0, 3, (5,))
    ref = R.clipped_sum(before, CE, x, y, 0.2)
    opt.zero_grad()
    CE(model(x), y).mean().backward()
    opt.step()
    for (name, p), q in zip(model.named_parameters(), before.parameters()):
        assert_close(p.detach() - q.detach(), -ref[name] / 5)


def test_nonfinite_example_contributes_nothing():
    model = mlp()
    x, y = torch.randn(4, 6, dtype=torch.float64), torch.randint(0, 3, (4,))
    x[2, 0] = float("inf")
    n = fastclip.clipped_grad(model, CE, x, y, 0.3, mode="nanobatch")
    assert not torch.isfinite(n[2])
    keep = [0, 1, 3]
    ref = R.clipped_sum(model, CE, x[keep], y[keep], 0.3)
    for name, p in model.named_parameters():
        assert_close(p.grad, ref[name])


def test_refusals():
    model = mlp()
    x, y = torch.randn(3, 6, dtype=torch.float64), torch.randint(0, 3, (3,))
    with pytest.raises(ValueError, match="requires grad"):
        fastclip.per_sample_grad_norms(model, CE, x.requires_grad_(), y, mode="nanobatch")

    class Scalar(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(6, 3)

        def forward(self, x):
            return self.lin(x).sum()

    with pytest.raises(ValueError, match="no batch dimension"):
        fastclip.Engine(Scalar().double(), mode="nanobatch").model(x.detach())
    packed = nn.utils.rnn.pack_sequence([torch.randn(3, 2), torch.randn(2, 2)])
    lstm = nn.LSTM(2, 3)
    e = fastclip.Engine(nn.Sequential(lstm), mode="nanobatch")
    with pytest.raises(ValueError, match="PackedSequence"):
        e.model(packed)
    e.detach()
    with pytest.raises(ValueError, match="BatchNorm"):
        fastclip.Engine(nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2)), mode="nanobatch")
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="nanobatch_size"):
            fastclip.Engine(mlp(), mode="nanobatch", nanobatch_size=bad)
        with pytest.raises(ValueError, match="num_threads"):
            fastclip.Engine(mlp(), mode="nanobatch", num_threads=bad)


# -- the native clip-and-accumulate loop ------------------------------------------------------

def _parts(k, sizes, dtypes, seed=0):
    g = torch.Generator().manual_seed(seed)
    grads = [torch.randn(k, n, generator=g, dtype=dt) for n, dt in zip(sizes, dtypes)]
    accs = [torch.randn(n, generator=g, dtype=dt) for n, dt in zip(sizes, dtypes)]
    return grads, accs


@pytest.mark.parametrize("k", [0, 1, 3])
@pytest.mark.parametrize("threads", [1, 2])
def test_kernel_matches_torch(k, threads):
    sizes = [1, 70000, 5, 0, 17]
    dtypes = [torch.float32, torch.float32, torch.float64, torch.float32, torch.float64]
    groups, bounds = [0, 1, 0, 1, 2], [0.5, 3.0, 1e9]
    grads, accs = _parts(k, sizes, dtypes)
    if k == 3:
        grads[1][2, 7] = float("nan")   # example 2 of group 1 adds nothing
    accs_t = [a.clone() for a in accs]
    sq, f = ops.clip_accumulate(grads, accs, groups, bounds, 2.0, threads)
    sq_t, f_t = ops.clip_accumulate_torch(grads, accs_t, groups, bounds, 2.0)
    torch.testing.assert_close(sq, sq_t, equal_nan=True)
    torch.testing.assert_close(f, f_t)
    for a, b in zip(accs, accs_t):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        assert torch.isfinite(a).all()
    norms_only, none = ops.clip_accumulate(grads, None, groups, None, 2.0, threads)
    assert none is None
    torch.testing.assert_close(norms_only, sq, equal_nan=True)


def test_kernel_thread_count_does_not_change_results():
    grads, accs = _parts(2, [300000, 9], [torch.float32, torch.float32])
    out = []
    for threads in (1, 2, 4):
        a = [x.clone() for x in accs]
        sq, _ = ops.clip_accumulate(grads, a, [0, 0], [1.0], 1.0, threads)
        out.append((sq, a))
    for sq, a in out[1:]:
        assert torch.equal(sq, out[0][0])
        for x, y in zip(a, out[0][1]):
            assert torch.equal(x, y)


def test_binding_rejects_hostile_input():
    from fastclip import _nanobatch
    clip = _nanobatch.clip_accumulate_nanobatch
    g = np.ones((2, 4), np.float32)
    a = np.zeros(4, np.float32)
    ok = dict(grads=[g], accs=[a], groups=[0], bounds=[1.0], scale=1.0, num_threads=1)

    def call(**kw):
        args = dict(ok)
        args.update(kw)
        return clip(args["grads"], args["accs"], args["groups"], args["bounds"], args["scale"],
                    args["num_threads"])

    cases = [
        (dict(grads=[g.astype(np.int32)]), TypeError, "float32 or float64"),
        (dict(grads=[torch.ones(2, 4)]), TypeError, "numpy array"),
        (dict(grads=[np.ones((4, 2), np.float32).T]), ValueError, "C-contiguous"),
        (dict(grads=[np.ones(4, np.float32)], accs=None, bounds=None), ValueError, "2-D"),
        (dict(grads=[g, np.ones((3, 4), np.float32)], accs=[a, a], groups=[0, 0]), ValueError,
         "examples"),
        (dict(accs=[np.zeros(5, np.float32)]), ValueError, "shape"),
        (dict(accs=[np.zeros(4, np.float64)]), TypeError, "float64"),
        (dict(accs=[np.zeros(4, np.float32)[::-1]]), ValueError, "C-contiguous"),
        (dict(groups=[1]), ValueError, "groups"),
        (dict(groups=[-1]), ValueError, "groups"),
        (dict(groups=[0, 0]), ValueError, "groups"),
        (dict(bounds=[0.0]), ValueError, "bounds"),
        (dict(bounds=[float("nan")]), ValueError, "bounds"),
        (dict(bounds=[]), ValueError, "bounds"),
        (dict(bounds=None), ValueError, "bounds"),
        (dict(scale=0.0), ValueError, "scale"),
        (dict(scale=float("inf")), ValueError, "scale"),
        (dict(num_threads=0), ValueError, "num_threads"),
        (dict(accs=[a, a]), ValueError, "accs"),
    ]
    for kw, err, match in cases:
        with pytest.raises(err, match=match):
            call(**kw)
    ro = np.zeros(4, np.float32)
    ro.setflags(write=False)
    with pytest.raises(ValueError, match="read-only"):
        call(accs=[ro])
    sq, f = call()
    assert sq.shape == (2, 1) and np.allclose(sq, 4.0) and np.allclose(a, 2 * 0.5)
