"""The single-backward engine and the public contract against tests/reference.py."""
import copy

import pytest
import torch
from torch import nn

import fastclip
import reference as R
from conftest import DTYPES
from harness import CE, MODES, assert_close, mse
from models import CalledTwice  # shared test models


def mlp(d, h, k, bias=True, dtype=torch.float32):
    return nn.Sequential(nn.Linear(d, h, bias=bias), nn.ReLU(inplace=True),
                         nn.Linear(h, k, bias=bias)).to(dtype)


class SeqModel(nn.Module):
    """Linear layers over (B, T, d) sequences, pooled at the end."""

    def __init__(self, d, h, k, bias):
        super().__init__()
        self.a = nn.Linear(d, h, bias=bias)
        self.b = nn.Linear(h, k, bias=bias)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x))).mean(1)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B", [0, 1, 2, 17])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("mode", MODES)
def test_mlp_norms(dtype, B, bias, mode):
    m = mlp(6, 9, 4, bias, dtype)
    x, y = torch.randn(B, 6, dtype=dtype), torch.randint(0, 4, (B,))
    got = fastclip.per_sample_grad_norms(m, CE, x, y, mode=mode)
    assert got.shape == (B,)
    if B:
        assert_close(got, R.norms(m, CE, x, y), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T", [1, 3, 40])
@pytest.mark.parametrize("shape", [(5, 7, 3), (33, 2, 65), (3, 80, 2)])
@pytest.mark.parametrize("mode", MODES)
def test_sequence_norms(dtype, T, shape, mode):
    d, h, k = shape
    m = SeqModel(d, h, k, bias=True).to(dtype)
    x, y = torch.randn(4, T, d, dtype=dtype), torch.randint(0, k, (4,))
    assert_close(fastclip.per_sample_grad_norms(m, CE, x, y, mode=mode), R.norms(m, CE, x, y), dtype)


def test_four_d_inputs():
    m = nn.Sequential(nn.Linear(5, 3), nn.Flatten(1), nn.Linear(3 * 4 * 2, 2)).double()
    x, y = torch.randn(3, 4, 2, 5, dtype=torch.float64), torch.randint(0, 2, (3,))
    assert_close(fastclip.per_sample_grad_norms(m, CE, x, y), R.norms(m, CE, x, y), torch.float64)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B", [0, 1, 9])
@pytest.mark.parametrize("C", [0.05, 1e6])
def test_clipped_grad(dtype, B, C):
    m = mlp(5, 8, 3, True, dtype)
    x, y = torch.randn(B, 5, dtype=dtype), torch.randint(0, 3, (B,))
    fastclip.clipped_grad(m, CE, x, y, max_grad_norm=C)
    for n, p in m.named_parameters():
        assert p.grad is not None and p.grad.dtype == dtype
        if B:
            assert_close(p.grad, R.clipped_sum(m, CE, x, y, C)[n], dtype)
        else:
            assert torch.count_nonzero(p.grad) == 0


def test_clipped_grad_bounds_each_example():
    """Sensitivity: removing one example changes the clipped sum by at most C."""
    m = mlp(5, 8, 3, True, torch.float64)
    x, y = torch.randn(6, 5, dtype=torch.float64) * 10, torch.randint(0, 3, (6,))
    C = 0.1

    def flat():
        return torch.cat([p.grad.flatten() for p in m.parameters()])
    fastclip.clipped_grad(m, CE, x, y, max_grad_norm=C)
    full = flat()
    fastclip.clipped_grad(m, CE, x[1:], y[1:], max_grad_norm=C)
    assert (full - flat()).norm() <= C * (1 + 1e-9)
    assert (full - flat()).norm() >= C * (1 - 1e-9)  # the example's norm is > C: clipped to exactly C


def test_frozen_parameters_are_left_out():
    m = mlp(5, 8, 3, True, torch.float64)
    m[0].weight.requires_grad_(False)
    x, y = torch.randn(4, 5, dtype=torch.float64), torch.randint(0, 3, (4,))
    assert_close(fastclip.per_sample_grad_norms(m, CE, x, y), R.norms(m, CE, x, y), torch.float64)
    fastclip.clipped_grad(m, CE, x, y, max_grad_norm=0.5)
    assert m[0].weight.grad is None
    ref = R.clipped_sum(m, CE, x, y, 0.5)
    assert_close(m[0].bias.grad, ref["0.bias"], torch.float64)



class SharedWeight(nn.Module):
    """Two Linear layers sharing one weight but not the bias, one of them on a sequence."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(6, 6)
        self.b = nn.Linear(6, 6)
        self.b.weight = self.a.weight
        self.out = nn.Linear(6, 3, bias=False)

    def forward(self, x):
        h = torch.tanh(self.a(x))                       # (B, 6)
        s = self.b(torch.stack([h, h * 2, -h], 1))       # (B, 3, 6)
        return self.out(s.sum(1))


class SharedAcrossRules(nn.Module):
    """A weight shared between a Linear (native rule) and a custom leaf (generic rule)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(6, 6)
        self.custom = ScaleShift(6)
        self.custom.w = self.a.weight

    def forward(self, x):
        return self.custom(torch.tanh(self.a(x)))[:, :3]


class ScaleShift(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.w = nn.Parameter(torch.randn(d, d) * 0.3)

    def forward(self, x):
        return torch.sin(x @ self.w)


@pytest.mark.parametrize("model_cls", [CalledTwice, SharedWeight, SharedAcrossRules])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_reused_weights_are_exact(model_cls, mode, dtype):
    m = model_cls().to(dtype)
    x, y = torch.randn(7, 6, dtype=dtype), torch.randint(0, 3, (7,))
    ref = R.norms(m, CE, x, y)
    assert_close(fastclip.per_sample_grad_norms(m, CE, x, y, mode=mode), ref, dtype)
    # Summing per-use norms would be wrong: the check above must be sensitive to that.
    fastclip.clipped_grad(m, CE, x, y, max_grad_norm=0.3, mode=mode)
    refc = R.clipped_sum(m, CE, x, y, 0.3)
    for n, p in m.named_parameters():
        assert_close(p.grad, refc[n], dtype)


class Custom(nn.Module):
    """A leaf module with no native rule, a tuple output and a broadcast input."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.randn(4))
        self.shift = nn.Parameter(torch.randn(4))

    def forward(self, x, offset):
        return torch.tanh(x * self.scale + self.shift + offset), x.sum(-1)


class WithCustom(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 4)
        self.custom = Custom()
        self.ln = nn.LayerNorm(4)
        self.register_buffer("offset", torch.randn(1, 4))

    def forward(self, x):
        h, s = self.custom(self.lin(x), self.offset)
        return self.ln(h) * s.unsqueeze(-1)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B", [1, 5])
def test_generic_fallback(dtype, B):
    m = WithCustom().to(dtype)
    x, y = torch.randn(B, 3, dtype=dtype), torch.randn(B, 4, dtype=dtype)
    assert_close(fastclip.per_sample_grad_norms(m, mse, x, y), R.norms(m, mse, x, y), dtype)
    fastclip.clipped_grad(m, mse, x, y, max_grad_norm=0.2)
    ref = R.clipped_sum(m, mse, x, y, 0.2)
    for n, p in m.named_parameters():
        assert_close(p.grad, ref[n], dtype)


def test_linear_subclass_with_own_forward_uses_generic_rule():
    class Doubled(nn.Linear):
        def forward(self, x):
            return 2 * (x @ self.weight.t()) + self.bias

    m = nn.Sequential(Doubled(4, 3)).double()
    x, y = torch.randn(5, 4, dtype=torch.float64), torch.randint(0, 3, (5,))
    assert_close(fastclip.per_sample_grad_norms(m, CE, x, y), R.norms(m, CE, x, y), torch.float64)
    # a plain subclass keeps the native rule
    from fastclip.engine import Engine
    from fastclip.layers.linear import LinearRule

    class Plain(nn.Linear):
        pass
    e = Engine(nn.Sequential(Plain(2, 2)))
    assert [r for _, r in e.covered()] == ["LinearRule", "LinearRule"]
    e.detach()
    assert isinstance(fastclip.layers.rule_for(Plain(2, 2)), LinearRule)


def test_model_left_as_found():
    m = mlp(4, 5, 3)
    x, y = torch.randn(3, 4), torch.randint(0, 3, (3,))
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    fastclip.per_sample_grad_norms(m, CE, x, y)
    for mod in m.modules():
        assert not mod._forward_hooks and not mod._forward_pre_hooks
    for n, p in m.named_parameters():
        assert p.grad is None and isinstance(p, nn.Parameter)
        assert torch.equal(p, before[n])
        assert not p._backward_hooks
    # the plain model trains normally afterwards
    CE(m(x), y).mean().backward()
    assert all(p.grad is not None for p in m.parameters())


def test_batchnorm_is_refused_with_path_and_fix():
    m = nn.Sequential(nn.Linear(4, 4), nn.Sequential(nn.BatchNorm1d(4)), nn.Linear(4, 2))
    with pytest.raises(ValueError, match=r"'1\.0'.*BatchNorm1d.*GroupNorm"):
        fastclip.per_sample_grad_norms(m, CE, torch.randn(3, 4), torch.zeros(3, dtype=torch.long))


def test_parameter_outside_leaf_module_is_exact():
    class Outer(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 3)
            self.cls = nn.Parameter(torch.randn(3))

        def forward(self, x):
            return self.lin(x) + self.cls

    m, x, y = Outer().double(), torch.randn(2, 3, dtype=torch.float64), torch.zeros(2, dtype=torch.long)
    assert_close(fastclip.per_sample_grad_norms(m, CE, x, y), R.norms(m, CE, x, y), torch.float64)


def test_parameter_outside_leaf_module_reaching_the_loss_alone_is_refused():
    class Outer(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 3)
            self.cls = nn.Parameter(torch.randn(3))

        def forward(self, x):
            return self.cls.expand(x.shape[0], 3)  # never combined with the batch's data

    with pytest.raises(RuntimeError, match="cls"):
        fastclip.per_sample_grad_norms(Outer(), CE, torch.randn(2, 3), torch.zeros(2, dtype=torch.long))


def test_weight_used_by_a_functional_call_is_refused():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 3)

        def forward(self, x):
            return torch.nn.functional.linear(self.lin(x), self.lin.weight)

    m = Tied()
    with pytest.raises(RuntimeError, match="lin.weight"):
        fastclip.per_sample_grad_norms(m, CE, torch.randn(2, 3), torch.zeros(2, dtype=torch.long))
    assert not m.lin._forward_hooks


def test_bad_loss_shape():
    with pytest.raises(ValueError, match=r"per-example losses of shape \(3,\)"):
        fastclip.per_sample_grad_norms(mlp(2, 2, 2), lambda o, y: CE(o, y).mean(), torch.randn(3, 2),
                                       torch.zeros(3, dtype=torch.long))


def test_bad_arguments():
    m = mlp(2, 2, 2)
    x, y = torch.randn(3, 2), torch.zeros(3, dtype=torch.long)
    with pytest.raises(ValueError, match="mode"):
        fastclip.per_sample_grad_norms(m, CE, x, y, mode="fast")
    with pytest.raises(ValueError, match="nanobatch_size"):
        fastclip.per_sample_grad_norms(m, CE, x, y, mode="nanobatch", nanobatch_size=0)
    with pytest.raises(ValueError, match="num_threads"):
        fastclip.per_sample_grad_norms(m, CE, x, y, mode="nanobatch", num_threads=0)
    with pytest.raises(ValueError, match="max_grad_norm"):
        fastclip.clipped_grad(m, CE, x, y, max_grad_norm=0)
    with pytest.raises(ValueError, match="clipping"):
        fastclip.clipped_grad(m, CE, x, y, max_grad_norm=1, clipping="nope")
    with pytest.raises(TypeError, match="nn.Module"):
        fastclip.per_sample_grad_norms(lambda x: x, CE, x, y)


def test_no_grad_forward_is_not_recorded():
    m = mlp(3, 4, 2, True, torch.float64)
    opt = torch.optim.SGD(m.parameters(), lr=1.0)
    m, opt, _ = fastclip.make_private(m, opt, None, noise_multiplier=0.0, max_grad_norm=1.0)
    with torch.no_grad():
        m(torch.randn(5, 3, dtype=torch.float64))
    x, y = torch.randn(4, 3, dtype=torch.float64), torch.randint(0, 2, (4,))
    CE(m(x), y).sum().backward()
    assert opt.engine.examples == 4


# ---- make_private ------------------------------------------------------------------------------

def _step(m, opt, x, y, reduction):
    opt.zero_grad()
    loss = CE(m(x), y)
    (loss.mean() if reduction == "mean" else loss.sum()).backward()
    opt.step()


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", MODES)
def test_make_private_update_is_clipped_mean(reduction, dtype, mode):
    m = mlp(5, 8, 3, True, dtype)
    m0 = copy.deepcopy(m)
    x, y = torch.randn(12, 5, dtype=dtype) * 3, torch.randint(0, 3, (12,))
    opt = torch.optim.SGD(m.parameters(), lr=1.0)
    m, opt, _ = fastclip.make_private(m, opt, None, noise_multiplier=0.0, max_grad_norm=0.4,
                                      mode=mode, loss_reduction=reduction)
    _step(m, opt, x, y, reduction)
    ref = R.clipped_sum(m0, CE, x, y, 0.4)
    scale = 12 if reduction == "mean" else 1
    for (n, p), p0 in zip(m.named_parameters(), m0.parameters()):
        assert_close(p - p0, -ref[n] / scale, dtype)


def test_accumulation_over_two_backward_calls():
    m = mlp(5, 8, 3, True, torch.float64)
    m0 = copy.deepcopy(m)
    x, y = torch.randn(10, 5, dtype=torch.float64) * 3, torch.randint(0, 3, (10,))
    opt = torch.optim.SGD(m.parameters(), lr=1.0)
    m, opt, _ = fastclip.make_private(m, opt, None, noise_multiplier=0.0, max_grad_norm=0.4)
    opt.zero_grad()
    CE(m(x[:4]), y[:4]).mean().backward()
    CE(m(x[4:]), y[4:]).mean().backward()
    assert opt.engine.examples == 10
    opt.step()
    ref = R.clipped_sum(m0, CE, x, y, 0.4)
    for (n, p), p0 in zip(m.named_parameters(), m0.parameters()):
        assert_close(p - p0, -ref[n] / 10, torch.float64)


def test_noise_std_and_empty_step():
    m = nn.Sequential(nn.Linear(200, 100))
    opt = torch.optim.SGD(m.parameters(), lr=1.0)
    w0 = m[0].weight.detach().clone()
    gen = torch.Generator().manual_seed(1)
    m, opt, _ = fastclip.make_private(m, opt, None, noise_multiplier=2.0, max_grad_norm=0.5,
                                      loss_reduction="sum", generator=gen)
    opt.zero_grad()
    x = torch.randn(0, 200)
    CE(m(x), torch.zeros(0, dtype=torch.long)).sum().backward()
    opt.step()
    delta = m[0].weight.detach() - w0
    # 20000 samples of N(0, (2 * 0.5)^2): the sample std is within 3% with overwhelming probability
    assert abs(delta.std().item() - 1.0) < 0.03
    assert abs(delta.mean().item()) < 0.03


def test_make_private_with_poisson_loader():
    from torch.utils.data import DataLoader, TensorDataset
    ds = TensorDataset(torch.randn(40, 5), torch.randint(0, 3, (40,)))
    m = mlp(5, 4, 3)
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    m, opt, loader = fastclip.make_private(m, opt, DataLoader(ds, batch_size=8),
                                           noise_multiplier=1.0, max_grad_norm=1.0)
    assert len(loader) == 5 and opt.expected_batch_size == pytest.approx(8)
    sizes = []
    for _ in range(20):
        for x, y in loader:
            sizes.append(len(x))
            assert x.shape[1:] == (5,)
            _step(m, opt, x, y, "mean")
    assert 0 in sizes or min(sizes) < 8 < max(sizes)
    assert abs(sum(sizes) / len(sizes) - 8) < 1.5
    assert all(torch.isfinite(p).all() for p in m.parameters())


def test_poisson_loader_empty_batches():
    from torch.utils.data import DataLoader, TensorDataset
    from fastclip.data import poisson_loader
    ds = TensorDataset(torch.randn(3, 2, 4), torch.arange(3))
    loader = poisson_loader(DataLoader(ds, batch_size=1), generator=torch.Generator().manual_seed(0))
    batches = [b for _ in range(10) for b in loader]
    empty = [b for b in batches if len(b[0]) == 0]
    assert empty, "with q = 1/3 and 30 batches some are empty"
    assert empty[0][0].shape == (0, 2, 4) and empty[0][1].shape == (0,)


def test_optimizer_wrapper_behaves_like_an_optimizer():
    m = mlp(3, 4, 2)
    base = torch.optim.Adam(m.parameters(), lr=1e-2)
    m, opt, _ = fastclip.make_private(m, base, None, noise_multiplier=0.5, max_grad_norm=1.0)
    assert isinstance(opt, torch.optim.Optimizer)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    _step(m, opt, torch.randn(4, 3), torch.randint(0, 2, (4,)), "mean")
    sched.step()
    assert base.param_groups[0]["lr"] == pytest.approx(5e-3)
    sd = opt.state_dict()
    assert len(sd["state"]) == 4
    with pytest.raises(ValueError, match="noise_multiplier"):
        fastclip.make_private(mlp(2, 2, 2), torch.optim.SGD(mlp(2, 2, 2).parameters(), lr=1), None,
                              noise_multiplier=-1.0, max_grad_norm=1.0)


try:
    from hypothesis import given, settings, strategies as st
except ImportError:  # hypothesis is in the test extra; the parametrised tests above still run
    given = None

if given is not None:
    @settings(max_examples=25, deadline=None)
    @given(B=st.integers(0, 6), T=st.integers(1, 9), d=st.integers(1, 12), h=st.integers(1, 12),
           k=st.integers(1, 5), bias=st.booleans(), mode=st.sampled_from(MODES),
           seq=st.booleans())
    def test_random_shapes(B, T, d, h, k, bias, mode, seq):
        m = SeqModel(d, h, k, bias).double() if seq else mlp(d, h, k, bias, torch.float64)
        x = torch.randn((B, T, d) if seq else (B, d), dtype=torch.float64)
        y = torch.randint(0, k, (B,))
        got = fastclip.per_sample_grad_norms(m, CE, x, y, mode=mode)
        assert got.shape == (B,)
        if B:
            assert_close(got, R.norms(m, CE, x, y), torch.float64)


def test_epsilon_follows_steps_and_matches_dp_accounting():
    import dp_accounting
    from dp_accounting import rdp
    from torch.utils.data import DataLoader, TensorDataset
    ds = TensorDataset(torch.randn(50, 3), torch.randint(0, 2, (50,)))
    m = mlp(3, 4, 2)
    m, opt, loader = fastclip.make_private(m, torch.optim.SGD(m.parameters(), lr=0.1),
                                           DataLoader(ds, batch_size=5), noise_multiplier=1.1,
                                           max_grad_norm=1.0)
    assert opt.epsilon(1e-5) == 0.0
    for x, y in loader:
        _step(m, opt, x, y, "mean")
    acc = rdp.RdpAccountant()
    acc.compose(dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(0.1, dp_accounting.GaussianDpEvent(1.1)), 10))
    assert opt.epsilon(1e-5) == pytest.approx(acc.get_epsilon(1e-5))
    m2 = mlp(3, 4, 2)
    _, opt2, _ = fastclip.make_private(m2, torch.optim.SGD(m2.parameters(), lr=0.1), None,
                                       noise_multiplier=1.1, max_grad_norm=1.0)
    with pytest.raises(ValueError, match="sampling rate"):
        opt2.epsilon(1e-5)


class Broadcast(nn.Module):
    """A leaf fed an input shared by the whole batch (shape (1, ...)), the position-id pattern."""

    def __init__(self):
        super().__init__()
        self.pos = nn.Linear(3, 4)
        self.inp = nn.Linear(4, 4)
        self.out = nn.Linear(4, 2)
        self.register_buffer("code", torch.randn(1, 5, 3))

    def forward(self, x):                       # x: (B, 5, 4)
        return self.out(torch.tanh(self.inp(x) + self.pos(self.code))).mean(1)


@pytest.mark.parametrize("B", [1, 2, 6])
def test_inputs_broadcast_over_the_batch_are_exact(B):
    m = Broadcast().double()
    x, y = torch.randn(B, 5, 4, dtype=torch.float64), torch.randint(0, 2, (B,))
    assert_close(fastclip.per_sample_grad_norms(m, CE, x, y), R.norms(m, CE, x, y), torch.float64)
    fastclip.clipped_grad(m, CE, x, y, max_grad_norm=0.1)
    ref = R.clipped_sum(m, CE, x, y, 0.1)
    for n, p in m.named_parameters():
        assert_close(p.grad, ref[n], torch.float64)


def test_params_of_and_use_gate():
    """The public accessors fsdp.py / optim.py use: params_of(module) and use_gate(gate)."""
    from fastclip.engine import Engine
    from fastclip.passes import Gate
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    eng = Engine(model, max_grad_norm=1.0, loss_reduction="sum")
    assert [n for n, _ in eng.params_of(model[0])] == ["weight", "bias"]
    qualified = {id(p): n for n, p in eng.covered_params()}
    assert [qualified[id(p)] for _, p in eng.params_of(model[0])] == ["0.weight", "0.bias"]
    assert eng.params_of(model[1]) == ()
    assert set(eng.rules) == {model[0], model[2]}

    class Counting(Gate):
        calls = 0

        def check(self, *a, **k):
            Counting.calls += 1
            return super().check(*a, **k)

    with pytest.raises(TypeError, match="Gate"):
        eng.use_gate(object())
    gate = Counting()
    eng.use_gate(gate)
    assert eng.gate is gate
    model(torch.randn(5, 3)).sum().backward()
    assert Counting.calls == 1 and model[0].weight.grad is not None
    eng.detach()


def test_a_modules_activations_are_dropped_once_its_sums_are_formed(monkeypatch):
    """Flat clipping holds every layer's input and output gradient until the norms are known;
    after that each module's are dropped as soon as its clipped sums are formed, so the sums of
    the next modules do not stack on all the activations (the step's peak memory)."""
    from fastclip.layers.linear import LinearRule

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 6), nn.Tanh(), nn.Linear(6, 3))
    seen = []    # per clipped call: how many other modules' uses still hold their tensors
    calls = []
    orig = LinearRule.clipped

    def spy(self, module, uses, c, pool):
        calls.append(uses)
        seen.append(sum(u.inputs is not None or u.grads is not None
                        for us in calls[:-1] for u in us))
        return orig(self, module, uses, c, pool)

    monkeypatch.setattr(LinearRule, "clipped", spy)
    engine = fastclip.Engine(model, max_grad_norm=1.0, audit=False)
    CE(model(torch.randn(4, 5)), torch.randint(0, 3, (4,))).mean().backward()
    assert len(calls) == 3 and seen == [0, 0, 0]
    assert all(p.grad is not None for p in model.parameters())
    engine.detach()
