"""Clipping configurations: the one place they live. The layout (one bound over the whole model,
or one bound per layer), the style of the clip factor, and the L2 sensitivity each gives the
clipped sum.

========================  ==========  ==========================================  ============
``clipping``              layout      clip factor of example i (layer l)          sensitivity
========================  ==========  ==========================================  ============
``"flat"``                flat        ``min(1, C / ||g_i||)``                     C
``"per_layer"``           per layer   ``min(1, C_l / ||g_il||)``                  sqrt(sum C_l^2)
``"automatic"``           flat        ``C / (||g_i|| + gamma)``                   C
``"automatic_per_layer"`` per layer   ``C_l / (||g_il|| + gamma)``                sqrt(sum C_l^2)
``"adaptive"``            flat        ``min(1, C_t / ||g_i||)``, C_t moves        C_t (step t)
========================  ==========  ==========================================  ============

Automatic clipping (Bu et al. 2023, "Automatic Clipping: Differentially Private Deep Learning
Made Easier and Stronger") normalises every example: ``||c_i g_i|| = C ||g_i|| / (||g_i|| +
gamma) < C``, so the sensitivity stays C; ``gamma > 0`` (default 0.01) keeps small gradients
from being blown up. Adaptive clipping (Andrew et al. 2021, "Differentially Private Learning with
Adaptive Clipping") moves C towards a quantile of the per-example norms: see
:class:`AdaptiveClipping`.

A *layer* is a set of leaf modules joined by shared trainable parameters (a module alone in
the common case; an embedding tied to an output projection is one layer with both modules'
parameters), holding every trainable parameter those modules own. Parameters a parent module
uses in its own forward (a position table) form the parent's layer. Layers are ordered by the
first appearance of their modules in ``model.named_modules()``, the order a list of per-layer
bounds follows; ``Engine.layers`` lists them by name.

Per-layer clipping bounds example i's gradient restricted to layer l by C_l, so adding or
removing one example moves the clipped sum by at most sqrt(sum_l C_l^2) in L2: that is the
sensitivity the optimizer's noise is scaled to. A single float C is split evenly,
C_l = C / sqrt(L), so the sensitivity stays C.
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

CLIPPINGS = ("flat", "per_layer", "automatic", "automatic_per_layer", "adaptive")
_PER_LAYER = ("per_layer", "automatic_per_layer")

Bound = Union[float, Sequence[float]]


class Layer:
    """One clipping group: ``name`` (module paths joined by '+'), its modules and parameters."""

    __slots__ = ("name", "modules", "params")

    def __init__(self, name: str, modules: List[nn.Module], params: List[nn.Parameter]):
        self.name, self.modules, self.params = name, modules, params

    def __repr__(self):
        return f"Layer({self.name!r}, {len(self.params)} parameters)"


def check_clipping(clipping: str) -> str:
    """``clipping`` itself if it is one of :data:`CLIPPINGS`, else ValueError."""
    if clipping not in CLIPPINGS:
        raise ValueError(f"fastclip: clipping must be one of {CLIPPINGS}, got {clipping!r}")
    return clipping


def is_per_layer(clipping: str) -> bool:
    """Whether ``clipping`` bounds each layer separately (else one bound over all parameters)."""
    return check_clipping(clipping) in _PER_LAYER


def is_automatic(clipping: str) -> bool:
    """Whether ``clipping`` normalises every example (``C / (||g|| + gamma)``)."""
    return check_clipping(clipping) in ("automatic", "automatic_per_layer")


def check_gamma(gamma) -> float:
    """The automatic-clipping stabiliser: a finite number > 0."""
    return _positive(gamma, "gamma")


def clip_factors(norms: Tensor, C, automatic: bool = False, gamma: float = 0.01) -> Tensor:
    """Clip factors from per-example gradient norms: the one formula every mode uses.

    Args:
        norms: (B,) or (B, L) norms of the true per-example gradients (float64 preferred).
        C: the bound (a float, or a tensor broadcasting against ``norms``: one per layer), already
            shrunk by any cast margin.
        automatic: ``C / (norm + gamma)`` (automatic clipping) instead of ``min(1, C / norm)``.
        gamma: the automatic-clipping stabiliser, > 0.

    Returns:
        factors of ``norms``' shape and dtype: ``||factor * g|| <= C`` for every finite norm
        (strictly below C for automatic clipping), and 0 where the norm is not finite (such an
        example contributes nothing, like an absent one).
    """
    # Three elementwise ops (the per-step cost of this call is dispatch, not arithmetic): C / norm
    # capped at 1 is min(1, C / norm) bit for bit (a norm of 0 gives inf, capped to 1); an
    # infinite norm gives C / inf = 0 already, a NaN one NaN, set to 0 last.
    c = C / (norms + gamma) if automatic else (C / norms).clamp_(max=1.0)
    return c.nan_to_num_(nan=0.0)


def _positive(value, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{what} must be a number, got {type(value).__name__}")
    value = float(value)
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"{what} must be a finite number > 0, got {value}")
    return value


def group_layers(params: Dict[nn.Module, List[Tuple[str, nn.Parameter]]],
                 paths: Dict[nn.Module, str]) -> List[Layer]:
    """The layers of a model from ``params`` (module -> its own trainable (name, parameter)
    pairs, in ``named_modules`` order) and ``paths`` (module -> qualified name)."""
    modules = list(params)
    parent = list(range(len(modules)))   # union-find over modules sharing a parameter

    def find(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    owner: Dict[int, int] = {}
    for i, m in enumerate(modules):
        for _, p in params[m]:
            j = owner.setdefault(id(p), i)
            if j != i:
                a, b = find(i), find(j)
                parent[max(a, b)] = min(a, b)
    groups: Dict[int, List[int]] = {}
    for i in range(len(modules)):
        groups.setdefault(find(i), []).append(i)
    layers = []
    for root in sorted(groups):
        ms = [modules[i] for i in groups[root]]
        seen, ps = set(), []
        for m in ms:
            for _, p in params[m]:
                if id(p) not in seen:
                    seen.add(id(p))
                    ps.append(p)
        layers.append(Layer("+".join(paths[m] for m in ms), ms, ps))
    return layers


def resolve_bounds(max_grad_norm: Optional[Bound], clipping: str,
                   layers: Sequence[Layer]) -> Tuple[Optional[Tuple[float, ...]], Optional[float]]:
    """(per-layer bounds or None for flat clipping, sensitivity) from the user's arguments.

    Flat layouts: ``max_grad_norm`` is one float C; sensitivity C. Per-layer: a float C split evenly
    over the L layers (C / sqrt(L) each), or a sequence of L floats; sensitivity
    sqrt(sum_l C_l^2). ``max_grad_norm=None`` (norms only): (None, None).
    """
    if max_grad_norm is None:
        return None, None
    if not is_per_layer(clipping):
        if isinstance(max_grad_norm, (list, tuple)):
            raise TypeError(f"fastclip: a list of bounds (one per layer) needs clipping='per_layer' "
                            f"or 'automatic_per_layer'; clipping={clipping!r} takes one float "
                            f"max_grad_norm, got {list(max_grad_norm)}")
        return None, _positive(max_grad_norm, "max_grad_norm")
    L = len(layers)
    if isinstance(max_grad_norm, (list, tuple)):
        if len(max_grad_norm) != L:
            names = ", ".join(layer.name for layer in layers)
            raise ValueError(f"clipping='per_layer' with a list needs one bound per layer: the model "
                             f"has {L} layers ({names}), got {len(max_grad_norm)} bounds")
        bounds = tuple(_positive(c, f"max_grad_norm[{i}] (layer '{layers[i].name}')")
                       for i, c in enumerate(max_grad_norm))
    else:
        C = _positive(max_grad_norm, "max_grad_norm")
        bounds = (C / math.sqrt(L),) * L if L else ()
    return bounds, math.sqrt(sum(c * c for c in bounds))


class AdaptiveClipping:
    """The clipping bound of ``clipping="adaptive"``: C follows a target quantile of the
    per-example gradient norms (Andrew, Thakkar, McMahan, Ramaswamy 2021, "Differentially Private
    Learning with Adaptive Clipping", NeurIPS; arXiv:1905.03871), with Opacus' keyword names.

    Each step t clips flat to C_t (sensitivity C_t), and releases, besides the noised gradient
    sum, the number of examples left unclipped, privately: every example contributes
    ``b_i - 1/2`` with ``b_i = [||g_i|| <= C_t]`` (sensitivity 1/2 under adding or removing one
    example), the sum gets Gaussian noise of std ``unclipped_num_std``, and the noised fraction
    ``b = noised_sum / expected_batch_size + 1/2`` moves the bound geometrically:
    ``C_{t+1} = clamp(C_t * exp(-clipbound_learning_rate * (b - target_unclipped_quantile)),
    min_clipbound, max_clipbound)``. Dividing by the expected batch size, not the drawn one, keeps
    the actual batch size unreleased.

    Privacy: the two releases of a step are Gaussian mechanisms with noise multipliers
    ``z_grad`` (the gradient sum, sensitivity C_t) and ``2 * unclipped_num_std`` (the count,
    sensitivity 1/2); together they are one Gaussian mechanism with noise multiplier z where
    ``z^-2 = z_grad^-2 + (2 sigma_b)^-2``. So to spend what the user's ``noise_multiplier`` z
    spends, the gradient noise multiplier is (Andrew et al., Section 3.1, Theorem 1; the same
    formula as tensorflow-federated's ``adaptive_clip_noise_params``)::

        z_grad = (z^-2 - (2 * unclipped_num_std)^-2)^(-1/2)

    which needs ``z < 2 * unclipped_num_std``; the accountant counts every step at z. (Opacus'
    AdaClipDPOptimizer uses this formula on the uncentred count ``sum_i b_i``, whose sensitivity
    is 1, not 1/2, and divides by the drawn batch size; fastclip centres the count as the paper
    does.)

    Args:
        max_grad_norm: the initial bound C_0 > 0.
        target_unclipped_quantile: the fraction of examples to leave unclipped, in [0, 1].
        clipbound_learning_rate: the geometric step, >= 0 (the paper uses 0.2).
        max_clipbound, min_clipbound: the clamp, 0 < min < max (max may be inf).
        unclipped_num_std: std of the count's noise, > 0 (the paper suggests
            expected_batch_size / 20).
    """

    def __init__(self, max_grad_norm: float, *, target_unclipped_quantile: float,
                 clipbound_learning_rate: float, max_clipbound: float, min_clipbound: float,
                 unclipped_num_std: float):
        self.max_grad_norm = _positive(max_grad_norm, "max_grad_norm")
        q = _number(target_unclipped_quantile, "target_unclipped_quantile")
        if not 0 <= q <= 1:
            raise ValueError(f"fastclip: target_unclipped_quantile must be in [0, 1], got {q}")
        lr = _number(clipbound_learning_rate, "clipbound_learning_rate")
        if not (lr >= 0 and math.isfinite(lr)):
            raise ValueError(f"fastclip: clipbound_learning_rate must be a finite number >= 0, got {lr}")
        hi = _number(max_clipbound, "max_clipbound")
        lo = _positive(min_clipbound, "min_clipbound")
        if not hi > lo:
            raise ValueError(f"fastclip: max_clipbound ({hi}) must be larger than min_clipbound ({lo})")
        self.target_unclipped_quantile, self.clipbound_learning_rate = q, lr
        self.max_clipbound, self.min_clipbound = hi, lo
        self.unclipped_num_std = _positive(unclipped_num_std, "unclipped_num_std")
        if not lo <= self.max_grad_norm <= hi:
            raise ValueError(f"fastclip: the initial max_grad_norm ({self.max_grad_norm}) must lie in "
                             f"[min_clipbound, max_clipbound] = [{lo}, {hi}]")

    def grad_noise_multiplier(self, noise_multiplier: float) -> float:
        """The gradient noise multiplier z_grad for a step accounted at ``noise_multiplier`` z.

        Raises:
            ValueError: ``z >= 2 * unclipped_num_std`` (the count alone would spend more than z).
        """
        z = float(noise_multiplier)
        if z == 0:
            return 0.0
        sb = 2.0 * self.unclipped_num_std
        if z >= sb:
            raise ValueError(
                f"fastclip: adaptive clipping needs noise_multiplier < 2 * unclipped_num_std, got "
                f"noise_multiplier={z} and unclipped_num_std={self.unclipped_num_std}: the noised "
                "count of unclipped examples would spend the whole budget (Andrew et al. 2021, "
                f"Theorem 1). Fix: unclipped_num_std > {z / 2:g} (the paper suggests the expected "
                "batch size / 20)")
        return (z ** -2 - sb ** -2) ** -0.5

    def update(self, unclipped: int, seen: int, denominator: float, noise: float) -> float:
        """Move the bound after a step; returns the new C.

        Args:
            unclipped: examples of the step with ``||g_i|| <= C`` (``sum_i b_i``).
            seen: examples of the step (so ``sum_i (b_i - 1/2) = unclipped - seen / 2``).
            denominator: the expected batch size (the drawn one only when none is known).
            noise: one standard normal draw, scaled here by ``unclipped_num_std``.
        """
        centred = unclipped - seen / 2.0 + self.unclipped_num_std * float(noise)
        fraction = centred / max(float(denominator), 1e-12) + 0.5
        C = self.max_grad_norm * math.exp(
            -self.clipbound_learning_rate * (fraction - self.target_unclipped_quantile))
        self.max_grad_norm = min(max(C, self.min_clipbound), self.max_clipbound)
        return self.max_grad_norm

    def state_dict(self) -> dict:
        """The current bound and the settings (checkpointed by the optimizer)."""
        return {"max_grad_norm": self.max_grad_norm,
                "target_unclipped_quantile": self.target_unclipped_quantile,
                "clipbound_learning_rate": self.clipbound_learning_rate,
                "max_clipbound": self.max_clipbound, "min_clipbound": self.min_clipbound,
                "unclipped_num_std": self.unclipped_num_std}

    @classmethod
    def from_state_dict(cls, state: dict) -> "AdaptiveClipping":
        """A validated copy of a :meth:`state_dict` (ValueError if a value is out of range)."""
        state = dict(state)
        return cls(state.pop("max_grad_norm"), **state)

    def __repr__(self):
        return f"AdaptiveClipping({self.state_dict()})"


ADAPTIVE_KEYS = ("target_unclipped_quantile", "clipbound_learning_rate", "max_clipbound",
                 "min_clipbound", "unclipped_num_std")


def adaptive_from(clipping: str, max_grad_norm, options: dict) -> Optional[AdaptiveClipping]:
    """The :class:`AdaptiveClipping` of ``clipping="adaptive"`` from make_private's keywords
    (None for other clippings, which must not be given them)."""
    given = {k: v for k, v in options.items() if v is not None}
    if clipping != "adaptive":
        if given:
            raise ValueError(f"fastclip: {sorted(given)} apply to clipping='adaptive' only, got "
                             f"clipping={clipping!r}")
        return None
    missing = [k for k in ADAPTIVE_KEYS if k not in given]
    if missing:
        raise ValueError(
            f"fastclip: clipping='adaptive' needs {missing} (as Opacus' AdaClipDPOptimizer does); "
            "e.g. target_unclipped_quantile=0.5, clipbound_learning_rate=0.2, max_clipbound=10.0, "
            "min_clipbound=0.01, unclipped_num_std=expected_batch_size / 20")
    if isinstance(max_grad_norm, (list, tuple)):
        raise TypeError("fastclip: clipping='adaptive' is flat: max_grad_norm is one float (the "
                        f"initial bound), got {list(max_grad_norm)}")
    return AdaptiveClipping(max_grad_norm, **given)


def _number(value, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"fastclip: {what} must be a number, got {type(value).__name__}")
    value = float(value)
    if math.isnan(value):
        raise ValueError(f"fastclip: {what} must be a number, got nan")
    return value
