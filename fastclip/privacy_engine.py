"""``fastclip.PrivacyEngine``: Opacus 1.x's entry point on top of fastclip, so that an Opacus
script runs with only the import changed::

    from fastclip import PrivacyEngine          # was: from opacus import PrivacyEngine

    privacy_engine = PrivacyEngine()
    model, optimizer, data_loader = privacy_engine.make_private(
        module=model, optimizer=optimizer, data_loader=data_loader,
        noise_multiplier=1.1, max_grad_norm=1.0)
    ...                                           # the usual loop
    privacy_engine.get_epsilon(delta=1e-5)

A thin facade: every call maps onto :func:`fastclip.make_private` (exact per-example clipping
in one backward, whatever ``grad_sample_mode`` says), the optimizers' accountants and
:func:`fastclip.save_checkpoint`. What maps to what, and where fastclip differs from Opacus, is
listed in the README's "Coming from Opacus".
"""
from __future__ import annotations

import os
import warnings
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn
from torch.optim import Optimizer
from torch.utils.data import DataLoader

from . import accounting
from .checkpoint import load_checkpoint as _load, save_checkpoint as _save
from .optim import DPOptimizer, make_private as _make_private, noise_multiplier_for_epochs

# grad_sample_mode (Opacus) -> fastclip mode. Every fastclip mode is exact; Opacus' modes only
# differ in how they get there, so each maps to the fastclip mode of the same spirit.
GRAD_SAMPLE_MODES = {
    "hooks": "auto",       # materialised per-example grads -> per layer the cheapest exact norm
    "ew": "auto",          # expanded weights -> same
    "functorch": "auto",   # vmap per-example grads (any layer) -> auto; the generic rule covers any layer
    "ghost": "ghost",      # ghost clipping (two backwards) -> ghost norms in one backward
    "ghost_fsdp": "ghost", # same, for FSDP (fastclip: the model unsharded; see docs/design.md)
}
_FASTCLIP_MODES = ("auto", "ghost", "direct", "nanobatch")

# accountant (Opacus) -> fastclip accountant.
ACCOUNTANTS = {
    "rdp": "opacus_rdp",   # dp-accounting's RDP on Opacus' orders: Opacus' RDP epsilon
    "prv": "pld",          # dp-accounting's privacy loss distributions: close to Opacus' PRV
}

# make_private keywords passed on to fastclip.make_private as they are.
_PASSED = ("gamma", "target_unclipped_quantile", "clipbound_learning_rate", "max_clipbound",
           "min_clipbound", "unclipped_num_std", "nanobatch_size", "num_threads",
           "sampling_generator", "distributed", "audit")


def _accountant(name: str) -> str:
    if name == "gdp":
        raise ValueError(
            "fastclip: accountant='gdp' is not offered: Opacus' GDP accountant is the central-limit "
            "approximation of Gaussian DP (Bu et al. 2020), which can under-state epsilon for the "
            "few-step or large-sampling-rate runs where it is inaccurate, so it is not a guarantee. "
            "Fix: accountant='prv' (PLD accounting, tight) or 'rdp' (Opacus' RDP numbers)")
    if name not in ACCOUNTANTS:
        raise ValueError(f"fastclip: accountant must be one of {sorted(ACCOUNTANTS)} (Opacus' names) "
                         f"or 'gdp' (refused), got {name!r}")
    return ACCOUNTANTS[name]


def _mode(grad_sample_mode: str) -> str:
    if grad_sample_mode in GRAD_SAMPLE_MODES:
        return GRAD_SAMPLE_MODES[grad_sample_mode]
    if grad_sample_mode in _FASTCLIP_MODES:
        return grad_sample_mode
    raise ValueError(f"fastclip: grad_sample_mode must be one of Opacus' {sorted(GRAD_SAMPLE_MODES)} "
                     f"or fastclip's {list(_FASTCLIP_MODES)}, got {grad_sample_mode!r}")


class DPLoss:
    """The criterion ghost modes return (Opacus' ``DPLossFastGradientClipping``):
    ``criterion(output, target)`` is a plain scalar tensor whose ``backward()`` is the clipped
    step (fastclip clips inside that one backward; no second pass).

    As in Opacus, the wrapped criterion is called with ``reduction="none"`` for the per-example
    losses, which are then reduced by ``loss_reduction``: ``"mean"`` -> their mean over the batch
    (the optimizer divides by the expected batch size), ``"sum"`` -> their sum. A per-example
    loss with more dimensions than the batch (``MSELoss``'s (B, d)) is reduced over them the way
    the criterion's own reduction would (mean or sum), so the value equals ``criterion(output,
    target)`` with its reduction; Opacus' ``shape=(B, T, V)`` keyword for token-level losses
    (flattened to B*T) reduces each sequence to one loss (mean over its positions not equal to
    ``ignore_index``, or sum), as Opacus does.

    Args:
        criterion: a loss module with a ``reduction`` attribute equal to ``loss_reduction``
            (Opacus asserts the same), or a callable returning per-example losses (B,).
        loss_reduction: "mean" or "sum", as given to ``make_private``.
    """

    def __init__(self, criterion, loss_reduction: str = "mean"):
        if loss_reduction not in ("mean", "sum"):
            raise ValueError(f"fastclip: loss_reduction must be 'mean' or 'sum', got {loss_reduction!r}")
        reduction = getattr(criterion, "reduction", None)
        if reduction is not None and reduction != loss_reduction:
            raise ValueError(
                f"fastclip: the criterion's reduction is {reduction!r} but loss_reduction is "
                f"{loss_reduction!r}; they must agree (Opacus asserts the same). Fix: "
                f"{type(criterion).__name__}(reduction={loss_reduction!r}) or "
                f"make_private(..., loss_reduction={reduction!r})")
        self.criterion = criterion
        self.loss_reduction = loss_reduction

    def per_example(self, *args, shape=None, **kwargs) -> torch.Tensor:
        """The per-example losses, shape (B,)."""
        crit = self.criterion
        if getattr(crit, "reduction", None) is not None:
            old = crit.reduction
            crit.reduction = "none"
            try:
                loss = crit(*args, **kwargs)
            finally:
                crit.reduction = old
        else:
            loss = crit(*args, **kwargs)
        if not isinstance(loss, torch.Tensor) or loss.dim() == 0:
            raise ValueError(
                "fastclip: the criterion returned a scalar, not one loss per example: with "
                "reduction='none' it must return a tensor whose first dimension is the batch. Fix: "
                "a criterion with a `reduction` attribute, or one returning per-example losses (B,)")
        mean = self.loss_reduction == "mean"
        if shape is not None and loss.dim() == 1 and loss.shape[0] == shape[0] * shape[1]:
            loss = loss.view(shape[0], shape[1])
            ignore = getattr(crit, "ignore_index", None)
            if mean and ignore is not None and len(args) >= 2:
                targets = kwargs.get("target", args[1])
                valid = (targets.view(shape[0], shape[1]) != ignore).sum(1).clamp(min=1)
                return loss.sum(1) / valid
            return loss.mean(1) if mean else loss.sum(1)
        if loss.dim() > 1:
            loss = loss.flatten(1)
            loss = loss.mean(1) if mean else loss.sum(1)
        return loss

    def __call__(self, *args, shape=None, **kwargs) -> torch.Tensor:
        """The training loss (a scalar tensor; ``.backward()`` forms the clipped sums)."""
        loss = self.per_example(*args, shape=shape, **kwargs)
        return loss.mean() if self.loss_reduction == "mean" else loss.sum()

    def __repr__(self):
        return f"DPLoss({self.criterion!r}, loss_reduction={self.loss_reduction!r})"


class EngineAccountant:
    """``privacy_engine.accountant``: the composition of every step taken by the optimizers
    this engine made (and the history a checkpoint brought in), as Opacus' accountant objects
    present it (``get_epsilon``, ``history``, ``mechanism()``, ``len``, state dicts)."""

    def __init__(self, engine: "PrivacyEngine"):
        self._engine = engine

    @property
    def history(self) -> List[Tuple[float, Optional[float], int]]:
        """Segments (noise_multiplier, sample_rate, steps); sample_rate None for steps taken
        without Poisson sampling."""
        segs = [tuple(s) for s in self._engine._carried]
        for opt in self._engine._optimizers:
            segs.extend(tuple(s) for s in opt.accountant.history)
        return segs

    def __len__(self) -> int:
        return sum(n for _, _, n in self.history)

    def mechanism(self) -> str:
        """The accountant's name as given to :class:`PrivacyEngine` ("rdp" or "prv")."""
        return self._engine._accountant_name

    def get_epsilon(self, delta: float) -> float:
        """Epsilon of every step so far at ``delta`` (0 before any step).

        Raises:
            ValueError: some steps were taken without Poisson sampling
                (``poisson_sampling=False``): fastclip does not report an epsilon whose
                assumption does not hold (Opacus reports one anyway).
        """
        delta = accounting.check_delta(delta)
        hist = self.history
        unknown = sum(n for _, q, n in hist if q is None)
        if unknown:
            raise ValueError(
                f"fastclip: {unknown} of the {len(self)} steps were taken with poisson_sampling=False; "
                "the accountants assume Poisson sampling, so no epsilon is reported for them "
                "(Opacus reports one as an approximation). Fix: poisson_sampling=True")
        return accounting._epsilon(tuple((float(s), float(q), int(n)) for s, q, n in hist),
                                   delta, self._engine._fastclip_accountant)

    def state_dict(self) -> Dict[str, Any]:
        """The composed history and the mechanism name."""
        return {"mechanism": self.mechanism(), "history": [list(s) for s in self.history]}

    def __repr__(self):
        return f"EngineAccountant({self.mechanism()!r}, steps={len(self)})"


class PrivacyEngine:
    """Opacus 1.x's ``PrivacyEngine`` on fastclip: same constructor, ``make_private``,
    ``make_private_with_epsilon``, ``get_epsilon``, ``save_checkpoint``, ``load_checkpoint``.

    Args:
        accountant: "rdp" (default; dp-accounting's RDP accountant on Opacus' orders, so the
            epsilon equals Opacus' RDPAccountant's for the same run: within 1e-6 relative where
            the RDP series converge, and slightly larger (never smaller) where dp-accounting
            must leave a fractional order out, e.g. sigma < ~0.6 at q = 0.1), or "prv" (mapped
            to dp-accounting's PLD accountant, a tight numerical accountant like Opacus' PRV;
            the two agree to a few percent, not digit for digit). "gdp" is refused (a
            central-limit approximation, not a bound). Note: Opacus >= 1.3 defaults to "prv";
            this facade defaults to the more conservative "rdp".
        secure_mode: noise seeds and Poisson draws from ``os.urandom`` (Opacus needs
            torchcsprng for this; fastclip does not). See :func:`fastclip.make_private`.
    """

    def __init__(self, *, accountant: str = "rdp", secure_mode: bool = False):
        self._fastclip_accountant = _accountant(accountant)
        self._accountant_name = accountant
        self.secure_mode = bool(secure_mode)
        self._optimizers: List[DPOptimizer] = []
        self._carried: List[list] = []   # segments brought in by load_checkpoint
        self.accountant = EngineAccountant(self)

    def make_private(self, *, module: nn.Module, optimizer: Optimizer, data_loader: DataLoader,
                     noise_multiplier: float, max_grad_norm, criterion=None,
                     batch_first: bool = True, loss_reduction: str = "mean",
                     poisson_sampling: bool = True, clipping: str = "flat",
                     noise_generator: Optional[torch.Generator] = None,
                     grad_sample_mode: str = "hooks", wrap_model: bool = True,
                     rand_on_empty: bool = False, **kwargs):
        """Opacus' ``make_private``: the model, optimizer and loader made private by
        :func:`fastclip.make_private`.

        ``grad_sample_mode`` maps to an exact fastclip mode: "hooks", "ew", "functorch" ->
        "auto" (per layer the cheapest exact method; any layer without a native rule goes to
        the exact generic rule); "ghost", "ghost_fsdp" -> "ghost" (ghost norms, formed in the
        one backward instead of Opacus' two). fastclip's own "auto", "ghost", "direct",
        "nanobatch" are accepted too. Whatever the mode, the released step is the same.

        Args:
            module, optimizer, data_loader, noise_multiplier, max_grad_norm, loss_reduction,
                poisson_sampling: as Opacus (and :func:`fastclip.make_private`).
            criterion: ghost modes only: the loss to wrap (default ``nn.CrossEntropyLoss()``,
                Opacus' default); see :class:`DPLoss`.
            batch_first: must be True (fastclip needs the batch dimension first).
            clipping: "flat", "per_layer" (fastclip's per-layer clipping is per *layer*, a
                module with its parameters; Opacus' is per parameter tensor: a list needs one
                bound per ``optimizer.engine.layers``), "adaptive" (Opacus' keywords:
                target_unclipped_quantile, clipbound_learning_rate, max_clipbound,
                min_clipbound, unclipped_num_std), or fastclip's "automatic",
                "automatic_per_layer" (``gamma=``).
            noise_generator: torch.Generator for the noise (refused with secure_mode).
            wrap_model: ignored: fastclip attaches hooks to the model and returns it (no
                wrapper; ``optimizer.engine.detach()`` removes them).
            rand_on_empty: ignored: an empty Poisson batch is an ordinary step in fastclip.
            **kwargs: fastclip options: gamma, the adaptive keywords, nanobatch_size,
                num_threads, sampling_generator, distributed, audit.

        Returns:
            ``(model, optimizer, data_loader)``, or ``(model, optimizer, criterion,
            data_loader)`` for a ghost ``grad_sample_mode``, as Opacus.
        """
        unknown = sorted(set(kwargs) - set(_PASSED))
        if unknown:
            raise TypeError(f"fastclip: PrivacyEngine.make_private got unsupported keyword(s) "
                            f"{unknown}; it takes Opacus' keywords and fastclip's {list(_PASSED)}")
        if not batch_first:
            raise ValueError("fastclip: batch_first=False is not supported: every input must have "
                             "the batch dimension first. Fix: transpose the inputs (e.g. "
                             "x.transpose(0, 1)) and pass batch_first=True")
        if noise_generator is not None and self.secure_mode:
            raise ValueError("fastclip: a noise_generator was passed with secure_mode=True, which "
                             "draws all randomness from os.urandom; drop one of them")
        mode = _mode(grad_sample_mode)
        ghost = "ghost" in grad_sample_mode
        if ghost:
            crit = DPLoss(nn.CrossEntropyLoss(reduction=loss_reduction) if criterion is None
                          else criterion, loss_reduction)
        model, dp_optimizer, loader = _make_private(
            module, optimizer, data_loader, noise_multiplier=noise_multiplier,
            max_grad_norm=max_grad_norm, mode=mode, clipping=clipping,
            loss_reduction=loss_reduction, poisson_sampling=poisson_sampling,
            generator=noise_generator, secure_mode=self.secure_mode,
            accountant=self._fastclip_accountant, **kwargs)
        self._optimizers.append(dp_optimizer)
        if ghost:
            return model, dp_optimizer, crit, loader
        return model, dp_optimizer, loader

    def make_private_with_epsilon(self, *, module: nn.Module, optimizer: Optimizer,
                                  data_loader: DataLoader, target_epsilon: float,
                                  target_delta: float, epochs: int, max_grad_norm,
                                  criterion=None, **kwargs):
        """Opacus' ``make_private_with_epsilon``: :meth:`make_private` with the smallest noise
        multiplier that keeps ``epochs`` epochs (``epochs * len(data_loader)`` steps at sample
        rate ``1 / len(data_loader)``) within ``(target_epsilon, target_delta)`` under this
        engine's accountant (calibrated to 1e-4 in sigma, never over the budget; Opacus stops
        within 0.01 of epsilon, so its sigma can differ in the third digit).

        Args:
            module, optimizer, data_loader, max_grad_norm, criterion, **kwargs: as
                :meth:`make_private`.
            target_epsilon, target_delta, epochs: the budget and the planned run.

        Returns:
            as :meth:`make_private`.
        """
        if len(self.accountant) > 0:
            warnings.warn("fastclip: make_private_with_epsilon with privacy budget already spent "
                          "by this engine; the noise multiplier assumes a fresh start, so the "
                          "whole run will spend more than target_epsilon", UserWarning, stacklevel=2)
        # The one calibration (fastclip.make_private_with_epsilon's).
        sigma = noise_multiplier_for_epochs(data_loader, target_epsilon, target_delta, epochs,
                                            self._fastclip_accountant,
                                            kwargs.get("poisson_sampling", True))
        return self.make_private(module=module, optimizer=optimizer, data_loader=data_loader,
                                 noise_multiplier=sigma, max_grad_norm=max_grad_norm,
                                 criterion=criterion, **kwargs)

    def get_epsilon(self, delta: float) -> float:
        """Epsilon spent so far by every optimizer this engine made, at ``delta``."""
        return self.accountant.get_epsilon(delta)

    def save_checkpoint(self, *, path, module: nn.Module, optimizer: Optional[DPOptimizer] = None,
                        noise_scheduler=None, grad_clip_scheduler=None,
                        checkpoint_dict: Optional[Dict[str, Any]] = None,
                        module_state_dict_kwargs: Optional[Dict[str, Any]] = None,
                        torch_save_kwargs: Optional[Dict[str, Any]] = None) -> None:
        """Opacus' ``save_checkpoint``, written atomically by :func:`fastclip.save_checkpoint`
        (a run killed while saving keeps the previous file). Keys as Opacus:
        ``module_state_dict``, ``privacy_accountant_state_dict``, ``optimizer_state_dict``
        (the DPOptimizer's, with its accountant, noise and sampler state), the schedulers', and
        ``checkpoint_dict``'s own.

        Args:
            path: a file path (not a file object: the atomic rename needs a path).
            module, optimizer, noise_scheduler, grad_clip_scheduler, checkpoint_dict,
                module_state_dict_kwargs: as Opacus.
            torch_save_kwargs: not supported (must be empty).
        """
        if not isinstance(path, (str, os.PathLike)):
            raise TypeError(f"fastclip: save_checkpoint needs a file path (written atomically), got "
                            f"{type(path).__name__}")
        if torch_save_kwargs:
            raise TypeError(f"fastclip: torch_save_kwargs {sorted(torch_save_kwargs)} are not "
                            "supported by the atomic save")
        payload: Dict[str, Any] = dict(checkpoint_dict or {})
        payload["module_state_dict"] = module.state_dict(**(module_state_dict_kwargs or {}))
        acc = self.accountant.state_dict()
        # What the saved optimizer does not carry itself (other optimizers, loaded history).
        acc["carried"] = [list(s) for s in self._carried] + [
            list(s) for opt in self._optimizers if opt is not optimizer
            for s in opt.accountant.history]
        payload["privacy_accountant_state_dict"] = acc
        if optimizer is not None:
            payload["optimizer_state_dict"] = optimizer.state_dict()
        if noise_scheduler is not None:
            payload["noise_scheduler_state_dict"] = noise_scheduler.state_dict()
        if grad_clip_scheduler is not None:
            payload["grad_clip_scheduler_state_dict"] = grad_clip_scheduler.state_dict()
        _save(path, **payload)

    def load_checkpoint(self, *, path, module: nn.Module, optimizer: Optional[DPOptimizer] = None,
                        noise_scheduler=None, grad_clip_scheduler=None,
                        module_load_dict_kwargs: Optional[Dict[str, Any]] = None,
                        torch_load_kwargs: Optional[Dict[str, Any]] = None) -> Dict:
        """Opacus' ``load_checkpoint``: loads the module, the optimizer (which validates its
        whole privacy state before applying any) and the schedulers; the engine's accountant
        becomes the checkpoint's (steps of this engine's other optimizers are no longer
        counted, as Opacus replaces its accountant's state).

        Returns:
            the rest of the checkpoint dict (Opacus returns it too).
        """
        ckpt = _load(path, **(torch_load_kwargs or {}))
        acc = ckpt.pop("privacy_accountant_state_dict", None)
        if acc is None or "history" not in acc:
            raise ValueError(f"fastclip: {os.fspath(path)} has no privacy_accountant_state_dict: it was "
                             "not written by PrivacyEngine.save_checkpoint")
        if acc.get("mechanism", self._accountant_name) != self._accountant_name:
            warnings.warn(f"fastclip: the checkpoint was accounted with {acc['mechanism']!r}, this "
                          f"engine uses {self._accountant_name!r}; the history is the same, the "
                          "epsilon is this engine's accountant's", UserWarning, stacklevel=2)
        history = acc["history"]
        module.load_state_dict(ckpt.pop("module_state_dict"), **(module_load_dict_kwargs or {}))
        opt_sd = ckpt.pop("optimizer_state_dict", None)
        if optimizer is not None and opt_sd is not None:
            optimizer.load_state_dict(opt_sd)
            carried = acc.get("carried", [])
            self._optimizers = [optimizer]
        else:
            if (optimizer is None) != (opt_sd is None):
                warnings.warn("fastclip: the checkpoint " + ("has an optimizer state but no optimizer "
                              "was passed" if optimizer is None else "has no optimizer state"),
                              UserWarning, stacklevel=2)
            carried = history
            self._optimizers = []
        check = accounting.PrivacyAccountant()
        check.load_state_dict({"history": carried})   # validates the segments
        self._carried = check.history
        for key, sched in (("noise_scheduler_state_dict", noise_scheduler),
                           ("grad_clip_scheduler_state_dict", grad_clip_scheduler)):
            sd = ckpt.pop(key, None)
            if sched is not None and sd is not None:
                sched.load_state_dict(sd)
        return ckpt

    @staticmethod
    def get_compatible_module(module: nn.Module) -> nn.Module:
        """Opacus' ``get_compatible_module``: BatchNorm replaced by GroupNorm
        (:func:`fastclip.fix`); returns the model."""
        from .fix import fix
        fix(module)
        return module

    def __repr__(self):
        return (f"PrivacyEngine(accountant={self._accountant_name!r}, secure_mode={self.secure_mode}, "
                f"optimizers={len(self._optimizers)})")
