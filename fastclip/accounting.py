"""Privacy accounting for DP-SGD with Poisson sampling, on Google's dp-accounting package.

The accountants themselves (RDP, PLD) are dp-accounting's; this module only describes a
DP-SGD run to them: each step is a Poisson-subsampled Gaussian mechanism (sampling rate q,
noise multiplier sigma = noise std / L2 sensitivity), and a run is the composition of its steps.
A run whose noise multiplier or sampling rate changes is a composition of segments, one per
(sigma, q), which :class:`PrivacyAccountant` records.

Neighbouring datasets differ by adding or removing one example (dp-accounting's default
``ADD_OR_REMOVE_ONE``), which is what Poisson sampling with per-example clipping to norm C and
noise of std sigma * C protects.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import math
import threading
from typing import List, Optional, Sequence, Tuple

ACCOUNTANTS = ("rdp", "pld", "opacus_rdp")

# Opacus' RDPAccountant's orders (opacus.accountants.RDPAccountant.DEFAULT_ALPHAS): "opacus_rdp"
# is dp-accounting's RDP accountant on this grid, so it reports the epsilon Opacus reports for
# the same run. dp-accounting's own default grid ("rdp") also has orders 64..1024 and is tighter
# for large noise multipliers (sigma 5, q 0.001, 100 steps, delta 1e-5: 0.020 vs 0.103).
OPACUS_RDP_ORDERS = tuple([1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64)))

log = logging.getLogger(__name__)

# The largest noise multiplier the calibration search tries. Above it a run is not worth
# training (and dp-accounting's PLD discretisation is no longer meaningful).
MAX_NOISE_MULTIPLIER = 1e4

Segment = Tuple[float, float, int]   # (noise_multiplier, sample_rate, steps)


def check_noise_multiplier(noise_multiplier) -> float:
    try:
        value = float(noise_multiplier)
    except (TypeError, ValueError):
        raise TypeError(f"noise_multiplier must be a number, got {type(noise_multiplier).__name__}") from None
    if not (value >= 0 and math.isfinite(value)):
        raise ValueError(f"noise_multiplier must be a finite number >= 0, got {noise_multiplier}")
    return value


def check_sample_rate(sample_rate) -> float:
    try:
        value = float(sample_rate)
    except (TypeError, ValueError):
        raise TypeError(f"sample_rate must be a number, got {type(sample_rate).__name__}") from None
    if not (0 < value <= 1):
        raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
    return value


def check_delta(delta) -> float:
    try:
        value = float(delta)
    except (TypeError, ValueError):
        raise TypeError(f"delta must be a number, got {type(delta).__name__}") from None
    if not (0 < value < 1):
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    return value


def check_steps(steps) -> int:
    if isinstance(steps, bool) or not isinstance(steps, (int, float)) or int(steps) != steps or steps < 0:
        raise ValueError(f"steps must be an integer >= 0, got {steps}")
    return int(steps)


def check_accountant(accountant: str) -> str:
    if accountant not in ACCOUNTANTS:
        raise ValueError(f"fastclip: accountant must be one of {ACCOUNTANTS}, got {accountant!r}")
    return accountant


def _check(noise_multiplier: float, sample_rate: float, steps: int, delta: float, accountant: str):
    return (check_noise_multiplier(noise_multiplier), check_sample_rate(sample_rate),
            check_steps(steps), check_delta(delta), check_accountant(accountant))


def dp_event(segments: Sequence[Segment]):
    """The dp-accounting event of a DP-SGD run made of ``segments`` (sigma, q, steps)."""
    import dp_accounting
    return dp_accounting.ComposedDpEvent([
        dp_accounting.SelfComposedDpEvent(
            dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), int(n))
        for sigma, q, n in segments if n > 0])


def _fresh(accountant: str):
    from dp_accounting import pld, rdp
    if accountant == "rdp":
        return rdp.RdpAccountant()
    if accountant == "opacus_rdp":
        return rdp.RdpAccountant(orders=OPACUS_RDP_ORDERS)
    return pld.PLDAccountant()


class _Convergence(logging.Filter):
    """Takes dp-accounting's "failed to converge" warnings (absl logs them through Python
    logging's "absl" logger, one line per RDP order, at every epsilon) out of the log."""

    def __init__(self):
        super().__init__()
        self.messages: List[str] = []

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "failed to converge" in message:
            self.messages.append(message)
            return False
        return True


_reported: set = set()
_reported_lock = threading.Lock()


@contextlib.contextmanager
def _quiet_absl():
    """Around dp-accounting calls: its non-convergence warnings are held back and shown once
    each, at debug level on the ``fastclip.accounting`` logger (an excluded order only makes
    the RDP bound a little looser: dp-accounting leaves that order out of the minimum)."""
    absl = logging.getLogger("absl")
    catch = _Convergence()
    absl.addFilter(catch)
    try:
        yield
    finally:
        absl.removeFilter(catch)
        with _reported_lock:
            new = [m for m in dict.fromkeys(catch.messages) if m not in _reported]
            _reported.update(new)
        if new:
            log.debug("dp-accounting could not evaluate %d RDP order(s) and left them out of the "
                      "epsilon (a slightly looser bound, never a smaller epsilon); first: %s",
                      len(new), new[0])


@functools.lru_cache(maxsize=256)
def _epsilon(segments: Tuple[Segment, ...], delta: float, accountant: str) -> float:
    segments = tuple(s for s in segments if s[2] > 0)
    if not segments:
        return 0.0
    if any(sigma == 0 for sigma, _, _ in segments):
        return math.inf
    with _quiet_absl():
        acc = _fresh(accountant)
        acc.compose(dp_event(segments))
        return float(acc.get_epsilon(delta))


def epsilon(noise_multiplier: float, sample_rate: float, steps: int, delta: float,
            accountant: str = "rdp") -> float:
    """Epsilon of ``steps`` DP-SGD steps at Poisson sampling rate q and noise multiplier sigma.

    Args:
        noise_multiplier: sigma >= 0 (noise std / max_grad_norm).
        sample_rate: q in (0, 1].
        steps: number of steps >= 0.
        delta: in (0, 1).
        accountant: "rdp" (dp-accounting's RdpAccountant), "pld" (its PLDAccountant, tighter
            and slower) or "opacus_rdp" (the RdpAccountant on Opacus' orders: Opacus' RDP
            epsilon for the same run, see :data:`OPACUS_RDP_ORDERS`).

    Returns:
        epsilon; ``inf`` when noise_multiplier is 0 (no privacy) and 0 when steps is 0.

    Raises:
        ValueError: an argument outside its range, with the value given.
    """
    sigma, q, steps, delta, accountant = _check(noise_multiplier, sample_rate, steps, delta, accountant)
    return _epsilon(((sigma, q, steps),), delta, accountant)


def noise_multiplier_for(target_epsilon: float, delta: float, sample_rate: float, steps: int,
                         accountant: str = "rdp", tol: float = 1e-4) -> float:
    """The smallest noise multiplier (within ``tol``) whose run spends at most ``target_epsilon``.

    The search is dp-accounting's ``calibrate_dp_mechanism`` (Brent's method on epsilon, with
    its guarantee that the returned value does not exceed the budget) inside a bracket this
    function finds first, so that an unreachable target is reported instead of searched for.

    Args:
        target_epsilon: the budget, > 0 and finite.
        delta: in (0, 1).
        sample_rate: Poisson sampling rate q in (0, 1].
        steps: the number of steps the run will take, >= 0.
        accountant: "rdp", "pld" or "opacus_rdp".
        tol: absolute tolerance on the noise multiplier.

    Returns:
        sigma with ``epsilon(sigma, sample_rate, steps, delta, accountant) <= target_epsilon``;
        0.0 when steps is 0.

    Raises:
        ValueError: an argument outside its range, or a target that no noise multiplier up to
            ``MAX_NOISE_MULTIPLIER`` reaches (the message gives the epsilon reached there).
    """
    try:
        target = float(target_epsilon)
    except (TypeError, ValueError):
        raise TypeError(f"target_epsilon must be a number, got {type(target_epsilon).__name__}") from None
    if not (target > 0 and math.isfinite(target)):
        raise ValueError(f"target_epsilon must be a finite number > 0, got {target_epsilon}")
    q, steps, delta = check_sample_rate(sample_rate), check_steps(steps), check_delta(delta)
    accountant = check_accountant(accountant)
    if not (tol > 0):
        raise ValueError(f"tol must be > 0, got {tol}")
    if steps == 0:
        return 0.0

    def eps(sigma: float) -> float:
        return _epsilon(((float(sigma), q, steps),), delta, accountant)

    # Bracket: epsilon decreases in sigma. Double from 1 (or halve) until the target is crossed.
    hi = 1.0
    while eps(hi) > target:
        hi *= 2
        if hi > MAX_NOISE_MULTIPLIER:
            reached = eps(MAX_NOISE_MULTIPLIER)
            raise ValueError(
                f"target_epsilon={target_epsilon} cannot be reached at delta={delta} with "
                f"sample_rate={q} and steps={steps} ({accountant}): even noise_multiplier="
                f"{MAX_NOISE_MULTIPLIER:g} spends epsilon={reached:.4g}. Take fewer steps, a "
                "smaller sample rate, a larger delta or a larger target")
    lo = hi / 2
    while lo > tol and eps(lo) <= target:
        hi, lo = lo, lo / 2
    if lo <= tol:
        return hi if eps(lo) > target else lo

    from dp_accounting import mechanism_calibration as mc

    def make_event(sigma: float):
        return dp_event(((float(sigma), q, steps),))

    try:
        with _quiet_absl():
            sigma = mc.calibrate_dp_mechanism(
                lambda: _fresh(accountant), make_event, target, delta,
                bracket_interval=mc.ExplicitBracketInterval(lo, hi), tol=tol)
    except (ValueError, mc.NoBracketIntervalFoundError) as err:  # pragma: no cover - bracketed above
        raise ValueError(f"could not calibrate the noise multiplier for target_epsilon={target_epsilon} "
                         f"(delta={delta}, sample_rate={q}, steps={steps}, {accountant}): {err}") from err
    if sigma is None or eps(sigma) > target:   # brentq did not converge: the bracket's safe end
        sigma = hi
    return float(sigma)


class PrivacyAccountant:
    """The privacy history of one training run: segments (noise_multiplier, sample_rate, steps).

    Consecutive steps with the same sigma and q are merged, so the history stays short; a change
    of either mid-run starts a new segment and the segments compose (dp-accounting composes the
    events). A sample rate of ``None`` records steps whose sampling is unknown; epsilon then
    refuses to answer rather than guess.

    Args:
        accountant: the default method for :meth:`epsilon`, "rdp", "pld" or "opacus_rdp".
    """

    def __init__(self, accountant: str = "rdp"):
        self.accountant = check_accountant(accountant)
        self.history: List[List] = []   # [[sigma, q or None, steps], ...]

    @property
    def steps(self) -> int:
        """Total steps recorded."""
        return sum(n for _, _, n in self.history)

    def step(self, noise_multiplier: float, sample_rate: Optional[float], steps: int = 1) -> None:
        """Record ``steps`` steps at (sigma, q)."""
        sigma = check_noise_multiplier(noise_multiplier)
        q = None if sample_rate is None else check_sample_rate(sample_rate)
        steps = check_steps(steps)
        if steps == 0:
            return
        if self.history and self.history[-1][0] == sigma and self.history[-1][1] == q:
            self.history[-1][2] += steps
        else:
            self.history.append([sigma, q, steps])

    def ledger(self):
        """The run as a dp-accounting ``DpEvent`` (to compose with other releases)."""
        self._check_known()
        return dp_event([tuple(s) for s in self.history])

    def _check_known(self):
        unknown = sum(n for _, q, n in self.history if q is None)
        if unknown:
            raise ValueError(f"{unknown} of the {self.steps} steps were taken without a known Poisson "
                             "sampling rate; epsilon cannot be computed for them. Pass the DataLoader "
                             "to make_private with poisson_sampling=True")

    def epsilon(self, delta: float, accountant: Optional[str] = None) -> float:
        """Epsilon spent by the recorded steps at ``delta`` (0 before any step, inf if any step
        had noise_multiplier 0)."""
        delta = check_delta(delta)
        accountant = check_accountant(accountant or self.accountant)
        self._check_known()
        return _epsilon(tuple((s, q, n) for s, q, n in self.history), delta, accountant)

    def state_dict(self) -> dict:
        return {"accountant": self.accountant, "history": [list(s) for s in self.history]}

    def load_state_dict(self, state_dict: dict) -> None:
        history = []
        for seg in state_dict["history"]:
            sigma, q, n = seg
            history.append([check_noise_multiplier(sigma),
                            None if q is None else check_sample_rate(q), check_steps(n)])
        self.accountant = check_accountant(state_dict.get("accountant", self.accountant))
        self.history = history

    def __repr__(self):
        return f"PrivacyAccountant(steps={self.steps}, history={self.history})"
