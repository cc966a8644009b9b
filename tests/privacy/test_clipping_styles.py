"""clipping="automatic" / "automatic_per_layer" / "adaptive" against tests/reference.py (float64,
one backward per example), in every mode; the influence of one example measured by its definition
(tests/misuse_common.py)."""
import copy
import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import fastclip
import reference as R
from fastclip import accounting
from fastclip.clipping import AdaptiveClipping
from misuse_common import flat_params, influence, private, released
from harness import CE, MODES

GAMMA = 0.01


def mlp():
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 6), nn.Tanh(), nn.Linear(6, 3))


def conv():
    return nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.GroupNorm(2, 4), nn.ReLU(),
                         nn.Conv2d(4, 4, 3, stride=2), nn.Flatten(1), nn.Linear(16, 3))


MODELS = {"mlp": (mlp, (5,)), "conv": (conv, (2, 5, 5))}


def data(shape, B=6, outlier=True):
    x = torch.randn(B, *shape)
    if outlier:
        x[0] *= 30          # one example far above C, one tiny one
        x[1] *= 1e-3
    return x, torch.randint(0, 3, (B,))


def one_step(model, x, y, reduction="sum"):
    loss = CE(model(x), y)
    (loss.sum() if reduction == "sum" else loss.mean()).backward()


def flat_ref(model, x, y, factor):
    """sum_i factor(||g_i||) g_i, flattened like flat_params, from the float64 reference."""
    g = R.per_example_grads(model, CE, x, y)
    n = R.norms(model, CE, x, y)
    c = factor(n)
    return torch.cat([torch.tensordot(c, g[k], dims=1).flatten() for k, _ in model.named_parameters()])


def plain(private_model, build=mlp):
    """A model without fastclip's hooks holding ``private_model``'s current parameters."""
    m = build()
    m.load_state_dict(private_model.state_dict())
    return m


def close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


# ---- automatic clipping ----------------------------------------------------------------------

@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", list(MODELS))
def test_automatic_flat_equals_reference(mode, name):
    build, shape = MODELS[name]
    base, (x, y) = build(), data(shape)
    C = 0.7

    def loop(m):
        m, opt, _ = private(m, C, mode, clipping="automatic")
        opt.zero_grad()
        one_step(m, x, y)
        opt.step()
        return m

    got = released(base, loop)
    want = flat_ref(base, x, y, lambda n: C / (n + GAMMA))
    close(got, want)
    # not min(1, C/n): the tiny example is scaled up, so the two differ
    assert (want - flat_ref(base, x, y, lambda n: torch.clamp(C / n, max=1.0))).norm() > 1e-3


@pytest.mark.parametrize("mode", MODES)
def test_automatic_mean_reduction_and_gamma(mode):
    """loss_reduction="mean" (no loader: divided by the B seen) and a non-default gamma."""
    base, (x, y) = mlp(), data((5,))
    C, gamma, B = 1.3, 0.5, x.shape[0]

    def loop(m):
        m, opt, _ = private(m, C, mode, clipping="automatic", gamma=gamma, loss_reduction="mean")
        opt.zero_grad()
        one_step(m, x, y, "mean")
        opt.step()
        return m

    close(released(base, loop), flat_ref(base, x, y, lambda n: C / (n + gamma)) / B)


@pytest.mark.parametrize("mode", MODES)
def test_automatic_per_layer_equals_reference(mode):
    # float64: the outlier saturates the first tanh, and its fp32 gradient there (1 - tanh^2,
    # cancellation) is amplified by its factor C_l / (||g_il|| + gamma) ~ 30.
    base, (x, y) = mlp().double(), data((5,))
    x = x.double()
    bounds = [0.5, 0.3, 0.8]
    m = copy.deepcopy(base)
    before = flat_params(m)
    m, opt, _ = private(m, bounds, mode, clipping="automatic_per_layer")
    opt.zero_grad()
    one_step(m, x, y)
    opt.step()
    got = before - flat_params(m)
    assert opt.sensitivity == pytest.approx(math.sqrt(sum(c * c for c in bounds)))
    g = R.per_example_grads(base, CE, x, y)
    names = {id(p): n for n, p in m.named_parameters()}
    want = {}
    for layer, Cl in zip(opt.engine.layers, bounds):
        keys = [names[id(p)] for p in layer.params]
        n = torch.stack([g[k].flatten(1).square().sum(1) for k in keys]).sum(0).sqrt()
        for k in keys:
            want[k] = torch.tensordot(Cl / (n + GAMMA), g[k], dims=1)
    torch.testing.assert_close(got, torch.cat([want[k].flatten() for k, _ in base.named_parameters()]),
                               rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("mode", MODES)
def test_automatic_influence_below_C(mode):
    base, (x, y) = mlp(), data((5,), B=5)
    C = 0.4

    def update(idx):
        def loop(m):
            m, opt, _ = private(m, C, mode, clipping="automatic")
            opt.zero_grad()
            one_step(m, x[idx], y[idx])
            opt.step()
            return m
        return released(base, loop)

    inf = influence(update, x.shape[0])
    assert 0.5 * C < inf <= C


def test_automatic_clipped_grad_and_errors():
    base, (x, y) = mlp(), data((5,))
    m = copy.deepcopy(base)
    fastclip.clipped_grad(m, CE, x, y, max_grad_norm=1.0, clipping="automatic", gamma=0.1)
    got = torch.cat([p.grad.flatten().double() for p in m.parameters()])
    close(got, flat_ref(base, x, y, lambda n: 1.0 / (n + 0.1)))
    with pytest.raises(ValueError, match="gamma"):
        private(mlp(), 1.0, clipping="automatic", gamma=0.0)
    with pytest.raises(ValueError, match="clipping must be one of"):
        private(mlp(), 1.0, clipping="auto")
    with pytest.raises(TypeError, match="automatic_per_layer"):
        private(mlp(), [1.0, 1.0, 1.0], clipping="automatic")


# ---- adaptive clipping -----------------------------------------------------------------------

ADA = dict(target_unclipped_quantile=0.5, clipbound_learning_rate=0.2, max_clipbound=10.0,
           min_clipbound=0.01)


def adaptive_run(mode, noise_multiplier=0.0, unclipped_num_std=2.0, C=1.0, steps=3, N=64,
                 batch_size=16, seed=0, shape=(5,), build=mlp):
    torch.manual_seed(seed)
    base = build()
    ds = TensorDataset(torch.randn(N, *shape) * torch.rand(N, *([1] * len(shape))) * 4,
                       torch.randint(0, 3, (N,)))
    m = copy.deepcopy(base)
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    m, dp, loader = fastclip.make_private(
        m, opt, DataLoader(ds, batch_size=batch_size), noise_multiplier=noise_multiplier,
        max_grad_norm=C, mode=mode, clipping="adaptive", loss_reduction="sum",
        generator=torch.Generator().manual_seed(seed), unclipped_num_std=unclipped_num_std, **ADA)
    return m, dp, loader


@pytest.mark.parametrize("mode", MODES)
def test_adaptive_bound_follows_formula(mode):
    m, dp, loader = adaptive_run(mode)
    N, q = 64, dp.sample_rate
    moved = []
    it = iter(loader)
    for _ in range(4):
        x, y = next(it)
        C = dp.max_grad_norm
        ref_model = plain(m)
        n = R.norms(ref_model, CE, x, y) if len(x) else torch.zeros(0, dtype=torch.float64)
        # the count's noise: the step's seed stream (noise 0: add_noise draws no seed)
        g = torch.Generator()
        g.set_state(dp.generator.get_state())
        seed = int(torch.randint(0, 1 << 62, (1,), generator=g).item())
        z = float(torch.randn((), generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
        frac = (int((n <= C).sum()) - len(x) / 2 + 2.0 * z) / (N * q) + 0.5
        want = min(max(C * math.exp(-0.2 * (frac - 0.5)), 0.01), 10.0)
        before = flat_params(m)
        dp.zero_grad()
        one_step(m, x, y)
        dp.step()
        # the released step is clipped to this step's C (noise 0, lr 0.1, sum reduction)
        if len(x):
            torch.testing.assert_close((before - flat_params(m)) / 0.1,
                                       flat_ref(ref_model, x, y, lambda n: torch.clamp(C / n, max=1.0)),
                                       rtol=1e-4, atol=1e-6)
        assert dp.max_grad_norm == pytest.approx(want, rel=1e-12)
        moved.append(dp.max_grad_norm)
    assert len(set(moved)) > 1


def test_adaptive_influence_below_step_bound():
    """After the bound moved, one example moves the released sum by at most that step's C."""
    m, dp, loader = adaptive_run("auto", C=3.0, unclipped_num_std=0.01)
    for x, y in loader:          # an epoch: the bound moves towards the median norm
        dp.zero_grad()
        one_step(m, x, y)
        dp.step()
    Ct = dp.max_grad_norm
    assert Ct != 3.0
    torch.manual_seed(1)
    x, y = data((5,), B=5)
    base = plain(m)

    def update(idx):
        mm = copy.deepcopy(base)
        before = flat_params(mm)
        eng = fastclip.Engine(mm, max_grad_norm=Ct, loss_reduction="sum")
        for p in mm.parameters():
            p.grad = None
        one_step(mm, x[idx], y[idx])
        eng.detach()
        return torch.cat([p.grad.flatten().double() for p in mm.parameters()])

    # the engine dp uses clips exactly like a flat engine at Ct: compare one step of each
    dp.zero_grad()
    for p in m.parameters():
        p.grad = None
    one_step(m, x, y)
    full = torch.cat([p.grad.flatten().double() for p in m.parameters()])
    close(full, update(list(range(5))))
    dp.zero_grad()
    assert influence(update, 5) <= Ct * (1 + 1e-6)


def test_adaptive_noise_and_epsilon():
    """Gradient noise at z_grad = (z^-2 - (2 sigma_b)^-2)^-1/2 times C; epsilon at the user's z."""
    torch.manual_seed(0)
    z = 1.0
    for sb, want in ((0.6, (z ** -2 - 1.2 ** -2) ** -0.5), (1e6, z)):
        model = nn.Linear(400, 50)
        before = flat_params(model)
        m, dp, _ = fastclip.make_private(
            model, torch.optim.SGD(model.parameters(), lr=1.0), None,
            noise_multiplier=z, max_grad_norm=0.5, clipping="adaptive", loss_reduction="sum",
            generator=torch.Generator().manual_seed(3), unclipped_num_std=sb, **ADA)
        for p in m.parameters():       # no example: the update is the noise alone
            p.grad = torch.zeros_like(p)
        dp.engine.adopt_grads(m.parameters())
        dp.step()
        std = (before - flat_params(m)).std().item()
        assert std == pytest.approx(want * 0.5, rel=0.03)
    # the accountant counts every step at the user's z, not at z_grad
    m, dp, loader = adaptive_run("auto", noise_multiplier=z, unclipped_num_std=0.6)
    for x, y in loader:
        dp.zero_grad()
        one_step(m, x, y)
        dp.step()
    assert dp.steps == len(loader)
    assert dp.epsilon(1e-5) == pytest.approx(
        accounting.epsilon(z, dp.sample_rate, dp.steps, 1e-5), rel=1e-12)
    with pytest.raises(ValueError, match="unclipped_num_std"):
        fastclip.make_private(nn.Linear(3, 2), torch.optim.SGD(nn.Linear(3, 2).parameters(), lr=1),
                              None, noise_multiplier=1.0, max_grad_norm=1.0, clipping="adaptive",
                              unclipped_num_std=0.4, **ADA)


def test_adaptive_checkpoint_and_errors(tmp_path):
    m, dp, loader = adaptive_run("auto", unclipped_num_std=0.01)
    for x, y in loader:
        dp.zero_grad()
        one_step(m, x, y)
        dp.step()
    sd = dp.state_dict()
    m2, dp2, _ = adaptive_run("auto", unclipped_num_std=0.01)
    assert dp2.max_grad_norm == 1.0
    dp2.load_state_dict(sd)
    assert dp2.max_grad_norm == dp.max_grad_norm == dp2.engine.max_grad_norm
    # a non-adaptive run refuses an adaptive checkpoint and the other way round
    model = mlp()
    _, flat, _ = fastclip.make_private(model, torch.optim.SGD(model.parameters(), lr=1), None,
                                       noise_multiplier=0.0, max_grad_norm=1.0)
    with pytest.raises(ValueError, match="clipping='adaptive'"):
        flat.load_state_dict(sd)
    with pytest.raises(ValueError, match="needs"):
        private(mlp(), 1.0, clipping="adaptive", unclipped_num_std=1.0)
    with pytest.raises(ValueError, match="apply to clipping='adaptive' only"):
        private(mlp(), 1.0, clipping="flat", unclipped_num_std=1.0)
    with pytest.raises(ValueError, match="larger than min_clipbound"):
        AdaptiveClipping(1.0, target_unclipped_quantile=0.5, clipbound_learning_rate=0.2,
                         max_clipbound=0.1, min_clipbound=0.2, unclipped_num_std=1.0)


def test_clipped_grad_refuses_adaptive_clipping():
    m = torch.nn.Linear(3, 2)
    with pytest.raises(ValueError, match="adaptive.*clipped_grad takes no step"):
        fastclip.clipped_grad(m, lambda o, y: o.sum(1), torch.randn(4, 3), None,
                              max_grad_norm=1.0, clipping="adaptive")
    assert m.weight.grad is None


@pytest.mark.parametrize("mode", ["auto", "nanobatch"])
def test_adaptive_count_moves_by_half_when_one_example_is_removed(mode):
    """The second release of an adaptive step, the centred count sum_i (b_i - 1/2) with
    b_i = [||g_i|| <= C], moves by exactly 1/2 when one example is removed (its sensitivity in
    the privacy analysis), whichever example it is, clipped or not."""
    torch.manual_seed(2)
    m = mlp()
    x, y = data((5,), B=7)
    C = float(fastclip.per_sample_grad_norms(m, CE, x, y).median())   # some clipped, some not

    def centred(idx):
        eng = fastclip.Engine(m, mode=mode, max_grad_norm=C, loss_reduction="sum",
                              clipping="adaptive")
        for p in m.parameters():
            p.grad = None
        one_step(m, x[idx], y[idx])
        eng.detach()
        assert eng.examples == len(idx)
        return eng.unclipped - eng.examples / 2

    full = centred(list(range(7)))
    moves = [full - centred([i for i in range(7) if i != j]) for j in range(7)]
    assert all(abs(d) == 0.5 for d in moves), moves
    assert {0.5, -0.5} <= set(moves)     # the batch has clipped and unclipped examples


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_clip_factors_by_their_definition(dtype):
    # The one formula every mode uses: min(1, C / norm) (automatic: C / (norm + gamma)), 0 for a
    # norm that is not finite; a norm of 0 keeps its example whole. Checked element by element
    # against Python floats, with per-layer bounds broadcasting over (B, L).
    from fastclip.clipping import clip_factors

    g = torch.Generator().manual_seed(0)
    norms = (torch.rand(40, 3, generator=g, dtype=torch.float64) * 3).to(dtype)
    tiny, huge = torch.finfo(dtype).tiny, torch.finfo(dtype).max
    specials = [0.0, float("inf"), float("nan"), 1.0, 0.5, 2.0, tiny, huge]
    for i, v in enumerate(specials):
        norms[i, i % 3] = v
    bounds = torch.tensor([1.0, 0.5, 2.0], dtype=dtype)
    for automatic in (False, True):
        for C in (1.0, bounds):
            got = clip_factors(norms, C, automatic, GAMMA)
            assert got.dtype == dtype and got.shape == norms.shape
            for (b, l), n in zip(((b, l) for b in range(40) for l in range(3)), norms.flatten()):
                c_bound = float(C) if isinstance(C, float) else float(C[l])
                n = float(n)
                if not math.isfinite(n):
                    want = 0.0
                elif automatic:
                    want = c_bound / (n + GAMMA)
                else:
                    want = 1.0 if n <= c_bound else c_bound / n
                assert float(got[b, l]) == pytest.approx(want, rel=1e-6, abs=0.0), (b, l, n)
                if math.isfinite(n):
                    assert float(got[b, l]) * n <= c_bound * (1 + 1e-6)
