"""The operation rule (fastclip/layers/ops_rule.py): leaves of any class covered natively from the
torch ops they apply to their own parameters, against tests/reference.py (float64)."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastclip
import harness
import reference as R
from conftest import DTYPES
from models import AddmmConv1D  # shared test models


def sq_loss(out, y):
    return (out.flatten(1) - y.flatten(1)).square().sum(1)


def rules_after_forward(model, *x):
    e = fastclip.Engine(model)
    try:
        before = dict(e.covered())
        model(*x)
        return before, dict(e.covered())
    finally:
        e.detach()


def check(model, x, y, dtype=torch.float64):
    """harness.check with this file's loss and bound, the model and data cast to ``dtype``."""
    harness.check(model, x, y, loss=sq_loss, C=0.5, dtype=dtype, cast=True)


# -- leaves from other libraries -----------------------------------------------------------------


class MatW(nn.Module):
    """x @ W with W (in, out), no bias."""

    def __init__(self, nx, nf):
        super().__init__()
        self.W = nn.Parameter(torch.randn(nx, nf) * 0.3)

    def forward(self, x):
        return x @ self.W


class Transposed(nn.Module):
    """W stored (out, in) and used transposed, three spellings."""

    def __init__(self, nx, nf, how):
        super().__init__()
        self.W = nn.Parameter(torch.randn(nf, nx) * 0.3)
        self.b = nn.Parameter(torch.randn(nf) * 0.1)
        self.how = how

    def forward(self, x):
        if self.how == "t":
            return torch.matmul(x, self.W.t()) + self.b
        if self.how == "T":
            return x @ self.W.T + self.b
        return F.linear(x, self.W.t().t(), self.b)       # transposed twice: F.linear's own layout


class RMSNorm(nn.Module):
    """Llama's: weight * normalised (float32 statistics), cast back."""

    def __init__(self, d):
        super().__init__()
        self.weight = nn.Parameter(1 + 0.2 * torch.randn(d))

    def forward(self, h):
        dt = h.dtype
        h = h.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)
        return self.weight * h.to(dt)


class ScaleShift(nn.Module):
    """Broadcast scale and shift: (d,), (1, 1, d) and a subtraction."""

    def __init__(self, d):
        super().__init__()
        self.s = nn.Parameter(1 + 0.2 * torch.randn(d))
        self.s3 = nn.Parameter(1 + 0.2 * torch.randn(1, 1, d))
        self.b = nn.Parameter(0.1 * torch.randn(d))

    def forward(self, x):
        return (x * self.s) * self.s3 - self.b


class ChannelScale(nn.Module):
    """(C, 1, 1) scale on images: broadcast over height and width."""

    def __init__(self, c):
        super().__init__()
        self.g = nn.Parameter(1 + 0.2 * torch.randn(c, 1, 1))

    def forward(self, x):
        return torch.relu(x) * self.g


class Table(nn.Module):
    def __init__(self, V, d):
        super().__init__()
        self.table = nn.Parameter(torch.randn(V, d))

    def forward(self, ids):
        return F.embedding(ids, self.table, padding_idx=-1)


class MyConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, 3, 3, 3) * 0.2)
        self.b = nn.Parameter(torch.randn(4) * 0.1)

    def forward(self, x):
        return F.conv2d(x, self.w, self.b, padding=1)


class Unknown(nn.Module):
    """Ops the rule does not recognise: a division by the parameter, a slice of it."""

    def __init__(self, d):
        super().__init__()
        self.s = nn.Parameter(1 + 0.2 * torch.rand(d))
        self.W = nn.Parameter(torch.randn(d + 2, d) * 0.3)

    def forward(self, x):
        return (x / self.s) @ self.W[:x.shape[-1]]


class TimeMajorInside(nn.Module):
    """Works time-major inside (rows of the scaled tensor are positions, not examples)."""

    def __init__(self, d):
        super().__init__()
        self.s = nn.Parameter(1 + 0.2 * torch.randn(d))
        self.t = nn.Parameter(0.1 * torch.randn(3, 1, d))

    def forward(self, x):
        h = x.transpose(0, 1) * self.s + self.t     # (T, B, d): T == B below
        return h.transpose(0, 1)


class Twice(nn.Module):
    """One weight used twice as a product (stacked) and a vector as scale and shift."""

    def __init__(self, d):
        super().__init__()
        self.W = nn.Parameter(torch.randn(d, d) * 0.3)
        self.v = nn.Parameter(1 + 0.2 * torch.randn(d))

    def forward(self, x):
        h = torch.tanh(x @ self.W)
        return (h @ self.W) * self.v + self.v


class TwoWays(nn.Module):
    """One weight used as a product and as a broadcast scale: their per-example gradients add."""

    def __init__(self, d):
        super().__init__()
        self.W = nn.Parameter(torch.randn(d, d) * 0.3)

    def forward(self, x):
        return (x @ self.W).unsqueeze(-1) * self.W + x.unsqueeze(-2)


class Seq(nn.Module):
    def __init__(self, *leaves, d_in=5, d=6, d_out=3):
        super().__init__()
        self.inp = nn.Linear(d_in, d)
        self.leaves = nn.ModuleList(leaves)
        self.out = nn.Linear(d, d_out)

    def forward(self, x):
        h = self.inp(x)
        for leaf in self.leaves:
            h = leaf(h)
        return self.out(h)


CASES = {
    "conv1d": lambda: Seq(AddmmConv1D(6, 8), AddmmConv1D(8, 6)),
    "matw": lambda: Seq(MatW(6, 6)),
    "t": lambda: Seq(Transposed(6, 6, "t")),
    "T": lambda: Seq(Transposed(6, 6, "T")),
    "tt": lambda: Seq(Transposed(6, 6, "tt")),
    "rmsnorm": lambda: Seq(RMSNorm(6), AddmmConv1D(6, 6)),
    "scaleshift": lambda: Seq(ScaleShift(6)),
    "twice": lambda: Seq(Twice(6)),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("B", [0, 1, 3])
@pytest.mark.parametrize("dtype", DTYPES)
def test_custom_leaves_are_exact_on_the_op_rule(case, B, dtype):
    m = CASES[case]()
    x, y = torch.randn(B, 4, 5), torch.randn(B, 4, 3)
    before, after = rules_after_forward(m, x)
    leaf = {k: r for k, r in after.items() if k.startswith("leaves")}
    assert set(before[k] for k in leaf) == {"PendingOpsRule"}
    assert set(leaf.values()) == {"OpsRule"}, after
    check(m, x, y, dtype)


def test_two_dim_input_and_bias_free_addmm():
    m = Seq(AddmmConv1D(6, 6), MatW(6, 6))
    check(m, torch.randn(4, 5), torch.randn(4, 3))


def test_same_weight_two_kinds_of_use_adds_per_example_gradients():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp, self.two, self.out = nn.Linear(5, 4), TwoWays(4), nn.Linear(4, 2)

        def forward(self, x):
            return self.out(self.two(self.inp(x)).sum(-1))

    m = M()
    assert rules_after_forward(m, torch.randn(2, 5))[1]["two.W"] == "OpsRule"
    for B in (0, 1, 3):
        check(m, torch.randn(B, 5), torch.randn(B, 2))


def test_image_channel_scale_and_functional_conv():
    m = nn.Sequential(MyConv(), ChannelScale(4), nn.Flatten(), nn.Linear(4 * 5 * 5, 2))
    x = torch.randn(3, 3, 5, 5)
    after = rules_after_forward(m, x)[1]
    assert after["0.w"] == after["0.b"] == after["1.g"] == "OpsRule"
    for B in (0, 1, 3):
        check(m, torch.randn(B, 3, 5, 5), torch.randn(B, 2))


def test_functional_embedding_with_negative_padding_idx():
    m = nn.Sequential(Table(7, 4), nn.Flatten(), nn.Linear(4 * 5, 2))
    ids = torch.randint(0, 7, (3, 5))
    ids[0, :2] = 6      # the padding row (-1): no gradient
    ids[1, :3] = 2      # a token repeated in one example
    assert rules_after_forward(m, ids)[1]["0.table"] == "OpsRule"
    for dtype in DTYPES:
        check(m, ids, torch.randn(3, 2), dtype)
    check(m, ids[:0], torch.randn(0, 2))


@pytest.mark.parametrize("leaf", [Unknown, TimeMajorInside])
@pytest.mark.parametrize("dtype", DTYPES)
def test_what_the_rule_cannot_prove_falls_back_to_the_generic_rule(leaf, dtype):
    m = Seq(leaf(6))
    x = torch.randn(3, 3, 5)    # T == B: a transposed batch has as many rows as the batch
    after = rules_after_forward(m, x)[1]
    assert {r for k, r in after.items() if k.startswith("leaves")} == {"GenericRule"}
    check(m, x, torch.randn(3, 3, 3), dtype)


def test_a_later_forward_using_the_parameter_otherwise_is_refused():
    class Branch(nn.Module):
        def __init__(self):
            super().__init__()
            self.s = nn.Parameter(torch.ones(6))
            self.odd = False

        def forward(self, x):
            return x / self.s if self.odd else x * self.s

    leaf = Branch()
    m = Seq(leaf)
    x = torch.randn(3, 5)
    fastclip.per_sample_grad_norms(m, sq_loss, x, torch.randn(3, 3))
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    pm, popt, _ = fastclip.make_private(m, opt, None, noise_multiplier=0.0, max_grad_norm=1.0,
                                        poisson_sampling=False)
    sq_loss(pm(x), torch.randn(3, 3)).mean().backward()   # resolved: OpsRule
    assert dict(popt.engine.covered())["leaves.0.s"] == "OpsRule"
    leaf.odd = True
    with pytest.raises(ValueError, match=r"'leaves\.0' \(Branch\) called .*div.*first forward"):
        pm(x)


def test_make_private_step_with_op_rule_leaves_is_the_clipped_mean():
    import copy
    m = Seq(RMSNorm(6), AddmmConv1D(6, 6), ScaleShift(6)).double()
    ref_model = copy.deepcopy(m)
    x, y = torch.randn(3, 4, 5, dtype=torch.float64), torch.randn(3, 4, 3, dtype=torch.float64)
    opt = torch.optim.SGD(m.parameters(), lr=1.0)
    pm, popt, _ = fastclip.make_private(m, opt, None, noise_multiplier=0.0, max_grad_norm=0.3,
                                        poisson_sampling=False)
    before = {k: p.detach().clone() for k, p in pm.named_parameters()}
    for clip in range(2):     # the first step resolves the rules, the second uses them
        popt.zero_grad()
        sq_loss(pm(x), y).mean().backward()
        popt.step()
        ref = R.clipped_sum(ref_model, sq_loss, x, y, 0.3)
        for k, p in pm.named_parameters():
            torch.testing.assert_close(before[k] - p.detach(), ref[k] / 3)
            dict(ref_model.named_parameters())[k].data.sub_(ref[k] / 3)
            before[k] = p.detach().clone()
    assert {r for k, r in popt.engine.covered() if k.startswith("leaves")} == {"OpsRule"}


def test_validate_names_the_op_rule():
    m = Seq(RMSNorm(6), AddmmConv1D(6, 6), Unknown(6))
    rep = fastclip.validate(m, sq_loss, torch.randn(2, 4, 5), torch.randn(2, 4, 3), verbose=False)
    assert rep.ok, str(rep)
    rules = {r["name"]: r["rule"] for r in rep.rows}
    assert rules["leaves.0.weight"] == rules["leaves.1.weight"] == "OpsRule"
    assert rules["leaves.2.W"] == "GenericRule" and rules["inp.weight"] == "LinearRule"
