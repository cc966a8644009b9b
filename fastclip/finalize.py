"""One clipping step as pure functions of explicit arguments (no engine state).

The engine (``fastclip/engine.py``) calls them when a backward ends (flat clipping) or a layer's
last use is recorded (per-layer clipping, ``fastclip/scheduling.py``), with the uses of the step
and its plan (each module's rule and trainable parameters)::

    groups = group_uses(uses, params)            # {module: (its uses, its trainable (name, p))}
    sq = total_sq(param_sq_norms(groups, rules, mode), B)    # ||g_i||^2, (B,) float64
    grads = clipped_sums(groups, uses, rules, sq, C, scale, ...)  # {p: sum_i c_i g_i}
    forget_memos(uses)

Each rule's kernels (``fastclip.layers``: ``sq_norms``, ``clipped``) run once per module and
step. ``c_i = min(1, C / ||g_i||)`` (or automatic clipping's ``C / (||g_i|| + gamma)``,
:func:`fastclip.clipping.clip_factors`), with C shrunk by the rounding margin of the dtype the
sum is released in, so that no example's contribution can exceed C after rounding.
"""
from __future__ import annotations

from contextlib import contextmanager, nullcontext
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten, tree_map

from .clipping import clip_factors
from .layers import Part, Pool, Rule, Use, cross_inner
from .layers.generic import GENERIC
from .ops import cast, cast_margin, widened as _widened_tensor
from .passes import partial_error

# The uses of one clipping step by module: {module: (its uses, its trainable (name, parameter)s)}.
Groups = Dict[nn.Module, Tuple[List[Use], List[Tuple[str, nn.Parameter]]]]
Rules = Dict[nn.Module, Rule]

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def group_uses(uses: List[Use], params: Dict[nn.Module, List]) -> Groups:
    """The uses of one clipping step by module, in order, with each module's trainable
    parameters from ``params`` ({module: [(name, p)]}; modules without one left out): each
    rule's kernels run once per module."""
    by_module: Dict[nn.Module, List[Use]] = {}
    for u in uses:
        us = by_module.get(u.module)
        if us is None:
            by_module[u.module] = [u]
        else:
            us.append(u)
    groups: Groups = {}
    for m, us in by_module.items():
        named = [(n, p) for n, p in params[m] if p.requires_grad]
        if named:
            groups[m] = (us, named)
    return groups


def batch_size(uses: List[Use], earlier: Sequence = ()) -> int:
    """The B every use (and every earlier use of the backward, ``earlier``: (module type name,
    B) pairs) agrees on."""
    sizes = {u.batch_size for u in uses}
    sizes.update(b for _, b in earlier)
    if len(sizes) != 1 or -1 in sizes:
        detail = ", ".join(f"{n}: {b}" for n, b in list(earlier) + [
            (type(u.module).__name__, u.batch_size) for u in uses])
        raise ValueError(f"fastclip: batch sizes differ between layer uses in one backward "
                         f"({detail}); every module must see the same batch, batch dimension first")
    return sizes.pop()


def check_wanted(groups: Groups, wanted, names: Dict[nn.Parameter, str]) -> None:
    """Refuse a backward that asked for some parameters' gradients only (``wanted``, the
    parameters it asks for, passes.SOME; None: all) when ``groups`` touches a trainable
    parameter it did not ask for."""
    if wanted is not None:
        missed = list({p: None for _, named in groups.values() for _, p in named
                       if p not in wanted})
        if missed:
            raise partial_error(missed, names)


def _low_precision(inputs, grads) -> bool:
    """Whether a half / bfloat16 tensor is among ``inputs`` and ``grads`` (any pytree); the
    common capture (a tensor and a tuple of tensors) is looked at without flattening."""
    if (inputs is None or isinstance(inputs, Tensor)) and (grads is None or type(grads) is tuple):
        if inputs is not None and inputs.dtype in _LOW_PRECISION:
            return True
        if grads is None:   # a use reduced when recorded (norm layers, kept convs)
            return False
        if all(g is None or isinstance(g, Tensor) for g in grads):
            return any(g is not None and g.dtype in _LOW_PRECISION for g in grads)
    leaves = tree_flatten((inputs, grads))[0]
    return any(isinstance(t, Tensor) and t.dtype in _LOW_PRECISION for t in leaves)


@contextmanager
def widened_module(uses: List[Use], rules: Rules) -> Iterator[None]:
    """Half / bfloat16 captures of ``uses`` seen as float32 by the rules inside the block, put
    back on leaving it (also on an error): norms and clip factors are computed in float32 or
    wider (a bf16 squared norm is 2^-8 off, which under-clips; an fp16 one overflows and drops
    the example), and the clipped sum is formed in float32 and rounded to the parameter's dtype
    once. The generic rule re-runs its module, in the module's own dtype: it widens itself.
    Per module, so only one module's float32 copies are alive at a time (transformer-bf16's step
    peak ~1.3x the non-private one instead of 2.5x with every use widened at once)."""
    saved = []
    for u in uses:
        if rules.get(u.module) is GENERIC:
            continue
        if _low_precision(u.inputs, u.grads):
            saved.append((u, u.inputs, u.grads))
            u.inputs = tree_map(_widened_tensor, u.inputs)
            u.grads = tree_map(_widened_tensor, u.grads)
    try:
        yield
    finally:
        for u, inputs, grads in saved:
            u.inputs, u.grads = inputs, grads


# A rule that widens its own captures in ``clipped`` (Rule.widens_in_clipped) gets them as recorded.
_NO_WIDENING = nullcontext()


def forget_memos(uses: List[Use]) -> None:
    """End of a clipping step: what the kernels memoised on ``uses`` (``Use.memo``) is dropped,
    also after an error, so no per-example result outlives the step."""
    for u in uses:
        u.memo = None


def kernel_out(out: Dict[str, Tensor], name: str, module: nn.Module, rule: Rule, kernel: str):
    if name in out:
        return out[name]
    raise RuntimeError(f"fastclip: the {kernel} kernel of {type(rule).__name__} gave no result "
                       f"for the trainable parameter '{name}' of {type(module).__name__} "
                       f"(it gave {sorted(out)})")


def param_sq_norms(groups: Groups, rules: Rules, mode: str) -> Dict[nn.Parameter, Tensor]:
    """Each parameter's per-example squared gradient norm, {p: (B,) float64}: one ``sq_norms``
    kernel call per module; a parameter shared between modules (tied) also gets the cross
    terms of its parts (:func:`add_cross_terms`)."""
    out: Dict[nn.Parameter, Tensor] = {}
    tied = False
    for m, (us, named) in groups.items():
        rule = rules[m]
        with widened_module(us, rules):
            sqs = rule.sq_norms(m, us, mode)
        for n, p in named:
            sq = cast(sqs[n] if n in sqs else kernel_out(sqs, n, m, rule, "sq_norms"),
                      torch.float64)
            prev = out.get(p)
            if prev is None:
                out[p] = sq
            else:
                out[p], tied = prev + sq, True
    if tied:
        add_cross_terms(groups, rules, mode, out)
    return out


def add_cross_terms(groups: Groups, rules: Rules, mode: str,
                    out: Dict[nn.Parameter, Tensor]) -> None:
    """A parameter shared between modules (tied weights): ||sum of parts||^2 = the sum of the
    parts' norms (in ``out``) + 2 * their inner products, exact without a per-example copy of
    every part where a cross kernel is registered."""
    parts: Dict[nn.Parameter, List[Part]] = {}
    for m, (us, named) in groups.items():
        for n, p in named:
            parts.setdefault(p, []).append(Part(m, n, us))
    for p, ps in parts.items():
        for i, a in enumerate(ps):
            for b in ps[i + 1:]:
                with widened_module(list(a.uses) + [u for u in b.uses if u not in a.uses], rules):
                    cross = cross_inner(rules[a.module], a, rules[b.module], b, mode)
                out[p] = out[p] + 2 * cross.to(torch.float64)


def total_sq(parts: Dict[nn.Parameter, Tensor], B: int) -> Tensor:
    """sum over the parameters of each example's squared gradient norm ({p: (B,)} from
    :func:`param_sq_norms`), (B,) float64 on the parameters' device."""
    ref = next(iter(parts))
    sq = torch.zeros(B, dtype=torch.float64, device=ref.device)
    for part in parts.values():
        sq += part
    return sq


def clipped_sums(groups: Groups, uses: List[Use], rules: Rules, sq: Tensor, C: float,
                 scale: float, automatic: bool, gamma: float, pool: Pool,
                 sink: Optional[Callable] = None) -> Dict[nn.Parameter, Tensor]:
    """{p: sum_i c_i g_i} for every trainable parameter ``groups`` touches (a tied parameter's
    parts added), with ``c_i = min(1, C / ||g_i||)`` from the squared norms ``sq`` times the
    loss scale ``scale`` (B for a mean loss), the factors times ``scale`` again: one ``clipped``
    kernel call per module (per parameter dtype when a module mixes them). An example whose
    norm is not finite contributes nothing (its rows zeroed by the rules). ``sink``: each
    module's [(p, sum)] handed to it as soon as formed (FSDP2's bucketed reduce-scatter) and
    nothing returned."""
    norms = sq.to(torch.float64).sqrt() * scale
    bad = ~torch.isfinite(norms)
    by_dtype: Dict[torch.dtype, Tensor] = {}

    def factors(dtype: torch.dtype) -> Tensor:
        # float64 factors; C shrunk by the margin of the dtype the sum is released in, so
        # rounding cannot lift an example's contribution above C (ops.cast_margin).
        if dtype not in by_dtype:
            # 0 where the norm is not finite (clip_factors' contract): such an example adds
            # nothing to the sum.
            by_dtype[dtype] = clip_factors(norms, C * (1.0 - cast_margin(dtype)), automatic,
                                           gamma) * scale
        return by_dtype[dtype]

    if bad.any():
        # An example whose gradient is not finite (an overflow in its forward) must not
        # poison the sum, nor show in it: it contributes nothing, like an absent example.
        for u in uses:
            rules[u.module].zero_examples(u, bad)
            u.memo = None   # per-example results memoised from the bad rows
    grads: Dict[nn.Parameter, Tensor] = {}
    for m, (us, named) in groups.items():
        rule = rules[m]
        # One call per module; per parameter dtype when they differ (the clip factors are
        # shrunk by the margin of the dtype each sum is released in).
        dtypes = [named[0][1].dtype]
        for _, p in named:
            if p.dtype not in dtypes:
                dtypes.append(p.dtype)
        for dtype in dtypes:
            with (_NO_WIDENING if rule.widens_in_clipped else widened_module(us, rules)):
                sums = rule.clipped(m, us, factors(dtype), pool)
            if sink is not None:
                # FSDP2: p is this rank's shard; the module's full-size sums are handed to
                # the bucketed reduce-scatter now (fastclip/fsdp.py), none is held here.
                sink([(p, kernel_out(sums, n, m, rule, "clipped"))
                      for n, p in named if p.dtype is dtype])
                del sums
                continue
            for n, p in named:
                if p.dtype is dtype:
                    g = sums[n] if n in sums else kernel_out(sums, n, m, rule, "clipped")
                    prev = grads.get(p)
                    grads[p] = g if prev is None else prev + g
        # This module's inputs and output gradients are spent: dropped now, not when the step
        # ends, so the sums formed next do not stack on every layer's activations (mlp's step
        # peak 1.5x the non-private one otherwise: all A and G live while all sums are formed).
        for u in us:
            rule.release(u)
    return grads
