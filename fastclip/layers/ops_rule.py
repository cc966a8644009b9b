"""The operation rule: a leaf module of any class gets the native rule of the torch operations its
forward applies to its own parameters.

Rules keyed by module class miss every linear-like layer of another library (Hugging Face's GPT-2
``Conv1D``: ``torch.addmm(bias, x.view(-1, d), weight)`` with the weight stored (in, out); Llama's
and T5's RMSNorm: ``weight * hidden_states``). A leaf here is a module with trainable parameters
none of whose descendants holds trainable parameters, and no registered rule.

Resolution (once, at the leaf's first forward with grad enabled, ``PendingOpsRule``): a dry run of
its forward (no_grad, RNG forked) under :class:`_OpsMode` sees every torch call that receives an
own parameter. If every such call is recognised, the leaf gets :data:`OPS` for good; otherwise the
rule it had before this module existed (generic, or direct for a module with children).

Recognised, with ``x`` a tensor whose rows are known to be grouped by example (below) and ``W`` an
own parameter, possibly transposed (``W.t()``, ``W.T``, ``W.mT``) or cast (``W.to(dtype)``):

* ``F.linear(x, W, b)``, ``torch.addmm(b, x, W)``, ``x @ W`` / ``torch.matmul`` / ``torch.mm``:
  weight gradient ``G_i^T A_i`` or its transpose: the linear kernels (``ops.linear_sq_norms``,
  one GEMM for the clipped sum) on (A, G) in the parameter's own orientation;
* ``F.embedding(ids, W)`` and ``F.conv1d/2d/3d(x, W, b)``: the embedding and conv rules' code;
* ``x * s``, ``x + s``, ``x - s`` with ``s`` broadcast over the batch and positions (a scale or
  shift): per-example gradient = sum over the broadcast positions of ``G * x`` (scale) or
  ``+-G`` (shift), formed in the backward, (B, *s.shape).

Rows grouped by example: the leaf's tensor inputs whose leading dimension is the batch size B
(the same assumption every rule makes of a module's inputs), and what the whitelisted row-wise
ops make of them: elementwise maths, reductions and softmax over dimensions other than 0, casts,
reshapes whose leading size is a multiple k of B (a row-major reshape keeps example i's rows
together: rows i*k .. i*k+k-1), and the outputs of the recognised ops. A parameter used with any
other tensor (a transposed batch, a sliced or reshaped weight, ``1 + W``) is not recognised: the
exact generic rule covers the leaf instead. Every use of a parameter, whatever its kind, is kept:
uses of one kind are stacked along the positions (exact), uses of different kinds add their
per-example gradients.

At every later forward the same mode captures the recognised calls (``capture._FnCapture``: the
backward computes the input gradient only and records (A, G)); a call it cannot recognise then is
an error naming the module (a use missed would leave part of the gradient out).
"""
from __future__ import annotations

import math
import types
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import ops
from .._rng import forked_rng
from . import Rule, keep, sq_rows, zero_rows
from .capture import CaptureMode, _FnCapture
from .conv import ConvRule
from .embedding import (_masked, _parse_embedding, _refusal, _stack, clipped_rows,
                        per_example_rows)
from .linear import clipped_product

_T = torch.Tensor
_MATMUL = {torch.matmul, _T.matmul, _T.__matmul__, torch.mm, _T.mm}
_ADDMM = {torch.addmm, _T.addmm}
_MUL = {torch.mul, _T.mul, _T.__mul__, _T.__rmul__, torch.multiply}
_ADD = {torch.add, _T.add, _T.__add__, _T.__radd__}
_SUB = {torch.sub, _T.sub, _T.__sub__, torch.subtract}
_CONV = {F.conv1d: 1, F.conv2d: 2, F.conv3d: 3}
# Getters of a parameter that give a transposed view (W.T, W.mT) or no gradient (W.data).
_TRANSPOSE_GETTERS = (_T.T, _T.mT)
_NO_GRAD_GETTERS = (_T.data,)
# Row-wise ops: example i's rows of the output depend on example i's rows of the inputs only.
_POINTWISE = {
    "add", "sub", "mul", "div", "true_divide", "pow", "rsqrt", "sqrt", "exp", "log", "tanh",
    "sigmoid", "relu", "gelu", "silu", "neg", "abs", "clamp", "clip", "square", "reciprocal",
    "erf", "sin", "cos", "softplus", "elu", "leaky_relu", "mish", "hardtanh", "dropout",
    "to", "float", "double", "half", "bfloat16", "type_as", "contiguous", "clone", "where",
    "add_", "sub_", "mul_", "div_", "relu_", "clamp_", "masked_fill",
    "__add__", "__radd__", "__iadd__", "__sub__", "__rsub__", "__isub__", "__mul__", "__rmul__",
    "__imul__", "__truediv__", "__rtruediv__", "__itruediv__", "__pow__", "__rpow__", "__neg__",
}
_REDUCE = {"mean", "sum", "var", "std", "amax", "amin", "norm", "logsumexp", "softmax",
           "log_softmax", "cumsum"}
_RESHAPE = {"view", "reshape", "flatten", "view_as", "reshape_as", "unflatten"}
_HARMLESS = {"detach", "size", "dim", "numel", "is_floating_point", "is_contiguous",
             "data_ptr", "__len__", "__format__", "__repr__", "__bool__", "__get__", "element_size"}


def _arg(args, kwargs, i, name, default=None):
    return args[i] if len(args) > i else kwargs.get(name, default)


def _tensors(args, kwargs):
    for a in list(args) + list(kwargs.values()):
        if isinstance(a, Tensor):
            yield a
        elif isinstance(a, (list, tuple)):
            for b in a:
                if isinstance(b, Tensor):
                    yield b


def _rows(t: Tensor, B: int, last: bool = True) -> Tensor:
    """(B*k, ..., n) -> (B, N, n) (or (B*k, ...) -> (B, N) with ``last=False``): example i's rows
    are rows i*k .. i*k+k-1 of a row-grouped tensor; N spelled out so B = 0 reshapes too."""
    if last:
        n = t.shape[-1] if t.dim() > 1 else 1
        N = t.numel() // max(B * n, 1) if B else math.prod(t.shape[1:-1])
        return t.reshape(B, N, n)
    return t.reshape(B, t.numel() // B if B else math.prod(t.shape[1:]))


class _OpsMode(CaptureMode):
    """Active during one leaf's forward. Follows which tensors have rows grouped by example
    (``rows``: id -> (tensor, k)) and which are views of the leaf's own parameters (``views``:
    id -> (tensor, name, transposed)). ``probe``: the dry run that resolves the rule (recognised
    calls run as they are, unrecognised ones are listed in ``failures``); otherwise recognised
    calls are captured and an unrecognised one is an error."""

    def __init__(self, engine, module, own, B: Optional[int], probe: bool):
        super().__init__(engine, module)
        self.B, self.probe = B, probe
        self.views = {id(p): (p, n, False) for n, p in own}
        self.rows: Dict[int, tuple] = {}
        self.failures: List[str] = []
        self.uses = 0

    def seed(self, args, kwargs):
        if self.B is not None:
            for t in _tensors(args, kwargs):
                if t.dim() > 0 and t.shape[0] == self.B:
                    self.rows[id(t)] = (t, 1)

    def _k(self, t) -> Optional[int]:
        e = self.rows.get(id(t)) if isinstance(t, Tensor) else None
        return e[1] if e is not None and e[0] is t else None

    def _view(self, t):
        e = self.views.get(id(t)) if isinstance(t, Tensor) else None
        return e if e is not None and e[0] is t else None

    def _track(self, out, k):
        for t in (out if isinstance(out, (list, tuple)) else (out,)):
            if isinstance(t, Tensor) and t.dim() > 0:
                self.rows[id(t)] = (t, k)

    # -- the calls that receive an own parameter ------------------------------------------
    def match(self, func, args, kwargs):
        params = [v for v in map(self._view, _tensors(args, kwargs)) if v is not None]
        if not params:
            out = func(*args, **kwargs)
            if self.rows:
                self._follow_rows(func, args, kwargs, out)
            return out
        found = self._recognise(func, args, kwargs)
        if isinstance(found, dict):
            return self._use(func, args, kwargs, found)
        out = self._param_view(func, args, kwargs, params)
        if out is not NotImplemented:
            return out
        name = getattr(func, "__name__", repr(func))
        why = f"{name}({', '.join(v[1] for v in params)})" + (f": {found}" if found else "")
        if self.probe:
            self.failures.append(why)
            return func(*args, **kwargs)
        raise ValueError(
            f"fastclip: module '{self.engine.path_of(self.module)}' "
            f"({type(self.module).__name__}) called {why}, which the operation rule chosen at its "
            "first forward cannot cover; its per-example gradient would be incomplete. Use the "
            "parameter in the same way at every forward, or use mode='nanobatch'")

    def _param_view(self, func, args, kwargs, params):
        """A transposed or cast view of one parameter, a call that gives no gradient, or
        NotImplemented for anything else."""
        name = getattr(func, "__name__", "")
        owner = getattr(func, "__self__", None)
        if name == "__get__" and owner not in _TRANSPOSE_GETTERS:
            out = func(*args, **kwargs)
            return out if owner in _NO_GRAD_GETTERS or not isinstance(out, Tensor) else NotImplemented
        if name in _HARMLESS and name != "__get__":
            return func(*args, **kwargs)
        if len(params) != 1 or not args or self._view(args[0]) is None:
            return NotImplemented
        t, pname, tr = self._view(args[0])
        flip = False
        if owner in _TRANSPOSE_GETTERS or name == "t":
            flip = t.dim() == 2
        elif name in ("transpose", "swapaxes"):
            dims = {d % max(t.dim(), 1) for d in (list(args[1:3]) + list(kwargs.values()))[:2]}
            flip = t.dim() == 2 and dims == {0, 1}
        elif name == "permute":
            dims = args[1] if len(args) == 2 else (args[1:] or kwargs.get("dims"))
            flip = t.dim() == 2 and [d % 2 for d in dims] == [1, 0]
        elif name in ("to", "float", "double", "half", "bfloat16", "type_as", "contiguous"):
            flip = None
        if flip is False:
            return NotImplemented
        out = func(*args, **kwargs)
        if not isinstance(out, Tensor) or (flip is None and out.shape != t.shape):
            return NotImplemented
        self.views[id(out)] = (out, pname, tr ^ bool(flip))
        return out

    def _recognise(self, func, args, kwargs):
        """{"kind", "x" (the data operand), "roles" {param name: role}, "build": the call rebuilt
        on (x, *params)} for a recognised call, else a reason (str) or None."""
        v = self._view
        if func is F.linear or func in _ADDMM or func in _MATMUL:
            if func is F.linear:
                x, w, b = _arg(args, kwargs, 0, "input"), _arg(args, kwargs, 1, "weight"), \
                    _arg(args, kwargs, 2, "bias")
                transposed = False
            elif func in _ADDMM:
                b, x, w = _arg(args, kwargs, 0, "input"), _arg(args, kwargs, 1, "mat1"), \
                    _arg(args, kwargs, 2, "mat2")
                if kwargs.get("beta", 1) != 1 or kwargs.get("alpha", 1) != 1 or len(args) > 3:
                    return "beta/alpha"
                transposed = True
            else:
                x, w, b = args[0] if args else kwargs.get("input"), \
                    args[1] if len(args) > 1 else kwargs.get("other", kwargs.get("mat2")), None
                transposed = True
            wv = v(w)
            if wv is None or w.dim() != 2:
                return "the weight must be a 2-D parameter after the input"
            k = self._k(x)
            if k is None or x.dim() < 2:
                return "input rows not known to be grouped by example"
            bv = v(b)
            if b is not None and bv is None and isinstance(b, Tensor) and b.requires_grad:
                return "bias that is not a parameter of the module"
            if bv is not None and (bv[2] or b.dim() != 1):
                return "bias not 1-D"
            # Orientation of the weight's own gradient: "oi" = G^T A (F.linear), "io" = A^T G.
            orient = "io" if transposed ^ wv[2] else "oi"
            roles = {wv[1]: ("lin", orient)}
            if bv is not None:
                if bv[1] in roles:
                    return "bias and weight are one parameter"
                roles[bv[1]] = ("shift", 1)
            names = [wv[1]] + ([bv[1]] if bv is not None else [])
            views = {wv[1]: wv, **({bv[1]: bv} if bv is not None else {})}

            def build(xs, *ps):
                got = dict(zip(names, ps))
                wd = _redo(got[wv[1]], w, wv[2])
                bd = _redo(got[bv[1]], b, False) if bv is not None else b
                if func is F.linear:
                    return F.linear(xs, wd, bd)
                if func in _ADDMM:
                    return torch.addmm(bd, xs, wd)
                return torch.matmul(xs, wd)

            return dict(kind="lin", x=x, k=k, roles=roles, names=names, build=build, views=views)
        if func is F.embedding:
            bound = _parse_embedding(*args, **kwargs)
            ids, w = bound["input"], bound["weight"]
            wv = v(w)
            if wv is None or wv[2] or self._k(ids) is None or ids.dim() < 1:
                return "ids rows not known to be grouped by example"
            if _refusal(bound["max_norm"], bound["scale_grad_by_freq"], bound["sparse"]):
                return "max_norm, scale_grad_by_freq or sparse"
            pad = bound["padding_idx"]
            if pad is not None and pad < 0:
                pad += w.shape[0]
            opts = dict(bound, padding_idx=pad)

            def build(xs, wd):
                return F.embedding(**dict(opts, input=xs, weight=_redo(wd, w, False)))

            return dict(kind="emb", x=ids, k=self._k(ids), roles={wv[1]: ("emb",)},
                        names=[wv[1]], build=build, padding_idx=pad)
        if func in _CONV:
            bound = dict(zip(("input", "weight", "bias", "stride", "padding", "dilation",
                              "groups"), args), **kwargs)
            x, w, b = bound.get("input"), bound.get("weight"), bound.get("bias")
            wv, bv = v(w), v(b)
            if wv is None or wv[2] or self._k(x) != 1 or x.dim() != _CONV[func] + 2:
                return "input not batch-first"
            if b is not None and bv is None and b.requires_grad:
                return "bias that is not a parameter of the module"
            roles = {wv[1]: ("conv", "weight")}
            if bv is not None:
                roles[bv[1]] = ("conv", "bias")
            names = list(roles)
            opts = {k: bound[k] for k in ("stride", "padding", "dilation", "groups") if k in bound}

            def build(xs, *ps):
                got = dict(zip(names, ps))
                bd = _redo(got[bv[1]], b, False) if bv is not None else b
                return func(xs, _redo(got[wv[1]], w, False), bd, **opts)

            return dict(kind="conv", x=x, k=1, roles=roles, names=names, build=build,
                        conv=dict(func=func, stride=opts.get("stride", 1),
                                  padding=opts.get("padding", 0),
                                  dilation=opts.get("dilation", 1), groups=opts.get("groups", 1)))
        if func in _MUL or func in _ADD or func in _SUB or func is _T.__rsub__:
            ops_ = [args[0] if args else kwargs.get("input"),
                    args[1] if len(args) > 1 else kwargs.get("other")]
            if any(key not in ("input", "other") for key in kwargs) or len(args) > 2:
                return "alpha"
            pi = [i for i, t in enumerate(ops_) if v(t) is not None]
            if len(pi) != 1:
                return "a parameter combined with itself or another parameter"
            i = pi[0]
            p, x = ops_[i], ops_[1 - i]
            pv, k = v(p), self._k(x)
            if pv[2] or k is None:
                return "data rows not known to be grouped by example"
            if p.dim() > x.dim() or (p.dim() == x.dim() and p.shape[0] != 1):
                return "the parameter is not broadcast over the batch"
            if func in _MUL:
                role = ("scale",)
            elif func in _ADD:
                role = ("shift", 1)
            else:   # a - b (__rsub__(a, b) = b - a)
                role = ("shift", -1 if (i == 1) != (func is _T.__rsub__) else 1)

            def build(xs, pd):
                pair = [None, None]
                pair[i], pair[1 - i] = _redo(pd, p, False), xs
                return func(*pair)

            return dict(kind="ew", x=x, k=k, roles={pv[1]: role}, names=[pv[1]], build=build,
                        pshape={pv[1]: tuple(p.shape)})
        return None

    def _use(self, func, args, kwargs, found):
        self.uses += 1
        if self.probe:
            out = func(*args, **kwargs)
        else:
            own = self.module._parameters
            extra = {k: found[k] for k in ("kind", "k", "roles") if k in found}
            extra["B"] = self.B
            extra.update(found.get("conv", {}))
            if "padding_idx" in found:
                extra["padding_idx"] = found["padding_idx"]
            if "pshape" in found:
                extra["pshape"] = found["pshape"]
            use = self.engine.new_use(self.module, extra=extra)
            out = _FnCapture.apply(self.engine, use, found["build"], found["x"],
                                   *[own[n] for n in found["names"]])
        self._track(out, found["k"])
        return out

    # -- rows grouped by example ------------------------------------------------------------
    def _follow_rows(self, func, args, kwargs, out):
        """Track the output of a call that keeps example i's rows on example i's data alone."""
        ins = [(t, self._k(t)) for t in _tensors(args, kwargs)]
        tracked = [(t, k) for t, k in ins if k is not None]
        if not tracked or not args or not isinstance(out, (Tensor, list, tuple)):
            return
        name = getattr(func, "__name__", "")
        ref, k = tracked[0]
        first = args[0] is ref
        if name in _RESHAPE:
            if first and isinstance(out, Tensor) and out.dim() > 0:
                if self.B == 0:
                    self._track(out, 1)
                elif out.shape[0] % self.B == 0:
                    self._track(out, out.shape[0] // self.B)
            return
        if name in _REDUCE:
            dim = _arg(args, kwargs, 1, "dim")
            dims = dim if isinstance(dim, (list, tuple)) else (dim,)
            if (first and isinstance(out, Tensor) and out.dim() > 0 and out.shape[0] == ref.shape[0]
                    and all(isinstance(d, int) and d % ref.dim() != 0 for d in dims)):
                self._track(out, k)
            return
        if name in _DIMOPS:
            outs = out if isinstance(out, (list, tuple)) else (out,)
            if first and _keeps_dim0(name, ref, args, kwargs) and all(
                    isinstance(o, Tensor) and o.dim() > 0 and o.shape[0] == ref.shape[0] for o in outs):
                self._track(out, k)
            return
        if not isinstance(out, Tensor) or out.dim() != ref.dim() or out.shape[0] != ref.shape[0]:
            return
        if func is F.linear or func in _MATMUL:
            # x W^T / x @ M with a weight that is not the module's own (a buffer): rows kept.
            other = _arg(args, kwargs, 1, "weight")
            if first and ref.dim() >= 2 and isinstance(other, Tensor) and other.dim() <= 2 \
                    and self._k(other) is None:
                self._track(out, k)
            return
        if name in ("layer_norm", "rms_norm"):
            shape = _arg(args, kwargs, 1, "normalized_shape")
            if not first or len(shape if isinstance(shape, (list, tuple)) else (shape,)) >= ref.dim():
                return
        if name in _POINTWISE or name in ("layer_norm", "rms_norm", "group_norm"):
            for t, kt in ins:
                if kt is not None:
                    if kt != k or t.dim() != out.dim():
                        return
                elif t.dim() >= out.dim() and not (t.dim() == out.dim() and t.shape[0] == 1):
                    return      # unknown rows meet known ones
            self._track(out, k)


_DIMOPS = {"unsqueeze", "squeeze", "transpose", "swapaxes", "split", "chunk", "narrow", "permute",
           "movedim", "__getitem__"}


def _keeps_dim0(name, t, args, kwargs) -> bool:
    n = t.dim()
    rest = list(args[1:]) + list(kwargs.values())
    if name == "__getitem__":
        idx = args[1] if len(args) > 1 else None
        idx = idx if isinstance(idx, tuple) else (idx,)
        if not idx or any(i is None or isinstance(i, Tensor) for i in idx):
            return False
        if idx[0] == slice(None):
            return True
        return idx[0] is Ellipsis and len(idx) - 1 < n
    if name in ("split", "chunk", "narrow", "squeeze", "unsqueeze", "movedim"):
        dims = [d for d in rest[1:2] if isinstance(d, int)] if name in ("split", "chunk") else \
            [d for d in rest[:1] if isinstance(d, int)]
        if name == "squeeze" and not rest:
            return t.shape[0] != 1
        if name == "unsqueeze":
            return bool(dims) and dims[0] % (n + 1) != 0
        if name in ("split", "chunk") and not dims:
            dims = [kwargs.get("dim", 0)]
        return bool(dims) and all(d % n != 0 for d in dims)
    if name in ("transpose", "swapaxes"):
        return len(rest) >= 2 and all(isinstance(d, int) and d % n != 0 for d in rest[:2])
    if name == "permute":
        dims = rest[0] if rest and isinstance(rest[0], (list, tuple)) else rest
        return bool(dims) and dims[0] % n == 0
    return False


def _redo(pd: Tensor, view: Tensor, transposed: bool) -> Tensor:
    """The detached parameter ``pd`` made into the view the forward used (dtype, transpose)."""
    if pd.dtype != view.dtype:
        pd = pd.to(view.dtype)
    return pd.t() if transposed else pd


def _trainable(module: nn.Module):
    return [(n, p) for n, p in module.named_parameters(recurse=False) if p.requires_grad]


class OpsRule(Rule):
    """Native rule of a leaf from the operations it applies to its own parameters (module doc).

    A use is one captured call; ``use.extra``: ``kind`` ("lin", "ew", "emb", "conv"), ``roles``
    {parameter name: role}, ``B`` and ``k`` (the call's data has B*k rows, example-grouped),
    and per kind the call's options; ``pe`` the per-example gradients of "shift"/"scale" roles."""

    def pre_forward(self, engine, module, args, kwargs):
        B = engine.current_batch_size()
        mode = _OpsMode(engine, module, _trainable(module), B, probe=False)
        mode.seed(args, kwargs)
        mode.__enter__()
        return mode

    def post_forward(self, engine, module, state, args, kwargs, output):
        state.__exit__(None, None, None)
        return None

    # -- backward ----------------------------------------------------------------------------
    def on_record(self, use):
        e = use.extra
        B, k = e["B"], e["k"]
        x, g = use.inputs, use.grads[0]
        if B is None or g is None or g.shape[0] != x.shape[0] or (B and x.shape[0] != B * k):
            raise ValueError(f"fastclip: {type(use.module).__name__}: a captured call's rows "
                             f"({x.shape[0]}) are not {k} per example of the batch of {B}")
        use.batch_size = B
        g = g.to(x.dtype) if g.dtype != x.dtype and x.is_floating_point() else g
        pe = e["pe"] = {}
        kind = e["kind"]
        if kind == "lin":
            use.inputs, use.grads = _rows(x, B), (_rows(g, B),)
            for n, role in e["roles"].items():
                if role[0] == "shift":   # summed in float32 or wider, as for "ew" below
                    g0 = use.grads[0]
                    pe[n] = role[1] * g0.to(torch.promote_types(g0.dtype, torch.float32)).sum(1)
        elif kind == "emb":
            use.inputs, use.grads = _rows(x, B, last=False), (_rows(g, B),)
        elif kind == "ew":
            (n, role), = e["roles"].items()
            # x may be broadcast too (over dims other than 0): g has the output's shape. Summed
            # over the positions in float32 or wider (a bf16 sum of T terms is ~T 2^-8 off).
            wide = torch.promote_types(g.dtype, torch.float32)
            prod = g.to(wide) * x.to(wide) if role[0] == "scale" else g.to(wide) * role[1]
            pe[n] = _reduce_to(prod, B, e["pshape"][n])
            use.inputs = use.grads = None     # (B, *shape) is all the finalize needs

    def zero_examples(self, use, bad):
        super().zero_examples(use, bad)
        use.extra["pe"] = zero_rows(use.extra["pe"], bad)

    def release(self, use):
        use.inputs = use.grads = None   # all set again by the backward
        use.extra.pop("pe", None)

    # -- finalize ----------------------------------------------------------------------------
    # Per parameter name: the uses whose call took it and its role there (a parameter no call
    # took has a zero gradient). Uses of one kind stack (exact); kinds mixed add per-example.
    @staticmethod
    def _parts(uses, name):
        return [(u, u.extra["roles"][name]) for u in uses if name in u.extra["roles"]]

    @staticmethod
    def _lin(use, role):
        """(A, G) in the parameter's orientation: its per-example gradient is G^T A."""
        A, G = use.inputs, use.grads[0]
        return (A, G) if role[1] == "oi" else (G, A)

    @staticmethod
    def _conv(weight=None, bias=None):
        """What the conv rule's kernels read of a module: its weight and bias."""
        return types.SimpleNamespace(weight=weight, bias=bias)

    def sq_norms(self, module, uses, method):
        out = {}
        for n, p in _trainable(module):
            if n in out:
                continue
            parts = self._parts(uses, n)
            kinds = {r[0] for _, r in parts}
            if len(kinds) != 1:
                if not parts:
                    out[n] = torch.zeros(max(uses[0].batch_size, 0), dtype=torch.float64,
                                         device=p.device)
                else:
                    out[n] = sq_rows(sum(self._one(module, n, u, r) for u, r in parts))
                continue
            kind = kinds.pop()
            if kind == "lin":
                pairs = [self._lin(u, r) for u, r in parts]
                A = torch.cat([a for a, _ in pairs], 1) if len(pairs) > 1 else pairs[0][0]
                G = torch.cat([g for _, g in pairs], 1) if len(pairs) > 1 else pairs[0][1]
                if keep.keeps(G.shape[0], G.shape[1], A.shape[2], G.shape[2], G.dtype, method):
                    # The per-example gradients, kept for this step's clipped sum (on the first
                    # call's use: a "lin" use, whose memo no other kernel sets).
                    kept = keep.form([(A, G)], False)
                    u0 = parts[0][0]
                    u0.memo = u0.memo if isinstance(u0.memo, dict) else {}
                    u0.memo[n] = kept
                    out[n] = keep.sq_norms(kept)[0]
                else:
                    out[n] = ops.linear_sq_norms(A.contiguous(), G.contiguous(),
                                                 method=method)[0]
            elif kind == "emb":
                ids, g, pad = _stack([u for u, _ in parts])
                out[n] = ops.embedding_sq_norms(ids, g, p.shape[0], pad)
            elif kind == "conv":
                out.update(self._conv_sq(module, uses, n, p, parts, method))
            else:
                out[n] = sq_rows(sum(u.extra["pe"][n] for u, _ in parts))
        return out

    def _conv_sq(self, module, uses, n, p, parts, method):
        """A conv weight's norms, with those of the bias every one of its calls took in the
        same pass (when that bias's calls are the same ones); a bias's alone."""
        us = [u for u, _ in parts]
        if parts[0][1][1] == "bias":
            return {n: _CONV_RULE.sq_norms(self._conv(bias=p), us, method)["bias"]}
        biases = {next((b for b, r in u.extra["roles"].items() if r == ("conv", "bias")), None)
                  for u in us}
        nb = biases.pop() if len(biases) == 1 else None
        if nb is not None and not (module._parameters[nb].requires_grad and {
                id(u) for u, _ in self._parts(uses, nb)} == {id(u) for u in us}):
            nb = None
        bias = module._parameters[nb] if nb is not None else None
        got = _CONV_RULE.sq_norms(self._conv(weight=p, bias=bias), us, method)
        return {n: got["weight"], **({nb: got["bias"]} if nb is not None and "bias" in got else {})}

    def _one(self, module, name, use, role):
        """Per-example gradients (B, *shape) of parameter ``name`` from one use."""
        p = module._parameters[name]
        if role[0] == "lin":
            A, G = self._lin(use, role)
            return torch.einsum("bnr,bnc->brc", G, A)
        if role[0] == "emb":
            return per_example_rows(*_masked(use), p.shape[0])
        if role[0] == "conv":
            proxy = self._conv(**{role[1]: p})
            return _CONV_RULE.per_example(proxy, [use])[role[1]]
        return use.extra["pe"][name]

    def per_example(self, module, uses):
        out = {}
        for n, p in _trainable(module):
            parts = self._parts(uses, n)
            out[n] = (sum(self._one(module, n, u, r) for u, r in parts) if parts
                      else p.new_zeros((max(uses[0].batch_size, 0),) + tuple(p.shape)))
        return out

    def clipped(self, module, uses, c, pool):
        out = {}
        for n, p in _trainable(module):
            grad = None
            parts = self._parts(uses, n)
            memo = parts[0][0].memo if parts else None
            if isinstance(memo, dict) and n in memo:
                # Kept by the norm pass (every part a "lin" call): taken, its bytes go back to
                # the keep budget once this sum is formed.
                grad = keep.clipped_weight(memo.pop(n), c)
                if not memo:
                    parts[0][0].memo = None
                parts = ()
            for u, role in parts:
                if role[0] == "lin":
                    A, G = self._lin(u, role)
                    g = clipped_product(A, G, c, pool)
                elif role[0] == "emb":
                    g = clipped_rows(*_masked(u), c, p.shape[0])
                elif role[0] == "conv":
                    g = _CONV_RULE.clipped(self._conv(**{role[1]: p}), [u], c, pool)[role[1]]
                else:
                    pe = u.extra["pe"][n]
                    g = torch.tensordot(c.to(pe.dtype), pe, dims=1)
                grad = g if grad is None else grad + g
            out[n] = torch.zeros_like(p) if grad is None else grad
        return out


def _reduce_to(t: Tensor, B: int, shape) -> Tensor:
    """Per example, ``t`` (B*k, *rest) summed over its k rows and over the dimensions a parameter
    of ``shape`` is broadcast along: (B, *shape)."""
    rest = t.shape[1:]
    t = t.reshape((B, t.shape[0] // B if B else 1) + tuple(rest)).sum(1)
    full = (1,) * (len(rest) + 1 - len(shape)) + tuple(shape)   # shape aligned to t's dims
    dims = [j + 1 for j in range(len(rest)) if full[j + 1] == 1 and rest[j] != 1]
    if dims:
        t = t.sum(dims, keepdim=True)
    return t.reshape((B,) + tuple(shape))


class PendingOpsRule(OpsRule):
    """Provisional rule of a leaf until its first forward with grad enabled: a dry run of that
    forward decides between :data:`OPS` and the fallback (generic, or direct beside children)."""

    def pre_forward(self, engine, module, args, kwargs):
        rule = self.resolve(engine, module, args, kwargs)
        engine.set_rule(module, rule)
        return rule.pre_forward(engine, module, args, kwargs)

    @staticmethod
    def resolve(engine, module, args, kwargs) -> Rule:
        from .direct import DIRECT
        from .generic import GENERIC
        B = engine.current_batch_size()
        mode = _OpsMode(engine, module, _trainable(module), B, probe=True)
        mode.seed(args, kwargs)
        try:
            with torch.no_grad(), forked_rng(module.parameters()), mode:
                module.forward(*args, **kwargs)
        except Exception:   # the real forward will tell; the generic rule is never wrong
            mode.failures.append("the dry run failed")
        if B is not None and mode.uses and not mode.failures:
            return OPS
        return DIRECT if next(module.children(), None) is not None else GENERIC


_CONV_RULE = ConvRule()
OPS = OpsRule()
PENDING = PendingOpsRule()
