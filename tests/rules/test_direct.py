"""Parameters a module uses directly (fastclip/layers/direct.py): the planned add / sub / cat paths
(per-example gradients read off the output gradient: a slice, a sum over broadcast dimensions, a
sign) and the general batched VJP, against tests/reference.py in every mode, B = 0, 1 and more,
float32 and float64."""
import functools

import pytest
import torch
from torch import nn

import harness
from fastclip.layers import direct

check = functools.partial(harness.check, C=0.3)
T, D = 5, 6


class Net(nn.Module):
    """Linear(4, D) over T positions, then ``kind``'s direct use of its own parameters, a
    Linear over the tokens' mean and the first token."""

    def __init__(self, kind):
        super().__init__()
        self.kind = kind
        self.inp = nn.Linear(4, D)
        self.cls = nn.Parameter(torch.randn(1, 1, D) * 0.5)
        self.pos = nn.Parameter(torch.randn(T + 3, D) * 0.5)     # sliced for the T used
        self.pos3 = nn.Parameter(torch.randn(1, T, D) * 0.5)
        self.col = nn.Parameter(torch.randn(1, T, 1) * 0.5)       # broadcast along features
        self.gain = nn.Parameter(torch.randn(D) * 0.5 + 1)
        self.head = nn.Linear(2 * D, 3)

    def forward(self, x):
        h = torch.tanh(self.inp(x))                                # (B, T, D)
        B, k = h.shape[0], self.kind
        if k == "vit":            # cat with an expanded class token, then + a (1, T+1, D) table
            h = torch.cat([self.cls.expand(B, -1, -1), h], 1)
            h = h + torch.cat([self.pos3, self.pos3[:, :1]], 1)
        elif k == "add_leaf":     # leaf tables broadcast: (1, T, D) and (1, T, 1), both sides
            h = self.pos3 + h
            h = h + self.col
        elif k == "add_slice":    # a slice of the leaf (batched VJP of the small sub-graph)
            h = h + self.pos[:T]
        elif k == "sub_alpha":    # torch.sub / torch.add with alpha, followed tensor either side
            h = torch.sub(h, self.pos3, alpha=0.5)
            h = torch.add(self.col, h, alpha=2.0)
            h = h - self.pos[1:T + 1]
        elif k == "cat_end":      # cat at the end, dim=-2, a non-leaf source, broadcast_to
            tok = (self.cls * 2).expand(B, 1, D)
            h = torch.cat((h, tok, torch.broadcast_to(self.pos[:2], (B, 2, D))), dim=-2)
        elif k == "both":         # one parameter used both ways (cat and add) and twice in one cat
            c = self.cls.expand(B, -1, -1)
            h = torch.cat([c, h, c], 1) + self.cls
        elif k == "mul":          # layer scale both sides, a (1, T, 1) column, an expanded source
            h = h * self.gain
            h = self.col * torch.mul(h, (self.cls * 2).expand(B, 1, D))
        elif k == "general":      # an op with no plan (a division): the batched VJP
            h = h / self.gain
        return self.head(torch.cat([h.mean(1), h[:, 0]], 1))


KINDS = ["vit", "add_leaf", "add_slice", "sub_alpha", "cat_end", "both", "mul"]


@pytest.fixture
def planned(monkeypatch):
    calls = []
    orig = direct.DirectRule._planned

    def spy(plan, G, leaves, result):
        calls.append(len(plan))
        return orig(plan, G, leaves, result)

    monkeypatch.setattr(direct.DirectRule, "_planned", staticmethod(spy))
    return calls


@pytest.mark.parametrize("kind", KINDS + ["general"])
@pytest.mark.parametrize("B", [0, 1, 3])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_direct_uses_exact(kind, B, dtype, planned):
    torch.manual_seed(1)
    m = Net(kind)
    x = torch.randn(B, T, 4)
    check(m, x, torch.randint(0, 3, (B,)), dtype=dtype, cast=True)
    if kind == "general" or B == 0:
        assert not planned
    else:
        assert planned, "the planned path was not taken"


def test_plans_of_the_vit_ops():
    """The plan read off each op: the table's broadcast add, the token's cat slice."""
    m = Net("vit")
    fol = direct._Follow(None, m, {"cls": m.cls, "pos3": m.pos3}, [])
    c = m.cls.expand(4, -1, -1)
    fol.followed[id(c)] = c
    fol.expanded[id(c)] = (c, m.cls)
    h = torch.randn(4, T, D)
    assert fol._plan(torch.cat, ([c, h], 1), {}, 4) == [(m.cls, 1, 0, 1, 1, None)]
    assert fol._plan(torch.Tensor.add, (h, m.pos3), {}, 4) == [(m.pos3, None, 0, 0, 1, None)]
    assert fol._plan(torch.sub, (h, m.pos3), {"alpha": 3}, 4) == [(m.pos3, None, 0, 0, -3, None)]
    (s, _, _, _, _, (d, _)), = fol._plan(torch.Tensor.mul, (m.pos3, h), {}, 4)
    assert s is m.pos3 and torch.equal(d, h)
    assert fol._plan(torch.cat, ([c, h], 0), {}, 4) is None          # along the batch
    assert fol._plan(torch.div, (h, m.pos3), {}, 4) is None           # no plan: general VJP
    assert fol._plan(torch.Tensor.add, (h[0], m.pos3), {}, 4) is None  # data not batch-first


def test_reduce_sums_broadcast_dims():
    g = torch.randn(3, 4, 5, 6, dtype=torch.float64)
    torch.testing.assert_close(direct._reduce(g, (5, 1)), g.sum((1, 3), keepdim=True)[:, 0])
    torch.testing.assert_close(direct._reduce(g, (1, 4, 5, 6)), g.unsqueeze(1))
    torch.testing.assert_close(direct._reduce(g, (6,)), g.sum((1, 2)))


def test_mul_operand_modified_in_place_is_refused():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp = nn.Linear(4, D)
            self.gain = nn.Parameter(torch.ones(D))

        def forward(self, x):
            h = self.inp(x)
            d = torch.tanh(h)
            out = d * self.gain
            d.mul_(2)                 # after the product: its per-example gradient needs d
            return out.sum(1) + d.sum(1)

    import fastclip
    with pytest.raises(RuntimeError, match="inplace|in place"):
        fastclip.clipped_grad(M(), lambda o, y: o, torch.randn(3, 4), torch.zeros(3),
                              max_grad_norm=1.0)
