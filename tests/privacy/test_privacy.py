"""The privacy guarantee end to end: sensitivity of the clipped sum (adversarial examples, every
mode, every layer family with a rule), the noise of a full make_private step, Poisson sampling,
secure mode, argument errors, and checkpoints that resume exactly."""
import copy
import io
import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, IterableDataset, TensorDataset

import fastclip
import reference as R
from fastclip.data import PoissonBatchSampler, PoissonDataLoader, poisson_loader
from harness import MODES, flat_grad, mse
from models import Doubler  # shared test models

DELTA = 1e-5


class ScaleShift(nn.Module):
    """A leaf without a native rule: the generic rule covers it."""

    def __init__(self, d):
        super().__init__()
        self.w = nn.Parameter(torch.randn(d, d) * 0.3)
        self.b = nn.Parameter(torch.randn(d) * 0.1)

    def forward(self, x):
        return torch.sin(x @ self.w) + self.b


class Mixed(nn.Module):
    """Embedding (repeated tokens, padding), LayerNorm, Linear over a sequence, Conv1d, a generic
    leaf, and a Linear head: every rule the engine has today, in one model."""

    def __init__(self, V=11, d=6, k=3):
        super().__init__()
        self.emb = nn.Embedding(V, d, padding_idx=0)
        self.ln = nn.LayerNorm(d)
        self.seq = nn.Linear(d, d)
        self.conv = nn.Conv1d(d, 4, 3, padding=1)
        self.custom = ScaleShift(3)
        self.head = nn.Linear(4 + 3, k)

    def forward(self, tokens, feats):
        h = torch.tanh(self.seq(self.ln(self.emb(tokens))))          # (B, T, d)
        c = self.conv(h.transpose(1, 2)).mean(2)                     # (B, 4)
        return self.head(torch.cat([c, self.custom(feats)], 1))


def adversarial_batch(dtype, B=7, T=5, k=3):
    """Ordinary examples beside ones built to have enormous gradients (huge regression targets,
    huge features, a sequence of one repeated token, padding only)."""
    tokens = torch.randint(1, 11, (B, T))
    feats = torch.randn(B, 3, dtype=dtype)
    y = torch.randn(B, k, dtype=dtype)
    y[1] = 1e6                           # gradient norm ~1e6 everywhere
    feats[2] *= 1e4                      # huge activations into the generic leaf
    tokens[3] = 7                        # one token repeated: its rows add up
    y[3] = -1e5
    tokens[4] = 0                        # padding only
    y[5] = 1e8
    feats[5] *= 1e3
    return (tokens, feats), y


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("C", [1e-3, 1.0])
def test_removing_any_example_moves_the_clipped_sum_by_at_most_C(mode, dtype, C):
    torch.manual_seed(3)
    m = Mixed().to(dtype)
    (tokens, feats), y = adversarial_batch(dtype)
    B = len(y)
    norms = fastclip.clipped_grad(m, mse, (tokens, feats), y, max_grad_norm=C, mode=mode)
    assert norms.max() > 1e5 * C     # the batch really is adversarial
    full = flat_grad(m)
    rtol = 1e-4 if dtype == torch.float32 else 1e-9
    diffs = []
    for i in range(B):
        keep = [j for j in range(B) if j != i]
        fastclip.clipped_grad(m, mse, (tokens[keep], feats[keep]), y[keep], max_grad_norm=C, mode=mode)
        diffs.append((full - flat_grad(m)).norm().item())
    assert max(diffs) <= C * (1 + rtol), diffs
    # tight: a clipped example moves the sum by exactly C (the bound is not met by losing gradients)
    for i in range(B):
        if norms[i] > C * 1.01:
            assert diffs[i] >= C * (1 - rtol)


@pytest.mark.parametrize("mode", MODES)
def test_removing_the_only_example_moves_by_at_most_C(mode):
    m = Mixed().double()
    tokens, feats = torch.full((1, 5), 7), torch.randn(1, 3, dtype=torch.float64) * 1e3
    y = torch.full((1, 3), 1e7, dtype=torch.float64)
    fastclip.clipped_grad(m, mse, (tokens, feats), y, max_grad_norm=0.5, mode=mode)
    assert flat_grad(m).norm().item() == pytest.approx(0.5, rel=1e-9)
    fastclip.clipped_grad(m, mse, (tokens[:0], feats[:0]), y[:0], max_grad_norm=0.5, mode=mode)
    assert flat_grad(m).norm().item() == 0


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_sensitivity_of_the_released_update(mode, reduction):
    """Through the optimizer, the step that is released: without noise, neighbouring batches give
    updates at most C apart ("sum"), C / E apart with the expected batch size E ("mean")."""
    torch.manual_seed(4)
    (tokens, feats), y = adversarial_batch(torch.float64)
    ds = TensorDataset(tokens, feats, y)
    base = Mixed().double()
    C = 0.3

    def update(idx):
        m = copy.deepcopy(base)
        opt = torch.optim.SGD(m.parameters(), lr=1.0)
        m, opt, _ = fastclip.make_private(m, opt, DataLoader(ds, batch_size=2), noise_multiplier=0.0,
                                          max_grad_norm=C, mode=mode, loss_reduction=reduction)
        assert opt.sensitivity == C
        # The neighbouring batches are built here, not drawn by the loader (step() refuses
        # those): the same optimizer with make_private's rate and expected batch size, no sampler.
        opt = fastclip.DPOptimizer(opt.original_optimizer, opt.engine, 0.0, opt.expected_batch_size,
                                   sample_rate=opt.sample_rate)
        opt.zero_grad()
        loss = mse(m(tokens[idx], feats[idx]), y[idx])
        (loss.sum() if reduction == "sum" else loss.mean()).backward()
        opt.step()
        E = opt.expected_batch_size if reduction == "mean" else 1.0
        return torch.cat([(p - p0).flatten() for p, p0 in zip(m.parameters(), base.parameters())]), E

    full, E = update(list(range(len(y))))
    if reduction == "mean":
        assert E == pytest.approx(len(y) / 4)     # 7 examples, 4 batches per epoch
    for i in range(len(y)):
        part, _ = update([j for j in range(len(y)) if j != i])
        assert (full - part).norm().item() <= C / E * (1 + 1e-9)


def test_a_nan_example_contributes_nothing():
    """An example whose forward overflows to NaN/inf must neither poison the clipped sum nor show
    in it: the sum equals the one without that example, and the step goes through."""
    m = nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3), nn.Linear(3, 2), Doubler(2))
    x, y = torch.randn(4, 4), torch.randn(4, 2)
    x[1] = 1e30
    keep = torch.tensor([0, 2, 3])
    for mode in ("auto", "ghost", "direct"):
        norms = fastclip.clipped_grad(m, mse, x, y, max_grad_norm=1.0, mode=mode)
        assert not torch.isfinite(norms[1]) and torch.isfinite(norms[keep]).all()
        got = [p.grad.clone() for p in m.parameters()]
        fastclip.clipped_grad(m, mse, x[keep], y[keep], max_grad_norm=1.0, mode=mode)
        for g, p in zip(got, m.parameters()):
            torch.testing.assert_close(g, p.grad)
    opt = torch.optim.SGD(m.parameters(), lr=1.0)
    m, opt, _ = fastclip.make_private(m, opt, None, noise_multiplier=1.0, max_grad_norm=1.0)
    opt.zero_grad()
    mse(m(x), y).mean().backward()
    opt.step()
    assert opt.steps == 1 and all(torch.isfinite(p).all() for p in m.parameters())



# ---- noise ------------------------------------------------------------------------------------

def ks_normal(z):
    z, _ = torch.sort(z.double().flatten())
    n = z.numel()
    cdf = torch.special.ndtr(z)
    i = torch.arange(1, n + 1, dtype=torch.float64)
    return max((i / n - cdf).max().item(), (cdf - (i - 1) / n).max().item())


def test_noise_of_a_full_make_private_step_has_the_known_std():
    """Noise only (an empty Poisson batch): every parameter moves by lr * N(0, (sigma C / E)^2),
    independently across parameters, tensors and steps."""
    N, bs = 400, 16
    ds = TensorDataset(torch.randn(N, 100), torch.randint(0, 10, (N,)))
    m = nn.Sequential(nn.Linear(100, 100), nn.Linear(100, 100))
    sigma, C, lr = 1.7, 0.6, 0.5
    opt = torch.optim.SGD(m.parameters(), lr=lr)
    m, opt, loader = fastclip.make_private(m, opt, DataLoader(ds, batch_size=bs), noise_multiplier=sigma,
                                           max_grad_norm=C, generator=torch.Generator().manual_seed(5))
    E = opt.expected_batch_size
    assert E == pytest.approx(N / len(loader)) and E == pytest.approx(16)
    # The steps below run on empty batches built here, not drawn by the loader (step() refuses
    # those): the same optimizer, noise generator, rate and expected batch size, no sampler.
    opt = fastclip.DPOptimizer(opt.original_optimizer, opt.engine, sigma, E, opt.generator,
                               opt.sample_rate)
    std = lr * sigma * C / E
    deltas = []
    for _ in range(2):
        before = torch.cat([p.detach().flatten() for p in m.parameters()])
        opt.zero_grad()
        nn.functional.cross_entropy(m(torch.randn(0, 100)), torch.zeros(0, dtype=torch.long)).backward()
        opt.step()
        deltas.append(torch.cat([p.detach().flatten() for p in m.parameters()]) - before)
    z = torch.cat(deltas).double() / std           # 40400 standard normals if the std is right
    n = z.numel()
    assert abs(z.std().item() - 1) < 5 / math.sqrt(2 * n)
    assert abs(z.mean().item()) < 5 / math.sqrt(n)
    assert ks_normal(z) < 1.95 / math.sqrt(n)
    # independent across steps and across the two same-shaped weight tensors
    assert abs(torch.corrcoef(torch.stack(deltas))[0, 1].item()) < 5 / math.sqrt(n / 2)
    w0, w1 = deltas[0][:10000], deltas[0][10100:20100]
    assert abs(torch.corrcoef(torch.stack([w0, w1]))[0, 1].item()) < 0.05


@pytest.mark.parametrize("secure", [False, True])
def test_noise_beside_data_is_the_clipped_mean_plus_known_noise(secure):
    torch.manual_seed(6)
    m = nn.Sequential(nn.Linear(60, 80), nn.Tanh(), nn.Linear(80, 50)).double()
    m0 = copy.deepcopy(m)
    ds = TensorDataset(torch.randn(64, 60, dtype=torch.float64) * 4, torch.randint(0, 50, (64,)))
    sigma, C = 0.9, 0.2
    kw = dict(secure_mode=True) if secure else dict(generator=torch.Generator().manual_seed(1))
    opt = torch.optim.SGD(m.parameters(), lr=1.0)
    m, opt, loader = fastclip.make_private(m, opt, DataLoader(ds, batch_size=8), noise_multiplier=sigma,
                                           max_grad_norm=C, **kw)
    x, y = next(iter(loader))
    opt.zero_grad()
    nn.functional.cross_entropy(m(x), y).backward()
    opt.step()
    E = opt.expected_batch_size
    ref = R.clipped_sum(m0, nn.CrossEntropyLoss(reduction="none"), x, y, C) if len(x) else None
    z = []
    for (n, p), p0 in zip(m.named_parameters(), m0.parameters()):
        signal = -ref[n] / E if ref is not None else 0
        z.append(((p - p0).detach() - signal).flatten() / (sigma * C / E))
    z = torch.cat(z)
    assert abs(z.std().item() - 1) < 5 / math.sqrt(2 * z.numel())
    assert abs(z.mean().item()) < 5 / math.sqrt(z.numel())


def _noisy_run(seed=None, secure=False, steps=3):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    ds = TensorDataset(torch.randn(30, 6), torch.randint(0, 3, (30,)))
    kw = dict(secure_mode=True) if secure else dict(generator=torch.Generator().manual_seed(seed))
    m, opt, loader = fastclip.make_private(m, torch.optim.SGD(m.parameters(), lr=0.1),
                                           DataLoader(ds, batch_size=5), noise_multiplier=1.0,
                                           max_grad_norm=1.0, **kw)
    torch.manual_seed(123)      # the global generator plays no part
    sizes = []
    for x, y in loader:
        sizes.append(len(x))
        opt.zero_grad()
        nn.functional.cross_entropy(m(x), y).backward()
        opt.step()
    return torch.cat([p.detach().flatten() for p in m.parameters()]), sizes


def test_one_seed_reproduces_noise_and_sampling_and_secure_mode_does_not():
    a, sa = _noisy_run(seed=7)
    b, sb = _noisy_run(seed=7)
    assert torch.equal(a, b) and sa == sb
    c, _ = _noisy_run(seed=8)
    assert not torch.equal(a, c)
    s1, _ = _noisy_run(secure=True)
    s2, _ = _noisy_run(secure=True)
    assert not torch.equal(s1, s2)


def test_secure_mode_refuses_generators():
    m = nn.Linear(3, 2)
    ds = TensorDataset(torch.randn(10, 3), torch.zeros(10, dtype=torch.long))
    with pytest.raises(ValueError, match="secure_mode.*os.urandom"):
        fastclip.make_private(m, torch.optim.SGD(m.parameters(), lr=1), None, noise_multiplier=1.0,
                              max_grad_norm=1.0, secure_mode=True, generator=torch.Generator())
    with pytest.raises(ValueError, match="secure_mode"):
        fastclip.make_private(m, torch.optim.SGD(m.parameters(), lr=1), DataLoader(ds, batch_size=2),
                              noise_multiplier=1.0, max_grad_norm=1.0, secure_mode=True,
                              sampling_generator=torch.Generator())
    assert not m._forward_hooks
    _, opt, loader = fastclip.make_private(m, torch.optim.SGD(m.parameters(), lr=1),
                                           DataLoader(ds, batch_size=2), noise_multiplier=1.0,
                                           max_grad_norm=1.0, secure_mode=True)
    assert opt.generator is None and loader.batch_sampler.secure and loader.batch_sampler.generator is None


# ---- Poisson sampling -------------------------------------------------------------------------

@pytest.mark.parametrize("secure", [False, True])
def test_poisson_batches_are_binomial_and_independent(secure):
    N, q, batches = 200, 0.05, 2000
    gen = None if secure else torch.Generator().manual_seed(2)
    sampler = PoissonBatchSampler(N, q, batches, generator=gen, secure=secure)
    counts = torch.zeros(N)
    sizes = []
    for b in sampler:
        assert len(set(b)) == len(b) and all(0 <= i < N for i in b)
        counts[b] += 1
        sizes.append(len(b))
    sizes = torch.tensor(sizes, dtype=torch.float64)
    # batch size ~ Binomial(N, q): mean 10, variance 9.5
    assert abs(sizes.mean().item() - N * q) < 5 * math.sqrt(N * q * (1 - q) / batches)
    assert abs(sizes.var().item() / (N * q * (1 - q)) - 1) < 0.15
    # every index is included with frequency q
    freq = counts / batches
    assert (freq - q).abs().max().item() < 5 * math.sqrt(q * (1 - q) / batches)


def test_poisson_loader_from_a_seeded_generator():
    ds = TensorDataset(torch.randn(50, 2), torch.arange(50))
    draw = lambda s: [b[1].tolist() for b in poisson_loader(DataLoader(ds, batch_size=10),
                                                             torch.Generator().manual_seed(s))]
    assert draw(1) == draw(1) and draw(1) != draw(2)
    loader = poisson_loader(DataLoader(ds, batch_size=10))
    assert isinstance(loader, PoissonDataLoader) and len(loader) == 5
    assert loader.batch_sampler.sample_rate == pytest.approx(0.2)


def test_empty_batches_reach_the_loop_and_step():
    ds = TensorDataset(torch.randn(4, 3), torch.randint(0, 2, (4,)))
    m = nn.Linear(3, 2)
    m, opt, loader = fastclip.make_private(m, torch.optim.SGD(m.parameters(), lr=0.1),
                                           DataLoader(ds, batch_size=1), noise_multiplier=1.0,
                                           max_grad_norm=1.0, generator=torch.Generator().manual_seed(0))
    sizes = []
    for _ in range(10):
        for x, y in loader:
            sizes.append(len(x))
            opt.zero_grad()
            nn.functional.cross_entropy(m(x), y, reduction="sum").backward()
            opt.step()
    assert 0 in sizes and opt.steps == 40
    assert all(torch.isfinite(p).all() for p in m.parameters())


def test_mean_is_divided_by_the_expected_batch_size():
    torch.manual_seed(1)
    ds = TensorDataset(torch.randn(30, 4, dtype=torch.float64) * 3, torch.randint(0, 3, (30,)))
    m = nn.Linear(4, 3).double()
    m0 = copy.deepcopy(m)
    m, opt, loader = fastclip.make_private(m, torch.optim.SGD(m.parameters(), lr=1.0),
                                           DataLoader(ds, batch_size=6), noise_multiplier=0.0,
                                           max_grad_norm=0.5, generator=torch.Generator().manual_seed(3))
    x, y = next(iter(loader))
    assert len(x) != 6          # this draw is not the expected size; the divisor still is
    opt.zero_grad()
    nn.functional.cross_entropy(m(x), y).backward()
    opt.step()
    ref = R.clipped_sum(m0, nn.CrossEntropyLoss(reduction="none"), x, y, 0.5)
    for (n, p), p0 in zip(m.named_parameters(), m0.parameters()):
        torch.testing.assert_close(p - p0, -ref[n] / 6, rtol=1e-10, atol=1e-12)


# ---- errors ------------------------------------------------------------------------------------

def _parts():
    m = nn.Sequential(nn.Linear(3, 2))
    return m, torch.optim.SGD(m.parameters(), lr=1.0)


@pytest.mark.parametrize("kwargs, err, match", [
    (dict(noise_multiplier=-0.1), ValueError, r"noise_multiplier must be a finite number >= 0, got -0\.1"),
    (dict(noise_multiplier=float("nan")), ValueError, r"noise_multiplier.*nan"),
    (dict(max_grad_norm=0.0), ValueError, r"max_grad_norm must be a finite number > 0, got 0\.0"),
    (dict(max_grad_norm=-2), ValueError, r"max_grad_norm.*-2"),
    (dict(max_grad_norm=float("inf")), ValueError, r"max_grad_norm.*inf"),
    (dict(accountant="moments"), ValueError, r"accountant.*'moments'"),
    (dict(sampling_generator=3), TypeError, "sampling_generator"),
])
def test_make_private_argument_errors(kwargs, err, match):
    m, opt = _parts()
    args = dict(noise_multiplier=1.0, max_grad_norm=1.0)
    args.update(kwargs)
    with pytest.raises(err, match=match):
        fastclip.make_private(m, opt, None, **args)
    assert not m[0]._forward_hooks and not m[0].weight._backward_hooks


def test_loaders_poisson_sampling_cannot_use():
    class Stream(IterableDataset):
        def __iter__(self):
            yield from zip(torch.randn(8, 3), torch.zeros(8, dtype=torch.long))

    class NoLen(Dataset):
        def __getitem__(self, i):
            return torch.randn(3), 0

    m, opt = _parts()
    with pytest.raises(ValueError, match="IterableDataset Stream.*poisson_sampling=False"):
        fastclip.make_private(m, opt, DataLoader(Stream(), batch_size=2), noise_multiplier=1.0,
                              max_grad_norm=1.0)
    with pytest.raises(ValueError, match="NoLen has none"):
        fastclip.make_private(m, opt, DataLoader(NoLen(), batch_size=2), noise_multiplier=1.0,
                              max_grad_norm=1.0)
    with pytest.raises(TypeError, match="DataLoader"):
        fastclip.make_private(m, opt, [(torch.randn(2, 3), torch.zeros(2))], noise_multiplier=1.0,
                              max_grad_norm=1.0)
    assert not m[0]._forward_hooks
    # without Poisson sampling an iterable loader is used as given, and epsilon is not claimed
    _, opt, loader = fastclip.make_private(m, opt, DataLoader(Stream(), batch_size=2), noise_multiplier=1.0,
                                           max_grad_norm=1.0, poisson_sampling=False)
    with pytest.raises(ValueError, match="sampling rate"):
        opt.epsilon(DELTA)


def test_sample_rate_delta_and_noise_errors_name_the_value():
    from fastclip.engine import Engine
    for q in (0.0, 1.5, -0.2):
        with pytest.raises(ValueError, match=rf"sample_rate must be in \(0, 1\], got {q}"):
            PoissonBatchSampler(10, q)
        m, opt = _parts()
        e = Engine(m, max_grad_norm=1.0, loss_reduction="sum")
        with pytest.raises(ValueError, match=rf"sample_rate.*{q}"):
            fastclip.DPOptimizer(opt, e, 1.0, sample_rate=q)
        e.detach()
    m, opt = _parts()
    e = Engine(m, max_grad_norm=1.0, loss_reduction="mean")
    with pytest.raises(ValueError, match="expected_batch_size"):
        fastclip.DPOptimizer(opt, e, 1.0, sample_rate=0.1)
    with pytest.raises(ValueError, match=r"expected_batch_size.*-3"):
        fastclip.DPOptimizer(opt, e, 1.0, expected_batch_size=-3, sample_rate=0.1)
    dp = fastclip.DPOptimizer(opt, e, 1.0, expected_batch_size=4, sample_rate=0.1)
    for d in (0.0, 1.0, 2.0, -1e-5):
        with pytest.raises(ValueError, match=rf"delta must be in \(0, 1\), got {d}"):
            dp.epsilon(d)
    with pytest.raises(ValueError, match=r"noise_multiplier.*-1"):
        dp.noise_multiplier = -1
    assert dp.noise_multiplier == 1.0
    with pytest.raises(TypeError, match="already private"):
        fastclip.DPOptimizer(dp, e, 1.0)
    e.detach()


# ---- accounting through the optimizer ----------------------------------------------------------

def test_noise_multiplier_change_mid_run_composes():
    ds = TensorDataset(torch.randn(20, 3), torch.randint(0, 2, (20,)))
    m = nn.Linear(3, 2)
    m, opt, loader = fastclip.make_private(m, torch.optim.SGD(m.parameters(), lr=0.1),
                                           DataLoader(ds, batch_size=4), noise_multiplier=1.0,
                                           max_grad_norm=1.0)
    for epoch in range(2):
        for x, y in loader:
            opt.zero_grad()
            nn.functional.cross_entropy(m(x), y).backward()
            opt.step()
        opt.noise_multiplier = 2.5
    assert opt.accountant.history == [[1.0, 0.2, 5], [2.5, 0.2, 5]]
    acc = fastclip.PrivacyAccountant()
    acc.step(1.0, 0.2, 5)
    acc.step(2.5, 0.2, 5)
    assert opt.epsilon(DELTA) == acc.epsilon(DELTA)
    assert opt.epsilon(DELTA, "pld") == acc.epsilon(DELTA, "pld")
    assert fastclip.accounting.epsilon(2.5, 0.2, 10, DELTA) < opt.epsilon(DELTA) \
        < fastclip.accounting.epsilon(1.0, 0.2, 10, DELTA)


# ---- checkpoints -------------------------------------------------------------------------------

def _run(total, stop=None, resume=None, seed=11, workers=0, init_seed=0):
    """Train ``total`` steps (3 epochs of 5 batches), Adam, noise on, the noise multiplier changed
    after step 6; stop after ``stop`` steps and return a checkpoint, or resume from one."""
    torch.manual_seed(init_seed)
    g = torch.Generator().manual_seed(99)
    ds = TensorDataset(torch.randn(40, 5, generator=g), torch.randint(0, 3, (40,), generator=g))
    m = nn.Sequential(nn.Linear(5, 6), nn.LayerNorm(6), nn.Tanh(), nn.Linear(6, 3))
    opt = torch.optim.Adam(m.parameters(), lr=0.05)
    m, opt, loader = fastclip.make_private(
        m, opt, DataLoader(ds, batch_size=8, num_workers=workers), noise_multiplier=1.2,
        max_grad_norm=0.7, generator=torch.Generator().manual_seed(seed))
    if resume is not None:
        ckpt = torch.load(io.BytesIO(resume), weights_only=False)
        m.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
    while opt.steps < total:
        for x, y in loader:
            opt.zero_grad()
            nn.functional.cross_entropy(m(x), y).backward()
            opt.step()
            if opt.steps == 6:
                opt.noise_multiplier = 2.0
            if opt.steps == stop:
                buf = io.BytesIO()
                torch.save({"model": m.state_dict(), "optimizer": opt.state_dict()}, buf)
                return buf.getvalue()
    assert opt.steps == total
    return torch.cat([p.detach().flatten() for p in m.parameters()]), opt.epsilon(DELTA), \
        opt.accountant.history


@pytest.mark.parametrize("stop", [5, 7])        # at an epoch boundary, and mid-epoch
@pytest.mark.parametrize("workers", [0, 2])     # workers prefetch batches the loop never receives
def test_checkpoint_resume_is_exact(stop, workers):
    params, eps, history = _run(15, workers=workers)
    ckpt = _run(15, stop=stop, workers=workers)
    # resumed in a fresh process-like setting: other initial weights, other seeds
    params2, eps2, history2 = _run(15, resume=ckpt, seed=12345, workers=workers, init_seed=1)
    assert torch.equal(params, params2)
    assert eps == eps2 and history == history2 == [[1.2, 0.2, 6], [2.0, 0.2, 9]]


def test_load_state_dict_refuses_what_would_lose_privacy_state():
    ds = TensorDataset(torch.randn(40, 5), torch.randint(0, 3, (40,)))
    m = nn.Linear(5, 3)
    m, opt, _ = fastclip.make_private(m, torch.optim.SGD(m.parameters(), lr=0.1),
                                      DataLoader(ds, batch_size=8), noise_multiplier=1.0, max_grad_norm=1.0)
    plain = torch.optim.SGD(nn.Linear(5, 3).parameters(), lr=0.1).state_dict()
    with pytest.raises(ValueError, match="no privacy state"):
        opt.load_state_dict(plain)
    m2 = nn.Linear(5, 3)
    _, opt2, _ = fastclip.make_private(m2, torch.optim.SGD(m2.parameters(), lr=0.1),
                                       DataLoader(ds, batch_size=4), noise_multiplier=1.0, max_grad_norm=1.0)
    opt.accountant.step(1.0, 0.2, 3)
    with pytest.raises(ValueError, match="sample_rate=0.2.*0.1"):
        opt2.load_state_dict(opt.state_dict())
    assert opt2.steps == 0        # nothing was half-loaded
    sd = opt.state_dict()
    assert set(sd) >= {"state", "param_groups", "fastclip"}
    assert opt.state_dict()["fastclip"]["accountant"]["history"] == [[1.0, 0.2, 3]]


def test_sampler_state_skips_prefetched_batches():
    ds = TensorDataset(torch.arange(30))
    ref = poisson_loader(DataLoader(ds, batch_size=3), torch.Generator().manual_seed(4))
    want = [b[0].tolist() for _ in range(2) for b in ref]          # 20 batches, uninterrupted
    loader = poisson_loader(DataLoader(ds, batch_size=3, num_workers=2),
                            torch.Generator().manual_seed(4))
    got = []
    for b in loader:
        got.append(b[0].tolist())
        if len(got) == 3:
            break               # workers have drawn batches beyond the third
    state = loader.state_dict()
    assert state["consumed"] == 3
    fresh = poisson_loader(DataLoader(ds, batch_size=3), torch.Generator().manual_seed(0))
    fresh.load_state_dict(state)
    got += [b[0].tolist() for b in fresh]           # the rest of the first epoch
    got += [b[0].tolist() for b in fresh]           # a whole second epoch
    assert got == want


class Recurrent(nn.Module):
    """torch.nn recurrent layers, converted to fastclip.nn's by make_private / clipped_grad."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(9, 4)
        self.gru = nn.GRU(4, 5, batch_first=True)
        self.lstm = nn.LSTM(5, 3, batch_first=True)
        self.head = nn.Linear(3, 2)

    def forward(self, tokens):
        h, _ = self.gru(self.emb(tokens))
        h, _ = self.lstm(h)
        return self.head(h[:, -1])


@pytest.mark.parametrize("mode", MODES)
def test_sensitivity_with_recurrent_layers(mode):
    torch.manual_seed(8)
    m = Recurrent().double()
    tokens = torch.randint(0, 9, (5, 6))
    tokens[2] = 3
    y = torch.randn(5, 2, dtype=torch.float64)
    y[1], y[3] = 1e6, -1e4
    C = 0.05
    fastclip.clipped_grad(m, mse, tokens, y, max_grad_norm=C, mode=mode)
    full = flat_grad(m)
    for i in range(5):
        keep = [j for j in range(5) if j != i]
        fastclip.clipped_grad(m, mse, tokens[keep], y[keep], max_grad_norm=C, mode=mode)
        assert (full - flat_grad(m)).norm().item() <= C * (1 + 1e-9)


class KernelPaths(nn.Module):
    """float32 layers that run fastclip's own AVX-512 kernels on such a CPU (csrc/gemm_avx512.h,
    csrc/conv_direct.h): an LSTM (its time loops and clipped sums), a 3 x 3 conv over 16 x 16
    maps with 16 output channels (the direct method's kernel, kept per-example gradients), and a
    Linear over 40 positions (ghost tiles, clipped sum)."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(9, 6)
        self.lstm = nn.LSTM(6, 20, batch_first=True)
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.seq = nn.Linear(20, 24)
        self.head = nn.Linear(24 + 16, 2)

    def forward(self, tokens, image):
        h, _ = self.lstm(self.emb(tokens))                         # (B, 40, 20)
        s = torch.tanh(self.seq(h)).mean(1)                        # (B, 24)
        c = torch.tanh(self.conv(image)).mean((2, 3))              # (B, 16)
        return self.head(torch.cat([s, c], 1))


@pytest.mark.parametrize("gemm_kernels", [True, False])
@pytest.mark.parametrize("mode", ["auto", "direct", "ghost"])
def test_sensitivity_through_the_native_float32_kernels(mode, gemm_kernels):
    # Remove each example in turn: the float32 clipped sum moves by at most C, and by C itself for
    # the clipped ones, through every product the AVX-512 kernels form (fallback paths elsewhere),
    # with the GEMM kernels preferred and bypassed (which one a CPU takes by default depends on
    # its core: csrc/gemm_avx512.h).
    from fastclip import _C

    if gemm_kernels and (_C is None or not _C.small_gemm_available()):
        pytest.skip("the AVX-512 GEMM kernels do not run on this CPU")
    old = None if _C is None else _C.set_gemm_kernels(gemm_kernels)
    try:
        _removal_moves_at_most_C(mode)
    finally:
        if old is not None:
            _C.set_gemm_kernels(old)


def _removal_moves_at_most_C(mode):
    torch.manual_seed(9)
    m = KernelPaths()
    B = 7
    tokens = torch.randint(0, 9, (B, 40))
    tokens[2] = 4                                    # one token repeated
    image = torch.randn(B, 3, 16, 16)
    image[3] *= 1e3                                  # huge activations into the conv
    y = torch.randn(B, 2)
    y[1], y[5] = 1e6, -1e4                           # huge gradients everywhere
    C = 0.05
    norms = fastclip.clipped_grad(m, mse, (tokens, image), y, max_grad_norm=C, mode=mode)
    assert norms.max() > 1e3 * C
    full = flat_grad(m)
    for i in range(B):
        keep = [j for j in range(B) if j != i]
        fastclip.clipped_grad(m, mse, (tokens[keep], image[keep]), y[keep], max_grad_norm=C,
                              mode=mode)
        moved = (full - flat_grad(m)).norm().item()
        assert moved <= C * (1 + 1e-4), (i, moved)
        if norms[i] > C * 1.01:
            assert moved >= C * (1 - 1e-4), (i, moved)


def test_make_private_converts_recurrent_layers_and_trains():
    m = Recurrent()
    ds = TensorDataset(torch.randint(0, 9, (20, 6)), torch.randn(20, 2))
    m, opt, loader = fastclip.make_private(m, torch.optim.SGD(m.parameters(), lr=0.1),
                                           DataLoader(ds, batch_size=5), noise_multiplier=1.0,
                                           max_grad_norm=1.0, generator=torch.Generator().manual_seed(0))
    assert type(m.gru).__module__.startswith("fastclip") and type(m.lstm).__module__.startswith("fastclip")
    for x, y in loader:
        opt.zero_grad()
        mse(m(x), y).mean().backward()
        opt.step()
    assert opt.steps == 4 and all(torch.isfinite(p).all() for p in m.parameters())
    # a refused model is left as it was found
    bad = Recurrent()
    bad.bn = nn.BatchNorm1d(3)
    with pytest.raises(ValueError, match="BatchNorm1d"):
        fastclip.make_private(bad, torch.optim.SGD(bad.parameters(), lr=0.1), None,
                              noise_multiplier=1.0, max_grad_norm=1.0)
    assert type(bad.gru) is nn.GRU and type(bad.lstm) is nn.LSTM


def test_failed_load_leaves_the_sampler_as_it_was():
    ds = TensorDataset(torch.randn(40, 5), torch.randint(0, 3, (40,)))
    a, b = nn.Linear(5, 3), nn.Sequential(nn.Linear(5, 3), nn.Linear(3, 3))
    _, opt_a, la = fastclip.make_private(a, torch.optim.SGD(a.parameters(), lr=0.1),
                                         DataLoader(ds, batch_size=8), noise_multiplier=1.0,
                                         max_grad_norm=1.0)
    _, opt_b, lb = fastclip.make_private(b, torch.optim.SGD(b.parameters(), lr=0.1),
                                         DataLoader(ds, batch_size=8), noise_multiplier=1.0,
                                         max_grad_norm=1.0)
    for _ in la:
        break
    before = lb.state_dict()
    with pytest.raises(ValueError):      # parameter groups differ: torch refuses
        opt_b.load_state_dict(opt_a.state_dict())
    after = lb.state_dict()
    assert after["consumed"] == before["consumed"] == 0
    assert torch.equal(after["generator"], before["generator"])
