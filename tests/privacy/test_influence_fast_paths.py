"""The privacy invariant, by its definition, on the fast paths added for speed (issue 15) and the
output-tap capture (issue 18): remove one example from the batch and the released clipped sum
moves by exactly its clipped gradient, at most C (every example here has a gradient norm far
above C, so each is clipped and the influence is C itself, not something smaller)."""
import pytest
import torch
from torch import nn

from fastclip.layers import OutputTapRule, keep, register
from misuse_common import influence, private, released

C = 0.5


class SeqLinear(nn.Module):          # Linear layers over (B, T, d) sequences: the kept path
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(5, 7), nn.Linear(7, 3)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x))).mean(1)


class ConvNet(nn.Module):            # conv layers whose per-example gradients are kept
    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(2, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)
        self.head = nn.Linear(4 * 5 * 5, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.c2(torch.tanh(self.c1(x)))).flatten(1))


class TokenNet(nn.Module):           # ViT's class token and position table, used by the parent
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(5, 6)
        self.cls = nn.Parameter(torch.randn(1, 1, 6))
        self.pos = nn.Parameter(torch.randn(1, 5, 6))
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        h = torch.cat([self.cls.expand(x.shape[0], -1, -1), torch.tanh(self.inp(x))], 1)
        return self.head((h + self.pos).mean(1))


class Tapped(nn.Module):             # a user's layer under OutputTapRule (README's example)
    def __init__(self, nx, nf):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(nx, nf))
        self.bias = nn.Parameter(torch.randn(nf))

    def forward(self, x):
        return x @ self.weight + self.bias


@register(Tapped)
class _TappedRule(OutputTapRule):
    def per_example(self, module, uses):
        A = torch.cat([u.inputs.flatten(1, -2) for u in uses], 1)
        G = torch.cat([u.grads[0].flatten(1, -2) for u in uses], 1)
        return {"weight": torch.einsum("bti,bto->bio", A, G), "bias": G.sum(1)}


class TapNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.t = Tapped(5, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.t(x))).mean(1)


CASES = {   # name: (model, input shape, mode)
    "linear_kept": (SeqLinear, (5, 5), "auto"),
    "conv_kept": (ConvNet, (2, 5, 5), "direct"),
    "direct_tokens": (TokenNet, (4, 5), "auto"),
    "output_tap": (TapNet, (3, 5), "auto"),
}


@pytest.fixture
def kept(monkeypatch):
    """Room for every layer's kept per-example gradients, and the Linear kept path forced."""
    monkeypatch.setattr(keep, "keep_wins", lambda T, d, p, method: True)
    monkeypatch.setattr(keep, "KEEP_STEP_BYTES", 1 << 30)
    yield
    assert keep.LEDGER.live == 0


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_one_example_moves_the_release_by_exactly_C(case, dtype, kept):
    cls, shape, mode = CASES[case]
    base = cls().to(dtype)
    B = 5
    x = torch.randn((B,) + shape, dtype=dtype) * 20   # gradients far above C
    y = torch.randint(0, 3, (B,))
    loss = nn.CrossEntropyLoss(reduction="sum")

    def update(idx):
        def loop(m):
            m, opt, _ = private(m, C=C, mode=mode)
            opt.zero_grad()
            loss(m(x[idx]), y[idx]).backward()
            opt.step()
            return m
        return released(base, loop)

    tol = 1e-9 if dtype == torch.float64 else 1e-4
    assert C * (1 - 1e-3) <= influence(update, B) <= C * (1 + tol)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_tiny_gradients_beside_large_ones_keep_the_bound(dtype):
    """Examples whose gradients are ~1e-20 (their ghost Gram products are subnormal, flushed to
    zero by the core: csrc/common.cpp FlushSubnormals) beside examples far above C: removing any
    one moves the ghost-norm release by at most C, and a large one by exactly C."""
    torch.manual_seed(3)
    base = SeqLinear().to(dtype)
    B = 6
    x = torch.randn(B, 5, 5, dtype=dtype) * 20
    y = torch.randint(0, 3, (B,))
    weight = torch.tensor([1e-20, 1e-20, 1e-20, 1.0, 1.0, 1.0], dtype=dtype)
    loss = nn.CrossEntropyLoss(reduction="none")

    def update(idx):
        def loop(m):
            m, opt, _ = private(m, C=C, mode="ghost")
            opt.zero_grad()
            (loss(m(x[idx]), y[idx]) * weight[idx]).sum().backward()
            opt.step()
            return m
        return released(base, loop)

    tol = 1e-9 if dtype == torch.float64 else 1e-4
    full = update(list(range(B)))
    moves = [(full - update([i for i in range(B) if i != j])).norm().item() for j in range(B)]
    assert max(moves) <= C * (1 + tol)
    assert all(C * (1 - 1e-3) <= m for m in moves[3:])
    assert all(m <= 1e-6 for m in moves[:3])
