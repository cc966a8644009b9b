"""Capture strategies: the base classes of the rules.

* ``FunctionalRule``: while one module of a rule runs its forward, a TorchFunctionMode routes
  the module's call of one of the rule's torch functions (``F.conv2d``, ``F.layer_norm``, ...)
  whose weight is the module's own parameter to ``_FnCapture``. Its forward runs the function on
  detached parameters inside a private sub-graph, so the backward computes the input gradient
  only (the non-private parameter-gradient product is skipped) and records the input A and the
  output gradient G.
* ``OutputTapRule``: the module's trainable parameters are swapped for detached copies during
  its forward and its outputs pass through ``_Tap``, whose backward records the output gradients
  (with the inputs the rule asked for, ``tap_inputs``); a subclass writes only ``per_example``.
  The generic rule (``generic.py``) captures the same way.
* ``ModuleCaptureRule``: ``fastclip.nn`` modules whose own Functions record their pieces.
"""
from __future__ import annotations

from typing import Any, Callable, Dict

import torch
from torch import Tensor, nn
from torch.autograd.graph import get_gradient_edge
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_unflatten

from ..nn.capture import pop_capture, push_capture
from ..ops import as_computed
from . import Rule, Use


class _FnCapture(torch.autograd.Function):
    """Runs ``call`` in the caller's autocast state (a Function's forward keeps it: autocast is
    dispatcher state, not reset by ``apply``), so the sub-graph holds autocast's own casts and
    the input gradient computed through it is autocast's."""

    @staticmethod
    def forward(ctx, engine, use, call, x, *params):
        with torch.enable_grad():
            xs = x.detach().requires_grad_(x.requires_grad)
            out = call(xs, *[p.detach() if p is not None else None for p in params])
        # The sub-graph is held by its output's gradient edge, not the output itself: the
        # output's storage (the module's returned tensor) is freed as soon as the caller is done
        # with it (a norm layer's output once the next op has read it), as without capture.
        ctx.engine, ctx.use, ctx.sub = engine, use, (
            xs, get_gradient_edge(out) if out.requires_grad else None)
        ctx.out_dtype = out.dtype
        # Saved through autograd so an in-place change of x before backward is an error.
        ctx.save_for_backward(x)
        return out.detach()

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        use = ctx.use
        # Cast here, not in the forward: no second copy of x held until the backward.
        use.inputs = as_computed(x.detach(), ctx.out_dtype)
        use.grads = (g,)
        # Before the sub-graph is read: a graph backpropagated again is refused here by name.
        counted = ctx.engine.record(use)
        xs, out = ctx.sub
        gx = None
        if ctx.needs_input_grad[3]:
            # A backward the engine left alone (torch.autograd.grad(loss, x)) may be followed
            # by the training backward of the same graph: keep the sub-graph for it.
            (gx,) = torch.autograd.grad(out, xs, g, retain_graph=not counted)
        if counted:
            ctx.sub = None
        return (None, None, None, gx) + (None,) * (len(ctx.needs_input_grad) - 4)


class CaptureMode(TorchFunctionMode):
    """The one TorchFunctionMode of the capture strategies keyed by the torch operation: active
    only during one module's forward, it offers every torch function call to :meth:`match`."""

    def __init__(self, engine, module):
        super().__init__()
        self.engine, self.module = engine, module

    def match(self, func, args, kwargs):
        """The result of the call ``func(*args, **kwargs)`` when this mode computes it (routed
        to a capturing autograd Function), or NotImplemented to run it as it is."""
        return NotImplemented

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = self.match(func, args, kwargs)
        return func(*args, **kwargs) if out is NotImplemented else out


class _Mode(CaptureMode):
    def __init__(self, engine, module, rule):
        super().__init__(engine, module)
        self.rule = rule

    def match(self, func, args, kwargs):
        parse = self.rule.functions.get(func)
        if parse is not None:
            bound = parse(*args, **kwargs)
            if bound.get("weight") is self.module.weight:
                return self.rule.capture_call(self.engine, self.module, func, bound)
        return NotImplemented


class FunctionalRule(Rule):
    """A rule whose module computes one torch function of (input, weight, bias, options).

    Subclasses set ``functions``: {torch function: parser}, where a parser has the function's
    signature and returns its arguments as a dict (``input``, ``weight``, ``bias``, options).
    The use's ``extra`` holds that dict without the tensors, for the finalize methods.
    """

    functions: Dict[Callable, Callable[..., Dict[str, Any]]] = {}

    def pre_forward(self, engine, module, args, kwargs):
        mode = _Mode(engine, module, self)
        mode.__enter__()
        return mode

    def post_forward(self, engine, module, state, args, kwargs, output):
        state.__exit__(None, None, None)
        return None

    def capture_call(self, engine, module, func, bound: Dict[str, Any]) -> Tensor:
        x, w, b = bound["input"], bound["weight"], bound.get("bias")
        opts = {k: v for k, v in bound.items() if k not in ("input", "weight", "bias")}
        opts["func"] = func
        use = engine.new_use(module, extra=opts)

        def call(xs, ws, bs):
            new = {"input": xs, "weight": ws}
            if "bias" in bound:
                new["bias"] = bs
            return func(**{**bound, **new})

        return _FnCapture.apply(engine, use, call, x, w, b)

    def release(self, use):
        use.inputs = use.grads = None  # both set again by _FnCapture.backward


class _Tap(torch.autograd.Function):
    """Identity on a module's tensor outputs whose backward records their gradients.

    Inputs: the outputs, then ``n_saved`` tensors saved through autograd (so an in-place change
    before the backward is an error) and handed to ``restore(use, saved)`` in the backward,
    then the module's trainable parameters: in the graph (the outputs require grad even when the
    inputs do not, and the engine's backward gate sees them), given no gradient from here, as
    the saved tensors."""

    @staticmethod
    def forward(ctx, engine, use, restore, n_out, n_saved, *tensors):
        ctx.engine, ctx.use, ctx.restore, ctx.n_out = engine, use, restore, n_out
        ctx.save_for_backward(*tensors[n_out:n_out + n_saved])
        # Clones, not views: a view returned from a custom Function may not be modified in
        # place, and an in-place activation after a layer is common.
        return tuple(t.clone() for t in tensors[:n_out])

    @staticmethod
    def backward(ctx, *grads):
        use = ctx.use
        use.grads = grads
        if ctx.restore is not None:
            ctx.restore(use, ctx.saved_tensors)
        ctx.engine.record(use)
        return (None,) * 5 + tuple(grads) + (None,) * (
            len(ctx.needs_input_grad) - 5 - ctx.n_out)


def tapped_outputs(output):
    """(leaves, spec, indices of the floating or complex tensor leaves) of ``output``."""
    leaves, spec = tree_flatten(output)
    idx = [i for i, t in enumerate(leaves)
           if isinstance(t, Tensor) and (t.is_floating_point() or t.is_complex())]
    return leaves, spec, idx


def tap(engine, use, leaves, spec, idx, saved=(), params=(), restore=None):
    """``output`` (as ``tapped_outputs`` split it) with its leaves ``idx`` passed through
    ``_Tap``: their gradients become ``use.grads`` (in that order) and ``engine.record(use)`` is
    called, once, in the backward."""
    out = _Tap.apply(engine, use, restore, len(idx), len(saved),
                     *[leaves[i] for i in idx], *saved, *params)
    leaves = list(leaves)
    for i, t in zip(idx, out):
        leaves[i] = t
    return tree_unflatten(leaves, spec)


def detach_params(module: nn.Module):
    """Swap ``module``'s trainable parameters for detached copies (autograd forms no gradient
    for them in its forward); returns [(name, parameter)] for :func:`restore_params`."""
    params = [(n, p) for n, p in module.named_parameters(recurse=False) if p.requires_grad]
    for n, p in params:
        module._parameters[n] = p.detach()
    return params


def restore_params(module: nn.Module, params) -> None:
    for n, p in params:
        module._parameters[n] = p


class OutputTapRule(Rule):
    """A rule whose kernel needs only the call's inputs and its output gradients: subclasses
    write ``per_example(module, uses)`` (and ``tap_inputs`` where the default is not enough).

    During the module's forward its trainable parameters are detached copies (autograd forms no
    weight gradient); each call makes a use (``engine.new_use``, so per-layer clipping knows
    it); its floating outputs are tapped: in the backward ``use.grads`` is the tuple of their
    gradients (``use.grads[0]`` for a single output) and ``use.inputs`` what ``tap_inputs``
    returned (detached tensors, saved through autograd so an in-place change of them before the
    backward is an error)."""

    def tap_inputs(self, args, kwargs):
        """What the kernels read of the call's inputs as ``use.inputs``: a tensor or a tuple /
        list / dict of tensors (detached). Default: the first positional argument."""
        return args[0].detach()

    def pre_forward(self, engine, module, args, kwargs):
        return detach_params(module)

    def post_forward(self, engine, module, params, args, kwargs, output):
        restore_params(module, params)
        leaves, spec, idx = tapped_outputs(output)
        if not idx:
            return None
        saved, in_spec = tree_flatten(self.tap_inputs(args, kwargs))
        if not all(isinstance(t, Tensor) for t in saved):
            raise TypeError(f"{type(self).__name__}.tap_inputs must return tensors (a tensor or "
                            "a tuple, list or dict of them)")
        saved = [t.detach() for t in saved]

        def restore(use, tensors):
            use.inputs = tree_unflatten(list(tensors), in_spec)

        use = engine.new_use(module)
        return tap(engine, use, leaves, spec, idx, saved, [p for _, p in params], restore)

    def release(self, use):
        super().release(use)
        use.inputs = None  # set again by _Tap.backward


class ModuleCaptureRule(Rule):
    """A rule for a fastclip.nn module that records its own factors while captured (RNN/GRU/LSTM,
    MultiheadAttention): the rule only marks the call as captured (fastclip.nn.capture)."""

    # Their inputs are not all batch-first (time-major sequences, (layers, B, h) states,
    # (L, S) masks): no batch expansion of leading-dim-1 inputs (see Rule.expand_broadcast).
    expand_broadcast = False

    def pre_forward(self, engine, module, args, kwargs):
        # Completed in pieces (each layer and direction, each projection): the module's
        # Functions announce each piece at forward (engine.expect) and record it at backward.
        use = Use(module, extra={})
        push_capture(module, engine, use)
        return use

    def post_forward(self, engine, module, state, args, kwargs, output):
        pop_capture(module)
        return None

    def release(self, use):
        use.grads = None
        use.extra.clear()  # the pieces' factors, all set by the backward
