"""Privacy accounting for DP-SGD with Poisson sampling, on Google's dp-accounting package.

The accountants themselves (RDP, PLD) are dp-accounting's; this module only describes a
DP-SGD run to them as ``steps`` compositions of a Poisson-subsampled Gaussian mechanism.
"""
from __future__ import annotations

import math

ACCOUNTANTS = ("rdp", "pld")


def _check(noise_multiplier: float, sample_rate: float, steps: int, delta: float, accountant: str):
    if not (noise_multiplier >= 0 and math.isfinite(noise_multiplier)):
        raise ValueError(f"noise_multiplier must be a finite number >= 0, got {noise_multiplier}")
    if not (0 < sample_rate <= 1):
        raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
    if int(steps) != steps or steps < 0:
        raise ValueError(f"steps must be an integer >= 0, got {steps}")
    if not (0 < delta < 1):
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    if accountant not in ACCOUNTANTS:
        raise ValueError(f"accountant must be one of {ACCOUNTANTS}, got {accountant!r}")


def epsilon(noise_multiplier: float, sample_rate: float, steps: int, delta: float,
            accountant: str = "rdp") -> float:
    """Epsilon of ``steps`` DP-SGD steps at Poisson sampling rate q and noise multiplier sigma.

    Returns ``inf`` when noise_multiplier is 0 (no privacy) and 0 when steps is 0.
    """
    _check(noise_multiplier, sample_rate, steps, delta, accountant)
    if steps == 0:
        return 0.0
    if noise_multiplier == 0:
        return math.inf
    import dp_accounting
    from dp_accounting import pld, rdp

    event = dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(sample_rate, dp_accounting.GaussianDpEvent(noise_multiplier)),
        int(steps))
    acc = rdp.RdpAccountant() if accountant == "rdp" else pld.PLDAccountant()
    acc.compose(event)
    return float(acc.get_epsilon(delta))
