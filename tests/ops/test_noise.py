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


def _philox4x32_10(counter, key):
    """Philox4x32-10 (Salmon et al., SC'11) on Python ints: the specification the core's
    vectorised variants must reproduce word for word."""
    c, (k0, k1) = list(counter), key
    for _ in range(10):
        p0, p1 = 0xD2511F53 * c[0], 0xCD9E8D57 * c[2]
        c = [(p1 >> 32) ^ c[1] ^ k0, p1 & 0xFFFFFFFF, (p0 >> 32) ^ c[3] ^ k1, p0 & 0xFFFFFFFF]
        k0, k1 = (k0 + 0x9E3779B9) & 0xFFFFFFFF, (k1 + 0xBB67AE85) & 0xFFFFFFFF
    return c


def test_philox_reference_matches_the_published_known_answers():
    # Random123's kat_vectors for philox4x32 with 10 rounds
    assert _philox4x32_10([0, 0, 0, 0], (0, 0)) == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]
    assert _philox4x32_10([0xFFFFFFFF] * 4, (0xFFFFFFFF, 0xFFFFFFFF)) == [
        0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD]


def _stream_reference(positions, seed):
    """Normal number p of the stream (seed) in float64: counter p // 4 (high words fixed), key the
    seed's halves; Box-Muller on the pair of words (2j, 2j+1) with 24-bit uniforms."""
    out = []
    for p in positions:
        j = p // 2
        words = []
        for w in (2 * j, 2 * j + 1):
            ctr = w // 4
            words.append(_philox4x32_10([ctr & 0xFFFFFFFF, ctr >> 32, 0x6A09E667, 0xBB67AE85],
                                        (seed & 0xFFFFFFFF, seed >> 32))[w % 4])
        u1 = ((words[0] >> 8) + 0.5) / 2**24
        u2 = (words[1] >> 8) / 2**24
        r = math.sqrt(-2 * math.log(u1))
        out.append(r * (math.cos if p % 2 == 0 else math.sin)(2 * math.pi * u2))
    return np.array(out)


@pytest.mark.parametrize("seed", [7, 2**40 + 3])
def test_stream_is_philox4x32_10_with_box_muller(seed):
    # The stream is specified, not just "some normals": a known-answer check of every block
    # position the vectorised Philox lays out differently (lanes, groups, block edges).
    n = 2 * 128 + 5
    positions = list(range(0, 128)) + [128, 129, 200, 255, 256, 260]
    got = _C.gaussian(n, seed, 1)[positions].astype(np.float64)
    np.testing.assert_allclose(got, _stream_reference(positions, seed), rtol=2e-6, atol=2e-6)


_VARIANT_CHILD = """
import sys
import numpy as np
from fastclip import _C
assert _C.isa() == sys.argv[1], (_C.isa(), sys.argv[1])
x = np.ones(70_001, np.float64)
_C.add_gaussian_noise(x, 0.5, 2.0, 11, 2)
np.save(sys.argv[2], np.concatenate([_C.gaussian(100_003, 7, 2).astype(np.float64), x]))
"""


def test_every_philox_variant_gives_the_same_stream(tmp_path):
    # The core picks an AVX-512, AVX2 or portable Philox by its isa level (FASTCLIP_ISA caps it):
    # the noise must not depend on the machine's vector width.
    import subprocess
    import sys

    from harness import child_env

    here = _C.isa()
    assert here in ("avx512", "avx2", "portable")
    x = np.ones(70_001, np.float64)
    _C.add_gaussian_noise(x, 0.5, 2.0, 11, 2)
    want = np.concatenate([_C.gaussian(100_003, 7, 2).astype(np.float64), x])
    order = ["portable", "avx2", "avx512"]
    for variant in order[:order.index(here)]:
        out = tmp_path / f"{variant}.npy"
        subprocess.run([sys.executable, "-c", _VARIANT_CHILD, variant, str(out)],
                       env=child_env(FASTCLIP_ISA=variant), check=True, timeout=120)
        np.testing.assert_array_equal(np.load(out), want, err_msg=variant)


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


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_tensors_get_the_float32_stream_rounded_once(dtype):
    # bf16/fp16 gradients (low-precision training) take the core's stream through a float32
    # copy: (x + std z) * scale formed in float32, then rounded to the tensor's dtype
    x = torch.randn(3, 1001).to(dtype)
    want = ((x.float() + 2.0 * torch.from_numpy(_C.gaussian(3003, 5, 1)).view(3, 1001)) * 0.5).to(dtype)
    ops.add_gaussian_noise_(x, 2.0, 0.5, seed=5)
    torch.testing.assert_close(x, want, rtol=0, atol=0)
    # and through the checked list call, beside a float32 tensor; a NaN anywhere writes nothing
    y, f = torch.randn(70_001).to(dtype), torch.randn(10)
    y0, f0 = y.clone(), f.clone()
    assert ops.add_gaussian_noise_checked_([y, f], 1.0, 1.0, [7, 8])
    torch.testing.assert_close(y, (y0.float() + torch.from_numpy(_C.gaussian(70_001, 7, 2))).to(dtype),
                               rtol=0, atol=0)
    y[3] = float("nan")
    y1, f1 = y.clone(), f.clone()
    assert not ops.add_gaussian_noise_checked_([f, y], 1.0, 1.0, [7, 8])
    assert torch.equal(f, f1) and torch.equal(y.isnan(), y1.isnan())
    assert torch.equal(y.nan_to_num(), y1.nan_to_num())
