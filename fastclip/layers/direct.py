"""Parameters a module uses directly in its own forward, beside submodules (a learned position
table or a class token held as an nn.Parameter by the model itself): exact per-example gradients
from the ops that use them.

Capture: during the module's forward each such parameter is replaced by a fresh leaf ``q``
(``p.detach().requires_grad_()``) and a TorchFunctionMode follows it. An op that takes a followed
tensor and no batched data (``q[:T]``, ``q.expand(B, -1, -1)``, ``q * 2``) is run on the private
sub-graph of ``q`` and its result is followed too. The first op that combines a followed tensor
with data whose leading dimension is the batch size B (``x + pos``, ``torch.cat([cls, x], 1)``)
is the *mixing* op: it runs inside ``_Mix``, whose forward keeps the op's sub-graph from ``q``
and whose backward records the gradient G at its output and returns the data inputs' gradients
only. Row i of that output belongs to example i (batch dimension first), so example i's gradient
of the parameter is the VJP of the sub-graph with G restricted to row i:

    grad_i = d out / d q  applied to  (G * e_i)      (one batched VJP, ``is_grads_batched``)

exact for any op, at a cost of B x |out| memory for the batched cotangent. A followed tensor that
reaches the loss any other way (returned as is, used by a child's captured op, an in-place write
into data) would give ``q`` an autograd gradient: a hook on ``q`` makes that an error, so nothing
is ever left out silently.
"""
from __future__ import annotations

from typing import Dict, List, Sequence

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten, tree_map

from .. import ops
from . import Rule, Use
from .capture import CaptureMode


_EXPANDS = (Tensor.expand, Tensor.broadcast_to, torch.broadcast_to)
_ADDS = (Tensor.add, Tensor.__add__, Tensor.__radd__, torch.add)
_SUBS = (Tensor.sub, Tensor.__sub__, Tensor.subtract, torch.sub, torch.subtract)
_CATS = (torch.cat, torch.concat, torch.concatenate)
_MULS = (Tensor.mul, Tensor.__mul__, Tensor.__rmul__, Tensor.multiply, torch.mul, torch.multiply)


def _unbatched(shape, out_shape) -> bool:
    """A tensor of ``shape`` broadcast to ``out_shape`` is the same in every row of dim 0."""
    return len(shape) < len(out_shape) or (len(shape) == len(out_shape) and shape[0] == 1)


def _reduce(g: Tensor, shape) -> Tensor:
    """Per-example gradients (B, *shape) of an unbatched tensor of ``shape`` broadcast to
    ``g.shape`` (B first): ``g`` summed over the dimensions it was broadcast along."""
    rest = g.shape[1:]
    aligned = tuple(shape[1:]) if len(shape) == g.dim() else (
        (1,) * (len(rest) - len(shape)) + tuple(shape))
    dims = [k + 1 for k, (a, r) in enumerate(zip(aligned, rest)) if a == 1 and r != 1]
    if dims:
        g = g.sum(dims, keepdim=True)
    return g.reshape((g.shape[0],) + tuple(shape))


class _Mix(torch.autograd.Function):
    """The mixing op. Inputs: the data tensors that require grad, then the followed leaves (so
    the outputs require grad even when the data does not), then the module's own parameters (so
    their gradient nodes are in the graph, where the engine asks whether a backward computes
    their gradients, fastclip/passes.py); neither gets a gradient from here."""

    @staticmethod
    def forward(ctx, engine, use, run, n_data, *tensors):
        data = tensors[:n_data]
        with torch.enable_grad():
            subs = [t.detach().requires_grad_() for t in data]
            outs = run(subs)
        ctx.engine, ctx.use, ctx.subs = engine, use, subs
        use.extra["outs"] = outs
        return tuple(o.detach() for o in outs)

    @staticmethod
    def backward(ctx, *grads):
        use = ctx.use
        outs = use.extra["outs"]
        use.grads = tuple(grads)
        pairs = [(o, g) for o, g in zip(outs, grads) if g is not None and o.requires_grad]
        subs = ctx.subs
        # Before the sub-graph is read: a graph backpropagated again is refused here by name.
        counted = ctx.engine.record(use)
        gd = [None] * len(subs)
        if pairs and subs:
            got = torch.autograd.grad([o for o, _ in pairs], subs, [g for _, g in pairs],
                                      retain_graph=True, allow_unused=True)
            gd = list(got)
        if counted:   # a backward the engine left alone may be followed by the training one
            ctx.subs = None
        return (None, None, None, None) + tuple(gd) + (None,) * (
            len(ctx.needs_input_grad) - 4 - len(gd))


class _Follow(CaptureMode):
    """The direct-follow capture strategy: a CaptureMode whose :meth:`match` takes the ops on
    followed tensors (the fresh leaves standing for the module's own parameters, and what was
    computed from them alone)."""

    def __init__(self, engine, module, leaves: Dict[str, Tensor], params: List[Tensor]):
        super().__init__(engine, module)
        self.leaves = leaves                       # parameter name -> fresh leaf q
        self.params = params                       # the parameters q stands for
        self.followed: Dict[int, Tensor] = {id(q): q for q in leaves.values()}
        # id(t) -> (t, s) for a followed t = s.expand(...) whose rows are all s (leading dim of s
        # 1 or absent): the mixing op's gradient for example i then needs only row i of t's.
        self.expanded: Dict[int, tuple] = {}

    def _is_followed(self, t) -> bool:
        return isinstance(t, Tensor) and self.followed.get(id(t)) is t

    def _any_followed(self, obj) -> bool:
        # Every op of the module's forward (a ViT's whole body) passes here: a plain scan of
        # tensors, lists, tuples and dicts instead of a pytree flatten. A followed tensor hidden
        # in another container is not missed silently: q's guard refuses the step.
        if isinstance(obj, Tensor):
            return self.followed.get(id(obj)) is obj
        if isinstance(obj, (list, tuple)):
            return any(self._any_followed(t) for t in obj)
        if isinstance(obj, dict):
            return any(self._any_followed(t) for t in obj.values())
        return False

    def __torch_function__(self, func, types, args=(), kwargs=None):
        # CaptureMode's dispatch with the filter first: the ops that touch no followed tensor
        # (nearly every op of the module's forward) run without a call to match.
        kwargs = kwargs or {}
        if not (self._any_followed(args) or (kwargs and self._any_followed(kwargs))):
            return func(*args, **kwargs)
        return self.match(func, args, kwargs)

    def match(self, func, args, kwargs):
        """An op on followed tensors: followed on (its outputs followed too) while it takes no
        batched data; the first op combining them with data of leading size B runs in ``_Mix``,
        whose backward records the output gradient."""
        leaves, _ = tree_flatten((args, kwargs))
        B = self.engine.current_batch_size()
        data = [t for t in leaves if isinstance(t, Tensor) and not self._is_followed(t)]
        mixing = B is not None and any(t.dim() > 0 and t.shape[0] == B for t in data)
        if not mixing:
            out = func(*args, **kwargs)
            for t in tree_flatten(out)[0]:
                if isinstance(t, Tensor):
                    self.followed[id(t)] = t
            if (func in _EXPANDS and isinstance(out, Tensor) and self._is_followed(args[0])
                    and _unbatched(args[0].shape, out.shape)):
                self.expanded[id(out)] = (out, args[0])
            return out
        name = getattr(func, "__name__", "")
        if name.endswith("_") and not name.endswith("__"):
            raise ValueError(f"fastclip: the in-place op {name} uses parameter(s) of "
                             f"{type(self.module).__name__} directly; write it out of place")
        needs = [t for t in data if t.requires_grad]
        idx = {id(t): i for i, t in enumerate(needs)}
        out_spec = {}

        def run(subs):
            def swap(t):
                if isinstance(t, Tensor) and not self._is_followed(t) and id(t) in idx:
                    return subs[idx[id(t)]]
                return t

            a, k = tree_map(swap, (args, kwargs))
            out = func(*a, **k)
            flat, spec = tree_flatten(out)
            out_spec["spec"], out_spec["flat"] = spec, flat
            return [t for t in flat if isinstance(t, Tensor) and t.is_floating_point()]

        use = self.engine.new_use(self.module, extra={"leaves": dict(self.leaves), "B": B,
                                                      "plan": self._plan(func, args, kwargs, B)})
        res = _Mix.apply(self.engine, use, run, len(needs), *needs, *self.leaves.values(),
                         *self.params)
        flat = list(out_spec["flat"])
        it = iter(res)
        for i, t in enumerate(flat):
            if isinstance(t, Tensor) and t.is_floating_point():
                flat[i] = next(it)
        from torch.utils._pytree import tree_unflatten
        return tree_unflatten(flat, out_spec["spec"])

    def _source(self, t: Tensor, out_dim: int, B: int):
        """The unbatched followed tensor ``s`` whose broadcast ``t`` is in the mixing op (``t``
        itself, or the ``s`` that ``t = s.expand(B, ...)`` was made from), or None."""
        if t.dim() <= out_dim and (t.dim() < out_dim or t.shape[0] == 1):
            return t
        rec = self.expanded.get(id(t))
        if rec is not None and rec[0] is t and t.dim() == out_dim and t.shape[0] == B:
            return rec[1]
        return None

    def _plan(self, func, args, kwargs, B: int):
        """For ``data + s``, ``data - s``, ``s + data`` (``torch.add/sub`` with ``alpha``),
        ``data * s`` / ``s * data`` and ``torch.cat`` along a non-batch dimension of data and
        expanded followed tensors: a list of ``(s, dim, offset, length, scale, factor)``, one per
        followed operand, with which example i's gradient of the unbatched ``s`` is ``scale``
        times row i of the output gradient (narrowed to ``[offset, offset + length)`` along
        ``dim`` for cat; times ``factor[0]``, the data operand, for mul), summed over the
        dimensions ``s`` is broadcast along. None for any other op: the general batched VJP."""
        try:
            mul = func in _MULS
            if func in _ADDS or func in _SUBS or mul:
                if len(args) != 2 or set(kwargs) - ({"alpha"} if not mul else set()):
                    return None
                a, b = args
                if not (isinstance(a, Tensor) and isinstance(b, Tensor)):
                    return None
                fa, fb = self._is_followed(a), self._is_followed(b)
                if fa == fb:
                    return None
                t = a if fa else b
                d = b if fa else a
                out_dim = max(a.dim(), b.dim())
                if d.dim() != out_dim or d.shape[0] != B:
                    return None
                s = self._source(t, out_dim, B)
                if s is None:
                    return None
                alpha = kwargs.get("alpha", 1)
                if isinstance(alpha, Tensor):
                    return None
                scale = 1 if fa else alpha
                if func in _SUBS and fb:
                    scale = -scale
                # mul: the data operand's value (its version checked when it is read)
                factor = (d.detach(), d._version) if mul else None
                return [(s, None, 0, 0, scale, factor)]
            if func in _CATS:
                if "out" in kwargs or not args and "tensors" not in kwargs:
                    return None
                tensors = args[0] if args else kwargs["tensors"]
                dim = args[1] if len(args) > 1 else kwargs.get("dim", 0)
                if not isinstance(tensors, (list, tuple)) or isinstance(dim, str):
                    return None
                pieces = [t for t in tensors if not (t.dim() == 1 and t.numel() == 0)]
                nd = pieces[0].dim()
                dim = dim + nd if dim < 0 else dim
                if dim <= 0 or dim >= nd:
                    return None
                plan, off = [], 0
                for t in pieces:
                    if self._is_followed(t):
                        s = self._source(t, nd, B)
                        if s is None:
                            return None
                        plan.append((s, dim, off, t.shape[dim], 1, None))
                    off += t.shape[dim]
                return plan
        except (TypeError, IndexError, AttributeError):
            return None
        return None


class DirectRule(Rule):
    """Exact rule for the trainable parameters a module with submodules uses in its own forward."""

    def check(self, module):
        if type(module) is nn.MultiheadAttention:
            return ("torch.nn.MultiheadAttention uses its projection weights in a functional call; "
                    "use fastclip.nn.MultiheadAttention (fastclip.nn.convert_modules(model), done "
                    "automatically by make_private / per_sample_grad_norms / clipped_grad)")
        return None

    def pre_forward(self, engine, module, args, kwargs):
        own = [(n, p) for n, p in module.named_parameters(recurse=False) if p.requires_grad]
        leaves = {}
        for n, p in own:
            q = p.detach().requires_grad_()
            q.register_hook(_guard(engine, module, n))
            leaves[n] = q
            module._parameters[n] = q
        mode = _Follow(engine, module, leaves, [p for _, p in own])
        mode.__enter__()
        return own, mode

    def post_forward(self, engine, module, state, args, kwargs, output):
        own, mode = state
        mode.__exit__(None, None, None)
        for n, p in own:
            module._parameters[n] = p
        return None

    def zero_examples(self, use, bad):
        use.grads = tuple(None if g is None else _zero(g, bad) for g in use.grads)

    def per_example(self, module: nn.Module, uses: Sequence[Use]) -> Dict[str, Tensor]:
        # The rule's sq_norms and clipped are the defaults, from these; each use's are memoised
        # on it for the step (the engine drops them when it ends).
        out: Dict[str, Tensor] = {}
        for u in uses:
            if u.memo is None:
                u.memo = self._per_example(u)
            for n, g in u.memo.items():
                out[n] = g if n not in out else out[n] + g
        return out

    def _per_example(self, use: Use) -> Dict[str, Tensor]:
        outs, leaves, B = use.extra["outs"], use.extra["leaves"], use.batch_size
        names = list(leaves)
        pairs = [(o, g) for o, g in zip(outs, use.grads) if g is not None and o.requires_grad]
        result = {n: leaves[n].new_zeros((max(B, 0),) + leaves[n].shape) for n in names}
        plan = use.extra.get("plan")
        if plan is not None and len(outs) == 1:
            if pairs and B > 0:
                self._planned(plan, pairs[0][1], leaves, result)
        elif pairs and B > 0:
            eye = torch.eye(B, dtype=pairs[0][1].dtype, device=pairs[0][1].device)
            batched = [eye.view((B, B) + (1,) * (g.dim() - 1)) * g.unsqueeze(0) for _, g in pairs]
            inputs = [leaves[n] for n in names]
            try:
                got = torch.autograd.grad([o for o, _ in pairs], inputs, batched, retain_graph=True,
                                          allow_unused=True, is_grads_batched=True)
            except (RuntimeError, NotImplementedError):
                rows = [torch.autograd.grad([o for o, _ in pairs], inputs, [b[i] for b in batched],
                                            retain_graph=True, allow_unused=True) for i in range(B)]
                got = [None if rows[0][j] is None else torch.stack([r[j] for r in rows])
                       for j in range(len(inputs))]
            for n, g in zip(names, got):
                if g is not None:
                    result[n] = g
        # bf16 / fp16 parameters: norms and clipped sums in float32 or wider (the engine rounds
        # the sum to the parameter's dtype once); a bf16 sum of squares under-clips.
        return {n: ops.widened(g) for n, g in result.items()}


    @staticmethod
    def _planned(plan, G: Tensor, leaves: Dict[str, Tensor], result: Dict[str, Tensor]) -> None:
        """Per-example gradients for a planned add/sub/mul/cat (``_Follow._plan``): example i's
        gradient of each unbatched operand ``s`` is read off row i of ``G`` (a slice, a sum over
        its broadcast dimensions, a sign, a product with the data operand), O(|G|) instead of a
        batched VJP over B x |G|; then, if
        ``s`` is not a leaf itself, one batched VJP of the small sub-graph leaf -> ``s``."""
        by_leaf = {id(q): n for n, q in leaves.items()}
        srcs, cots = [], []
        for s, dim, off, length, scale, factor in plan:
            g = G if dim is None else G.narrow(dim, off, length)
            if factor is not None:
                d, version = factor
                if d._version != version:
                    raise RuntimeError(
                        "fastclip: a tensor multiplied by a parameter used directly in the forward "
                        "was modified in place before the backward; its per-example gradient "
                        "needs the value it had; do not modify it in place")
                g = g * d
            g = _reduce(g, s.shape)
            if scale != 1:
                g = g * scale
            g = g.to(s.dtype)
            n = by_leaf.get(id(s))
            if n is not None and leaves[n] is s:
                result[n] = result[n] + g
            elif s.requires_grad:
                srcs.append(s)
                cots.append(g)
        if not srcs:
            return
        names = list(leaves)
        inputs = [leaves[n] for n in names]
        try:
            got = torch.autograd.grad(srcs, inputs, cots, retain_graph=True, allow_unused=True,
                                      is_grads_batched=True)
        except (RuntimeError, NotImplementedError):
            B = cots[0].shape[0]
            rows = [torch.autograd.grad(srcs, inputs, [c[i] for c in cots], retain_graph=True,
                                        allow_unused=True) for i in range(B)]
            got = [None if rows[0][j] is None else torch.stack([r[j] for r in rows])
                   for j in range(len(inputs))]
        for n, g in zip(names, got):
            if g is not None:
                result[n] = result[n] + g


def _zero(t: Tensor, bad: Tensor) -> Tensor:
    t = t.clone()
    t[bad.to(t.device)] = 0
    return t


def _guard(engine, module, name):
    def hook(grad):
        if grad is not None and not engine.finalizing:
            raise RuntimeError(
                f"fastclip: parameter '{name}' of {type(module).__name__}, used directly in its "
                "forward, reached the loss without passing through an op that combines it with "
                "the batch (returned as is, used inside a submodule's captured op, or written in "
                "place into data); its per-example gradient cannot be formed, so the step is "
                "refused")
        return grad
    return hook


DIRECT = DirectRule()
