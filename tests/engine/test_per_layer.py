"""clipping="per_layer" in the single-backward engine, against tests/reference.py (float64, one
backward per example): each layer's part of each example's gradient clipped to its own bound."""
import math

import pytest
import torch
from torch import nn

import fastclip
import fastclip.nn as fnn
import reference as R
from conftest import DTYPES
from fastclip.engine import Engine
from fastclip.nn.rnn import converted
from harness import CE, MODES, assert_close, check, layer_groups, mse, reference_per_layer
from models import CalledTwice, Doubler  # shared test models


# ---- models ----------------------------------------------------------------------------------

def mlp():
    return nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 6), nn.Tanh(), nn.Linear(6, 3))


def conv_gn():
    return nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.GroupNorm(2, 4), nn.ReLU(),
                         nn.Conv2d(4, 4, 3, stride=2), nn.Flatten(1), nn.Linear(16, 3))


class TiedLM(nn.Module):
    """Embedding tied to the output Linear: one layer holding both modules' parameters."""

    def __init__(self, V=11, E=6):
        super().__init__()
        self.emb = nn.Embedding(V, E)
        self.mid = nn.Linear(E, E)
        self.out = nn.Linear(E, V)
        self.out.weight = self.emb.weight

    def forward(self, ids):
        return self.out(torch.tanh(self.mid(self.emb(ids))).mean(1))


class LSTMNet(nn.Module):
    def __init__(self, torch_lstm=False):
        super().__init__()
        self.inp = nn.Linear(4, 5)
        cls = nn.LSTM if torch_lstm else fnn.LSTM
        self.lstm = cls(5, 6, num_layers=2, batch_first=True, bidirectional=True)
        self.out = nn.Linear(12, 3)

    def forward(self, x):
        h, _ = self.lstm(torch.tanh(self.inp(x)))
        return self.out(h[:, -1])


class Custom(nn.Module):
    """A leaf with no native rule (the generic rule)."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.randn(4))
        self.shift = nn.Parameter(torch.randn(4))

    def forward(self, x):
        return torch.sin(x * self.scale + self.shift)


class WithCustom(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 4)
        self.custom = Custom()
        self.ln = nn.LayerNorm(4)
        self.out = nn.Linear(4, 3)

    def forward(self, x):
        return self.out(self.ln(self.custom(self.lin(x))))


class PosTable(nn.Module):
    """A learned position table held by the parent (DirectRule) beside a child Linear."""

    def __init__(self, T=5, d=4):
        super().__init__()
        self.pos = nn.Parameter(torch.randn(T, d) * 0.5)
        self.lin = nn.Linear(d, 3)

    def forward(self, x):
        return self.lin(torch.tanh(x + self.pos[:x.shape[1]])).mean(1)


class Attn(nn.Module):
    """fastclip.nn.MultiheadAttention: a use recorded in pieces (each projection, bias_k/v)."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(3, 6)
        self.att = fnn.MultiheadAttention(6, 2, batch_first=True, add_bias_kv=True)
        self.out = nn.Linear(6, 3)

    def forward(self, x):
        h = torch.tanh(self.inp(x))
        a, _ = self.att(h, h, h)
        return self.out(a.mean(1))


# name -> (builder, inputs(B, dtype), targets(B))
MODELS = {
    "mlp": (mlp, lambda B, dt: torch.randn(B, 5, dtype=dt) * 3, lambda B: torch.randint(0, 3, (B,))),
    "conv_gn": (conv_gn, lambda B, dt: torch.randn(B, 2, 5, 5, dtype=dt) * 3,
                lambda B: torch.randint(0, 3, (B,))),
    "tied": (TiedLM, lambda B, dt: torch.randint(0, 11, (B, 4)), lambda B: torch.randint(0, 11, (B,))),
    "lstm": (LSTMNet, lambda B, dt: torch.randn(B, 4, 4, dtype=dt) * 2, lambda B: torch.randint(0, 3, (B,))),
    "torch_lstm": (lambda: LSTMNet(torch_lstm=True), lambda B, dt: torch.randn(B, 4, 4, dtype=dt) * 2,
                   lambda B: torch.randint(0, 3, (B,))),
    "generic": (WithCustom, lambda B, dt: torch.randn(B, 3, dtype=dt) * 3,
                lambda B: torch.randint(0, 3, (B,))),
    "pos_table": (PosTable, lambda B, dt: torch.randn(B, 5, 4, dtype=dt) * 2,
                  lambda B: torch.randint(0, 3, (B,))),
    "called_twice": (CalledTwice, lambda B, dt: torch.randn(B, 6, dtype=dt) * 3,
                     lambda B: torch.randint(0, 3, (B,))),
    "attention": (Attn, lambda B, dt: torch.randn(B, 4, 3, dtype=dt) * 2,
                  lambda B: torch.randint(0, 3, (B,))),
}


def make(name, B, dtype):
    build, xs, ys = MODELS[name]
    return build().to(dtype), xs(B, dtype), ys(B)


def n_layers(model):
    return len(layer_groups(model, 1.0))


def bounds(kind, model):
    if kind == "small":
        return 0.05           # split evenly: most layers of most examples clipped
    if kind == "large":
        return 1e6            # nothing clipped
    L = n_layers(model)       # a list: alternately clipped and not
    return [0.03 if i % 2 == 0 else 1e6 for i in range(L)]


# ---- the clipped sums ------------------------------------------------------------------------

@pytest.mark.parametrize("bound", ["small", "large", "list"])
@pytest.mark.parametrize("B", [0, 1, 5])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("model", list(MODELS))
def test_clipped_sums_match_reference(model, mode, dtype, B, bound):
    """The clipped sums equal the per-layer reference; the norms reported are the total norms,
    as with flat clipping."""
    m, x, y = make(model, B, dtype)
    check(m, x, y, modes=(mode,), clipping="per_layer", C=bounds(bound, m), dtype=dtype)


def test_clipping_is_active_in_the_tests():
    """The "small" bounds clip most layers of most examples, "large" none (the test above would
    not tell per-layer from flat clipping or from no clipping otherwise)."""
    m, x, y = make("mlp", 6, torch.float64)
    g = R.per_example_grads(m, CE, x, y)
    for kind, want in (("small", True), ("large", False)):
        clipped = []
        for names, C in layer_groups(m, bounds(kind, m)):
            norm = sum(g[n].flatten(1).square().sum(1) for n in names).sqrt()
            clipped.append(norm > C)
        frac = torch.stack(clipped).double().mean().item()
        assert (frac > 0.8) if want else frac == 0


def test_float_bound_is_split_evenly_and_list_is_per_layer():
    m = mlp()
    groups = layer_groups(m, 0.6)
    assert [names for names, _ in groups] == [["0.weight", "0.bias"], ["2.weight", "2.bias"],
                                              ["4.weight", "4.bias"]]
    assert all(C == pytest.approx(0.6 / math.sqrt(3)) for _, C in groups)
    assert [C for _, C in layer_groups(m, [1, 2, 3])] == [1.0, 2.0, 3.0]
    tied = TiedLM()
    assert [names for names, _ in layer_groups(tied, 1.0)] == [["emb.weight", "out.bias"],
                                                              ["mid.weight", "mid.bias"]]


def test_differs_from_flat_clipping():
    m, x, y = make("mlp", 5, torch.float64)
    fastclip.clipped_grad(m, CE, x, y, max_grad_norm=0.05, clipping="per_layer")
    per_layer = [p.grad.clone() for p in m.parameters()]
    fastclip.clipped_grad(m, CE, x, y, max_grad_norm=0.05)
    assert any(not torch.allclose(a, p.grad) for a, p in zip(per_layer, m.parameters()))


@pytest.mark.parametrize("model", ["mlp", "conv_gn", "tied", "lstm", "generic", "pos_table",
                                   "called_twice", "attention"])
@pytest.mark.parametrize("mode", MODES)
def test_each_layer_of_one_example_is_bounded(model, mode):
    """Sensitivity: one example's contribution to each layer has norm <= C_l, == C_l if clipped."""
    m, x, y = make(model, 1, torch.float64)
    g = R.per_example_grads(m, CE, x, y)
    for kind in ("small", "large", "list"):
        C = bounds(kind, m)
        fastclip.clipped_grad(m, CE, x, y, max_grad_norm=C, mode=mode, clipping="per_layer")
        grads = dict(m.named_parameters())
        for names, C_l in layer_groups(m, C):
            got = math.sqrt(sum(grads[n].grad.double().square().sum().item() for n in names))
            raw = math.sqrt(sum(g[n].square().sum().item() for n in names))
            assert got <= C_l * (1 + 1e-9)
            assert got == pytest.approx(min(raw, C_l), rel=1e-9)


# ---- the engine at work ----------------------------------------------------------------------

def test_layers_are_clipped_during_the_backward():
    """A layer's p.grad is written inside the backward, as soon as its last use is recorded: a
    hook on the gradient at an earlier layer's output sees the later layers' gradients written
    and the earlier layers' not yet."""
    m = mlp().double()
    x, y = torch.randn(4, 5, dtype=torch.float64), torch.randint(0, 3, (4,))
    eng = Engine(m, max_grad_norm=0.1, clipping="per_layer", loss_reduction="sum")
    eng.keep_norms = True
    seen = {}

    def hook(grad):
        seen["last"] = m[4].weight.grad is not None and m[4].bias.grad is not None
        seen["middle"] = m[2].weight.grad is not None
        seen["first"] = m[0].weight.grad is not None
        seen["open"] = [len(s) for s in eng._schedule.open]

    h = m[1](m[0](x))
    h.register_hook(hook)  # fires when the backward reaches the first layer's output
    out = m[4](m[3](m[2](h)))
    CE(out, y).sum().backward()
    eng.detach()
    assert seen == {"last": True, "middle": True, "first": False, "open": [1, 0, 0]}
    per_layer_norms = eng.norms_log[0]
    ref = reference_per_layer(m, CE, x, y, 0.1)
    for n, p in m.named_parameters():
        assert_close(p.grad, ref[n], torch.float64)
    # the norms kept are the total norms, the same numbers flat clipping reports
    flat = Engine(m, max_grad_norm=0.1, loss_reduction="sum")
    flat.keep_norms = True
    CE(m(x), y).sum().backward()
    flat.detach()
    torch.testing.assert_close(per_layer_norms, flat.norms_log[0], rtol=1e-12, atol=0)
    assert_close(per_layer_norms, R.norms(m, CE, x, y), torch.float64)


@pytest.mark.parametrize("model", list(MODELS))
def test_every_layer_is_clipped_in_the_backward(model):
    """Nothing is left for the end of the backward: every layer (tied, recurrent and attention
    uses recorded in pieces, generic and direct rules, a layer called twice) is clipped as soon
    as its last use is recorded."""
    m, x, y = make(model, 4, torch.float64)
    ref = reference_per_layer(m, CE, x, y, 0.05)
    left = []
    with converted(m) as cm:
        eng = Engine(cm, max_grad_norm=0.05, clipping="per_layer", loss_reduction="sum")
        sched = eng._schedule
        finish = sched.finish

        def spy():
            left.append(sorted(sched.waiting))
            finish()
        sched.finish = spy
        CE(cm(x), y).sum().backward()
        eng.detach()
    assert left == [[]]
    assert len(eng._schedule.clipped) == 0 and eng.examples == 4
    for n, p in m.named_parameters():
        assert_close(p.grad, ref[n], torch.float64)


def test_layer_tensors_are_released_in_the_backward():
    """Once a layer is clipped its uses hold no activation-sized tensor any more (they are freed
    then, not when autograd frees the graph)."""
    m = mlp().double()
    x, y = torch.randn(4, 5, dtype=torch.float64), torch.randint(0, 3, (4,))
    eng = Engine(m, max_grad_norm=0.1, clipping="per_layer", loss_reduction="sum")
    uses = []
    orig = eng.new_use

    def spy(*a, **k):
        u = orig(*a, **k)
        uses.append(u)
        return u
    eng.new_use = spy
    seen = {}
    h = m[1](m[0](x))

    def hook(grad):
        seen["last"] = (uses[-1].grads, uses[-1].inputs)
    h.register_hook(hook)
    loss = CE(m[4](m[3](m[2](h))), y).sum()
    loss.backward()
    eng.detach()
    assert len(uses) == 3
    assert seen["last"] == (None, None)
    assert all(u.grads is None and u.inputs is None for u in uses)


def test_output_not_in_the_loss_blocks_nothing():
    """A head whose output does not reach the loss never records its use: the other layers are
    still clipped in the backward, the head gets no gradient, and the next step streams too."""

    class TwoHeads(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Linear(4, 5)
            self.a = nn.Linear(5, 3)
            self.b = nn.Linear(5, 3)

        def forward(self, x):
            h = torch.tanh(self.body(x))
            return self.a(h), self.b(h)

    m = TwoHeads().double()
    x, y = torch.randn(3, 4, dtype=torch.float64), torch.randint(0, 3, (3,))
    eng = Engine(m, max_grad_norm=0.2, clipping="per_layer", loss_reduction="sum")
    eng.keep_norms = True
    for _ in range(2):
        for p in m.parameters():
            p.grad = None
        a, _ = m(x)
        CE(a, y).sum().backward()
        assert m.b.weight.grad is None and m.a.weight.grad is not None
    eng.detach()

    class OnlyA(nn.Module):
        def __init__(self, src):
            super().__init__()
            self.body, self.a = src.body, src.a

        def forward(self, x):
            return self.a(torch.tanh(self.body(x)))

    ref = reference_per_layer(OnlyA(m), CE, x, y, [0.2 / math.sqrt(3)] * 2)
    assert_close(m.body.weight.grad, ref["body.weight"], torch.float64)
    assert_close(m.a.weight.grad, ref["a.weight"], torch.float64)
    assert eng.examples == 6


def test_forward_counts_across_forwards():
    """Several forwards before one backward, a forward under grad never backpropagated, a layer
    called twice, two forwards backpropagated separately: every step equals the reference and
    what is announced for a layer does not outlive its graph."""
    m = CalledTwice().double()
    x, y = torch.randn(4, 6, dtype=torch.float64), torch.randint(0, 3, (4,))
    C = 0.05

    class Twice(nn.Module):  # two forwards of the same batch in one loss
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner(x) + self.inner(x * 0.5)

    ref = reference_per_layer(m, CE, x, y, C)
    ref2 = reference_per_layer(Twice(m), CE, x, y, C)
    ref3 = reference_per_layer(m, CE, x * 0.5, y, C)
    eng = Engine(m, max_grad_norm=C, clipping="per_layer", loss_reduction="sum")

    def grads():
        out = {n: p.grad.clone() for n, p in m.named_parameters()}
        for p in m.parameters():
            p.grad = None
        return out

    # eval under grad, output dropped: its uses go with its graph
    m(x)
    assert all(len(s) == 0 for s in eng._schedule.open)
    CE(m(x), y).sum().backward()
    for n, g in grads().items():
        assert_close(g, ref[n], torch.float64)
    # an eval under grad whose output is kept: that layer is clipped at the end, still exact
    kept = m(x)
    CE(m(x), y).sum().backward()
    for n, g in grads().items():
        assert_close(g, ref[n], torch.float64)
    del kept
    assert all(len(s) == 0 for s in eng._schedule.open)
    # two forwards in one backward
    CE(m(x) + m(x * 0.5), y).sum().backward()
    for n, g in grads().items():
        assert_close(g, ref2["inner." + n], torch.float64)
    # two forwards, two backward calls: each its own examples, the sums add up
    l1, l2 = CE(m(x), y).sum(), CE(m(x * 0.5), y).sum()
    l1.backward()
    l2.backward()
    for n, g in grads().items():
        assert_close(g, ref[n] + ref3[n], torch.float64)
    assert eng.examples == 4 * 5
    sched = eng._schedule
    assert all(len(s) == 0 for s in sched.open) and not sched.waiting and sched.sq is None
    eng.detach()


def test_accumulation_over_two_backward_calls():
    m, x, y = make("conv_gn", 6, torch.float64)
    C = [0.05, 1e6, 0.05, 0.02]
    eng = Engine(m, max_grad_norm=C, clipping="per_layer", loss_reduction="sum")
    assert len(eng.layers) == 4
    CE(m(x[:3]), y[:3]).sum().backward()
    CE(m(x[3:]), y[3:]).sum().backward()
    eng.detach()
    assert eng.examples == 6
    ref = reference_per_layer(m, CE, x, y, C)
    for n, p in m.named_parameters():
        assert_close(p.grad, ref[n], torch.float64)


def test_loss_reduction_mean_scales_back():
    """With loss_reduction="mean" the norms are of the true per-example gradients."""
    m, x, y = make("mlp", 5, torch.float64)
    eng = Engine(m, max_grad_norm=0.1, clipping="per_layer", loss_reduction="mean")
    CE(m(x), y).mean().backward()
    eng.detach()
    ref = reference_per_layer(m, CE, x, y, 0.1)
    for n, p in m.named_parameters():
        assert_close(p.grad, ref[n], torch.float64)


@pytest.mark.parametrize("mode", MODES)
def test_a_nan_example_contributes_nothing(mode):
    m = nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3), nn.Linear(3, 2), Doubler(2))
    x, y = torch.randn(4, 4), torch.randn(4, 2)
    x[1] = 1e30
    keep = torch.tensor([0, 2, 3])
    norms = fastclip.clipped_grad(m, mse, x, y, max_grad_norm=0.5, mode=mode, clipping="per_layer")
    assert not torch.isfinite(norms[1]) and torch.isfinite(norms[keep]).all()
    got = [p.grad.clone() for p in m.parameters()]
    assert all(torch.isfinite(g).all() for g in got)
    fastclip.clipped_grad(m, mse, x[keep], y[keep], max_grad_norm=0.5, mode=mode, clipping="per_layer")
    for g, p in zip(got, m.parameters()):
        torch.testing.assert_close(g, p.grad)


def test_batch_sizes_differ_is_a_clear_error_and_the_next_step_works():
    class Split(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(3, 3)
            self.b = nn.Linear(3, 3)

        def forward(self, x):
            return self.b(x[:2]).sum() + self.a(x).sum()

    m = Split().double()
    x = torch.randn(4, 3, dtype=torch.float64)
    # The first-step audit would refuse the scalar output first (tests/privacy/test_misuse_mixing.py);
    # off here, so the engine's own check in the backward is what is tested.
    eng = Engine(m, max_grad_norm=1.0, clipping="per_layer", loss_reduction="sum", audit=False)
    with pytest.raises(ValueError, match="batch sizes differ.*Linear: 2.*Linear: 4|batch sizes differ.*Linear: 4.*Linear: 2"):
        m(x).backward()
    for p in m.parameters():
        p.grad = None
    (m.a(x).sum() + m.b(x).sum()).backward()
    assert m.a.weight.grad is not None and m.b.weight.grad is not None
    assert eng.examples == 4
    eng.detach()


def test_use_made_without_new_use_is_clipped_at_the_end():
    """A third-party rule that builds its Use directly: its layer is clipped when the backward
    ends (exact, just not streamed)."""
    from fastclip.layers import Use
    from fastclip.layers.linear import LinearRule

    m = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2)).double()
    x, y = torch.randn(5, 4, dtype=torch.float64), torch.randint(0, 2, (5,))
    eng = Engine(m, max_grad_norm=0.05, clipping="per_layer", loss_reduction="sum")
    eng.new_use = lambda module, inputs=None, extra=None: Use(module, inputs, extra)
    seen = {}
    h = m[0](x)

    def hook(grad):
        seen["last"] = m[2].weight.grad
    h.register_hook(hook)
    CE(m[2](m[1](h)), y).sum().backward()
    eng.detach()
    assert seen["last"] is None  # not streamed
    ref = reference_per_layer(m, CE, x, y, 0.05)
    for n, p in m.named_parameters():
        assert_close(p.grad, ref[n], torch.float64)
    assert isinstance(eng._rules[m[0]], LinearRule)


# ---- privacy: sensitivity and noise ------------------------------------------------------------

def test_optimizer_sensitivity_and_noise_std():
    m = nn.Sequential(nn.Linear(200, 100), nn.ReLU(), nn.Linear(100, 10))
    C = [0.3, 0.4]
    sigma, lr = 2.0, 1.0
    opt = torch.optim.SGD(m.parameters(), lr=lr)
    m, opt, _ = fastclip.make_private(m, opt, None, noise_multiplier=sigma, max_grad_norm=C,
                                      clipping="per_layer", loss_reduction="sum",
                                      generator=torch.Generator().manual_seed(3))
    assert opt.sensitivity == pytest.approx(0.5)
    assert opt.engine.bounds == (0.3, 0.4)
    w0 = m[0].weight.detach().clone()
    opt.zero_grad()
    CE(m(torch.randn(0, 200)), torch.zeros(0, dtype=torch.long)).sum().backward()
    opt.step()
    delta = (m[0].weight.detach() - w0).double()
    std = lr * sigma * 0.5  # sum reduction: denominator 1
    z = delta.flatten() / std        # 20000 standard normals if the std is right
    assert abs(z.std().item() - 1) < 5 / math.sqrt(2 * z.numel())
    assert abs(z.mean().item()) < 5 / math.sqrt(z.numel())


def test_make_private_mean_step_is_the_clipped_mean_plus_noise_of_the_right_std():
    torch.manual_seed(4)
    m = nn.Sequential(nn.Linear(60, 80), nn.Tanh(), nn.Linear(80, 50)).double()
    m0 = {n: p.detach().clone() for n, p in m.named_parameters()}
    ref_model = nn.Sequential(nn.Linear(60, 80), nn.Tanh(), nn.Linear(80, 50)).double()
    ref_model.load_state_dict(m.state_dict())
    x, y = torch.randn(8, 60, dtype=torch.float64) * 4, torch.randint(0, 50, (8,))
    sigma, C = 0.9, 0.2
    opt = torch.optim.SGD(m.parameters(), lr=1.0)
    m, opt, _ = fastclip.make_private(m, opt, None, noise_multiplier=sigma, max_grad_norm=C,
                                      clipping="per_layer", generator=torch.Generator().manual_seed(1))
    assert opt.sensitivity == pytest.approx(C)
    opt.zero_grad()
    nn.functional.cross_entropy(m(x), y).backward()
    opt.step()
    ref = reference_per_layer(ref_model, CE, x, y, C)
    z = torch.cat([((p.detach() - m0[n]) + ref[n] / 8).flatten() / (sigma * C / 8)
                   for n, p in m.named_parameters()])
    assert abs(z.std().item() - 1) < 5 / math.sqrt(2 * z.numel())
    assert abs(z.mean().item()) < 5 / math.sqrt(z.numel())
    # without noise the step is exactly the clipped mean
    m2 = nn.Sequential(nn.Linear(60, 80), nn.Tanh(), nn.Linear(80, 50)).double()
    m2.load_state_dict(ref_model.state_dict())
    opt2 = torch.optim.SGD(m2.parameters(), lr=1.0)
    m2, opt2, _ = fastclip.make_private(m2, opt2, None, noise_multiplier=0.0, max_grad_norm=C,
                                        clipping="per_layer")
    opt2.zero_grad()
    nn.functional.cross_entropy(m2(x), y).backward()
    opt2.step()
    for n, p in m2.named_parameters():
        assert_close(p.detach() - m0[n], -ref[n] / 8, torch.float64)


# ---- errors ----------------------------------------------------------------------------------

def test_errors():
    m = mlp()
    x, y = torch.randn(3, 5), torch.randint(0, 3, (3,))
    with pytest.raises(ValueError, match=r"3 layers \(0, 2, 4\), got 2 bounds"):
        fastclip.clipped_grad(m, CE, x, y, max_grad_norm=[1.0, 1.0], clipping="per_layer")
    with pytest.raises(TypeError, match="per_layer"):
        fastclip.clipped_grad(m, CE, x, y, max_grad_norm=[1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match=r"max_grad_norm\[1\] \(layer '2'\).*> 0"):
        fastclip.clipped_grad(m, CE, x, y, max_grad_norm=[1.0, 0.0, 1.0], clipping="per_layer")
    with pytest.raises(ValueError, match="> 0"):
        fastclip.clipped_grad(m, CE, x, y, max_grad_norm=[1.0, float("nan"), 1.0], clipping="per_layer")
    with pytest.raises(ValueError, match="> 0"):
        fastclip.clipped_grad(m, CE, x, y, max_grad_norm=-1.0, clipping="per_layer")
    with pytest.raises(ValueError, match="> 0"):
        fastclip.clipped_grad(m, CE, x, y, max_grad_norm=float("nan"), clipping="per_layer")
    with pytest.raises(ValueError, match="clipping must be"):
        fastclip.clipped_grad(m, CE, x, y, max_grad_norm=1.0, clipping="layerwise")
    with pytest.raises(ValueError, match="clipping must be"):
        fastclip.make_private(m, torch.optim.SGD(m.parameters(), lr=1.0), None, noise_multiplier=1.0,
                              max_grad_norm=1.0, clipping="layerwise")
    for mod in m.modules():  # the failed calls left nothing behind
        assert not mod._forward_hooks and not mod._forward_pre_hooks


# ---- the demo --------------------------------------------------------------------------------

def test_demo_with_per_layer_clipping(capsys):
    pytest.importorskip("sklearn", reason="the demo's data set comes from scikit-learn")
    from fastclip.cli import main

    assert main(["demo", "--epochs", "1", "--max-steps", "2", "--batch-size", "32",
                 "--clipping", "per_layer"]) == 0
    out = capsys.readouterr().out
    assert "clipping 'per_layer'" in out and "DP-SGD (fastclip)" in out


@pytest.mark.parametrize("clipping", ["flat", "per_layer"])
def test_a_failed_backward_leaves_nothing_behind(clipping):
    """A backward that fails after some layers were recorded (here a user hook on the input
    gradient) never runs the end-of-backward callback: the next backward starts clean. (Layers
    clipped before the failure have written p.grad, as autograd's own accumulation would.)"""
    m = mlp().double()
    x, y = torch.randn(4, 5, dtype=torch.float64), torch.randint(0, 3, (4,))
    ref = (reference_per_layer(m, CE, x, y, 0.1) if clipping == "per_layer"
           else R.clipped_sum(m, CE, x, y, 0.1))
    eng = Engine(m, max_grad_norm=0.1, clipping=clipping, loss_reduction="sum")
    xb = x.clone().requires_grad_()

    def boom(grad):
        raise RuntimeError("boom")
    xb.register_hook(boom)
    with pytest.raises(RuntimeError, match="boom"):
        CE(m(xb), y).sum().backward()
    for p in m.parameters():
        p.grad = None
    CE(m(x), y).sum().backward()
    eng.detach()
    assert eng.examples == 4  # the failed backward's examples are not counted
    for n, p in m.named_parameters():
        assert_close(p.grad, ref[n], torch.float64)
