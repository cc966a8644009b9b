"""The rules' finalize kernels: one call per module and step, and a parameter shared between
modules (of one rule or of two) exact through the parts + cross terms, against tests/reference.py."""
import pytest
import torch
from torch import nn

import fastclip
from fastclip.layers import Use
from fastclip.layers.conv import ConvRule
from fastclip.layers.linear import LinearRule
from harness import CE, check, mse


class TwoEmbeddings(nn.Module):
    """Two Embedding modules sharing one table (an encoder's and a decoder's)."""

    def __init__(self, pad=None):
        super().__init__()
        self.a = nn.Embedding(11, 4, padding_idx=pad)
        self.b = nn.Embedding(11, 4)
        self.b.weight = self.a.weight
        self.out = nn.Linear(4, 3)

    def forward(self, ids):
        return self.out(torch.tanh(self.a(ids[:, :3])).sum(1) + self.b(ids[:, 2:]).mean(1))


class TwoConvs(nn.Module):
    """Two Conv2d modules sharing their weight and bias, one of them called twice."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(2, 2, 3, padding=1)
        self.b = nn.Conv2d(2, 2, 3, padding=1)
        self.b.weight, self.b.bias = self.a.weight, self.a.bias
        self.out = nn.Linear(2, 3)

    def forward(self, x):
        h = self.b(torch.tanh(self.a(x)))
        return self.out(torch.tanh(self.b(h)).mean((2, 3)))


class TwoNorms(nn.Module):
    """Two LayerNorm modules sharing their affine weight but not their bias."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(5, 5)
        self.n1, self.n2 = nn.LayerNorm(5), nn.LayerNorm(5)
        self.n2.weight = self.n1.weight
        self.out = nn.Linear(5, 3)

    def forward(self, x):
        return self.out(self.n2(torch.tanh(self.lin(self.n1(x)))))


class BiasShared(nn.Module):
    """Two Linear modules sharing only their bias."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)
        self.b.bias = self.a.bias
        self.out = nn.Linear(4, 3, bias=False)

    def forward(self, x):
        return self.out(self.b(torch.tanh(self.a(x))))


@pytest.mark.parametrize("pad", [None, 0])
def test_table_shared_by_two_embeddings(pad):
    ids = torch.randint(0, 11, (5, 6))
    ids[:, 0] = 0
    check(TwoEmbeddings(pad).double(), ids, torch.randint(0, 3, (5,)))


def test_conv_weight_and_bias_shared_by_two_convs():
    check(TwoConvs().double(), torch.randn(4, 2, 5, 5, dtype=torch.float64),
          torch.randint(0, 3, (4,)))


def test_norm_weight_shared_by_two_layer_norms():
    check(TwoNorms().double(), torch.randn(4, 5, dtype=torch.float64), torch.randint(0, 3, (4,)))


def test_bias_shared_by_two_linears():
    check(BiasShared().double(), torch.randn(4, 4, dtype=torch.float64), torch.randint(0, 3, (4,)))


def test_one_kernel_call_per_module_and_step(monkeypatch):
    calls = []
    for rule in (LinearRule, ConvRule):
        for kernel in ("sq_norms", "clipped"):
            orig = getattr(rule, kernel)

            def spy(self, module, uses, *a, _orig=orig, _k=kernel):
                assert all(isinstance(u, Use) and u.module is module for u in uses)
                calls.append((_k, module, len(uses)))
                return _orig(self, module, uses, *a)

            monkeypatch.setattr(rule, kernel, spy)
    m = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(2 * 3 * 3, 4), nn.Tanh(),
                      nn.Linear(4, 4)).double()
    x, y = torch.randn(3, 1, 5, 5, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)
    fastclip.clipped_grad(m, mse, x, y, max_grad_norm=1.0)
    layers = [m[0], m[2], m[4]]
    assert sorted((k, id(mod), n) for k, mod, n in calls) == sorted(
        (k, id(mod), 1) for k in ("sq_norms", "clipped") for mod in layers)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("B", [0, 1, 5])
@pytest.mark.parametrize("T", [1, 3])
@pytest.mark.parametrize("d, p", [(7, 4), (4, 7), (5, 5)])
def test_linear_clipped_sum_either_factor_rescaled(d, p, T, B, dtype):
    """A Linear's clipped sum rescales G (p <= d: its bias sum is then the column sum of the
    rescaled rows) or A (p > d: the bias from G), positions per example or not: both equal the
    float64 reference, the bias included, with examples clipped (inputs scaled up)."""
    g = torch.Generator().manual_seed(d * 100 + p * 10 + T)
    shape = (B, d) if T == 1 else (B, T, d)
    x = torch.randn(*shape, generator=g) * 3
    y = torch.randn(*(shape[:-1] + (p,)), generator=g)

    def loss(out, target):
        return (out - target).square().flatten(1).sum(1)

    check(nn.Linear(d, p), x, y, loss=loss, C=0.5, dtype=dtype, cast=True)
