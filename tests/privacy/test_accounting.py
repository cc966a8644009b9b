"""Privacy accounting: fastclip.accounting against dp-accounting called directly, against the
closed form of the Gaussian mechanism, calibration of the noise multiplier, the accountant's
history, and make_private_with_epsilon."""
import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, IterableDataset, TensorDataset

import dp_accounting
from dp_accounting import pld, rdp

import fastclip
from fastclip import accounting as A

DELTA = 1e-5


def direct(segments, delta, accountant):
    """dp-accounting called directly: a composition of Poisson-subsampled Gaussian steps."""
    event = dp_accounting.ComposedDpEvent([
        dp_accounting.SelfComposedDpEvent(
            dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(s)), n)
        for s, q, n in segments])
    acc = rdp.RdpAccountant() if accountant == "rdp" else pld.PLDAccountant()
    acc.compose(event)
    return acc.get_epsilon(delta)


def _phi(x):
    return 0.5 * math.erfc(-x / math.sqrt(2))


def gaussian_exact_epsilon(sigma, delta):
    """The exact epsilon of one Gaussian mechanism (sensitivity 1, std sigma) at delta, from
    its privacy profile delta(eps) = Phi(1/(2 sigma) - eps sigma) - e^eps Phi(-1/(2 sigma) - eps sigma)
    (Balle & Wang 2018, Theorem 8), solved by bisection."""
    def d(eps):
        return _phi(0.5 / sigma - eps * sigma) - math.exp(eps) * _phi(-0.5 / sigma - eps * sigma)
    lo, hi = 0.0, 1.0
    while d(hi) > delta:
        hi *= 2
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if d(mid) > delta else (lo, mid)
    return hi


@pytest.mark.parametrize("accountant", ["rdp", "pld"])
@pytest.mark.parametrize("sigma, q, steps, delta", [
    (1.1, 0.01, 6000, 1e-5), (0.8, 0.004, 1000, 1e-6), (4.0, 0.25, 40, 1e-3), (1.0, 1.0, 5, 1e-5)])
def test_epsilon_matches_dp_accounting(accountant, sigma, q, steps, delta):
    assert A.epsilon(sigma, q, steps, delta, accountant) == pytest.approx(
        direct([(sigma, q, steps)], delta, accountant), rel=1e-12)


@pytest.mark.parametrize("sigma, steps", [(1.0, 1), (2.0, 1), (3.0, 9), (5.0, 100)])
def test_full_batch_is_the_gaussian_mechanism(sigma, steps):
    """q = 1: T steps of std sigma are one Gaussian mechanism of std sigma / sqrt(T), whose
    epsilon is known exactly. PLD is within its discretisation of it; RDP is an upper bound,
    below the classic RDP conversion T alpha / (2 sigma^2) + log(1/delta) / (alpha - 1)."""
    exact = gaussian_exact_epsilon(sigma / math.sqrt(steps), DELTA)
    got_pld = A.epsilon(sigma, 1.0, steps, DELTA, "pld")
    assert exact * (1 - 1e-9) <= got_pld <= exact * 1.01 + 1e-3
    got_rdp = A.epsilon(sigma, 1.0, steps, DELTA, "rdp")
    classic = min(steps * a / (2 * sigma**2) + math.log(1 / DELTA) / (a - 1)
                  for a in [1.5] + list(range(2, 11)))
    assert exact <= got_rdp <= classic


def test_known_values_and_ordering():
    # PLD is tighter than RDP; more steps or less noise never cost less.
    e_rdp, e_pld = A.epsilon(1.1, 0.01, 6000, DELTA, "rdp"), A.epsilon(1.1, 0.01, 6000, DELTA, "pld")
    assert e_pld < e_rdp
    assert A.epsilon(1.1, 0.01, 3000, DELTA) < e_rdp < A.epsilon(1.0, 0.01, 6000, DELTA)
    assert A.epsilon(1.1, 0.01, 0, DELTA) == 0.0
    assert A.epsilon(0.0, 0.01, 5, DELTA) == math.inf


@pytest.mark.parametrize("kwargs, match", [
    (dict(noise_multiplier=-0.5), r"noise_multiplier.*-0\.5"),
    (dict(noise_multiplier=float("nan")), r"noise_multiplier.*nan"),
    (dict(noise_multiplier=float("inf")), r"noise_multiplier.*inf"),
    (dict(sample_rate=0.0), r"sample_rate must be in \(0, 1\], got 0\.0"),
    (dict(sample_rate=1.5), r"sample_rate.*1\.5"),
    (dict(sample_rate=-0.1), r"sample_rate.*-0\.1"),
    (dict(sample_rate=float("nan")), r"sample_rate.*nan"),
    (dict(delta=0.0), r"delta must be in \(0, 1\), got 0\.0"),
    (dict(delta=1.0), r"delta.*1\.0"),
    (dict(delta=-1e-5), r"delta.*-1e-05"),
    (dict(steps=-1), r"steps.*-1"),
    (dict(steps=2.5), r"steps.*2\.5"),
    (dict(accountant="gdp"), r"accountant.*'gdp'"),
])
def test_epsilon_errors_name_the_value(kwargs, match):
    args = dict(noise_multiplier=1.0, sample_rate=0.01, steps=10, delta=DELTA, accountant="rdp")
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        A.epsilon(**args)


# ---- PrivacyAccountant ------------------------------------------------------------------------

def test_accountant_history_composes_segments():
    acc = A.PrivacyAccountant()
    assert acc.steps == 0 and acc.epsilon(DELTA) == 0.0
    for _ in range(300):
        acc.step(1.1, 0.01)
    acc.step(2.0, 0.01, steps=200)
    acc.step(2.0, 0.02, steps=100)
    acc.step(1.1, 0.01, steps=50)
    assert acc.history == [[1.1, 0.01, 300], [2.0, 0.01, 200], [2.0, 0.02, 100], [1.1, 0.01, 50]]
    assert acc.steps == 650
    segs = [(1.1, 0.01, 300), (2.0, 0.01, 200), (2.0, 0.02, 100), (1.1, 0.01, 50)]
    for method in ("rdp", "pld"):
        assert acc.epsilon(DELTA, method) == pytest.approx(direct(segs, DELTA, method), rel=1e-12)
    # composition, not the last segment's multiplier applied to all steps
    assert acc.epsilon(DELTA) != pytest.approx(A.epsilon(1.1, 0.01, 650, DELTA))
    assert acc.epsilon(DELTA) != pytest.approx(A.epsilon(2.0, 0.01, 650, DELTA))
    # the ledger is a dp-accounting event
    r = rdp.RdpAccountant()
    r.compose(acc.ledger())
    assert r.get_epsilon(DELTA) == pytest.approx(acc.epsilon(DELTA), rel=1e-12)


def test_accountant_state_dict_round_trip():
    acc = A.PrivacyAccountant("pld")
    acc.step(1.3, 0.05, 10)
    acc.step(0.9, 0.05, 3)
    other = A.PrivacyAccountant()
    other.load_state_dict(acc.state_dict())
    assert other.history == acc.history and other.accountant == "pld"
    assert other.epsilon(DELTA) == acc.epsilon(DELTA)
    with pytest.raises(ValueError, match="sample_rate.*2"):
        other.load_state_dict({"history": [[1.0, 2, 3]]})
    assert other.history == acc.history     # a bad state dict changes nothing


def test_accountant_refuses_unknown_sample_rate_and_bad_steps():
    acc = A.PrivacyAccountant()
    acc.step(1.0, None, 4)
    with pytest.raises(ValueError, match="4 of the 4 steps"):
        acc.epsilon(DELTA)
    with pytest.raises(ValueError, match=r"noise_multiplier.*-1"):
        acc.step(-1, 0.1)
    with pytest.raises(ValueError, match="sample_rate.*0"):
        acc.step(1.0, 0)
    with pytest.raises(ValueError, match="accountant"):
        A.PrivacyAccountant("moments")


# ---- calibration ------------------------------------------------------------------------------

@pytest.mark.parametrize("accountant", ["rdp", "pld"])
@pytest.mark.parametrize("target, q, steps", [(3.0, 0.01, 3000), (0.5, 0.1, 20), (8.0, 1.0, 1)])
def test_noise_multiplier_for_is_tight_and_within_budget(accountant, target, q, steps):
    sigma = A.noise_multiplier_for(target, DELTA, q, steps, accountant)
    assert A.epsilon(sigma, q, steps, DELTA, accountant) <= target
    # the smallest such sigma, within the search tolerance (1e-4) and a little slack
    assert A.epsilon(sigma - 2e-3, q, steps, DELTA, accountant) > target


def test_noise_multiplier_for_errors():
    with pytest.raises(ValueError, match=r"target_epsilon=0\.001 cannot be reached.*epsilon="):
        A.noise_multiplier_for(0.001, DELTA, 1.0, 10_000)
    with pytest.raises(ValueError, match=r"target_epsilon must be a finite number > 0, got 0"):
        A.noise_multiplier_for(0, DELTA, 0.01, 100)
    with pytest.raises(ValueError, match=r"target_epsilon.*-1"):
        A.noise_multiplier_for(-1, DELTA, 0.01, 100)
    with pytest.raises(ValueError, match=r"target_epsilon.*inf"):
        A.noise_multiplier_for(math.inf, DELTA, 0.01, 100)
    with pytest.raises(ValueError, match=r"delta.*1\.5"):
        A.noise_multiplier_for(1.0, 1.5, 0.01, 100)
    with pytest.raises(ValueError, match=r"sample_rate.*0"):
        A.noise_multiplier_for(1.0, DELTA, 0, 100)
    assert A.noise_multiplier_for(1.0, DELTA, 0.01, 0) == 0.0


# ---- make_private_with_epsilon -----------------------------------------------------------------

def _setup(n=40, batch_size=8):
    ds = TensorDataset(torch.randn(n, 5), torch.randint(0, 3, (n,)))
    m = nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3))
    return m, torch.optim.SGD(m.parameters(), lr=0.1), DataLoader(ds, batch_size=batch_size)


@pytest.mark.parametrize("accountant", ["rdp", "pld"])
def test_make_private_with_epsilon_spends_the_budget(accountant):
    m, opt, loader = _setup()
    m, opt, loader = fastclip.make_private_with_epsilon(
        m, opt, loader, target_epsilon=4.0, target_delta=DELTA, epochs=3, max_grad_norm=1.0,
        accountant=accountant, generator=torch.Generator().manual_seed(0))
    assert opt.noise_multiplier == pytest.approx(
        A.noise_multiplier_for(4.0, DELTA, 0.2, 15, accountant))
    assert opt.accountant.accountant == accountant
    loss_fn = nn.CrossEntropyLoss()
    for _ in range(3):
        for x, y in loader:
            opt.zero_grad()
            loss_fn(m(x), y).backward()
            opt.step()
    assert opt.steps == 15
    eps = opt.epsilon(DELTA)          # the calibration's accountant by default
    assert 4.0 * 0.99 < eps <= 4.0
    assert opt.epsilon(DELTA, "rdp" if accountant == "pld" else "pld") != pytest.approx(eps)


def test_make_private_with_epsilon_errors():
    m, opt, loader = _setup()
    with pytest.raises(ValueError, match=r"target_epsilon=0\.01 cannot be reached"):
        fastclip.make_private_with_epsilon(m, opt, DataLoader(loader.dataset, batch_size=40),
                                           target_epsilon=0.01, target_delta=DELTA, epochs=10_000,
                                           max_grad_norm=1.0)
    with pytest.raises(ValueError, match="needs the DataLoader"):
        fastclip.make_private_with_epsilon(m, opt, None, target_epsilon=1.0, target_delta=DELTA,
                                           epochs=1, max_grad_norm=1.0)
    with pytest.raises(ValueError, match="poisson_sampling=False"):
        fastclip.make_private_with_epsilon(m, opt, loader, target_epsilon=1.0, target_delta=DELTA,
                                           epochs=1, max_grad_norm=1.0, poisson_sampling=False)
    with pytest.raises(ValueError, match="epochs.*0"):
        fastclip.make_private_with_epsilon(m, opt, loader, target_epsilon=1.0, target_delta=DELTA,
                                           epochs=0, max_grad_norm=1.0)
    with pytest.raises(ValueError, match=r"delta.*0\.0"):
        fastclip.make_private_with_epsilon(m, opt, loader, target_epsilon=1.0, target_delta=0.0,
                                           epochs=1, max_grad_norm=1.0)
    with pytest.raises(TypeError, match="noise_multiplier"):
        fastclip.make_private_with_epsilon(m, opt, loader, target_epsilon=1.0, target_delta=DELTA,
                                           epochs=1, max_grad_norm=1.0, noise_multiplier=1.0)

    class Stream(IterableDataset):
        def __iter__(self):
            yield from zip(torch.randn(8, 5), torch.zeros(8, dtype=torch.long))

    with pytest.raises(ValueError, match="IterableDataset Stream"):
        fastclip.make_private_with_epsilon(m, opt, DataLoader(Stream(), batch_size=4),
                                           target_epsilon=1.0, target_delta=DELTA, epochs=1,
                                           max_grad_norm=1.0)
    # nothing was left attached to the model by the failed calls
    assert all(not mod._forward_hooks for mod in m.modules())
