"""The private optimizer and make_private."""
from __future__ import annotations

import math
from collections import OrderedDict
from typing import Optional, Tuple

import torch
from torch import nn
from torch.optim import Optimizer
from torch.utils.data import DataLoader

from . import accounting, ops
from .data import poisson_loader
from .engine import Engine, check_clipping


class DPOptimizer(Optimizer):
    """Wraps any torch optimizer: before its step, adds Gaussian noise of std ``sigma * C`` to the
    clipped gradient sums the engine wrote into ``p.grad``, then divides by the batch size for
    ``loss_reduction="mean"``.

    The wrapped optimizer's ``param_groups``, ``state`` and ``defaults`` are shared (not copied),
    so LR schedulers and state dicts work on either object.

    Args:
        optimizer: the torch optimizer over the model's parameters.
        engine: the attached :class:`fastclip.engine.Engine`.
        noise_multiplier: sigma >= 0.
        expected_batch_size: the divisor for "mean" (Poisson sampling); None uses the number of
            examples actually seen since the last step.
        generator: torch.Generator for the noise (reproducible runs); None uses torch's default.
        sample_rate: the Poisson sampling rate q, for :meth:`epsilon`.
    """

    def __init__(self, optimizer: Optimizer, engine: Engine, noise_multiplier: float,
                 expected_batch_size: Optional[float] = None,
                 generator: Optional[torch.Generator] = None, sample_rate: Optional[float] = None):
        if not isinstance(optimizer, Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        noise_multiplier = float(noise_multiplier)
        if not (noise_multiplier >= 0 and math.isfinite(noise_multiplier)):
            raise ValueError(f"noise_multiplier must be a finite number >= 0, got {noise_multiplier}")
        self.original_optimizer = optimizer
        self.engine = engine
        self.noise_multiplier = noise_multiplier
        self.expected_batch_size = expected_batch_size
        self.generator = generator
        self.sample_rate = sample_rate
        self.steps = 0
        self._optimizer_step_pre_hooks = OrderedDict()
        self._optimizer_step_post_hooks = OrderedDict()
        self._optimizer_state_dict_pre_hooks = OrderedDict()
        self._optimizer_state_dict_post_hooks = OrderedDict()
        self._optimizer_load_state_dict_pre_hooks = OrderedDict()
        self._optimizer_load_state_dict_post_hooks = OrderedDict()
        covered = {id(p) for ps in engine._params.values() for _, p in ps}
        for group in optimizer.param_groups:
            for p in group["params"]:
                if p.requires_grad and id(p) not in covered:
                    raise ValueError("the optimizer holds a trainable parameter that is not part of "
                                     "the private model; pass the model's own parameters")

    # Shared with the wrapped optimizer, never copied.
    @property
    def param_groups(self):
        return self.original_optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value):
        self.original_optimizer.param_groups = value

    @property
    def state(self):
        return self.original_optimizer.state

    @state.setter
    def state(self, value):
        self.original_optimizer.state = value

    @property
    def defaults(self):
        return self.original_optimizer.defaults

    @defaults.setter
    def defaults(self, value):
        self.original_optimizer.defaults = value

    def __repr__(self):
        return f"DPOptimizer(noise_multiplier={self.noise_multiplier}, {self.original_optimizer!r})"

    def zero_grad(self, set_to_none: bool = True):
        self.original_optimizer.zero_grad(set_to_none)
        self.engine.examples = 0

    def add_noise_and_scale(self):
        """Turn the accumulated clipped sums into the private gradient, in place."""
        C = self.engine.max_grad_norm
        std = self.noise_multiplier * C
        if self.engine.loss_reduction == "mean":
            denom = self.expected_batch_size if self.expected_batch_size is not None \
                else max(self.engine.examples, 1)
        else:
            denom = 1.0
        # One seed per step from the user's generator (reproducible runs); one stream per tensor.
        base = int(torch.randint(0, 1 << 62, (1,), generator=self.generator).item()) if std > 0 else 0
        k = 0
        for group in self.param_groups:
            for p in group["params"]:
                if not p.requires_grad:
                    continue
                if p.grad is None:
                    if std == 0:
                        continue
                    # An example-free step still releases noise for every parameter.
                    p.grad = torch.zeros_like(p)
                k += 1
                ops.add_gaussian_noise_(p.grad, std, 1.0 / denom, base + k * 0x9E3779B97F4A7C15)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.add_noise_and_scale()
        self.original_optimizer.step()
        self.engine.examples = 0
        self.steps += 1
        return loss

    def state_dict(self):
        return self.original_optimizer.state_dict()

    def load_state_dict(self, state_dict):
        self.original_optimizer.load_state_dict(state_dict)

    def epsilon(self, delta: float, accountant: str = "rdp") -> float:
        """Epsilon spent by the steps taken so far, at ``delta`` (Poisson sampling assumed).

        Raises:
            ValueError: no sample rate is known (make_private was given no loader, or
                poisson_sampling=False).
        """
        if self.sample_rate is None:
            raise ValueError("epsilon needs the Poisson sampling rate: pass the DataLoader to "
                             "make_private with poisson_sampling=True")
        return accounting.epsilon(self.noise_multiplier, self.sample_rate, self.steps, delta, accountant)


def make_private(model: nn.Module, optimizer: Optimizer, loader: Optional[DataLoader], *,
                 noise_multiplier: float, max_grad_norm: float, mode: str = "auto",
                 clipping: str = "flat", loss_reduction: str = "mean",
                 poisson_sampling: bool = True,
                 generator: Optional[torch.Generator] = None) -> Tuple[nn.Module, DPOptimizer,
                                                                       Optional[DataLoader]]:
    """Make a model, its optimizer and (optionally) its loader differentially private.

    After this, the usual loop ``zero_grad(); loss_fn(model(x), y).mean().backward(); step()``
    performs DP-SGD: each example's gradient is clipped to ``max_grad_norm`` inside the single
    backward, Gaussian noise of std ``noise_multiplier * max_grad_norm`` is added to the clipped
    sum at each step, and the sum is divided by the batch size for ``loss_reduction="mean"``
    (the expected batch size under Poisson sampling).

    Args:
        model: the model; hooks are attached to it (``optimizer.engine.detach()`` removes them).
        optimizer: any torch optimizer over the model's parameters.
        loader: a DataLoader, or None.
        noise_multiplier: sigma >= 0.
        max_grad_norm: C > 0.
        mode: "auto", "ghost" or "direct" (all exact).
        clipping: "flat".
        loss_reduction: "mean" or "sum": how the training loss combines per-example losses.
        poisson_sampling: replace the loader's sampling by Poisson sampling at rate 1/len(loader).
        generator: torch.Generator for the noise.

    Returns:
        (model, DPOptimizer, loader or None)
    """
    check_clipping(clipping)
    engine = Engine(model, mode=mode, max_grad_norm=max_grad_norm, loss_reduction=loss_reduction)
    try:
        expected = q = None
        if loader is not None and poisson_sampling:
            loader = poisson_loader(loader)
            q = loader.batch_sampler.sample_rate
            if loss_reduction == "mean":
                expected = len(loader.dataset) * q
        dp_optimizer = DPOptimizer(optimizer, engine, noise_multiplier, expected, generator, q)
    except Exception:
        engine.detach()
        raise
    return model, dp_optimizer, loader
