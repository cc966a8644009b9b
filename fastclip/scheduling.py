"""When the uses of a backward are clipped: the engine's per-backward book-keeping.

Rules make one :class:`fastclip.layers.Use` per captured module call at forward time
(``engine.new_use``) and ``record`` it from the backward once its output gradients are known
(``engine.record``; both are this class's methods, bound onto the engine). The first record of
a backward asks the gate which parameters the backward wants (``fastclip/passes.py``: none
leaves it alone, some but not all is refused) and queues :meth:`Schedule.finish` as autograd's
final callback.

Flat clipping: recorded uses pile up in ``pending``; ``finish`` hands them to the engine's step
(``Engine._finalize``: norms over all parameters, one bound C).

Per-layer clipping (``clipping="per_layer"``): ``new_use`` / ``expect`` count, per layer, the
records each layer awaits (``open``: weak sets, so a forward never backpropagated frees its
claim); when ``record`` has seen a layer's last one, the layer is clipped right there
(:meth:`Schedule.clip_layer`, to its bound C_l) and its uses released. Uses whose backward never
comes hold nothing up: what is left is clipped by ``finish``.

The schedule belongs to one engine (``engine._schedule``) and calls its step
(``_finalize``, ``_clip_layer``, ``_log``); the plan it works with is handed to it by
:meth:`Schedule.lay_out` whenever the engine plans.
"""
from __future__ import annotations

import threading
import weakref
from typing import Dict, List, Optional

import torch
from torch import Tensor, nn

from .finalize import batch_size
from .layers import Use
from .passes import NONE, THREADS, TWICE


class Schedule:
    """The per-backward state of one :class:`fastclip.engine.Engine` (module docstring)."""

    def __init__(self, engine):
        self.engine = engine
        self.rules: Dict = {}
        self.params: Dict = {}
        self.names: Dict = {}
        self.time_major = set()
        self.layers = ()
        self.layer_of: Dict[nn.Module, int] = {}
        self.open: Optional[List[weakref.WeakSet]] = None
        self.pending: List[Use] = []     # flat: the uses recorded in this backward
        self.queued = False              # this backward's finish is queued
        self.new_backward()

    def lay_out(self, rules, params, names, time_major, layers, per_layer: bool) -> None:
        """The engine's plan (its own dicts: {module: rule}, {module: [(name, p)]},
        {p: name}, the time-major leaves) and clipping layers; with ``per_layer``, one weak set
        per layer of the uses announced at forward and not recorded yet. Uses of forwards not
        backpropagated yet keep their claim on their module's layer across a re-plan."""
        old = self.open
        self.rules, self.params, self.names, self.time_major = rules, params, names, time_major
        self.layers = layers
        self.layer_of = {m: i for i, layer in enumerate(layers) for m in layer.modules}
        self.open = [weakref.WeakSet() for _ in layers] if per_layer else None
        if old is not None and self.open is not None:
            for group in old:
                for u in list(group):
                    l = self.layer_of.get(u.module)
                    if l is not None:
                        self.open[l].add(u)

    def busy(self) -> bool:
        """Whether a backward's uses are recorded and not clipped yet."""
        return bool(self.queued or self.pending or self.waiting)

    # -- forward: uses --------------------------------------------------------------------
    def new_use(self, module: nn.Module, inputs=None, extra=None) -> Use:
        """A :class:`Use` of ``module`` made at forward time, whose backward will call
        :meth:`record` once. Rules make their uses here so that per-layer clipping knows how
        many uses each layer awaits (a Use made directly is clipped at the end of the backward)."""
        use = Use(module, inputs, extra)
        if self.open is not None:
            self.expect(use)
        return use

    def expect(self, use: Use) -> None:
        """Announce, at forward time, one more :meth:`record` call of ``use`` from the backward:
        a use completed in pieces (each layer and direction of an RNN, each attention projection)
        records once per piece."""
        if self.open is not None:
            use.expected += 1
            self.open[self.layer_of[use.module]].add(use)

    # -- backward -------------------------------------------------------------------------
    def record(self, use: Use) -> bool:
        """Called from a rule's backward once ``use.grads`` is set (and again for each further
        piece of a use announced in pieces, see :meth:`expect`). Returns whether the use entered
        the step: not in a backward that asks for no parameter's gradient
        (``torch.autograd.grad(loss, x)``), which the engine leaves alone."""
        if use.module not in self.rules:
            return False  # made before a re-plan (refresh) that dropped its module: nothing trainable
        if not self.queued or self.queued_cb() is None:
            self.start_backward()
        elif self.owner != threading.get_ident():
            raise RuntimeError(THREADS)
        if self.skip:
            return False
        if not use.recorded:
            if use.spent:
                raise RuntimeError(TWICE)
            use.spent = True
            use.recorded = True
            if use.module in self.time_major:     # (T, B, ...) -> (B, T, ...), as views
                use.inputs = use.inputs.transpose(0, 1)
                use.grads = tuple(None if g is None else g.transpose(0, 1) for g in use.grads)
            g0 = next((g for g in use.grads if g is not None), None)
            use.batch_size = g0.shape[0] if g0 is not None and g0.dim() > 0 else -1
            self.rules[use.module].on_record(use)
            if self.open is None:
                self.pending.append(use)
            else:
                self.waiting.setdefault(self.layer_of[use.module], []).append(use)
        if self.open is not None:
            self.arrived(use)
        return True

    def start_backward(self) -> None:
        """First record of a backward: queue :meth:`finish` for its end. A finish autograd
        dropped unrun (its backward failed) left that backward's uses behind: forget them.
        A backward that asks for no parameter's gradient is left alone to its end; one that asks
        for some but not all is refused (fastclip/passes.py)."""
        if self.queued:
            for u in self.pending:
                u.recorded = False
            self.pending = []
            self.new_backward()
        params = (p for ps in self.params.values() for _, p in ps)
        # The engine's gate, read here: FSDP2 replaces it after attach (Engine.use_gate).
        kind, self.wanted = self.engine.gate.check(params, self.names)
        self.skip = kind == NONE
        self.owner = threading.get_ident()
        if self.skip:
            cb = lambda: self.new_backward()  # noqa: E731
        else:
            cb = lambda: self.finish()  # noqa: E731  (weakly watched: freed unrun if the backward fails)
        self.queued_cb = weakref.ref(cb)
        self.queued = True
        torch.autograd.Variable._execution_engine.queue_callback(cb)

    def arrived(self, use: Use) -> None:
        """Per-layer clipping: one announced record of ``use`` has come; clip its layer now if
        that was the last one the layer awaits."""
        l = self.layer_of[use.module]
        try:
            if l in self.clipped:
                raise RuntimeError(
                    f"fastclip: a use of layer '{self.layers[l].name}' was recorded after the "
                    "layer was clipped in this backward (a rule that makes its Use without "
                    "engine.new_use, a graph backpropagated again together with a new one, or a "
                    "forward run inside the backward); per-layer clipping cannot include it, so the "
                    "step is refused")
            if use.expected > 0:
                use.expected -= 1
                if use.expected == 0:
                    self.open[l].discard(use)
            else:
                self.late.add(l)  # not announced at forward: more may come, clip at the end
            if not self.open[l] and l not in self.late:
                self.clip_layer(l, self.waiting.pop(l))
        except BaseException:
            self.new_backward()  # this backward fails: the next one starts clean
            raise

    def clip_layer(self, l: int, uses: List[Use]) -> None:
        """Per-layer clipping of layer ``l`` to its bound C_l from all of its uses in this
        backward; its squared norms are added to the backward's total, its uses released."""
        self.clipped.add(l)
        B = batch_size(uses, self.sizes)
        self.sizes.extend((type(u.module).__name__, u.batch_size) for u in uses)
        sq = self.engine._clip_layer(uses, B, l)
        self.B = B
        if sq is not None:
            self.sq = sq if self.sq is None else self.sq + sq
        for u in uses:
            u.recorded = False
            self.rules[u.module].release(u)

    def finish(self) -> None:
        """autograd's final callback of a backward that entered the step: flat, the engine's
        step on every recorded use; per layer, the layers still waiting are clipped and the
        backward's per-example norms logged."""
        uses, self.pending, self.queued = self.pending, [], False
        if self.open is None:
            if not uses:
                return
            try:
                self.engine._finalize(uses)
            finally:
                for u in uses:
                    u.recorded = False
            return
        uses = [u for group in self.waiting.values() for u in group]
        self.waiting = {}
        if not uses and self.sq is None:
            self.new_backward()
            return
        try:
            by_layer: Dict[int, List[Use]] = {}
            for u in uses:
                by_layer.setdefault(self.layer_of[u.module], []).append(u)
            for l, group in by_layer.items():
                self.clip_layer(l, group)
            if self.sq is not None:
                self.engine._log(self.sq, self.B)
        finally:
            for u in uses:
                u.recorded = False
            self.new_backward()

    def new_backward(self) -> None:
        """Forget the per-backward state (called when a backward ends or fails)."""
        for group in getattr(self, "waiting", {}).values():
            for u in group:
                u.recorded = False
        self.waiting: Dict[int, List[Use]] = {}  # per-layer: layer -> its uses recorded so far
        self.clipped = set()   # layers clipped in this backward
        self.late = set()      # layers that got a use not announced at forward
        self.sq: Optional[Tensor] = None  # sum over clipped layers of squared norms (B,)
        self.B: Optional[int] = None
        self.sizes: List = []  # (module type, B) of the uses clipped so far, for errors
        self.queued = False
        self.queued_cb = None
        self.skip = False      # this backward asks for no parameter's gradient: left alone
        self.wanted = None     # the parameters it asks for, when not all (passes.SOME)
        self.owner = None      # the thread that runs it

    def clear(self) -> None:
        """Detach: nothing recorded is kept."""
        self.pending.clear()
        self.new_backward()
