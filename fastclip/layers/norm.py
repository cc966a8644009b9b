"""Normalisation layers: nn.LayerNorm, nn.RMSNorm, nn.GroupNorm, nn.InstanceNorm1d/2d/3d, and
nn.BatchNorm1d/2d/3d in eval mode (running statistics: a per-channel affine map that mixes no
examples, exact like instance norm with running statistics; in training mode it is refused).

Their affine parameters have only C (or prod(normalized_shape)) entries, so the per-example
gradients themselves are cheap to hold (B x C): one native pass per use (``ops.norm_affine_grads``)
recomputes x_hat from the captured input with the layer's own statistics and forms the weight and
bias gradients of every example. Norms, clipped sums and per-example gradients all come from that
one pass, kept on the use (``per_example``; the rule's sq_norms / clipped are the defaults).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm

from .. import ops
from . import register, trainable, zero_rows
from .capture import FunctionalRule


def _layer_norm(input, normalized_shape, weight=None, bias=None, eps=1e-5):
    return dict(input=input, normalized_shape=normalized_shape, weight=weight, bias=bias, eps=eps)


def _rms_norm(input, normalized_shape, weight=None, eps=None):
    return dict(input=input, normalized_shape=normalized_shape, weight=weight, eps=eps)


def _group_norm(input, num_groups, weight=None, bias=None, eps=1e-5):
    return dict(input=input, num_groups=num_groups, weight=weight, bias=bias, eps=eps)


def _instance_norm(input, running_mean=None, running_var=None, weight=None, bias=None,
                   use_input_stats=True, momentum=0.1, eps=1e-5):
    return dict(input=input, running_mean=running_mean, running_var=running_var, weight=weight,
                bias=bias, use_input_stats=use_input_stats, momentum=momentum, eps=eps)


def _batch_norm(input, running_mean, running_var, weight=None, bias=None, training=False,
                momentum=0.1, eps=1e-5):
    return dict(input=input, running_mean=running_mean, running_var=running_var, weight=weight,
                bias=bias, training=training, momentum=momentum, eps=eps)


_BASE_FORWARD = {nn.LayerNorm: nn.LayerNorm.forward, nn.RMSNorm: nn.RMSNorm.forward,
                 nn.GroupNorm: nn.GroupNorm.forward, _InstanceNorm: _InstanceNorm.forward,
                 _BatchNorm: _BatchNorm.forward}


@register(nn.LayerNorm, nn.RMSNorm, nn.GroupNorm, nn.InstanceNorm1d, nn.InstanceNorm2d,
          nn.InstanceNorm3d, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
class NormRule(FunctionalRule):
    functions = {F.layer_norm: _layer_norm, F.rms_norm: _rms_norm, F.group_norm: _group_norm,
                 F.instance_norm: _instance_norm, F.batch_norm: _batch_norm}

    def supports(self, module):
        # A subclass with its own forward may compute something else: the generic rule covers it.
        return any(isinstance(module, t) and type(module).forward is f
                   for t, f in _BASE_FORWARD.items())

    def capture_call(self, engine, module, func, bound):
        x = bound["input"]
        if func in (F.layer_norm, F.rms_norm):
            shape = bound["normalized_shape"]
            k = 1 if isinstance(shape, int) else len(shape)
            if x.dim() <= k:
                raise ValueError(
                    f"{type(module).__name__} got a {x.dim()}-D input {tuple(x.shape)} with "
                    f"normalized_shape {tuple(module.normalized_shape)}; per-example gradients "
                    "need the batch dimension first")
        elif x.dim() < 2:
            raise ValueError(f"{type(module).__name__} got a {x.dim()}-D input {tuple(x.shape)}; "
                             "per-example gradients need the batch dimension first")
        if func is F.batch_norm and (bound["training"] or bound["running_mean"] is None):
            # Batch statistics: every example's output depends on the others (the engine's
            # forward guard refuses this earlier; this is the last line of defence).
            raise ValueError(f"fastclip: {type(module).__name__} normalises with batch statistics "
                             "(training mode or track_running_stats=False), which mixes the "
                             "examples of a batch; keep it in eval mode or use fastclip.fix(model)")
        if (func is F.instance_norm and not bound["use_input_stats"]) or func is F.batch_norm:
            # Eval mode with running statistics: the call does not update them, so snapshot them
            # for the backward (a change of the buffers in between must not change the norms).
            bound = dict(bound)
            for name in ("running_mean", "running_var"):
                if bound[name] is not None:
                    bound[name] = bound[name].detach().clone()
        return super().capture_call(engine, module, func, bound)

    def on_record(self, use):
        # The per-example gradients are only (B, C): form them now, in the backward, and drop the
        # activation-sized input and output gradient instead of holding them to its end.
        use.extra["grads"] = self._compute(use)
        use.inputs = use.grads = None

    def zero_examples(self, use, bad):
        use.extra["grads"] = zero_rows(use.extra["grads"], bad)

    def release(self, use):
        use.extra.pop("grads", None)  # formed again by on_record
        use.inputs = use.grads = None

    @staticmethod
    def _compute(use):
        """(gw (B, K), gb (B, K) or None) of one use."""
        opts, x, g = use.extra, use.inputs, use.grads[0]
        func = opts["func"]
        bias = getattr(use.module, "bias", None) is not None
        # rms_norm's eps=None: torch takes the eps of its float32 opmath type for a bf16 layer,
        # as ops.norm_affine_grads does for the widened x below.
        eps = opts["eps"]
        # In float32 or wider, as torch's own kernels accumulate a bf16/fp16 layer (x_hat in
        # float32): formed here in the backward, before the engine widens the other captures,
        # and a bf16 x_hat would be 2^-8 off per entry.
        wide = torch.promote_types(x.dtype, torch.float32)
        x, g = ops.cast(x, wide), ops.cast(g, wide)
        if func in (F.layer_norm, F.rms_norm):
            shape = opts["normalized_shape"]
            k = 1 if isinstance(shape, int) else len(shape)
            kind = "layer_norm" if func is F.layer_norm else "rms_norm"
            return ops.norm_affine_grads(kind, x, g, eps=eps, normalized_ndim=k, bias=bias)
        if func is F.group_norm:
            return ops.norm_affine_grads("group_norm", x, g, eps=opts["eps"],
                                         num_groups=int(opts["num_groups"]), bias=bias)
        if func is F.batch_norm:    # eval mode: x_hat from the running statistics, per channel
            return ops.norm_affine_grads("instance_norm", x, g, eps=opts["eps"], bias=bias,
                                         running_mean=opts["running_mean"].to(wide),
                                         running_var=opts["running_var"].to(wide))
        stats = {} if opts["use_input_stats"] else dict(
            running_mean=opts["running_mean"].to(wide), running_var=opts["running_var"].to(wide))
        return ops.norm_affine_grads("instance_norm", x, g, eps=opts["eps"], bias=bias, **stats)

    def per_example(self, module, uses):
        out = {}
        for use in uses:
            for name, g in zip(("weight", "bias"), use.extra["grads"]):
                if not trainable(module, name):
                    continue
                if g is None:
                    raise ValueError(
                        f"{type(module).__name__}: parameter '{name}' was not used by the call")
                g = g.view((g.shape[0],) + tuple(getattr(module, name).shape))
                out[name] = g if name not in out else out[name] + g
        return out
