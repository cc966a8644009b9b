"""The exact generic rule: any leaf module, through per-example vector-Jacobian products of
that module alone (torch.func), and the modules fastclip refuses.

Capture: during the module's forward its trainable parameters are swapped for detached copies
(so autograd computes no parameter gradient), and the outputs pass through ``_Tap``, whose
backward records the output gradients: the capture of ``capture.OutputTapRule``, with all the
call's tensor inputs saved. Finalize: ``vmap(vjp)`` over the examples of each use
gives the per-example gradients of the module's parameters (memory B x module parameters).
"""
from __future__ import annotations

import contextlib
from typing import Dict, Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call, vjp, vmap
from torch.utils._pytree import tree_flatten, tree_unflatten

from . import Rule, Use, rule_for
from .capture import detach_params, restore_params, tap, tapped_outputs


def _saved_inputs(use, saved):
    """_Tap's backward: the call's tensor inputs, saved through autograd, into the use."""
    use.inputs = (use.inputs[0], list(saved), use.inputs[2])


def _trainable(module: nn.Module):
    return [(n, p) for n, p in module.named_parameters(recurse=False) if p.requires_grad]


def _rng_devices(tensors):
    """The CUDA devices whose generators a forward over ``tensors`` may draw from."""
    return sorted({t.device.index or 0 for t in tensors
                   if isinstance(t, Tensor) and t.device.type == "cuda"})


def _rng_state(cuda_devices):
    return (torch.get_rng_state(), [torch.cuda.get_rng_state(d) for d in cuda_devices])


def _set_rng_state(state, cuda_devices):
    torch.set_rng_state(state[0])
    for d, s in zip(cuda_devices, state[1]):
        torch.cuda.set_rng_state(s, d)


def _same_state(a, b) -> bool:
    return torch.equal(a[0], b[0]) and all(torch.equal(x, y) for x, y in zip(a[1], b[1]))


def _autocast_state(tensors):
    """{device type: (enabled, dtype)} of autocast for the CPU and the devices of ``tensors``:
    the state the module's forward ran in, which its re-run at finalize must take again."""
    types = {"cpu"} | {t.device.type for t in tensors if isinstance(t, Tensor)}
    return {d: (torch.is_autocast_enabled(d), torch.get_autocast_dtype(d)) for d in sorted(types)}


def _in_autocast(state) -> contextlib.ExitStack:
    """Enter the autocast ``state`` (from :func:`_autocast_state`) where it differs from the
    current one. The finalize runs at the end of the backward, usually outside the user's
    ``torch.autocast`` block: a re-run there would compute a float32 forward whose per-example
    gradients are not those of the bf16 forward that made the loss (and whose replayed output
    would not match)."""
    stack = contextlib.ExitStack()
    for device, (enabled, dtype) in state.items():
        if (torch.is_autocast_enabled(device), torch.get_autocast_dtype(device)) != (enabled, dtype):
            stack.enter_context(torch.autocast(device, dtype=dtype, enabled=enabled))
    return stack


class _Random:
    """What the finalize needs to replay a forward that drew random numbers (dropout inside a
    custom leaf): the generators' states before it and its outputs, to check the replay."""
    __slots__ = ("state", "devices", "outputs")

    def __init__(self, state, devices, outputs):
        self.state, self.devices, self.outputs = state, devices, outputs


class GenericRule(Rule):
    """Exact rule for any leaf module that treats the examples of a batch independently.

    A module whose forward draws random numbers (the default generators' states differ after
    it) gets its per-example gradients from a replay of that very forward: the states from
    before it restored, the module re-run on the whole batch (same shapes, so the same draws),
    the replayed outputs checked against the recorded ones, and one vjp of that forward taken
    per example with the cotangent restricted to the example. Re-running per example, as for a
    deterministic module, would draw new masks: gradients of a forward that never happened."""

    def pre_forward(self, engine, module, args, kwargs):
        params = detach_params(module)
        devices = _rng_devices(tree_flatten((args, kwargs))[0] + [p for _, p in params])
        return params, devices, _rng_state(devices)

    def post_forward(self, engine, module, state, args, kwargs, output):
        params, devices, before = state
        restore_params(module, params)
        if output is None:
            return None
        random = None
        if not _same_state(before, _rng_state(devices)):
            outs = [t.detach() for t in tree_flatten(output)[0] if isinstance(t, Tensor)
                    and (t.is_floating_point() or t.is_complex())]
            random = _Random(before, devices, outs)
        leaves, out_spec, out_idx = tapped_outputs(output)
        in_leaves, in_spec = tree_flatten((args, kwargs))
        in_idx = [i for i, t in enumerate(in_leaves) if isinstance(t, Tensor)]
        in_tensors = [in_leaves[i] for i in in_idx]
        if not out_idx:
            return None
        # inputs = (all input leaves with tensors detached later, tensor inputs, spec)
        amp = _autocast_state(in_tensors + [p for _, p in params])
        use = engine.new_use(module, inputs=(in_leaves, in_tensors, in_spec),
                             extra=(out_idx, out_spec, random, amp))
        return tap(engine, use, leaves, out_spec, out_idx, in_tensors, [p for _, p in params],
                   _saved_inputs)

    def per_example(self, module: nn.Module, uses: Sequence[Use]) -> Dict[str, Tensor]:
        # The rule's sq_norms and clipped are the defaults, from these; each use's are memoised
        # on it for the step (the engine drops them when it ends).
        out: Dict[str, Tensor] = {}
        for u in uses:
            if u.memo is None:
                u.memo = self._per_example(module, u)
            for n, g in u.memo.items():
                out[n] = g if n not in out else out[n] + g
        return out

    def _per_example(self, module: nn.Module, use: Use) -> Dict[str, Tensor]:
        in_leaves, in_tensors, in_spec = use.inputs
        in_leaves = list(in_leaves)
        it = iter(in_tensors)
        for i, t in enumerate(in_leaves):
            if isinstance(t, Tensor):
                in_leaves[i] = next(it).detach()
        out_idx, out_spec, random, amp = use.extra
        with _in_autocast(amp):
            return self._per_example_in(module, use, in_leaves, in_spec, out_idx, random)

    def _per_example_in(self, module, use, in_leaves, in_spec, out_idx, random):
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
        elif random is not None:
            result = self._replayed(module, params, buffers, in_leaves, in_spec, out_idx, grads,
                                    B, random)
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
        return result

    # Examples per vmapped vjp call of a replayed forward: each holds a batch-sized cotangent.
    _REPLAY_CHUNK = 16

    def _replayed(self, module, params, buffers, in_leaves, in_spec, out_idx, grads, B, random):
        """Per-example gradients {name: (B, *shape)} of a forward that drew random numbers:
        replayed on the whole batch from the generators' states before it."""
        user = _rng_state(random.devices)
        try:
            _set_rng_state(random.state, random.devices)

            def run(p):
                args, kwargs = tree_unflatten(in_leaves, in_spec)
                out = functional_call(module, (p, buffers), tuple(args), kwargs)
                leaves, _ = tree_flatten(out)
                return tuple(leaves[i] for i in out_idx)

            outs, fn = vjp(run, params)
        finally:
            _set_rng_state(user, random.devices)   # the user's stream goes on as if untouched
        if len(outs) != len(random.outputs) or not all(
                torch.equal(a, b) for a, b in zip(outs, random.outputs)):
            raise RuntimeError(
                f"fastclip: {type(module).__name__} draws random numbers in its forward, and "
                "replaying it from the random generators' states before that forward did not "
                "reproduce its output (its draws depend on something else: its own "
                "torch.Generator, a device other than its inputs', the call's history), so its "
                "per-example gradients cannot be formed; draw from the default generator of the "
                "inputs' device, or move the random op out of the module into a parameter-free one")
        cots = [None if g is None else g.to(o.dtype) for o, g in zip(outs, grads)]

        def restricted(idx):
            # cotangents (k, *out.shape): the output gradient of examples idx, zero elsewhere
            k = len(idx)
            sel = torch.zeros((k, B), dtype=torch.bool, device=outs[0].device)
            sel[torch.arange(k), torch.as_tensor(idx)] = True
            return tuple(torch.zeros((k,) + o.shape, dtype=o.dtype, device=o.device) if g is None
                         else g.unsqueeze(0) * sel.view((k, B) + (1,) * (g.dim() - 1)).to(g.dtype)
                         for o, g in zip(outs, cots))

        rows = {n: [] for n in params}
        for s in range(0, B, self._REPLAY_CHUNK):
            idx = list(range(s, min(B, s + self._REPLAY_CHUNK)))
            ct = restricted(idx)
            try:
                part = vmap(lambda *c: fn(c)[0])(*ct)
            except (RuntimeError, NotImplementedError, ValueError):
                got = [fn(tuple(t[j] for t in ct))[0] for j in range(len(idx))]
                part = {n: torch.stack([g[n] for g in got]) for n in params}
            for n in params:
                rows[n].append(part[n])
        return {n: torch.cat(rows[n]) for n in params}



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
