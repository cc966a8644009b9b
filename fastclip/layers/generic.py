"""The exact generic rule: any leaf module, through per-example vector-Jacobian products of
that module alone (torch.func), and the modules fastclip refuses.

Capture: during the module's forward its trainable parameters are swapped for detached copies
(so autograd computes no parameter gradient), and the outputs pass through ``_Tap``, whose
backward records the output gradients. Finalize: ``vmap(vjp)`` over the examples of each use
gives the per-example gradients of the module's parameters (memory B x module parameters).
"""
from __future__ import annotations

from typing import Dict

import torch
from torch import Tensor, nn
from torch.func import functional_call, vjp, vmap
from torch.utils._pytree import tree_flatten, tree_unflatten

from . import Rule, Use, rule_for


class _Tap(torch.autograd.Function):
    """Identity on a module's tensor outputs whose backward records their gradients.

    Inputs: the outputs, then the call's tensor inputs (saved so an in-place change before the
    backward is an error), then the trainable parameters (so the outputs require grad even when
    the inputs do not). Parameters and inputs get no gradient from here."""

    @staticmethod
    def forward(ctx, engine, use, n_out, n_in, *tensors):
        ctx.engine, ctx.use, ctx.n_out, ctx.n_in = engine, use, n_out, n_in
        ctx.save_for_backward(*tensors[n_out:n_out + n_in])
        # Clones, not views: a view returned from a custom Function may not be modified in
        # place, and an in-place activation after a layer is common.
        return tuple(t.clone() for t in tensors[:n_out])

    @staticmethod
    def backward(ctx, *grads):
        use = ctx.use
        use.grads = grads
        use.inputs = (use.inputs[0], list(ctx.saved_tensors), use.inputs[2])
        ctx.engine.record(use)
        return (None, None, None, None) + tuple(grads) + (None,) * (
            len(ctx.needs_input_grad) - 4 - ctx.n_out)


def _trainable(module: nn.Module):
    return [(n, p) for n, p in module.named_parameters(recurse=False) if p.requires_grad]


class GenericRule(Rule):
    """Exact rule for any leaf module that treats the examples of a batch independently."""

    def pre_forward(self, engine, module, args, kwargs):
        params = _trainable(module)
        for n, p in params:
            module._parameters[n] = p.detach()
        return params

    def post_forward(self, engine, module, params, args, kwargs, output):
        for n, p in params:
            module._parameters[n] = p
        if output is None:
            return None
        leaves, out_spec = tree_flatten(output)
        out_idx = [i for i, t in enumerate(leaves)
                   if isinstance(t, Tensor) and (t.is_floating_point() or t.is_complex())]
        in_leaves, in_spec = tree_flatten((args, kwargs))
        in_idx = [i for i, t in enumerate(in_leaves) if isinstance(t, Tensor)]
        in_tensors = [in_leaves[i] for i in in_idx]
        if not out_idx:
            return None
        # inputs = (all input leaves with tensors detached later, tensor inputs, spec)
        use = engine.new_use(module, inputs=(in_leaves, in_tensors, in_spec),
                             extra=(out_idx, out_spec, len(leaves)))
        tapped = _Tap.apply(engine, use, len(out_idx), len(in_tensors),
                            *[leaves[i] for i in out_idx], *in_tensors, *[p for _, p in params])
        leaves = list(leaves)
        for i, t in zip(out_idx, tapped):
            leaves[i] = t
        return tree_unflatten(leaves, out_spec)

    def _per_example(self, module: nn.Module, use: Use, cache: Dict) -> Dict[str, Tensor]:
        key = ("generic", id(use))
        if key in cache:
            return cache[key]
        in_leaves, in_tensors, in_spec = use.inputs
        in_leaves = list(in_leaves)
        it = iter(in_tensors)
        for i, t in enumerate(in_leaves):
            if isinstance(t, Tensor):
                in_leaves[i] = next(it).detach()
        out_idx, out_spec, _ = use.extra
        B = use.batch_size
        # Tensors whose leading dimension is B are split per example; the rest (shapes broadcast
        # over the batch, non-tensors) are passed whole to every example.
        batched = [isinstance(t, Tensor) and t.dim() > 0 and t.shape[0] == B for t in in_leaves]
        grads = tuple(use.grads)
        params = {n: p.detach() for n, p in _trainable(module)}
        buffers = dict(module.named_buffers(recurse=False))

        def loss_of(p, leaves_i):
            full = [t.unsqueeze(0) if b else t for t, b in zip(leaves_i, batched)]
            args, kwargs = tree_unflatten(full, in_spec)
            out = functional_call(module, (p, buffers), tuple(args), kwargs)
            out_leaves, _ = tree_flatten(out)
            return tuple(out_leaves[i] for i in out_idx)

        def one(leaves_i, grads_i):
            outs, fn = vjp(lambda p: loss_of(p, leaves_i), params)
            cot = tuple(torch.zeros_like(o) if g is None else g.unsqueeze(0).to(o.dtype)
                        for o, g in zip(outs, grads_i))
            return fn(cot)[0]

        for o_grad in grads:
            if o_grad is not None and (o_grad.dim() == 0 or o_grad.shape[0] != B):
                raise ValueError(
                    f"{type(module).__name__}: an output of shape {tuple(o_grad.shape)} has no batch "
                    f"dimension of size {B} first; fastclip needs the batch dimension first in every "
                    "output of a module it covers generically")
        in_dims = ([0 if b else None for b in batched], tuple(None if g is None else 0 for g in grads))
        if B == 0:
            result = {n: p.new_zeros((0,) + p.shape) for n, p in params.items()}
        else:
            try:
                result = vmap(one, in_dims=in_dims, randomness="same")(in_leaves, grads)
            except (RuntimeError, NotImplementedError, ValueError):
                # Some modules (data-dependent control flow, ops without a batching rule) cannot be
                # vmapped: the same products one example at a time.
                rows = []
                for i in range(B):
                    li = [t[i] if b else t for t, b in zip(in_leaves, batched)]
                    gi = tuple(None if g is None else g[i] for g in grads)
                    rows.append(one(li, gi))
                result = {n: torch.stack([r[n] for r in rows]) for n in params}
        cache[key] = result
        return result

    def per_example_grad(self, module, name, use, cache):
        return self._per_example(module, use, cache)[name]

    def clipped_grad(self, module, name, use, c, cache):
        g = self._per_example(module, use, cache)[name]
        return torch.tensordot(c.to(g.dtype), g, dims=1)


GENERIC = GenericRule()

def batch_statistics(module: nn.Module) -> bool:
    """Whether ``module`` is a BatchNorm that normalises with the statistics of the batch: in
    training mode, or built with ``track_running_stats=False`` (which uses them in eval too)."""
    return (isinstance(module, nn.modules.batchnorm._BatchNorm)
            and (module.training or module.running_mean is None))


def mixing_refusal(module: nn.Module):
    """Why ``module`` has no per-example gradients (it mixes the examples of a batch), or None.
    The one refusal of every mode, nanobatch included. BatchNorm in eval mode (running
    statistics) is a per-channel affine map and mixes nothing: it is accepted."""
    if batch_statistics(module):
        return ("BatchNorm in training mode (or with track_running_stats=False) normalises with "
                "the statistics of the batch, which mixes the examples (no per-example gradient "
                "exists) and its running statistics leak privacy; either keep it in eval mode "
                "(running statistics frozen: call "
                "module.eval() after model.train(); its affine parameters may stay trainable) or "
                "replace every BatchNorm with GroupNorm: fastclip.fix(model)")
    return None


def refusal(module: nn.Module):
    """The reason the single-backward engine refuses ``module``, or None."""
    why = mixing_refusal(module)
    if why is not None:
        return why
    if isinstance(module, nn.RNNBase) and not module.batch_first and rule_for(module) is None:
        return ("the generic rule needs the batch dimension first; construct it with "
                "batch_first=True (a native recurrent rule is planned)")
    return None
