"""The private optimizer and make_private."""
from __future__ import annotations

import math
import os
import warnings
import weakref
from collections import OrderedDict
from typing import Optional, Tuple

import torch
from torch import nn
from torch.optim import Optimizer
from torch.utils.data import DataLoader

from . import accounting, distributed as _dist, fsdp as _fsdp, ops
from .accounting import (PrivacyAccountant, check_accountant, check_noise_multiplier,
                         check_sample_rate)
from .data import (PoissonBatchSampler, _check_generator_state, poisson_loader, poisson_source,
                   split_batch)
from .clipping import (AdaptiveClipping, Bound, adaptive_from, check_clipping,
                       is_per_layer)
from .engine import Engine, make_engine
from .nn.rnn import convert_recurrent


_KEY = "fastclip"
_NOT_FINITE = ("fastclip: the clipped gradient sum is not finite (an example in this batch has a "
               "NaN or infinite loss or gradient); the step is refused before noise is added and "
               "before the parameters change")   # the privacy entry of DPOptimizer.state_dict()


class DPOptimizer(Optimizer):
    """Wraps any torch optimizer: before its step, adds Gaussian noise of std
    ``noise_multiplier * sensitivity`` (sensitivity = C for flat clipping) to the clipped
    gradient sums the engine wrote into ``p.grad``, then divides by the batch size for
    ``loss_reduction="mean"``; after it, records the step in its :class:`PrivacyAccountant`.

    The wrapped optimizer's ``param_groups``, ``state`` and ``defaults`` are shared (not copied),
    so LR schedulers work on either object. :meth:`state_dict` holds, beside the wrapped
    optimizer's state, everything a resumed run needs to continue exactly: the accountant's
    history, the noise generator's state and the Poisson sampler's position and generator state.

    Logical batches (:class:`BatchMemoryManager`): while the manager feeds a
    physical batch that is not the last of its logical batch, :meth:`step` only runs the closure
    (if any) and leaves the clipped sums in ``p.grad`` to accumulate: no reduction across ranks,
    no noise, no parameter change, no accounted step. :meth:`zero_grad` does nothing while a
    logical batch is partly accumulated (after such a skipped step, until the step that ends the
    logical batch). So noise is added and the step accounted once per logical batch.

    The drawn batch. With the Poisson loader of :func:`make_private`, each :meth:`step` must
    release exactly one batch the loader handed out since the last step, each of its examples
    covered once by the step's backward passes (``engine.examples``; the physical batches of a
    logical batch add up). Anything else is refused before anything is released, with the reason:
    no batch handed out (training on the original loader or tensors of one's own, a second step
    on one batch), several batches stepped as one (including a skipped step on an empty batch),
    or another number of examples (a batch backpropagated twice). An empty batch is an ordinary
    noise-only step, with or without a backward.

    Args:
        optimizer: the torch optimizer over the model's parameters.
        engine: the attached :class:`fastclip.engine.Engine`.
        noise_multiplier: sigma >= 0; may be changed between steps (``opt.noise_multiplier =``),
            the accountant composes the segments.
        expected_batch_size: the divisor for "mean" under Poisson sampling (N q). None divides
            by the number of examples actually seen since the last step, which is allowed only
            while no sample rate is known (the actual batch size is not private).
        generator: torch.Generator for the noise (reproducible runs); None seeds a private one
            from torch's default generator.
        sample_rate: the Poisson sampling rate q in (0, 1], for :meth:`epsilon`.
        secure_mode: every step's noise seed comes from ``os.urandom`` (``generator`` must be
            None); see :func:`make_private`.
        sampler: the :class:`fastclip.data.PoissonBatchSampler` feeding the run, whose state the
            optimizer's state_dict carries.
        accountant: default accountant of :meth:`epsilon`, "rdp", "pld" or "opacus_rdp".
        reducer: a :class:`fastclip.distributed.GradReducer` for a multi-process run: ``step``
            all-reduces the clipped sums first, and each step's noise seed is rank 0's (see
            :mod:`fastclip.distributed`). None: this process alone.
        adaptive: the :class:`fastclip.clipping.AdaptiveClipping` of ``clipping="adaptive"``:
            each step adds gradient noise at its adjusted noise multiplier, releases the noised
            count of unclipped examples and moves the engine's bound; the accountant counts
            the step at ``noise_multiplier``.
    """

    def __init__(self, optimizer: Optimizer, engine: Engine, noise_multiplier: float,
                 expected_batch_size: Optional[float] = None,
                 generator: Optional[torch.Generator] = None, sample_rate: Optional[float] = None,
                 *, secure_mode: bool = False, sampler: Optional[PoissonBatchSampler] = None,
                 accountant: str = "rdp", reducer: Optional["_dist.GradReducer"] = None,
                 adaptive: Optional[AdaptiveClipping] = None,
                 pipeline: Optional["_dist.PipelineExchange"] = None):
        if not isinstance(optimizer, Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if isinstance(optimizer, DPOptimizer):
            raise TypeError("the optimizer is already private (a DPOptimizer); pass the original one")
        sigma = check_noise_multiplier(noise_multiplier)
        if sample_rate is not None:
            sample_rate = check_sample_rate(sample_rate)
        if expected_batch_size is not None:
            expected_batch_size = float(expected_batch_size)
            if not (expected_batch_size > 0 and math.isfinite(expected_batch_size)):
                raise ValueError(f"expected_batch_size must be a finite number > 0, got {expected_batch_size}")
        if (engine.loss_reduction == "mean" and sample_rate is not None
                and expected_batch_size is None):
            raise ValueError("loss_reduction='mean' with a known sample rate needs expected_batch_size "
                             "(N * sample_rate): dividing by the actual batch size would release it")
        if secure_mode and generator is not None:
            raise ValueError("secure_mode draws every noise seed from os.urandom; do not pass a generator")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
        if generator is None and not secure_mode:
            # A private generator (seeded from torch's default one) so its state can be saved.
            generator = torch.Generator().manual_seed(int(torch.randint(0, 2**62, (1,)).item()))
        self.original_optimizer = optimizer
        self.engine = engine
        self._noise_multiplier = sigma
        self.expected_batch_size = expected_batch_size
        self.generator = generator
        self.sample_rate = sample_rate
        self.secure_mode = bool(secure_mode)
        self.sampler = sampler
        self.accountant = PrivacyAccountant(accountant)
        self.reducer = reducer
        self.pipeline = pipeline
        if adaptive is not None and pipeline is not None:
            raise ValueError("fastclip: clipping='adaptive' is not supported across pipeline "
                             "stages yet (the count of unclipped examples would need the norms of "
                             "every stage); use clipping='flat' or 'per_layer'")
        if adaptive is not None:
            if reducer is not None:
                raise ValueError("fastclip: clipping='adaptive' is not supported in a multi-process "
                                 "run yet (the count of unclipped examples would have to be "
                                 "all-reduced); use clipping='flat' or one process")
            adaptive.grad_noise_multiplier(sigma)   # refuses sigma >= 2 * unclipped_num_std
            self._set_bound(adaptive.max_grad_norm, engine)
        self.adaptive = adaptive
        # Logical batches (BatchMemoryManager): the iteration feeding physical batches, whether
        # the current one ends its logical batch, and whether p.grad holds part of a logical batch.
        self._logical_owner = None
        self._last_physical = True
        self._partial = False
        self._optimizer_step_pre_hooks = OrderedDict()
        self._optimizer_step_post_hooks = OrderedDict()
        self._optimizer_state_dict_pre_hooks = OrderedDict()
        self._optimizer_state_dict_post_hooks = OrderedDict()
        self._optimizer_load_state_dict_pre_hooks = OrderedDict()
        self._optimizer_load_state_dict_post_hooks = OrderedDict()
        self._check_params(step=False)

    @property
    def noise_multiplier(self) -> float:
        return self._noise_multiplier

    @noise_multiplier.setter
    def noise_multiplier(self, value: float):
        value = check_noise_multiplier(value)
        if self.adaptive is not None:
            self.adaptive.grad_noise_multiplier(value)
        self._noise_multiplier = value

    @property
    def max_grad_norm(self) -> float:
        """The current flat clipping bound C (adaptive clipping moves it after every step); for
        per-layer clipping the sensitivity sqrt(sum_l C_l^2)."""
        return self.sensitivity

    @staticmethod
    def _set_bound(C: float, engine: Engine) -> None:
        """Adaptive clipping: the engine clips flat to C from the next backward on."""
        engine.sensitivity = engine.max_grad_norm = float(C)

    @property
    def steps(self) -> int:
        """Steps taken (all of them accounted)."""
        return self.accountant.steps

    @property
    def sensitivity(self) -> float:
        """L2 sensitivity of the summed clipped gradient to adding or removing one example; the
        noise std is ``noise_multiplier * sensitivity``.

        Flat clipping: C; per-layer clipping with bounds C_l: ``sqrt(sum_l C_l^2)`` (the engine
        keeps each example's contribution to layer l within C_l). This is the one place the
        noise scale is derived from the clipping. Pipeline stages: the whole model's (every
        stage's layers), agreed at make_private.
        """
        if self.pipeline is not None:
            return self.pipeline.sensitivity
        return self.engine.sensitivity

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
        """Clear the gradients and the count of examples the next step will release.

        Does nothing while a logical batch of :class:`fastclip.BatchMemoryManager` is partly
        accumulated (its clipped sums must reach the step that ends it).

        Args:
            set_to_none: as :meth:`torch.optim.Optimizer.zero_grad`: ``p.grad = None`` (default),
                or zeroed in place (the engine then adds the next clipped sums into them).
        """
        if self._partial:       # the clipped sums of an unfinished logical batch stay
            return
        self.original_optimizer.zero_grad(set_to_none)
        self.engine.drop_deferred()     # pipeline flat clipping: held-back uses, never released
        self.engine.examples = 0
        self.engine.unclipped = 0
        if not set_to_none:     # zeroed in place: clean, later clipped sums may add into them
            self.engine.adopt_grads(p for g in self.param_groups for p in g["params"])

    def _check_params(self, step: bool = True):
        """Refuse, before anything is released, a trainable parameter in ``param_groups`` that
        the engine does not clip (one the model no longer uses after a replacement, or one never
        in it), and (``step``) a clipped parameter whose ``p.grad`` the engine did not write (a
        raw autograd gradient). Set lookups only, no pass over gradient data. At a step the
        engine first re-plans if the model's trainable parameters changed since its last call
        (``Engine.refresh``), so a layer unfrozen after the last forward is covered."""
        engine = self.engine
        if step:
            engine.refresh(full=True)
        for group in self.param_groups:
            for p in group["params"]:
                if not p.requires_grad:
                    continue
                if not engine.covers(p):
                    raise ValueError(self._uncovered(p) + (
                        "; nothing was released (no noise added, parameters unchanged)"
                        if step else ""))
                if step and not engine.wrote_grad(p):
                    raise RuntimeError(
                        f"fastclip: parameter {engine.name_of(p)} has a gradient fastclip did not "
                        "write (computed while the parameter was not clipped: unfrozen or added "
                        "after make_private and used outside a call of the private model, or a "
                        "tensor assigned to p.grad); releasing it would release an unclipped "
                        "gradient, so the step is refused: nothing was released (no noise added, "
                        "parameters unchanged). Fix: optimizer.zero_grad(), then run the forward "
                        "through the private model and the backward again")

    def _uncovered(self, p) -> str:
        name = self.engine.name_of(p)
        if name is not None and name.startswith("former"):
            return (f"fastclip: the optimizer holds the {name}, a parameter the model no longer "
                    "uses: it was replaced after make_private (model.load_state_dict(sd, "
                    "assign=True), module.weight = nn.Parameter(...)), so its gradient is always "
                    "None and the optimizer would step a detached tensor while the model's new "
                    "parameter never trains. Fix: re-create the optimizer over model.parameters() "
                    "and call make_private again, or load with assign=False (copies into the "
                    f"existing parameters)")
        if name is not None:
            return (f"fastclip: the optimizer holds parameter {name}, which fastclip does not "
                    "clip (it became trainable after the private model's last call and the plan "
                    "could not be updated); its gradient would be released unclipped. Fix: run "
                    "the forward through the private model before step()")
        return ("fastclip: the optimizer holds a parameter not in the private model (shape "
                f"{tuple(p.shape)}): its gradient would be computed outside fastclip's clipping "
                "and released unclipped. Fix: make it part of the model (e.g. model.head = head, "
                "used in the model's forward; it is clipped from the next forward on) or leave it "
                "out of the optimizer")

    @property
    def skips_step(self) -> bool:
        """True while the current physical batch is not the last of its logical batch
        (:class:`BatchMemoryManager`): :meth:`step` then accumulates only."""
        return not self._last_physical

    def _set_physical_batch(self, owner, last: bool) -> None:
        """Called by the iteration ``owner`` before it hands out each physical batch."""
        if self._logical_owner is not owner:
            self._end_logical_batches(self._logical_owner)   # an abandoned iteration's partial sums go
            self._logical_owner = owner
        self._last_physical = bool(last)

    def _end_logical_batches(self, owner) -> None:
        """Back to one step per batch when ``owner``'s iteration ends (finished, broken out of,
        or its with-block left). The clipped sums of a logical batch it left unfinished are
        discarded (never released), so no example of it can enter a later step as well."""
        if self._logical_owner is not owner:
            return
        if self._partial:
            self._partial = False
            self.zero_grad()
        self._logical_owner = None
        self._last_physical = True

    def _step_seed(self) -> int:
        if self.secure_mode:
            seed = int.from_bytes(os.urandom(8), "little")
        else:
            seed = int(torch.randint(0, 1 << 62, (1,), generator=self.generator).item())
        # Distributed: every rank adds the same noise to the same reduced sum, from rank 0's seed.
        # Pipeline: every stage draws from rank 0's seed too (its streams continue the numbering
        # of the earlier stages' parameters, PipelineExchange.noise_offset).
        return seed if self.reducer is None and self.pipeline is None else _dist.agree_seed(seed)

    def _check_finite(self):
        """Refuse a non-finite clipped sum before anything is released: an example whose loss or
        gradient is NaN poisons the sum whatever its clip factor, and NaN parameters would tell
        every later observer that such an example was sampled."""
        grads = [_fsdp.local(p.grad) for g in self.param_groups for p in g["params"]
                 if p.requires_grad and p.grad is not None]
        if not grads:
            return
        if not ops.all_finite(grads):
            raise RuntimeError(_NOT_FINITE)

    def _check_batch(self):
        """Refuse a step that would not release exactly the one batch the private loader drew
        (what the accountant counts): no batch handed out since the last step (training on
        another loader, or a second step on one batch), several batches released as one, or
        backward passes that covered another number of examples than the batch has (a batch
        backpropagated twice: each example counted, and its influence bounded, twice).

        Runs before anything is released, and changes nothing: after a refusal the user can
        ``zero_grad()``, redo the batch's backward once and step again. Distributed: each rank
        checks its own shard, and every rank refuses if any does (no rank waits in a collective
        for one that raised). Without a sampler (``loader=None``, ``poisson_sampling=False``)
        there is nothing drawn to compare with, and no epsilon is claimed.
        """
        sampler = self.sampler
        why = None
        if sampler is not None and sampler.tracked:
            handed, covered = sampler.handed_sizes, int(self.engine.examples)
            if not handed:
                why = ("fastclip: step() was called but the loader make_private returned has handed "
                       f"out no batch since the last step (the backward passes covered {covered} "
                       "examples); the accountant would count a Poisson-sampled batch that was never "
                       "drawn. Cause: training on another loader (the original one, or tensors of "
                       "your own) or a second step on the same batch. Fix: iterate over the loader "
                       "make_private returned (model, optimizer, loader = fastclip.make_private(...); "
                       "for batch in loader: ...) with one step() per batch; to train on data you "
                       "sample yourself, pass loader=None or poisson_sampling=False (epsilon is then "
                       "not computed)")
            elif len(handed) > 1:
                why = (f"fastclip: {len(handed)} batches (of {handed} examples) were handed out by "
                       "the private loader since the last step, and step() would release them as "
                       f"one (the backward passes covered {covered} examples); the accountant counts "
                       "one Poisson-sampled batch per step. Fix: call step() once for every batch "
                       "the loader yields, an empty one included (a noise-only step), and take no "
                       "batch from it for anything else (to look at a batch, use the original "
                       "loader); for batches larger than memory use fastclip.BatchMemoryManager")
            elif covered != handed[0]:
                cause = ("each example counted, and its influence bounded, more than once: "
                         "backward() called on two forward passes of the same batch, or the batch "
                         "trained twice" if covered > handed[0] else
                         "examples of the batch left out of the backward, or data other than the "
                         "batch trained")
                why = (f"fastclip: the backward passes of this step covered {covered} examples, but "
                       f"the batch the private loader drew has {handed[0]} ({cause}); the released "
                       "step must be exactly the drawn batch, each example once. Fix: one forward "
                       "and one backward over the whole batch per step (zero_grad() first); for "
                       "batches larger than memory use fastclip.BatchMemoryManager")
        if ((self.reducer is not None or self.pipeline is not None)
                and sampler is not None and sampler.tracked
                and _dist.any_rank(why is not None) and why is None):
            why = ("fastclip: another rank refused this step (its error names the cause); the step "
                   "is refused on every rank")
        if why is not None:
            raise RuntimeError(why + "; nothing was released (no noise added, parameters unchanged)")

    def add_noise_and_scale(self):
        """Turn the accumulated clipped sums into the private gradient, in place: Gaussian noise
        of std ``noise_multiplier * sensitivity`` (adaptive clipping: the adjusted gradient noise
        multiplier, :meth:`fastclip.clipping.AdaptiveClipping.grad_noise_multiplier`), then the
        division by the (expected) batch size for ``loss_reduction="mean"``."""
        self._noise_and_scale(check=False)

    def _noise_and_scale(self, check: bool) -> None:
        """:meth:`add_noise_and_scale` over every parameter in one call of the noise op
        (``ops.add_gaussian_noise_checked_``). ``check``: that call first checks every clipped sum
        finite and, if one is not, refuses the step (RuntimeError) with nothing written: p.grad,
        the parameters and the noise generator's state as before the call."""
        sigma = self.noise_multiplier
        if self.adaptive is not None:
            sigma = self.adaptive.grad_noise_multiplier(sigma)
        std = sigma * self.sensitivity
        if self.engine.loss_reduction == "mean":
            denom = self.expected_batch_size if self.expected_batch_size is not None \
                else max(self.engine.examples, 1)
        else:
            denom = 1.0
        grads, fresh = [], []
        for group in self.param_groups:
            for p in group["params"]:
                if not p.requires_grad:
                    continue
                g = p.grad
                if g is None:
                    if std == 0:
                        continue
                    # An example-free step still releases noise for every parameter (assigned
                    # to p.grad only once the step is not refused).
                    g = torch.zeros_like(p)
                    fresh.append((p, g))
                grads.append(_fsdp.local(g))    # FSDP2: this rank's shard only
        # One seed per step (from the generator, or os.urandom in secure mode); one stream per
        # tensor, k = 1, 2, ... in parameter order (pipeline stages continue the numbering).
        state = None
        if std > 0:
            if check and not self.secure_mode and self.generator is not None:
                state = self.generator.get_state()   # a refused step leaves the stream as it was
            base = self._step_seed()
        else:
            base = 0
        # Pipeline stages and FSDP2 ranks (each noising its own shard) continue the numbering.
        k0 = (self.pipeline.noise_offset if self.pipeline is not None
              else getattr(self.reducer, "noise_offset", 0))
        seeds = [base + (k0 + i + 1) * 0x9E3779B97F4A7C15 for i in range(len(grads))]
        if check:
            if not ops.add_gaussian_noise_checked_(grads, std, 1.0 / denom, seeds):
                if state is not None:
                    self.generator.set_state(state)
                raise RuntimeError(_NOT_FINITE)
        else:
            for g, s in zip(grads, seeds):
                ops.add_gaussian_noise_(g, std, 1.0 / denom, s)
        for p, g in fresh:
            p.grad = g

    # torch.amp.GradScaler.step(opt) then calls step() itself, with the scaler's state set on
    # the optimizer (grad_scale, found_inf) instead of unscaling p.grad first: how a scaler is
    # seen at all (_refuse_grad_scaler). The loss scale is invisible to the backward.
    _step_supports_amp_scaling = True

    def _refuse_grad_scaler(self) -> None:
        """Refuse a step driven by an enabled ``torch.amp.GradScaler``: its loss scale S
        multiplied every per-example gradient before the engine clipped it to C, so after the
        scaler's unscaling each example's bound would silently be C / S (exactly: the clip
        factors cannot be formed again once the backward is over)."""
        if "found_inf" not in self.__dict__:
            return
        # GradScaler deletes these after step() returns, which it does not: leave none behind.
        self.__dict__.pop("found_inf", None)
        self.__dict__.pop("grad_scale", None)
        raise RuntimeError(
            "fastclip: torch.amp.GradScaler cannot drive a private optimizer: the loss scale S "
            "multiplies every per-example gradient before fastclip clips it to max_grad_norm, so "
            "after unscaling each example would be clipped to max_grad_norm / S (silently far "
            "too small). Fix: use bfloat16 autocast (torch.autocast(device, "
            "dtype=torch.bfloat16)), which needs no scaler (fastclip forms norms and clipped "
            "sums in float32), and call loss.backward() and optimizer.step() without the "
            "scaler; nothing was released (no noise added, parameters unchanged)")

    @torch.no_grad()
    def step(self, closure=None):
        """One DP-SGD step: checks that the step releases exactly the batch the private loader
        drew (every covered parameter's gradient written by fastclip), all-reduces the clipped
        sums in a multi-process run, adds the noise, scales for ``loss_reduction="mean"``, runs
        the wrapped optimizer's step and records the step in the accountant. Adaptive clipping
        then releases the noised count of unclipped examples and moves the bound.

        While a :class:`fastclip.BatchMemoryManager` feeds a physical batch that is not the last
        of its logical batch, only the closure runs (the clipped sums keep accumulating).

        Args:
            closure: optional, re-evaluates the model and returns the loss (run with grad
                enabled, before anything else).

        Returns:
            the closure's loss, or None.

        Raises:
            RuntimeError, ValueError: the step would release something other than the drawn
                batch's clipped sums (the message names the cause and the fix), or it is driven
                by a ``torch.amp.GradScaler`` (use bfloat16 autocast, which needs no scaler);
                nothing is released then.
        """
        self._refuse_grad_scaler()
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if not self._last_physical:
            # Not the last physical batch of its logical batch: the clipped sums accumulate.
            self._partial = True
            return loss
        self._check_params()
        self._check_batch()
        self._partial = False
        if self.pipeline is not None:
            self._pipeline_exchange()
        if self.reducer is not None:
            self.reducer.reduce([p for g in self.param_groups for p in g["params"]
                                 if p.requires_grad], self.engine)
        if self.reducer is None and self.pipeline is None:
            # The finite check and the noise in one call: checked before anything is written.
            self._noise_and_scale(check=True)
        else:
            # Every rank (stage) refuses before the seed is agreed (a collective).
            self._check_finite()
            self.add_noise_and_scale()
        self.original_optimizer.step()
        if self.adaptive is not None:
            self._adapt()
        self.engine.examples = 0
        self.engine.unclipped = 0
        # The released gradients are the engine's to accumulate into (zero_grad(set_to_none=False)).
        self.engine.adopt_grads(p for g in self.param_groups for p in g["params"] if p.requires_grad)
        self.accountant.step(self.noise_multiplier, self.sample_rate)
        if self.sampler is not None:
            self.sampler.clear_handed()     # the batch is released: the next step needs its own
        return loss

    def _pipeline_exchange(self) -> None:
        """Pipeline stages: refuse (on every stage) gradients edited in place after fastclip wrote
        them (a schedule's scale_grads) or a clipping changed since make_private; then, for flat
        clipping, the one all-reduce of the per-example squared norms and the clipped sums."""
        pipe, engine = self.pipeline, self.engine
        edited = next((p for g in self.param_groups for p in g["params"]
                       if p.requires_grad and engine.grad_edited(p)), None)
        why = None
        if edited is not None:
            why = _dist.PIPELINE_GRADS.format(name=engine.name_of(edited))
        elif float(engine.sensitivity) != pipe.local_sensitivity:
            try:
                pipe.check_sensitivity(engine)
            except RuntimeError as e:
                why = str(e)
        if _dist.any_rank(why is not None):
            engine.drop_deferred()
            raise RuntimeError(why or "fastclip: another pipeline stage refused this step (its "
                               "error names the cause); the step is refused on every stage: "
                               "nothing was released (no noise added, parameters unchanged)")
        if not pipe.per_layer:
            pipe.exchange(engine)

    def _adapt(self) -> None:
        """Adaptive clipping after a released step: the noised fraction of unclipped examples
        moves the bound (:meth:`fastclip.clipping.AdaptiveClipping.update`). The count's noise
        is drawn from the step's own seed stream (``os.urandom`` in secure mode)."""
        engine = self.engine
        seed = self._step_seed()
        gen = torch.Generator().manual_seed(seed & ((1 << 63) - 1))
        noise = float(torch.randn((), generator=gen, dtype=torch.float64))
        denom = (self.sampler.num_samples * self.sample_rate if self.sampler is not None
                 else self.expected_batch_size if self.expected_batch_size is not None
                 else max(engine.examples, 1))
        self._set_bound(self.adaptive.update(engine.unclipped, engine.examples, denom, noise),
                        engine)

    def state_dict(self) -> dict:
        """The wrapped optimizer's state dict (keys "state", "param_groups") plus a "fastclip"
        entry: accountant history, noise multiplier, noise generator state, sampler state."""
        sd = self.original_optimizer.state_dict()
        sd[_KEY] = {
            "version": 1,
            "noise_multiplier": self.noise_multiplier,
            "sample_rate": self.sample_rate,
            "secure_mode": self.secure_mode,
            "accountant": self.accountant.state_dict(),
            "generator": None if self.generator is None else self.generator.get_state(),
            "sampler": None if self.sampler is None else self.sampler.state_dict(),
        }
        if self.adaptive is not None:
            sd[_KEY]["adaptive"] = self.adaptive.state_dict()
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore a state dict from :meth:`state_dict`: the run continues exactly (same noise,
        same batches, same epsilon) when the model and loader are built as before.

        Every part is validated before any is applied: a refused state dict changes nothing
        (accountant, noise multiplier, generators, sampler, wrapped optimizer). A checkpoint saved
        with another ``secure_mode`` loads with a warning (the accounting resumes exactly, the
        randomness does not). :func:`fastclip.save_checkpoint` writes checkpoints atomically.

        Raises:
            ValueError: the state dict has no privacy state (it was saved from a non-private
                optimizer: loading it would silently restart the accounting at 0 steps), or it
                does not fit this run (another sample rate or dataset size for the sampler), or
                a part of it is not valid (accountant history, generator states).
        """
        if _KEY not in state_dict:
            raise ValueError("this state dict has no privacy state (accountant, noise generator, "
                             "steps): it was saved from a non-private optimizer, and loading it would "
                             "restart the privacy accounting at 0 steps. Load it into "
                             "optimizer.original_optimizer if that is what you mean")
        sd = dict(state_dict)
        priv = sd.pop(_KEY)
        # Validate every part first, then apply: a refused checkpoint changes nothing.
        if not isinstance(priv, dict):
            raise ValueError(f"the checkpoint's privacy state is not a dict: {type(priv).__name__}")
        missing = [k for k in ("accountant", "noise_multiplier") if k not in priv]
        if missing:
            raise ValueError(f"the checkpoint's privacy state lacks {missing}; it is not from "
                             "DPOptimizer.state_dict()")
        accountant = PrivacyAccountant()
        accountant.load_state_dict(priv["accountant"])      # a fresh object: validates only
        sigma = check_noise_multiplier(priv["noise_multiplier"])
        q = priv.get("sample_rate")
        if q is not None and self.sample_rate is not None and q != self.sample_rate:
            raise ValueError(f"the checkpoint was trained at sample_rate={q}, this run samples at "
                             f"{self.sample_rate}: resume with the same dataset and batch size")
        load_sampler = self.sampler is not None and priv.get("sampler") is not None
        if load_sampler:
            self.sampler.check_state_dict(priv["sampler"])
        gen = priv.get("generator")
        if self.generator is not None and gen is not None:
            _check_generator_state(gen, "the noise")
        adaptive = None
        if self.adaptive is not None:
            if priv.get("adaptive") is None:
                raise ValueError("fastclip: this optimizer clips adaptively but the checkpoint has "
                                 "no adaptive clipping state (it was saved from a run with another "
                                 "clipping); resume with the clipping it was saved with")
            adaptive = AdaptiveClipping.from_state_dict(priv["adaptive"])
            adaptive.grad_noise_multiplier(sigma)
        elif priv.get("adaptive") is not None:
            raise ValueError("fastclip: the checkpoint was saved from a run with clipping='adaptive' "
                             "(its bound moved during training); resume it with clipping='adaptive'")
        secure = priv.get("secure_mode")
        if secure is not None and bool(secure) != self.secure_mode:
            # The accounting resumes exactly either way; the randomness does not.
            warnings.warn(
                f"fastclip: the checkpoint was saved with secure_mode={bool(secure)}, this run has "
                f"secure_mode={self.secure_mode}. The privacy accounting resumes exactly; the "
                + ("noise and sampling after this point come from seeded generators, so the steps "
                   "from now on are protected only while those seeds stay secret, and the run's "
                   "earlier os.urandom randomness is not reproduced"
                   if secure else
                   "earlier steps' noise came from seeded generators (their privacy rests on the "
                   "seeds staying secret, and the checkpoint holds the generator states), and this "
                   "run does not continue their streams, so it is not reproducible")
                + ". Resume with the secure_mode the checkpoint was saved with to avoid this",
                UserWarning, stacklevel=2)
        # Apply. torch's optimizer validates the parameter groups before it changes anything,
        # and nothing after it can fail.
        self.original_optimizer.load_state_dict(sd)
        if load_sampler:
            self.sampler.load_state_dict(priv["sampler"])
        self.accountant = accountant
        self._noise_multiplier = sigma
        if adaptive is not None:
            self.adaptive = adaptive
            self._set_bound(adaptive.max_grad_norm, self.engine)
        if self.generator is not None and gen is not None:
            self.generator.set_state(gen)
        self.engine.examples = 0
        self.engine.unclipped = 0

    def epsilon(self, delta: float, accountant: Optional[str] = None) -> float:
        """Epsilon spent by the steps taken so far, at ``delta`` (Poisson sampling assumed).

        Args:
            delta: in (0, 1).
            accountant: "rdp", "pld" or "opacus_rdp"; None uses the optimizer's default (``make_private``'s
                ``accountant``).

        Raises:
            ValueError: no sample rate is known (make_private was given no loader, or
                poisson_sampling=False), or delta is outside (0, 1).
        """
        if self.sample_rate is None:
            raise ValueError("epsilon needs the Poisson sampling rate: pass the DataLoader to "
                             "make_private with poisson_sampling=True")
        return self.accountant.epsilon(delta, accountant)


class BatchMemoryManager:
    """Logical batches larger than memory: each batch of ``data_loader`` (one *logical* batch,
    e.g. a Poisson batch of :func:`fastclip.make_private`'s loader) is handed out as
    *physical* batches of at most ``max_physical_batch_size`` examples, with one optimizer step
    per logical batch::

        model, optimizer, loader = fastclip.make_private(model, optimizer, loader, ...)
        with BatchMemoryManager(loader, max_physical_batch_size=64, optimizer=optimizer) as batches:
            for x, y in batches:
                optimizer.zero_grad()
                loss_fn(model(x), y).mean().backward()
                optimizer.step()

    Before each physical batch the manager tells the :class:`fastclip.DPOptimizer` whether it
    is the last of its logical batch. On every other one, ``optimizer.step()`` does nothing but
    run its closure, and ``optimizer.zero_grad()`` does nothing once the logical batch has begun,
    so the engine's clipped sums add up in ``p.grad`` over the physical batches. At the last one,
    ``step()`` is a full DP-SGD step on the whole logical batch: the clipped sums all-reduced
    across ranks (distributed runs), noise of std ``noise_multiplier * sensitivity`` added once,
    "mean" divided by the optimizer's ``expected_batch_size`` (the expected *logical* batch
    size), one step accounted. The update equals the unsplit batch's up to floating-point
    rounding, and epsilon is unchanged. Each physical backward's "mean" is over the physical
    batch (the engine rescales by the examples of each backward).

    An empty logical batch (Poisson sampling draws 0 examples with probability (1-q)^N) is
    handed out as one empty physical batch, so the loop still calls ``step()`` and releases the
    noise-only step the privacy analysis assumes. No other physical batch is empty.

    Normal behaviour (one step per ``step()`` call) comes back when the iteration ends: at the
    end of the loader, on ``break`` or an exception out of the loop (the iteration is closed), or
    on leaving the ``with`` block. A logical batch left unfinished then is discarded: its partial
    clipped sums are zeroed, never released. Checkpoints (``optimizer.state_dict()``, the
    sampler's state) count logical batches; save them after the step that ends a logical batch
    (``optimizer.skips_step`` is False) and a resumed run continues exactly.

    Args:
        data_loader: any iterable of collated batches (tensors batch-first, possibly nested in
            tuples, lists and dicts), typically the loader :func:`fastclip.make_private` returns.
        max_physical_batch_size: the most examples in one physical batch, an integer >= 1.
        optimizer: the :class:`fastclip.DPOptimizer` stepped once per logical batch.

    Raises:
        TypeError: ``optimizer`` is not a DPOptimizer, or ``data_loader`` is not iterable.
        ValueError: ``max_physical_batch_size`` is not an integer >= 1.
    """

    def __init__(self, data_loader, max_physical_batch_size: int, optimizer):
        if not isinstance(optimizer, DPOptimizer):
            raise TypeError(f"optimizer must be the fastclip.DPOptimizer that make_private returns, "
                            f"got {type(optimizer).__name__}")
        if (isinstance(max_physical_batch_size, bool) or not isinstance(max_physical_batch_size, int)
                or max_physical_batch_size < 1):
            raise ValueError(f"max_physical_batch_size must be an integer >= 1, "
                             f"got {max_physical_batch_size!r}")
        if not hasattr(data_loader, "__iter__"):
            raise TypeError(f"data_loader must be an iterable of batches (a DataLoader), "
                            f"got {type(data_loader).__name__}")
        self.data_loader = data_loader
        self.max_physical_batch_size = max_physical_batch_size
        self.optimizer = optimizer
        self._iteration = None

    def __enter__(self) -> "BatchMemoryManager":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """End the current iteration (if any): the optimizer steps on every call again."""
        ref, self._iteration = self._iteration, None
        it = ref() if ref is not None else None
        if it is not None:
            it.close()

    def __iter__(self):
        self.close()
        it = self._physical_batches()
        # A weak reference: a loop left by ``break`` drops the last reference to its iteration,
        # which closes it (and restores the optimizer) at once.
        self._iteration = weakref.ref(it)
        return it

    def _physical_batches(self):
        opt, token = self.optimizer, object()
        try:
            for batch in self.data_loader:
                parts = split_batch(batch, self.max_physical_batch_size)
                for i, part in enumerate(parts):
                    opt._set_physical_batch(token, last=i == len(parts) - 1)
                    yield part
        finally:
            opt._end_logical_batches(token)


def make_private(model: nn.Module, optimizer: Optimizer, loader: Optional[DataLoader], *,
                 noise_multiplier: float, max_grad_norm: Bound, mode: str = "auto",
                 clipping: str = "flat", loss_reduction: str = "mean",
                 nanobatch_size: int = 1, num_threads: Optional[int] = None,
                 poisson_sampling: bool = True,
                 generator: Optional[torch.Generator] = None,
                 sampling_generator: Optional[torch.Generator] = None,
                 secure_mode: bool = False,
                 accountant: str = "rdp",
                 distributed: Optional[bool] = None,
                 pipeline: bool = False,
                 audit: bool = True,
                 gamma: float = 0.01,
                 target_unclipped_quantile: Optional[float] = None,
                 clipbound_learning_rate: Optional[float] = None,
                 max_clipbound: Optional[float] = None,
                 min_clipbound: Optional[float] = None,
                 unclipped_num_std: Optional[float] = None,
                 ) -> Tuple[nn.Module, DPOptimizer, Optional[DataLoader]]:
    """Make a model, its optimizer and (optionally) its loader differentially private.

    After this, the usual loop ``zero_grad(); loss_fn(model(x), y).mean().backward(); step()``
    performs DP-SGD: each example's gradient is clipped to ``max_grad_norm`` inside the single
    backward, Gaussian noise of std ``noise_multiplier * max_grad_norm`` is added to the clipped
    sum at each step, and the sum is divided by the batch size for ``loss_reduction="mean"``
    (the expected batch size under Poisson sampling). ``optimizer.epsilon(delta)`` reports the
    privacy spent; ``optimizer.state_dict()`` checkpoints everything needed to resume exactly.

    Randomness. By default (``secure_mode=False``) the noise of each step is seeded from
    ``generator`` and the Poisson sampling draws from ``sampling_generator``: a seeded run is
    reproducible bit for bit and resumes exactly from a checkpoint, which is what research and
    debugging need. Anyone who knows the seeds can regenerate the noise and subtract it, so the
    privacy guarantee then rests on the seeds staying secret. ``secure_mode=True`` is for
    releasing a model: every step's noise seed comes from ``os.urandom`` (64 bits, fresh per
    step, never stored) and every Poisson draw directly from ``os.urandom``. The price: runs are
    not reproducible, and a resumed run continues with fresh randomness (the accounting still
    resumes exactly). The noise itself is still generated by a counter-based Philox stream
    with Box-Muller in floating point, which is not a discrete or cryptographically proven
    Gaussian sampler; its known floating-point weaknesses (Mironov 2012) are a far smaller
    concern for Gaussian noise on high-dimensional gradients than a known seed.

    Args:
        model: the model; hooks are attached to it (``optimizer.engine.detach()`` removes them)
            and its torch.nn RNN/GRU/LSTM modules are replaced by fastclip.nn's drop-ins holding
            the same parameters (use the returned model).
        optimizer: any torch optimizer over the model's parameters.
        loader: a DataLoader, or None.
        noise_multiplier: sigma >= 0.
        max_grad_norm: C > 0; with ``clipping="per_layer"`` also a list of one bound per layer
            (see :mod:`fastclip.clipping`; ``optimizer.engine.layers`` names them).
        mode: "auto", "ghost" or "direct" (all exact, the single-backward engine), or
            "nanobatch" (whole-model per-example gradients ``nanobatch_size`` examples at a time
            over ``num_threads`` CPU threads; exact for any model, see :mod:`fastclip.nanobatch`).
        clipping: "flat" (one bound C over all parameters) or "per_layer" (each layer clipped
            to its own bound; noise std ``noise_multiplier * optimizer.sensitivity``, which is
            C for a float C split evenly over the layers); "automatic" / "automatic_per_layer"
            (every example normalised: factor ``C / (||g_i|| + gamma)``, sensitivity C); or
            "adaptive" (flat, the bound follows a quantile of the norms; see
            :class:`fastclip.clipping.AdaptiveClipping`). The table is in
            :mod:`fastclip.clipping`.
        gamma: automatic clipping's stabiliser, > 0 (default 0.01).
        target_unclipped_quantile, clipbound_learning_rate, max_clipbound, min_clipbound,
            unclipped_num_std: adaptive clipping's settings, Opacus' names, all required with
            ``clipping="adaptive"`` (``max_grad_norm`` is the initial bound).
        nanobatch_size, num_threads: mode "nanobatch" only (defaults 1 and
            ``torch.get_num_threads()``).
        loss_reduction: "mean" or "sum": how the training loss combines per-example losses.
        poisson_sampling: replace the loader's sampling by Poisson sampling at rate 1/len(loader)
            (the loader's dataset must be map-style, with a length) over the index set its
            sampler draws from: the dataset, or a ``SubsetRandomSampler``'s indices (N is then
            their number). Other samplers (weighted, with replacement, custom) are refused; see
            :func:`fastclip.data.poisson_loader`. Train on the returned loader: ``step`` refuses a
            step that is not exactly one of its batches.
        generator: torch.Generator for the noise; None seeds one from torch's default generator.
        sampling_generator: torch.Generator for the Poisson sampling; None derives one from
            ``generator`` when given (one seed makes the whole run reproducible), else from
            torch's default generator.
        secure_mode: draw noise seeds and Poisson samples from ``os.urandom`` (see above);
            ``generator`` and ``sampling_generator`` must then be None.
        accountant: default accountant of ``optimizer.epsilon``: "rdp", "pld" or "opacus_rdp".
        distributed: multi-process training on ``torch.distributed`` (see
            :mod:`fastclip.distributed`): None (default) turns it on when a process group with
            more than one process is initialised, True forces it, False keeps this process on
            its own. Each rank Poisson-samples its shard of the dataset at the global rate, the
            clipped sums are all-reduced at ``step``, noise of std ``noise_multiplier *
            max_grad_norm`` is added once, and every rank takes the same step. The model must
            not be wrapped in DistributedDataParallel (refused).
        pipeline: ``model`` is this rank's stage module of a
            ``torch.distributed.pipelining`` schedule, one stage per rank of the default process
            group (see :class:`fastclip.distributed.PipelineExchange`). Every stage is made
            private with the same arguments and draws the same Poisson batches (rank 0's seed);
            per-layer clipping clips each stage's layers in its own backward (a float C is
            split over the layers of all stages); flat clipping exchanges the B per-example
            squared norms between the stages at ``step`` before any clipped sum is formed; each
            stage adds the noise of the whole model's sensitivity to its own parameters. Build
            the schedule with ``scale_grads=False`` (a step after torch's division by the
            number of micro-batches is refused).
        audit: the first-step audit (default on, :mod:`fastclip.audit`): at the first forward
            with two or more examples, a few examples are recomputed alone (eval mode, RNG and
            train/eval modes restored) and the model is refused if their outputs differ from
            their rows of the batched output (batch statistics, attention across the batch), or
            if an output that requires grad has no batch dimension (a loss computed inside the
            model, e.g. Hugging Face ``model(..., labels=...).loss``: use
            :func:`fastclip.lm_loss` on the logits). Afterwards a forward costs a set lookup.
            ``audit=False`` skips it: you are then responsible for each example's gradient
            depending on that example alone (the loss you compute from the outputs is never
            audited under make_private: it must be per example too).

    Returns:
        (model, DPOptimizer, loader or None); the loader is a
        :class:`fastclip.data.PoissonDataLoader` when Poisson sampling is on.

    Raises:
        ValueError: noise_multiplier < 0, max_grad_norm <= 0, a loader Poisson sampling cannot
            use (iterable-style or length-less dataset), generators passed with secure_mode.
    """
    check_noise_multiplier(noise_multiplier)
    check_accountant(accountant)
    check_clipping(clipping)
    adaptive = adaptive_from(clipping, max_grad_norm, dict(
        target_unclipped_quantile=target_unclipped_quantile,
        clipbound_learning_rate=clipbound_learning_rate, max_clipbound=max_clipbound,
        min_clipbound=min_clipbound, unclipped_num_std=unclipped_num_std))
    if adaptive is not None:
        adaptive.grad_noise_multiplier(noise_multiplier)
    if isinstance(model, nn.parallel.DistributedDataParallel):
        raise TypeError("make_private takes the model itself, not a DistributedDataParallel wrapper: "
                        "DDP would all-reduce unclipped gradients; in a torch.distributed run "
                        "fastclip's optimizer all-reduces the clipped sums (pass model.module)")
    if not isinstance(pipeline, bool):
        raise TypeError(f"pipeline must be True or False, got {pipeline!r}")
    sharded = _fsdp.is_sharded(model)
    if sharded and pipeline:
        raise ValueError("fastclip: pipeline=True with a model sharded by fully_shard (FSDP2) is "
                         "not supported; use one or the other")
    if pipeline:
        if distributed:
            raise ValueError("fastclip: pipeline=True and distributed=True: data parallelism over "
                             "pipeline stages is not supported yet; each rank is one stage of one "
                             "pipeline (pass distributed=None)")
        if not _dist.is_initialized():
            raise ValueError("fastclip: pipeline=True needs torch.distributed.init_process_group("
                             "...) first (one pipeline stage per rank)")
        if clipping == "adaptive":
            raise ValueError("fastclip: clipping='adaptive' is not supported across pipeline stages "
                             "yet; use clipping='flat' or 'per_layer'")
        if mode == "nanobatch" and not is_per_layer(clipping):
            raise ValueError("fastclip: flat clipping across pipeline stages holds each stage's "
                             "norms until every stage's are in, which mode='nanobatch' does not; "
                             "use mode='auto' (or clipping='per_layer')")
    ranks = None if pipeline else _dist.resolve(distributed)
    # FSDP2: refused here if unsupported (fastclip/fsdp.py), before anything is attached.
    managed = _fsdp.check_model(model, mode=mode, audit=audit, ranks=ranks) if sharded else None
    if secure_mode and (generator is not None or sampling_generator is not None):
        raise ValueError("secure_mode draws all randomness from os.urandom; do not pass generator "
                         "or sampling_generator")
    if sampling_generator is not None and not isinstance(sampling_generator, torch.Generator):
        raise TypeError(f"sampling_generator must be a torch.Generator, got "
                        f"{type(sampling_generator).__name__}")
    # torch.nn RNN/GRU/LSTM/MultiheadAttention -> fastclip.nn drop-ins (same Parameter
    # objects), for good: the returned model trains with them. Put back if anything below
    # refuses the model (a refused model is left as it was found).
    swapped = (nn.RNN, nn.GRU, nn.LSTM, nn.MultiheadAttention)
    recurrent = [(parent, name, child) for parent in model.modules()
                 for name, child in parent._modules.items()
                 if child is not None and type(child) in swapped] \
        if isinstance(model, nn.Module) else []
    model = convert_recurrent(model)
    try:
        engine = make_engine(model, mode=mode, max_grad_norm=max_grad_norm,
                             loss_reduction=loss_reduction, clipping=clipping,
                             nanobatch_size=nanobatch_size, num_threads=num_threads,
                             audit=audit, gamma=gamma)
        if pipeline:
            # A float per-layer C is split over every stage's layers (as one process splits it
            # over the whole model); flat clipping holds its clipped sums for the norm exchange.
            bounds = _dist.pipeline_bounds(clipping, max_grad_norm, len(engine.layers))
            if bounds is not max_grad_norm:
                engine.detach()
                engine = make_engine(model, mode=mode, max_grad_norm=bounds,
                                     loss_reduction=loss_reduction, clipping=clipping,
                                     nanobatch_size=nanobatch_size, num_threads=num_threads,
                                     audit=audit, gamma=gamma)
            engine.defer_flat = not is_per_layer(clipping)
    except Exception:
        for parent, name, child in recurrent:
            parent._modules[name] = child
        raise
    try:
        if sharded:
            # FSDP2: clipped sums reduce-scattered in buckets as they are formed, and the backward
            # classified by the unsharded parameters autograd sees (fastclip/fsdp.py).
            _fsdp.check_rules(engine)
            engine.grad_sink = _fsdp.ShardedReducer(managed)
            engine.use_gate(_fsdp.ShardedGate(managed))
        expected = q = sampler = None
        if loader is not None and poisson_sampling:
            derive = sampling_generator is None and not secure_mode
            if sampling_generator is None and generator is not None:
                seed = int(torch.randint(0, 2**62, (1,), generator=generator).item())
                sampling_generator = torch.Generator().manual_seed(seed)
            rank, world = ranks if ranks is not None else (0, 1)
            if (ranks is not None or pipeline) and derive:
                # Rank 0's sampling seed everywhere: the ranks' shards of one global mask, the
                # batch one process would draw.
                seed = (int(torch.randint(0, 2**62, (1,), generator=generator).item())
                        if sampling_generator is None else sampling_generator.initial_seed())
                sampling_generator = torch.Generator().manual_seed(_dist.agree_seed(seed))
            loader = poisson_loader(loader, sampling_generator, secure=secure_mode,
                                    rank=rank, world_size=world)
            sampler = loader.batch_sampler
            q = sampler.sample_rate
            if loss_reduction == "mean":
                # N is the index set sampled (a SubsetRandomSampler's indices, else the dataset).
                expected = sampler.num_samples * q
        dp_optimizer = DPOptimizer(optimizer, engine, noise_multiplier, expected, generator, q,
                                   secure_mode=secure_mode, sampler=sampler, accountant=accountant,
                                   reducer=(None if ranks is None
                                            else engine.grad_sink if sharded
                                            else _dist.GradReducer()),
                                   adaptive=adaptive,
                                   pipeline=None if not pipeline else _dist.PipelineExchange(
                                       engine, clipping,
                                       [p for g in optimizer.param_groups for p in g["params"]
                                        if p.requires_grad]))
    except Exception:
        engine.detach()
        for parent, name, child in recurrent:
            parent._modules[name] = child
        raise
    return model, dp_optimizer, loader


def noise_multiplier_for_epochs(loader: Optional[DataLoader], target_epsilon: float,
                                target_delta: float, epochs: int, accountant: str = "rdp",
                                poisson_sampling: bool = True) -> float:
    """The smallest noise multiplier that keeps ``epochs`` epochs of Poisson-sampled training on
    ``loader`` (``epochs * len(loader)`` steps at sample rate ``1 / len(loader)``) within
    ``(target_epsilon, target_delta)`` under ``accountant``
    (:func:`fastclip.accounting.noise_multiplier_for`: within 1e-4, never over the budget). The
    one calibration of :func:`make_private_with_epsilon` and
    ``PrivacyEngine.make_private_with_epsilon``.

    Raises:
        ValueError: no loader, ``poisson_sampling=False`` (the calibration assumes Poisson
            sampling), ``epochs`` not an integer > 0, or the target cannot be reached.
    """
    if loader is None:
        raise ValueError("fastclip: make_private_with_epsilon needs the DataLoader: the sampling "
                         "rate and the steps per epoch come from it")
    if not poisson_sampling:
        raise ValueError("fastclip: make_private_with_epsilon accounts for Poisson sampling; "
                         "poisson_sampling=False cannot be calibrated (use make_private with "
                         "your own noise_multiplier, and account yourself)")
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs <= 0:
        raise ValueError(f"fastclip: epochs must be an integer > 0, got {epochs!r}")
    _, num_batches = poisson_source(loader)
    return accounting.noise_multiplier_for(target_epsilon, target_delta, 1.0 / num_batches,
                                           epochs * num_batches, accountant)


def make_private_with_epsilon(model: nn.Module, optimizer: Optimizer, loader: DataLoader, *,
                              target_epsilon: float, target_delta: float, epochs: int,
                              max_grad_norm: float, accountant: str = "rdp",
                              **kwargs) -> Tuple[nn.Module, DPOptimizer, DataLoader]:
    """:func:`make_private` with the smallest noise multiplier that keeps ``epochs`` epochs of
    Poisson-sampled training within ``(target_epsilon, target_delta)``.

    The sampling rate is ``1 / len(loader)`` and the run has ``epochs * len(loader)`` steps;
    the noise multiplier comes from :func:`fastclip.accounting.noise_multiplier_for` (within
    1e-4, never over the budget) and is ``optimizer.noise_multiplier`` afterwards.

    Args:
        model, optimizer, loader: as :func:`make_private`; the loader is required.
        target_epsilon: the budget, > 0.
        target_delta: in (0, 1).
        epochs: number of epochs the run will train, an integer > 0.
        max_grad_norm: C > 0.
        accountant: "rdp", "pld" or "opacus_rdp", for the calibration and ``optimizer.epsilon``'s default.
        **kwargs: any other option of :func:`make_private` (mode, clipping, loss_reduction,
            generator, sampling_generator, secure_mode).

    Raises:
        ValueError: the target cannot be reached (with the epsilon the largest noise multiplier
            tried reaches), no loader, poisson_sampling=False, or an argument outside its range.
    """
    if "noise_multiplier" in kwargs:
        raise TypeError("make_private_with_epsilon chooses noise_multiplier itself; use make_private "
                        "to set it")
    sigma = noise_multiplier_for_epochs(loader, target_epsilon, target_delta, epochs, accountant,
                                        kwargs.get("poisson_sampling", True))
    return make_private(model, optimizer, loader, noise_multiplier=sigma,
                        max_grad_norm=max_grad_norm, accountant=accountant, **kwargs)
