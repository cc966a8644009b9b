"""The functional research API: exact per-example norms and clipped gradients in one call."""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor, nn

from .audit import audit_loss
from .clipping import Bound
from .engine import Engine, make_engine
from .nn.rnn import converted


def _as_tuple(inputs):
    return inputs if isinstance(inputs, tuple) else (inputs,)


def _batch_size(inputs) -> int:
    for x in inputs:
        if isinstance(x, Tensor) and x.dim() > 0:
            return x.shape[0]
    raise ValueError("inputs must hold at least one tensor with a batch dimension first")


def _run(engine: Engine, model, loss_fn, inputs, targets) -> Tensor:
    """Forward, per-example losses, one backward of their sum; returns the norms (B,)."""
    inputs = _as_tuple(inputs)
    B = _batch_size(inputs)
    engine.keep_norms = True
    try:
        output = model(*inputs)
        losses = loss_fn(output, targets)
        if not isinstance(losses, Tensor) or losses.shape != (B,):
            shape = tuple(losses.shape) if isinstance(losses, Tensor) else type(losses).__name__
            raise ValueError(f"loss_fn must return per-example losses of shape ({B},), got {shape}; "
                             "use a loss with reduction='none'")
        if engine.auditor.enabled:
            audit_loss(loss_fn, output, targets, B)   # before the backward: nothing written yet
        if losses.requires_grad:
            torch.autograd.backward(losses.sum())
    finally:
        engine.detach()
    if engine.norms_log:
        return torch.cat(engine.norms_log) if len(engine.norms_log) > 1 else engine.norms_log[0]
    return torch.zeros(B, dtype=torch.float64)


def per_sample_grad_norms(model: nn.Module, loss_fn: Callable, inputs, targets,
                          mode: str = "auto", nanobatch_size: int = 1,
                          num_threads: Optional[int] = None, audit: bool = True) -> Tensor:
    """Exact per-example gradient norms over all trainable parameters of ``model``.

    Args:
        model: the model; left exactly as found (no hooks, no gradients written).
        loss_fn: ``loss_fn(output, targets)`` -> per-example losses (B,).
        inputs: a tensor (B, ...) or a tuple of tensors passed positionally to the model.
        targets: whatever ``loss_fn`` takes.
        mode: "auto", "ghost", "direct" or "nanobatch" (all exact).
        nanobatch_size, num_threads: mode "nanobatch" only (see :class:`fastclip.Engine`).
        audit: check first that the model and ``loss_fn`` do not mix examples (a few examples
            recomputed alone, :mod:`fastclip.audit`); False skips it, and you are responsible
            for each example's loss depending on that example alone.

    Returns:
        Tensor (B,) float64: ||grad_theta loss_i||_2 for every example i.

    Raises:
        fastclip.audit.MixingError (a ValueError): the model or the loss mixes examples.
    """
    with converted(model) as model:  # torch.nn RNN/GRU/LSTM -> fastclip.nn, put back after
        engine = make_engine(model, mode=mode, max_grad_norm=None, loss_reduction="sum",
                             nanobatch_size=nanobatch_size, num_threads=num_threads,
                             audit=audit)
        return _run(engine, model, loss_fn, inputs, targets)


def clipped_grad(model: nn.Module, loss_fn: Callable, inputs, targets, max_grad_norm: Bound,
                 mode: str = "auto", clipping: str = "flat", nanobatch_size: int = 1,
                 num_threads: Optional[int] = None, audit: bool = True,
                 gamma: float = 0.01) -> Tensor:
    """Set ``p.grad = sum_i clip(g_i)`` for every trainable parameter (no noise, no scaling).

    Flat: ``clip(g) = g * min(1, C / ||g||)`` with ``||g||`` over all trainable parameters.
    Per layer: each layer's part of g is clipped to its own bound C_l (:mod:`fastclip.clipping`).

    Args:
        model, loss_fn, inputs, targets, mode, nanobatch_size, num_threads, audit: as
            :func:`per_sample_grad_norms` (a refusal comes before any gradient is written).
        max_grad_norm: C > 0, or (per_layer) a list of one bound per layer.
        clipping: "flat" (one bound over all parameters), "per_layer", "automatic" or
            "automatic_per_layer" (``clip(g) = C g / (||g|| + gamma)``, see
            :mod:`fastclip.clipping`; "adaptive" needs the optimizer: use make_private).
        gamma: automatic clipping's stabiliser, > 0.

    Returns:
        Tensor (B,) float64: the per-example norms (over all parameters) before clipping.
    """
    if clipping == "adaptive":
        # The adaptive bound moves between optimizer steps; one call has no steps to move it.
        raise ValueError("fastclip: clipping='adaptive' moves the bound from one optimizer step "
                         "to the next; clipped_grad takes no step. Use clipping='flat' with the "
                         "current bound, or make_private(..., clipping='adaptive')")
    with converted(model) as model:  # torch.nn RNN/GRU/LSTM -> fastclip.nn, put back after
        engine = make_engine(model, mode=mode, max_grad_norm=max_grad_norm, loss_reduction="sum",
                             clipping=clipping, nanobatch_size=nanobatch_size,
                             num_threads=num_threads, audit=audit, gamma=gamma)
        params = [p for _, p in engine.covered_params()]
        for p in params:
            p.grad = None
        norms = _run(engine, model, loss_fn, inputs, targets)
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    return norms
