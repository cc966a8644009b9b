"""NanoBatch mode: per-example gradients of the whole model, a few examples at a time.

Exact for any model, whatever its layers or parameter sharing, because nothing is derived per
layer: each example's gradient is the model's own backward for that example.

:class:`NanoBatchEngine` is the sibling of the book-keeping :class:`fastclip.engine.Engine`,
chosen for ``mode="nanobatch"`` by :func:`fastclip.engine.make_engine` (and by
``Engine(model, mode="nanobatch")``). It shares the Engine's plan (which parameters, their names
and clipping layers, re-planned by ``refresh``), the optimizer's view of the gradients it wrote
(``covers``, ``wrote_grad``, ``add_grad``...) and the audit; instead of a rule and hooks per
module it wraps the model's forward.

How it runs inside the usual training loop (``make_private(model, ..., mode="nanobatch")``):

* forward (grad enabled): the model's forward is run on nanobatches of ``nanobatch_size``
  examples (every input tensor whose first dimension is the batch size is split; the others go
  whole to every nanobatch), each building its own autograd graph. The outputs are concatenated
  and returned through ``_Tap``, detached from those graphs, so the user's ``loss.backward()``
  only computes the gradient of the loss with respect to the model's outputs, G (B, ...).
  The forward that produced the loss is the one differentiated: dropout masks and any other
  randomness are exactly those of the loss.
* end of that backward: for each nanobatch, one backward of its own graph with its rows of G
  gives its examples' parameter gradients (nanobatch_size 1: the real parameters, plain
  autograd; larger: the forward ran under ``torch.func.vmap`` with one copy of every parameter
  per example, so the backward yields per-example gradients (k, *shape)). The native loop
  (csrc/clip.cpp through src/nanobatch.pyx) computes their norms by clipping group, clips and
  adds them into per-thread accumulators, which are added into ``p.grad`` at the end.

On the CPU, nanobatches are spread over ``num_threads`` Python threads, statically (nanobatch j to thread
j mod T) and summed in thread order, so results do not depend on scheduling; autograd and the
native loop release the GIL. Memory: the forward's activations as in non-private training, plus
per thread one nanobatch's gradients (nanobatch_size x parameters) and one accumulator.
"""
from __future__ import annotations

import threading
import warnings
import weakref
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Dict, Iterator, List, Optional

import torch
from torch import Tensor, nn
from torch.func import functional_call, vmap
from torch.nn.utils.rnn import PackedSequence
from torch.utils._pytree import tree_flatten, tree_unflatten

from . import ops
from .clipping import clip_factors
from .engine import Engine
from .passes import NONE, THREADS, TWICE


def _check_int(value, name: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


class _Call:
    """One forward of the model: its nanobatches' graphs, completed by the backward's G."""

    __slots__ = ("B", "chunks", "outs", "leaves", "tapped", "grads", "params", "spent")

    def __init__(self, B, chunks, outs, leaves, tapped, params):
        self.B = B
        self.params = params    # the covered-parameter list the forward ran with
        self.chunks = chunks    # [(start, stop)] of each nanobatch
        self.outs = outs        # per nanobatch: the output tensors (graph), by output leaf
        self.leaves = leaves    # per nanobatch: per-example parameter copies (vmap), or None
        self.tapped = tapped    # indices of the output leaves that carry gradients
        self.grads = None
        self.spent = False      # taken into a step by a backward (fastclip/passes.py)


class _Tap(torch.autograd.Function):
    """The concatenated outputs, detached from the nanobatch graphs; the backward hands G to
    the nanobatch engine. The inputs are the trainable parameters, only so that the outputs
    require grad; they receive no gradient from here."""

    @staticmethod
    def forward(ctx, nano, call, *params):
        ctx.nano, ctx.call = nano, call
        return tuple(torch.cat([outs[i].detach() for outs in call.outs]) for i in call.tapped)

    @staticmethod
    def backward(ctx, *grads):
        ctx.nano.ready(ctx.call, grads)
        return (None, None) + (None,) * (len(ctx.needs_input_grad) - 2)


class NanoBatchEngine(Engine):
    """The engine of mode "nanobatch" (module docstring); made by
    :func:`fastclip.engine.make_engine` or ``Engine(model, mode="nanobatch", ...)``, with the
    arguments of :class:`fastclip.engine.Engine`.

    Its backward state is its own (``_calls*``), apart from the Engine's per-use state, which
    stays empty here."""

    _per_module = False     # no rule per module: the whole model's gradient per example

    def _init_capture(self, nanobatch_size: int = 1, num_threads: Optional[int] = None):
        """Called by ``Engine.__init__`` before it plans and attaches."""
        if self.mode != "nanobatch":
            raise ValueError(f"NanoBatchEngine is the engine of mode='nanobatch', got "
                             f"mode={self.mode!r}; use fastclip.engine.make_engine")
        self.size = _check_int(nanobatch_size, "nanobatch_size")
        self.num_threads = (torch.get_num_threads() if num_threads is None
                            else _check_int(num_threads, "num_threads"))
        self._inner = None          # the model's forward we wrap
        self._had_attr = False      # whether the model had its own instance attribute 'forward'
        self._local = threading.local()   # re-entrance guard (functional_call calls the model)
        self._calls: List[_Call] = []   # calls whose output gradients came in this backward
        self._calls_queued = False  # this backward's finalize is queued
        self._calls_cb = None       # weakly: freed unrun when its backward fails
        self._calls_skip = False    # the backward in progress asks for no parameter's gradient
        self._calls_owner = None    # the thread that runs it
        self._pool: Optional[ThreadPoolExecutor] = None
        self._warned_vmap = False
        self._flat = []             # [(name, parameter)] covered, each once, set at attach
        # fastclip.validate: norms-only backward passes keep each parameter's squared norms,
        # param_sq (B, P) float64 in covered_params() order.
        self.by_param = False
        self.param_sq: Optional[Tensor] = None

    def __getstate__(self):
        # copy.deepcopy(model) copies the wrapped forward with its engine: threads and the
        # thread-local guard are not copied but made afresh.
        state = super().__getstate__()
        state.update(_local=None, _pool=None, _calls=[], _calls_queued=False)
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        self._local = threading.local()

    # -- what differs from the book-keeping Engine -------------------------------------------
    def _rule_name(self, module: nn.Module) -> str:
        return "NanoBatch"

    @contextmanager
    def no_capture(self) -> Iterator[None]:
        """As :meth:`Engine.no_capture`; also this thread's re-entrance guard, so that a model
        call inside the block runs the model's own forward, unsplit."""
        inside = getattr(self._local, "inside", False)
        self._local.inside = True
        try:
            with super().no_capture():
                yield
        finally:
            self._local.inside = inside

    def refresh(self, full: bool = False) -> bool:
        """As :meth:`Engine.refresh`; nothing either while a backward's output gradients are
        not yet turned into clipped sums."""
        if self._calls or self._calls_queued:
            return False
        return super().refresh(full)

    # -- attach / detach --------------------------------------------------------------------
    def _attach_capture(self):
        """Wrap the model's forward (instead of the Engine's hooks per module); the covered
        parameters are listed again, as the engine re-attaches when it re-plans."""
        model = self.model
        self._flat = self.covered_params()
        self._had_attr = "forward" in model.__dict__
        self._inner = model.forward
        # An instance attribute takes precedence over the class's forward in nn.Module.__call__,
        # so the user's hooks still run once around the whole call.
        model.forward = self._forward

    def detach(self):
        """As :meth:`Engine.detach`; the model's own forward is put back too."""
        super().detach()
        model = self.model
        if self._inner is not None:
            if self._had_attr:
                model.forward = self._inner
            else:
                model.__dict__.pop("forward", None)
            self._inner = None
        self._calls.clear()
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    # -- forward ----------------------------------------------------------------------------
    def _forward(self, *args, **kwargs):
        if getattr(self._local, "inside", False) or not torch.is_grad_enabled():
            return self._inner(*args, **kwargs)  # evaluation, or a nanobatch's own call
        if torch.compiler.is_compiling():
            # torch.compile after make_private: traced, the nanobatch graphs are not the ones the
            # finalize differentiates (its backward failed deep inside autograd). Raising while
            # traced makes dynamo run this frame eagerly (exact); under fullgraph=True the
            # error reaches the user.
            raise RuntimeError(
                "fastclip: the forward of a model made private with mode='nanobatch' cannot be "
                "traced by torch.compile (the model was compiled after make_private, with "
                "fullgraph=True). Compile the model before make_private (model = "
                "torch.compile(model), then make_private(model, ...): each nanobatch runs the "
                "compiled forward), or use mode='auto'")
        # Parameters unfrozen/replaced/added since attach: re-planned (this object re-attached,
        # self._flat and self._inner formed again) and covered from this forward on.
        self.refresh()
        self._auditor(args, kwargs)   # once: examples must not mix (fastclip/audit.py)
        params = self._flat
        if not params:
            return self._inner(*args, **kwargs)
        packed = tree_flatten((args, kwargs), is_leaf=lambda t: isinstance(t, PackedSequence))[0]
        leaves, spec = tree_flatten((args, kwargs))
        for t in packed + leaves:
            if isinstance(t, PackedSequence):
                raise ValueError("mode='nanobatch' splits the model's inputs along dim 0; a "
                                 "PackedSequence input cannot be split. Pass padded tensors (and "
                                 "lengths) to the model and pack inside it, or use mode='auto'")
            if isinstance(t, Tensor) and t.requires_grad:
                raise ValueError("mode='nanobatch': a model input requires grad; gradients with "
                                 "respect to the inputs are not propagated in this mode. Detach "
                                 "the inputs or use mode='auto'")
        B = next((t.shape[0] for t in leaves if isinstance(t, Tensor) and t.dim() > 0), None)
        if B is None:
            raise ValueError("mode='nanobatch' needs at least one input tensor with the batch "
                             "dimension first")
        batched = [isinstance(t, Tensor) and t.dim() > 0 and t.shape[0] == B for t in leaves]
        k = self.size
        chunks = [(s, min(s + k, B)) for s in range(0, B, k)] or [(0, 0)]
        outs, chunk_leaves, out_spec, first = [], [], None, None
        self._local.inside = True
        try:
            for s, e in chunks:
                part = [t[s:e] if b else t for t, b in zip(leaves, batched)]
                if k == 1 or e - s == 0:
                    a, kw = tree_unflatten(part, spec)
                    out, pl = self._inner(*a, **kw), None
                else:
                    out, pl = self._vmapped(params, part, batched, spec, e - s)
                o_leaves, o_spec = tree_flatten(out)
                if out_spec is None:
                    out_spec, first = o_spec, o_leaves
                elif o_spec != out_spec:
                    raise ValueError("mode='nanobatch': the model's output structure differs "
                                     "between nanobatches")
                for t in o_leaves:
                    if isinstance(t, Tensor) and (t.dim() == 0 or t.shape[0] != e - s):
                        raise ValueError(
                            f"mode='nanobatch': a model output of shape {tuple(t.shape)} has no "
                            f"batch dimension first (nanobatch of {e - s} examples); every output "
                            "tensor must be per example. Use mode='auto' for other outputs")
                outs.append(o_leaves)
                chunk_leaves.append(pl)
        finally:
            self._local.inside = False
        tapped = [i for i, t in enumerate(first)
                  if isinstance(t, Tensor) and t.requires_grad and t.is_floating_point()]
        call = _Call(B, chunks, outs, chunk_leaves if k > 1 else None, tapped, params)
        result = list(first)
        for i, t in enumerate(first):
            if isinstance(t, Tensor) and i not in tapped:
                result[i] = torch.cat([o[i].detach() for o in outs])
        if tapped:
            for i, t in zip(tapped, _Tap.apply(self, call, *[p for _, p in params])):
                result[i] = t
        # Probes until the training loss has been audited once (fastclip/audit.py).
        return self._auditor.probe(tree_unflatten(result, out_spec), B)

    def _vmapped(self, params, part, batched, spec, m):
        """Forward of m examples with one copy of each parameter per example (vmap), so the
        backward gives per-example gradients (m, *shape). Falls back to one example at a time
        (exact for any model) when the model cannot be vmapped."""
        copies = {n: p.detach().unsqueeze(0).expand(m, *p.shape).requires_grad_() for n, p in params}
        in_dims = [0 if b else None for b in batched]

        def one(ps, leaves_i):
            full = [t.unsqueeze(0) if b else t for t, b in zip(leaves_i, batched)]
            a, kw = tree_unflatten(full, spec)
            out = functional_call(self.model, ps, tuple(a), kw)
            return _tree_map_tensors(lambda t: t.squeeze(0), out)

        try:
            out = vmap(one, in_dims=(0, in_dims), randomness="different")(copies, part)
        except (RuntimeError, NotImplementedError, ValueError) as exc:
            if not self._warned_vmap:
                self._warned_vmap = True
                warnings.warn(f"mode='nanobatch': the model cannot be vmapped ({exc}); running "
                              "nanobatches one example at a time (exact, slower). Use "
                              "nanobatch_size=1 to silence this", RuntimeWarning, stacklevel=4)
            return self._one_by_one(copies, part, batched, spec, m)
        return out, copies

    def _one_by_one(self, copies, part, batched, spec, m):
        rows = []
        for i in range(m):
            li = [t[i:i + 1] if b else t for t, b in zip(part, batched)]
            a, kw = tree_unflatten(li, spec)
            rows.append(functional_call(self.model, {n: c[i] for n, c in copies.items()},
                                        tuple(a), kw))
        leaves0, spec0 = tree_flatten(rows[0])
        per = [tree_flatten(r)[0] for r in rows]
        cat = [torch.cat([p[j] for p in per]) if isinstance(t, Tensor) else t
               for j, t in enumerate(leaves0)]
        return tree_unflatten(cat, spec0), copies

    # -- backward ---------------------------------------------------------------------------
    def ready(self, call: _Call, grads):
        """From _Tap's backward: the call's output gradients are known."""
        if not self._calls_queued or self._calls_cb() is None:
            self._start_calls(call)
        elif self._calls_owner != threading.get_ident():
            raise RuntimeError(THREADS)
        if self._calls_skip:
            return
        if call.spent:
            raise RuntimeError(TWICE)
        call.spent = True
        call.grads = grads
        self._calls.append(call)

    def _start_calls(self, call: _Call):
        """First call of a backward: what it asks for (fastclip/passes.py; every covered
        parameter is an input of _Tap, so asking for a part of them is refused), and the
        finalize queued for its end. A backward that failed left its calls: dropped unreleased."""
        self._calls, self._calls_queued = [], False
        kind, _ = self._gate.check((p for _, p in call.params), self._names, all_in_graph=True)
        self._calls_skip = kind == NONE
        self._calls_owner = threading.get_ident()
        # A new bound method each time.
        cb = self._end_skipped if self._calls_skip else self._finalize_calls
        self._calls_cb = weakref.ref(cb)
        self._calls_queued = True
        torch.autograd.Variable._execution_engine.queue_callback(cb)

    def _end_skipped(self):
        self._calls_queued = self._calls_skip = False

    def _finalize_calls(self):
        calls, self._calls, self._calls_queued = self._calls, [], False
        if not calls:
            return
        engine = self   # (the Engine's plan, layout and counters)
        sizes = {c.B for c in calls}
        if len(sizes) != 1:
            raise ValueError(f"fastclip: batch sizes differ between model calls in one backward "
                             f"({sorted(sizes)}); every call must see the same batch")
        B = sizes.pop()
        params = self._flat
        if any(c.params is not params for c in calls):
            for c in calls:
                c.outs = c.leaves = None
            raise RuntimeError(
                "fastclip: a forward made before the model's trainable parameters changed "
                "(unfrozen, frozen, replaced or added; mode='nanobatch' re-planned at a later "
                "forward) was backpropagated after the change, so its per-example gradients do not "
                "match the parameters now clipped; nothing was written. Fix: run the backward of "
                "each forward before changing which parameters train")
        layer_of = {id(p): i for i, layer in enumerate(engine.layers) for p in layer.params}
        write = engine.write_grads
        if write and engine.bounds is not None:      # per layer: one group per layer
            groups, bounds = [layer_of[id(p)] for _, p in params], engine.bounds
        else:                                        # flat, or norms only
            groups, bounds = [0] * len(params), (engine.sensitivity,) if write else None
        if self.by_param and not write:              # validate: one group per parameter
            groups = list(range(len(params)))
        L = len(bounds) if bounds is not None else max(groups, default=0) + 1
        scale = float(B) if engine.loss_reduction == "mean" else 1.0
        n_chunks = len(calls[0].chunks) if B > 0 else 0
        T = max(1, min(self.num_threads, n_chunks))
        if params[0][1].device.type != "cpu":
            # This runs inside the backward's final callback, which for an accelerator is the
            # device's autograd thread: a backward started from another thread would wait for
            # that very thread. Accelerator nanobatches run here, one after the other.
            T = 1
        sq = torch.zeros(B, L, dtype=torch.float64, device=params[0][1].device)

        def work(t):
            accs = ([torch.zeros(p.numel(), dtype=p.dtype, device=p.device) for _, p in params]
                    if write else None)
            for j in range(t, n_chunks, T):
                self._chunk(calls, j, params, groups, bounds, scale, accs, sq,
                            1 if T > 1 else self.num_threads)
            return accs

        self._finalizing = True     # no capture while the nanobatch graphs are differentiated
        try:
            if T == 1:
                results = [work(0)] if n_chunks else []
            else:
                if self._pool is None or self._pool._max_workers < T:
                    if self._pool is not None:
                        self._pool.shutdown(wait=True)
                    self._pool = ThreadPoolExecutor(T, thread_name_prefix="fastclip-nanobatch")
                futures = [self._pool.submit(work, t) for t in range(T)]
                results = [f.result() for f in futures]
        finally:
            self._finalizing = False
            for c in calls:
                c.outs = c.leaves = None   # free the nanobatch graphs
        norms = sq.sum(1).sqrt()
        if write and engine.clipping == "adaptive":
            engine.unclipped += int((norms <= engine.max_grad_norm).sum())
        if self.by_param and not write:
            self.param_sq = sq
        engine.examples += B
        if engine.keep_norms:
            engine.norms_log.append(norms)
        if not write:
            return
        for i, (_, p) in enumerate(params):
            total = None
            for accs in results:   # fixed order: the sum does not depend on scheduling
                total = accs[i] if total is None else total.add_(accs[i])
            if total is None:
                total = torch.zeros_like(p)
            engine.add_grad(p, total.view_as(p))

    def _chunk(self, calls, j, params, groups, bounds, scale, accs, sq, threads):
        """Per-example gradients of nanobatch j (summed over the calls), clipped and added."""
        s, e = calls[0].chunks[j]
        m = e - s
        per: Dict[int, Tensor] = {}
        for c in calls:
            outs = [c.outs[j][i] for i, g in zip(c.tapped, c.grads) if g is not None]
            gos = [g[s:e] for g in c.grads if g is not None]
            c.outs[j] = None
            if not outs:
                continue
            if c.leaves is None:
                inputs = [p for _, p in params]
            else:
                inputs = [c.leaves[j][n] for n, _ in params]
                c.leaves[j] = None
            got = torch.autograd.grad(outs, inputs, gos, allow_unused=True)
            for i, g in enumerate(got):
                if g is not None:
                    g = g.reshape(m, -1)
                    per[i] = g if i not in per else per[i] + g
        idx = sorted(per)
        if not idx:
            return
        if accs is not None and self.automatic:
            # Automatic clipping: the native loop computes min(1, C / norm) factors itself, so the
            # norms come from it (norms only) and the factors from clipping.clip_factors.
            grads, sums = [per[i] for i in idx], [accs[i] for i in idx]
            res_sq, _ = ops.clip_accumulate(grads, None, [groups[i] for i in idx], None, scale,
                                            threads)
            shrink = 1.0 - max(ops.cast_margin(a.dtype) for a in sums)
            b = torch.as_tensor(bounds, dtype=torch.float64, device=res_sq.device) * shrink
            f = clip_factors(res_sq.sqrt(), b, True, self.gamma) * scale
            for g, a, grp in zip(grads, sums, (groups[i] for i in idx)):
                fl = f[:, grp].to(g.device)
                rows = fl != 0
                # In float32 or wider, rounded to the accumulator's dtype once (as ops does).
                wide = torch.promote_types(g.dtype, torch.float32)
                a += (fl[rows].to(wide).unsqueeze(1) * g[rows].to(wide)).sum(0).to(a.dtype)
            sq[s:e] += res_sq.to(sq.device)
            return
        res_sq, _ = ops.clip_accumulate(
            [per[i] for i in idx], None if accs is None else [accs[i] for i in idx],
            [groups[i] for i in idx], bounds, scale, threads)
        sq[s:e] += res_sq


def _tree_map_tensors(fn, tree):
    leaves, spec = tree_flatten(tree)
    return tree_unflatten([fn(t) if isinstance(t, Tensor) else t for t in leaves], spec)
