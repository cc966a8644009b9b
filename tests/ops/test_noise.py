"""The Gaussian noise of the private gradient: distribution, reproducibility, fused scaling, and
hostile inputs to the binding."""
import math

import numpy as np
import pytest
import torch

from fastclip import ops

_C = pytest.importorskip("fastclip._C", reason="native core not built")


def ks_statistic(z: torch.Tensor) -> float:
    """Kolmogorov-Smirnov distance between the sample z and N(0, 1)."""
    z, _ = torch.sort(z.double())
    n = z.numel()
    cdf = torch.special.ndtr(z)
    i = torch.arange(1, n + 1, dtype=torch.float64)
    return max((i / n - cdf).max().item(), (cdf - (i - 1) / n).max().item())


def test_native_core_is_built():
    """CI must exercise the native core, not the torch fallback."""
    assert ops.HAS_NATIVE


@pytest.mark.parametrize("seed", [0, 1, 2**63 + 5])
def test_standard_normal_distribution(seed):
    n = 1_000_000
    z = torch.from_numpy(_C.gaussian(n, seed, 2))
    # KS critical value at the 0.1% level is 1.95 / sqrt(n); a biased or wrong-shaped
    # distribution (e.g. uniform, or variance 0.9) is far beyond it at this n.
    assert ks_statistic(z) < 1.95 / math.sqrt(n)
    assert abs(z.mean().item()) < 5 / math.sqrt(n)
    assert abs(z.var().item() - 1) < 5 * math.sqrt(2 / n)
    # tails reach past 4.5 sigma at this n, and stay finite
    assert torch.isfinite(z).all() and z.abs().max() > 4.5


def test_ks_statistic_detects_a_wrong_distribution():
    n = 100_000
    assert ks_statistic(torch.randn(n) * 1.05) > 1.95 / math.sqrt(n)


def test_stream_depends_on_seed_and_position_only():
    a = _C.gaussian(100_003, 7, 1)
    b = _C.gaussian(100_003, 7, 2)
    c = _C.gaussian(1000, 7, 1)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a[:1000], c)
    assert not np.array_equal(a[:1000], _C.gaussian(1000, 8, 1))
    # consecutive values are uncorrelated
    assert abs(np.corrcoef(a[:-1], a[1:])[0, 1]) < 0.02


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fused_noise_and_scale(dtype):
    x = torch.randn(3, 1000, dtype=dtype)
    ref = x.clone()
    ops.add_gaussian_noise_(x, 0.0, 0.25, seed=3)
    torch.testing.assert_close(x, ref * 0.25, rtol=0, atol=0)
    x = ref.clone()
    ops.add_gaussian_noise_(x, 2.0, 0.5, seed=3)
    z = torch.from_numpy(_C.gaussian(3000, 3, 1)).to(dtype).view(3, 1000)
    torch.testing.assert_close(x, (ref + 2.0 * z) * 0.5, rtol=1e-6, atol=1e-6)


def test_torch_fallback_for_non_contiguous_tensors():
    x = torch.zeros(400, 500).t()
    ops.add_gaussian_noise_(x, 3.0, 1.0, seed=1)
    assert abs(x.std().item() - 3.0) < 0.05


@pytest.mark.parametrize("bad, err, match", [
    (np.zeros(10, np.int32), TypeError, "float32 or float64"),
    ([0.0, 1.0], TypeError, "numpy.ndarray"),
    (np.zeros((10, 10), np.float32)[:, ::2], ValueError, "C-contiguous"),
    (np.zeros(10, np.float32)[::-1], ValueError, "C-contiguous"),
])
def test_hostile_arrays(bad, err, match):
    with pytest.raises(err, match=match):
        _C.add_gaussian_noise(bad, 1.0, 1.0, 0, 1)


def test_hostile_scalars():
    x = np.zeros(10, np.float32)
    with pytest.raises(ValueError, match="std"):
        _C.add_gaussian_noise(x, -1.0, 1.0, 0, 1)
    with pytest.raises(ValueError, match="std"):
        _C.add_gaussian_noise(x, float("nan"), 1.0, 0, 1)
    with pytest.raises(ValueError, match="scale"):
        _C.add_gaussian_noise(x, 1.0, float("inf"), 0, 1)
    with pytest.raises(ValueError, match="num_threads"):
        _C.add_gaussian_noise(x, 1.0, 1.0, 0, 0)
    with pytest.raises(TypeError):
        _C.add_gaussian_noise(x, 1.0, 1.0, -1, 1)
    ro = np.zeros(10, np.float32)
    ro.setflags(write=False)
    with pytest.raises(ValueError, match="writeable"):
        _C.add_gaussian_noise(ro, 1.0, 1.0, 0, 1)
    with pytest.raises(ValueError, match="n must be"):
        _C.gaussian(-1, 0, 1)
    with pytest.raises(TypeError, match="floating"):
        ops.add_gaussian_noise_(torch.zeros(3, dtype=torch.long), 1.0)
    assert _C.gaussian(0, 0, 1).shape == (0,)
    _C.add_gaussian_noise(np.zeros(0, np.float32), 1.0, 1.0, 0, 1)


def test_noisy_steps_are_reproducible_with_a_seeded_generator():
    import fastclip
    from torch import nn

    def run():
        torch.manual_seed(0)
        m = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
        opt = torch.optim.SGD(m.parameters(), lr=0.1)
        m, opt, _ = fastclip.make_private(m, opt, None, noise_multiplier=1.0, max_grad_norm=1.0,
                                          generator=torch.Generator().manual_seed(42))
        for _ in range(3):
            opt.zero_grad()
            nn.functional.cross_entropy(m(torch.randn(8, 6)), torch.randint(0, 3, (8,))).backward()
            opt.step()
        return [p.detach().clone() for p in m.parameters()]

    for a, b in zip(run(), run()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
