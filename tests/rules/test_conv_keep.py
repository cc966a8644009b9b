"""Convolutions reduced at record (fastclip/layers/conv.py ``ConvRule.on_record``): where the
direct method runs and the step ledger allows, a use's per-example weight / bias gradients and
norms are formed in the backward and its input and output gradient dropped. Against
tests/reference.py in every mode, flat and per-layer, a conv used twice (all uses reduced, or
one reduced and one not), B 0/1, float32/64, a non-finite example, and the ledger given back."""
import pytest
import torch
from torch import nn

import fastclip
from fastclip.layers import conv, keep
from harness import CE, assert_bad_example_dropped, check

MODES = ("auto", "direct", "ghost")


@pytest.fixture
def eager(monkeypatch):
    """Room in the ledger for every layer; the list of the shapes of the gradients reduced at
    record (per use)."""
    monkeypatch.setattr(keep, "KEEP_STEP_BYTES", 1 << 30)
    formed = []
    orig = conv.ConvRule.on_record

    def spy(self, use):
        orig(self, use)
        if isinstance(use.memo, conv._Eager):
            assert use.inputs is None and use.grads is None   # dropped in the backward
            formed.append(tuple(use.memo.kept.shape))

    monkeypatch.setattr(conv.ConvRule, "on_record", spy)
    yield formed
    assert keep.LEDGER.live == 0   # every reduced use dropped, its bytes given back


class Net(nn.Module):
    def __init__(self, groups=1, bias=True):
        super().__init__()
        self.c1 = nn.Conv2d(2, 4, 3, padding=1, bias=bias)
        self.c2 = nn.Conv2d(4, 4, 3, padding=1, groups=groups)
        self.head = nn.Linear(4 * 6 * 6, 3)

    def forward(self, x):
        h = torch.tanh(self.c1(x))
        return self.head(torch.tanh(self.c2(h)).flatten(1))


class Twice(nn.Module):
    """One conv called on two inputs of different sizes (its gradient is the sum over uses)."""

    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(2, 3, 3, padding=1)
        self.head = nn.Linear(3, 3)

    def forward(self, x):
        a = torch.tanh(self.c(x)).mean((2, 3))
        b = torch.tanh(self.c(x[:, :, :3, :3] * 2)).mean((2, 3))
        return self.head(a + b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("B", [0, 1, 4])
def test_reduced_matches_reference(eager, dtype, B):
    torch.manual_seed(0)
    m = Net().to(dtype)
    check(m, torch.randn(B, 2, 6, 6, dtype=dtype), torch.randint(0, 3, (B,)), modes=MODES,
          C=0.3, dtype=dtype)
    assert eager   # "direct" reduces both convs


@pytest.mark.parametrize("groups,bias", [(2, True), (1, False)])
def test_groups_and_no_bias(eager, groups, bias):
    torch.manual_seed(1)
    m = Net(groups=groups, bias=bias).double()
    check(m, torch.randn(3, 2, 6, 6, dtype=torch.float64), torch.randint(0, 3, (3,)),
          modes=MODES, C=0.3)
    assert (3, groups, 4 // groups * 9, 4 // groups) in eager


def test_used_twice(eager):
    torch.manual_seed(2)
    check(Twice().double(), torch.randn(4, 2, 5, 5, dtype=torch.float64),
          torch.randint(0, 3, (4,)), modes=MODES, C=0.2)
    assert eager.count((4, 1, 18, 3)) >= 2


def test_used_twice_one_reduced(eager, monkeypatch):
    """The budget has room for one use: the other is formed at finalize from its tensors."""
    torch.manual_seed(3)
    B = 4
    per_use = max(0, (B * 3 * 18 + B * 3 - B * 3 * 3 * 3) * 8)   # the smaller use's charge
    monkeypatch.setattr(keep, "KEEP_STEP_BYTES", per_use - 8)
    check(Twice().double(), torch.randn(B, 2, 5, 5, dtype=torch.float64),
          torch.randint(0, 3, (B,)), modes=("direct",), C=0.2)
    assert eager and set(eager) == {(B, 1, 18, 3)}   # the 5x5 use (charged nothing) only
    n = len(eager)
    monkeypatch.setattr(keep, "KEEP_STEP_BYTES", per_use)
    check(Twice().double(), torch.randn(B, 2, 5, 5, dtype=torch.float64),
          torch.randint(0, 3, (B,)), modes=("direct",), C=0.2)
    assert len(eager) == 3 * n   # both uses now


def test_per_layer(eager):
    torch.manual_seed(4)
    check(Net().double(), torch.randn(3, 2, 6, 6, dtype=torch.float64), torch.randint(0, 3, (3,)),
          modes=MODES, clipping="per_layer", C=[0.2, 0.3, 0.4])
    assert eager


def test_non_finite_example_zeroed(eager):
    """An example whose gradient is not finite contributes nothing (the reduced rows zeroed)."""
    torch.manual_seed(6)
    m = Net().double()
    x = torch.randn(3, 2, 6, 6, dtype=torch.float64)
    x[1, 0, 0, 0] = float("inf")
    y = torch.randint(0, 3, (3,))
    assert_bad_example_dropped(m, x, y, 1, max_grad_norm=1.0, mode="direct")
    assert eager


def test_budget_zero_reduces_only_what_frees_memory(monkeypatch):
    """With no step budget, a use is reduced only where its kept gradients are no larger than
    the output gradient dropped (B O K <= B O P)."""
    monkeypatch.setattr(keep, "KEEP_STEP_BYTES", 0)
    m = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.Flatten(), nn.Linear(4 * 16 * 16, 2))
    seen = []
    orig = conv.ConvRule.on_record

    def spy(self, use):
        orig(self, use)
        seen.append(isinstance(use.memo, conv._Eager))

    monkeypatch.setattr(conv.ConvRule, "on_record", spy)
    x, y = torch.randn(3, 1, 16, 16), torch.randint(0, 2, (3,))
    fastclip.clipped_grad(m, CE, x, y, max_grad_norm=1.0, mode="direct")
    assert seen == [True] and keep.LEDGER.live == 0


@pytest.mark.parametrize("channels_last", [False, True])
def test_grads_take_the_parameters_layout(eager, channels_last):
    """The kept sums come out of ``c @ (B, K, O)`` transposed; p.grad must still have p's own
    strides, as autograd leaves it (the optimizer and the one-call native noise read it)."""
    torch.manual_seed(7)
    m = Net()
    if channels_last:
        m = m.to(memory_format=torch.channels_last)
    model, opt, _ = fastclip.make_private(m, torch.optim.SGD(m.parameters(), lr=0.1), None,
                                          noise_multiplier=0.0, max_grad_norm=1.0, mode="direct",
                                          poisson_sampling=False, audit=False)
    opt.zero_grad()
    CE(model(torch.randn(3, 2, 6, 6)), torch.randint(0, 3, (3,))).mean().backward()
    assert eager
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.stride() == p.stride(), (name, p.grad.stride())
