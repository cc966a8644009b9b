"""Linear layers keeping their per-example gradients from the norm pass for the clipped sum
(fastclip/layers/keep.py), against tests/reference.py: every case forces the kept path where the
budget allows it (``keep_wins`` patched to True), and counts the layers that kept."""
import pytest
import torch
from torch import nn

import fastclip
from fastclip.layers import keep
from harness import CE, assert_bad_example_dropped, check, mse
from models import AddmmConv1D, Attn  # shared test models

MODES = ("auto", "direct", "ghost")


@pytest.fixture
def kept(monkeypatch):
    """Force the kept path (budget permitting); the list of the kept tensors' shapes formed."""
    monkeypatch.setattr(keep, "keep_wins", lambda T, d, p, method: True)
    monkeypatch.setattr(keep, "KEEP_STEP_BYTES", 64 << 20)   # beyond the 12 MiB default
    formed = []
    orig = keep.form

    def spy(pairs, bias):
        k = orig(pairs, bias)
        formed.append(tuple(k.w.shape))
        return k

    monkeypatch.setattr(keep, "form", spy)
    yield formed
    assert keep.LEDGER.live == 0   # every memo dropped, its bytes given back


class Seq(nn.Module):
    """Two Linear layers over (B, T, d) sequences, d < p then d > p (both orientations)."""

    def __init__(self, d=5, h=7, o=3, bias=True):
        super().__init__()
        self.a = nn.Linear(d, h, bias=bias)
        self.b = nn.Linear(h, o)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x))).sum(1)


class Reused(nn.Module):
    """One Linear called on two sequences of different lengths, then a 2-D call (T = 1)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 6)
        self.out = nn.Linear(6, 3)

    def forward(self, x):
        h = torch.tanh(self.a(x)).sum(1) + torch.tanh(self.a(x[:, :2] * 2)).mean(1)
        return self.out(torch.tanh(self.a(torch.cat([x[:, 0, :2], h[:, :2]], 1)[:, :4])) + h)


class Tied(nn.Module):
    """Two Linear modules sharing their weight (not their bias), on sequences."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(5, 5), nn.Linear(5, 5)
        self.b.weight = self.a.weight
        self.out = nn.Linear(5, 3)

    def forward(self, x):
        return self.out(torch.tanh(self.b(torch.tanh(self.a(x)))).sum(1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("B", [0, 1, 4])
def test_kept_matches_reference(kept, dtype, B):
    torch.manual_seed(0)
    m = Seq().to(dtype)
    x = torch.randn(B, 6, 5, dtype=dtype)
    check(m, x, torch.randint(0, 3, (B,)), modes=MODES, C=0.5, dtype=dtype)
    # auto and direct keep both layers (norms-only and clipping calls); ghost never keeps.
    assert sorted(set(kept)) == sorted({(B, 7, 5), (B, 3, 7)})


def test_frozen_bias_and_frozen_weight(kept):
    torch.manual_seed(1)
    m = Seq(bias=True).double()
    m.a.bias.requires_grad_(False)
    m.b.weight.requires_grad_(False)
    check(m, torch.randn(3, 4, 5, dtype=torch.float64), torch.randint(0, 3, (3,)), modes=MODES)
    assert set(kept) == {(3, 7, 5)}   # the frozen-weight layer has nothing to keep


def test_weight_used_several_times(kept):
    torch.manual_seed(2)
    check(Reused().double(), torch.randn(4, 5, 4, dtype=torch.float64),
          torch.randint(0, 3, (4,)), modes=MODES, C=0.3)
    assert (4, 6, 4) in kept   # a: 5 + 2 + 1 positions stacked


def test_tied_weights(kept):
    torch.manual_seed(3)
    check(Tied().double(), torch.randn(4, 3, 5, dtype=torch.float64), torch.randint(0, 3, (4,)),
          modes=MODES, C=0.4)
    assert kept.count((4, 5, 5)) >= 2


def test_per_layer_clipping(kept):
    torch.manual_seed(4)
    m = Seq().double()
    check(m, torch.randn(5, 6, 5, dtype=torch.float64), torch.randint(0, 3, (5,)),
          modes=MODES, clipping="per_layer", C=[0.2, 0.3])
    assert kept


def test_budget_switches_mid_model(kept, monkeypatch):
    """Room for one layer's gradients: under flat clipping the first layer norm'd (the last
    in the forward) keeps, the other falls back to the norm + GEMM; under per-layer clipping
    each layer's memo is dropped when it is clipped, so both keep. Exact either way."""
    torch.manual_seed(5)
    m = nn.Sequential(nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 6)).double()
    B, T = 3, 4
    monkeypatch.setattr(keep, "KEEP_STEP_BYTES", B * 6 * 6 * 8 + B * 6 * 8)
    x = torch.randn(B, T, 6, dtype=torch.float64)
    y = torch.randn(B, T, 6, dtype=torch.float64)
    check(m, x, y, loss=mse, modes=("direct",), C=0.5)
    # Norms-only and clipping calls: one layer kept in each.
    assert kept == [(B, 6, 6)] * 2
    kept.clear()
    check(m, x, y, loss=mse, modes=("direct",), C=[0.5, 0.5], clipping="per_layer")
    assert kept.count((B, 6, 6)) >= 3   # norms-only keeps one, per-layer clipping keeps both


def test_budget_zero_keeps_nothing(kept, monkeypatch):
    monkeypatch.setattr(keep, "KEEP_STEP_BYTES", 0)
    m = Seq().double()
    check(m, torch.randn(2, 3, 5, dtype=torch.float64), torch.randint(0, 3, (2,)), modes=MODES)
    assert kept == []


def test_non_finite_example_zeroed(kept):
    """An example whose gradient is not finite contributes nothing (the memo is dropped)."""
    torch.manual_seed(6)
    m = Seq().double()
    x = torch.randn(3, 4, 5, dtype=torch.float64)
    x[1, 0, 0] = float("inf")
    y = torch.randint(0, 3, (3,))
    assert_bad_example_dropped(m, x, y, 1, max_grad_norm=1.0, mode="direct")


def test_cost_model():
    assert not keep.keep_wins(1, 512, 512, "auto")       # T = 1: the product norm
    assert not keep.keep_wins(128, 256, 768, "ghost")    # ghost mode never keeps
    assert keep.keep_wins(128, 256, 768, "auto")         # a transformer block's projection
    assert keep.keep_wins(128, 1024, 256, "auto")
    assert not keep.keep_wins(4, 256, 256, "auto")       # short sequences: ghost is nearly free


# -- the attention rule's projections and the operation rule's linear calls --------------------


@pytest.mark.parametrize("opts", [{}, {"bias": False}, {"add_bias_kv": True},
                                  {"kdim": 6, "vdim": 5}])
@pytest.mark.parametrize("B", [0, 1, 3])
def test_attention_projections_kept(kept, opts, B):
    torch.manual_seed(7)
    m = Attn("kdim" not in opts, **opts).double()
    check(m, torch.randn(B, 5, 8, dtype=torch.float64), torch.randint(0, 3, (B,)), modes=MODES,
          C=0.3)
    assert ((B, 24, 8) if "kdim" not in opts else (B, 8, 6)) in kept   # the attention rule's


def test_attention_float32_per_layer(kept):
    torch.manual_seed(8)
    m = Attn(True)
    check(m, torch.randn(4, 5, 8), torch.randint(0, 3, (4,)), modes=MODES, dtype=torch.float32,
          clipping="per_layer", C=0.2)
    assert (4, 24, 8) in kept


class GPTish(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = AddmmConv1D(6, 9)
        self.proj = AddmmConv1D(9, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        h = self.proj(torch.tanh(self.fc(x)))
        h = self.proj(torch.tanh(self.fc(h)))
        return self.head(h.mean(1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("B", [0, 1, 3])
def test_conv1d_ops_rule_kept(kept, dtype, B):
    torch.manual_seed(9)
    m = GPTish().to(dtype)
    check(m, torch.randn(B, 4, 6, dtype=dtype), torch.randint(0, 3, (B,)), modes=MODES, C=0.3,
          dtype=dtype)
    # Conv1D weights are (in, out): kept in their own layout, (B, 6, 9) and (B, 9, 6)
    assert {(B, 9, 6)} <= set(kept)
