"""The engine: attaches to a model and forms clipped gradients in the model's own backward.

One DP step, as the engine runs it:

1. **Plan** (``fastclip/planning.py``, at attach and whenever the trainable parameters change,
   ``refresh``): every module owning trainable parameters gets a rule (``fastclip.layers``) and
   a clipping layer (``fastclip.clipping.group_layers``).
2. **Capture** (``_pre`` / ``_post`` forward hooks): each rule records a ``Use`` of its module
   per call (``new_use``) and skips the non-private parameter-gradient products in the backward,
   delivering the output gradients instead (``record``).
3. **Schedule** (``fastclip/scheduling.py``): when a backward ends (flat clipping) or a layer's
   last use is recorded (``clipping="per_layer"``), the uses are handed to the clipping step.
4. **Clip** (``_clip``, pure functions in ``fastclip/finalize.py``): per-example squared norms
   from each rule's ``sq_norms`` kernel, clip factors ``c_i = min(1, C / ||g_i||)`` and, per
   parameter, the clipped sum ``sum_i c_i g_i`` from its ``clipped`` kernel, added to ``p.grad``
   (several backward calls accumulate like ordinary gradients). The optimizer
   (``fastclip/optim.py``) adds the noise and steps.

The engine owns all of its state (dicts keyed by module or parameter) and hook handles;
``detach()`` removes every hook and leaves the model as it was. Mode "nanobatch" is
:class:`fastclip.nanobatch.NanoBatchEngine` (:func:`make_engine`).
"""
from __future__ import annotations

import threading
import weakref
from collections import defaultdict
from contextlib import contextmanager
from types import MappingProxyType
from typing import Dict, Iterator, List, Mapping, Optional, Tuple

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from .audit import Auditor
from .clipping import (Bound, check_clipping, check_gamma, group_layers, is_automatic,
                       resolve_bounds)
from .finalize import (Groups, batch_size, check_wanted, clipped_sums, forget_memos,
                       group_uses, param_sq_norms, total_sq)
from .heap import keep_heap
from .layers import Pool, Rule, Use
from .layers.generic import mixing_refusal
from .ops import cast
from .passes import Gate
from .planning import Plan, Watch, plan, rebound
from .scheduling import Schedule

MODES = ("auto", "ghost", "direct", "nanobatch")


def _batch_of(args, kwargs) -> Optional[int]:
    """The leading dimension of the first tensor of dimension >= 1 in ``(args, kwargs)``
    (pytree order), or None; plain tensor arguments are looked at without flattening."""
    for a in args:
        if not isinstance(a, Tensor):
            break
        if a.dim() > 0:
            return a.shape[0]
    else:
        if not kwargs:
            return None
    leaves, _ = tree_flatten((args, kwargs))
    return next((t.shape[0] for t in leaves if isinstance(t, Tensor) and t.dim() > 0), None)


LOSS_REDUCTIONS = ("mean", "sum")


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    return mode


def engine_class(mode: str) -> type:
    """The engine of ``mode``: the book-keeping :class:`Engine` ("auto", "ghost", "direct": a
    rule per module, clipped sums formed from the captured uses) or its sibling
    :class:`fastclip.nanobatch.NanoBatchEngine` ("nanobatch": per-example gradients of the whole
    model). Both have the public interface the optimizer, the functional API and the audit use."""
    if mode == "nanobatch":
        from .nanobatch import NanoBatchEngine  # here: nanobatch.py builds on this module
        return NanoBatchEngine
    return Engine


def make_engine(model: nn.Module, mode: str = "auto", **kwargs) -> "Engine":
    """The engine of ``mode`` (:func:`engine_class`) attached to ``model``; ``kwargs`` are
    :class:`Engine`'s. ``Engine(model, mode=...)`` gives the same."""
    return engine_class(check_mode(mode))(model, mode=mode, **kwargs)


def _refuse_batch_statistics(module, args):
    why = mixing_refusal(module)
    if why is not None:
        raise RuntimeError(f"fastclip: {type(module).__name__} was switched to training mode after "
                           f"the model was made private. {why}")


class Engine:
    """Attaches to ``model`` and forms clipped gradients in the model's own backward.

    Args:
        model: the model; every trainable parameter must be covered (a native rule, the generic
            rule, or a clear error at attach time).
        mode: "auto", "ghost" or "direct": how native rules compute norms (all exact);
            "nanobatch": per-example gradients of the whole model, ``nanobatch_size`` examples
            at a time (``fastclip/nanobatch.py``), exact for any model.
        max_grad_norm: C, or None to compute norms only (no gradients are written). With
            ``clipping="per_layer"`` also a sequence of one bound per layer
            (:mod:`fastclip.clipping`).
        loss_reduction: "sum" if the backward's loss is the sum of per-example losses, "mean"
            if it is their mean (gradients are scaled back by the batch size B).
        clipping: "flat" (one bound over all parameters) or "per_layer" (one per layer).
        nanobatch_size: examples per nanobatch in mode "nanobatch" (default 1).
        num_threads: CPU threads the nanobatches are spread over in mode "nanobatch" (default
            ``torch.get_num_threads()``).
        audit: run the first-step audit (:mod:`fastclip.audit`): the first forward with two or
            more examples refuses a model whose examples mix. False skips it: you are then
            responsible for each example's gradient depending on that example alone.

    Attributes:
        layers: the clipping layers (:class:`fastclip.clipping.Layer`), in bound-list order.
        bounds: per-layer bounds (per_layer clipping) or None.
        sensitivity: L2 sensitivity of one backward's clipped sum to one example (C flat,
            sqrt(sum C_l^2) per layer), or None without max_grad_norm.
    """

    # Whether a rule per module captures the forward (the nanobatch engine has none).
    _per_module = True

    def __new__(cls, *args, **kwargs):
        # Engine(model, mode="nanobatch") is the nanobatch engine, as make_engine gives it
        # (copy/pickle call __new__ with no arguments: the class stays as it is).
        if cls is Engine and (args or kwargs):
            mode = args[1] if len(args) > 1 else kwargs.get("mode", "auto")
            cls = engine_class(mode)
        return super().__new__(cls)

    def __init__(self, model: nn.Module, mode: str = "auto", max_grad_norm: Optional[Bound] = None,
                 loss_reduction: str = "mean", clipping: str = "flat", nanobatch_size: int = 1,
                 num_threads: Optional[int] = None, audit: bool = True, gamma: float = 0.01):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        self.mode = check_mode(mode)
        self.clipping = check_clipping(clipping)
        # Automatic clipping's C / (||g|| + gamma) (fastclip/clipping.py: clip_factors).
        self.automatic, self.gamma = is_automatic(clipping), check_gamma(gamma)
        # Adaptive clipping: examples with ||g_i|| <= C since the optimizer's last step.
        self.unclipped = 0
        if loss_reduction not in LOSS_REDUCTIONS:
            raise ValueError(f"loss_reduction must be 'mean' or 'sum', got {loss_reduction!r}")
        self.model = model
        self.loss_reduction = loss_reduction
        self.write_grads = max_grad_norm is not None
        keep_heap()   # the freed heap stays for the next step (fastclip/heap.py)

        # The plan (fastclip/planning.py): {module: rule}, {module: [(name, parameter)]},
        # {parameter: qualified name}, {module: path}, the time-major leaves (_adopt).
        # Per thread (a TorchFunctionMode entered in a pre-hook is the thread's own): the capture
        # state stacks and the B of each model call in progress (properties _states, _batches).
        self._tls = threading.local()
        self._handles: List = []
        self._gate = Gate()      # which backward passes may enter the step (fastclip/passes.py)
        self._pool = Pool()         # scratch buffers lent to the rules' clipped kernels
        # When the uses of a backward are clipped (fastclip/scheduling.py). Rules call its
        # new_use / expect / record through the engine: bound here, no extra call per use.
        self._schedule = Schedule(self)
        self._bind_schedule()
        self._finalizing = False            # rules re-run modules at finalize: no capture then
        self.norms_log: List[Tensor] = []   # per backward: per-example norms (B,), when kept
        self.keep_norms = False
        self.examples = 0                    # examples seen since reset_count()
        # Flat clipping across pipeline stages (fastclip.distributed.PipelineExchange): each
        # backward's squared norms are computed and its uses kept, and no clipped sum is formed
        # until every stage's norms are summed (write_deferred). [(uses, B, local sq (B,))]
        self.defer_flat = False
        self._deferred: List = []
        # FSDP2 (fastclip/fsdp.py): the planned parameters are this rank's shards (DTensors), so
        # each module's full-size clipped sums go to this sink (a ShardedReducer: add, clear) as
        # soon as they are formed, to be reduce-scattered in buckets; None: written to p.grad.
        self.grad_sink = None
        self._init_capture(nanobatch_size, num_threads)
        self._adopt(plan(model, self._per_module))
        # The first-step audit (fastclip/audit.py): models that mix examples are refused.
        self._auditor = Auditor(self, audit)
        self.layers = group_layers(self._params, self._paths)
        self.bounds, self.sensitivity = resolve_bounds(max_grad_norm, clipping, self.layers)
        # Parameters changed after attach (unfrozen, frozen, replaced, modules added) are
        # re-planned by refresh(): it needs the user's bound and, for a list, the layer each
        # bound was given for.
        self._bound_arg = max_grad_norm
        self._bound_of = (dict(zip((layer.name for layer in self.layers), self.bounds))
                          if isinstance(max_grad_norm, (list, tuple)) else None)
        self._grads: Dict[nn.Parameter, weakref.ref] = {}   # p -> the p.grad this engine wrote
        self._versions: Dict[nn.Parameter, int] = {}  # p -> that p.grad's version when written
        self._former: Dict[nn.Parameter, str] = {}  # parameters the model no longer has -> name
        self._set_layout(self.layers, self.bounds)
        self._attach()

    # -- planning (fastclip/planning.py) ----------------------------------------------------
    def _adopt(self, p: Plan) -> None:
        self._names, self._paths, self._params = p.names, p.paths, p.params
        self._rules, self._time_major = p.rules, p.time_major

    def _set_layout(self, layers, bounds):
        """The clipping layout of the current plan, and the snapshot of the model's trainable
        parameters that :meth:`refresh` compares against."""
        self.layers, self.bounds = layers, bounds
        # Flat clipping's C (the total bound) for the finalize; per-layer uses self.bounds.
        self.max_grad_norm = self.sensitivity if bounds is None else None
        self._schedule.lay_out(self._rules, self._params, self._names, self._time_major, layers,
                               per_layer=bounds is not None and self._per_module)
        self._covered = {p for ps in self._params.values() for _, p in ps}
        self._watch = Watch(self.model)

    def refresh(self, full: bool = False) -> bool:
        """Re-plan if the model's trainable parameters changed since the engine planned them
        (``requires_grad_`` flipped, a parameter replaced by ``load_state_dict(assign=True)`` or
        ``module.weight = nn.Parameter(...)``, a module appended), so that they are clipped
        exactly from the next forward on. Called at every model call and by
        ``DPOptimizer.step``; does nothing while a model call or a backward is in progress
        (those keep the plan they started with). ``full``: walk the model even when no module
        registered anything since the last look (the optimizer's step does).

        Per-layer clipping: a float bound is split again over the new layers; with a list of
        bounds, every layer must be one the list was given for (by name), else ValueError. The
        sensitivity never decreases (a layer frozen keeps its share of the noise), so the noise
        of a logical batch straddling the change still covers its earlier physical batches.

        Returns:
            whether it re-planned.

        Raises:
            ValueError: the changed model cannot be made private (an unsupported module, a layer
                without a bound); the engine keeps its previous plan.
        """
        s = self._schedule
        if (not self._attached or self._batches or self._finalizing or s.queued or s.pending
                or s.waiting or self._deferred):
            return False
        if not self._watch.changed(full):
            return False
        new = plan(self.model, self._per_module)
        layers = group_layers(new.params, new.paths)
        bounds, self.sensitivity = rebound(self._bound_arg, self._bound_of, self.clipping,
                                           layers, self.sensitivity)
        for p, name in self._names.items():
            if p not in new.names:
                self._former[p] = name   # for the optimizer's error about a replaced parameter
        self.detach()
        self._adopt(new)
        self._set_layout(layers, bounds)   # uses awaited per layer keep their claim
        self._attach()
        return True

    # -- what the optimizer checks before it releases a step ---------------------------------
    def covers(self, p: Tensor) -> bool:
        """Whether ``p`` is one of the trainable parameters the engine clips."""
        return p in self._covered

    def name_of(self, p: Tensor) -> Optional[str]:
        """``p``'s qualified name in the model (or its former name, "former 'x'", when the
        model no longer holds it), or None."""
        name = self._names.get(p)
        if name is None:
            name = next((n for n, q in self.model.named_parameters(remove_duplicate=False)
                         if q is p), None)
        if name is None and p in self._former:
            name = f"former '{self._former[p]}'"
        elif name is not None:
            name = f"'{name}'"
        return name

    def wrote_grad(self, p: Tensor) -> bool:
        """Whether ``p.grad`` is None or the tensor this engine wrote its clipped sums into (or
        was handed by :meth:`adopt_grads`): a gradient from elsewhere (a raw autograd gradient
        computed while ``p`` was not covered, an assignment to ``p.grad``) is not."""
        g = p.grad
        if g is None:
            return True
        ref = self._grads.get(p)
        return ref is not None and ref() is g

    def grad_edited(self, p: Tensor) -> bool:
        """Whether ``p.grad`` (one this engine wrote) was changed in place since it was written
        (its version counter moved): e.g. divided by a pipeline schedule's ``scale_grads``."""
        g = p.grad
        return g is not None and self.wrote_grad(p) and self._versions.get(p, g._version) != g._version

    def adopt_grads(self, params) -> None:
        """Count the current ``p.grad`` of ``params`` as the engine's (the optimizer's released
        or zeroed gradients, which later backward passes may accumulate into)."""
        for p in params:
            if p.grad is not None:
                self._grads[p] = weakref.ref(p.grad)
                self._versions[p] = p.grad._version

    def add_grad(self, p: Tensor, grad: Tensor) -> None:
        """Add clipped sums ``grad`` into ``p.grad`` (set it if None): the result is the
        engine's only if the ``p.grad`` found was (or there was none)."""
        before = p.grad
        if before is None:
            # In the parameter's own layout, as autograd's AccumulateGrad leaves it: a kernel's
            # transposed view (a conv's kept (K, O) sums) would otherwise reach the optimizer,
            # slower to update and off the one-call native noise path (it takes dense tensors).
            if grad.stride() != p.stride():
                grad = torch.empty_like(p, dtype=grad.dtype).copy_(grad)
            p.grad = grad
        else:
            p.grad.add_(grad)
        ref = self._grads.get(p)
        if before is None or (ref is not None and ref() is before):
            self._grads[p] = weakref.ref(p.grad)
            self._versions[p] = p.grad._version
        else:
            self._grads.pop(p, None)

    def _attach(self):
        self._attached = True       # refresh() re-plans only an attached engine
        # A BatchNorm accepted in eval mode and switched to training mode later (model.train())
        # would mix the examples from its next forward on: refused there, in every mode.
        for module in self.model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                self._handles.append(module.register_forward_pre_hook(_refuse_batch_statistics))
        self._attach_capture()
        self._attach_param_hooks()

    def _init_capture(self, nanobatch_size: int, num_threads: Optional[int]) -> None:
        """The capture strategy's own state, made before the plan (the nanobatch engine's; the
        rules' state is the Engine's own)."""

    def _attach_capture(self):
        """The forward hooks that capture: the model's own call and each module's rule (the
        nanobatch engine wraps the model's forward instead)."""
        # The model's own call tells the batch size B, for leaves fed inputs broadcast over it.
        self._handles.append(self.model.register_forward_pre_hook(self._root_pre, with_kwargs=True))
        self._handles.append(self.model.register_forward_hook(self._root_post, always_call=True))
        for module, rule in self._rules.items():
            self._handles.append(module.register_forward_pre_hook(self._pre, with_kwargs=True))
            self._handles.append(module.register_forward_hook(self._post, with_kwargs=True,
                                                              always_call=True))

    def _attach_param_hooks(self):
        seen = set()
        for params in self._params.values():
            for _, p in params:
                if p not in seen:
                    seen.add(p)
                    self._handles.append(p.register_hook(self._outside_use_hook(p)))

    def detach(self):
        """Remove every hook: the model is exactly as it was before the engine attached."""
        self._attached = False
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._gate.clear()
        self._schedule.clear()

    def set_rule(self, module: nn.Module, rule: Rule):
        """Fix ``module``'s rule for good (a provisional rule resolved at the module's first
        forward, before it makes any use)."""
        self._rules[module] = rule

    def covered(self):
        """[(qualified parameter name, rule name)] for every trainable parameter."""
        out = []
        for module, params in self._params.items():
            for _, p in params:
                out.append((self._names[p], self._rule_name(module)))
        return out

    # -- read-only views for the other modules ---------------------------------------------
    # The audit, validate, functional, the rules and nanobatch read the engine through these,
    # never through its private attributes, so the engine may change how it keeps its state.
    @property
    def finalizing(self) -> bool:
        """Whether the engine is forming clipped sums now (rules re-run modules then), or is
        inside :meth:`no_capture`: forwards run then are not captured."""
        return self._finalizing

    @contextmanager
    def no_capture(self) -> Iterator[None]:
        """Forwards of the model inside the block are not captured (the audit's own forwards);
        the previous state is restored on leaving, also on an error."""
        prev, self._finalizing = self._finalizing, True
        try:
            yield
        finally:
            self._finalizing = prev

    @property
    def auditor(self) -> Auditor:
        """The first-step audit of this engine (:mod:`fastclip.audit`)."""
        return self._auditor

    @property
    def rules(self) -> Mapping[nn.Module, Rule]:
        """{module: its rule} of the current plan, read-only (empty in mode "nanobatch", which
        has no per-module rule)."""
        return MappingProxyType(self._rules)

    def path_of(self, module: nn.Module) -> str:
        """``module``'s qualified path in the model ("<root>" for the model), "?" if the plan
        holds no trainable parameter of it."""
        return self._paths.get(module, "?")

    def is_time_major(self, module: nn.Module) -> bool:
        """Whether ``module`` is a leaf of a time-major (batch_first=False) transformer, which
        sees its batch in dim 1 (see ``_plan_time_major``)."""
        return module in self._time_major

    def params_of(self, module: nn.Module) -> Tuple[Tuple[str, nn.Parameter], ...]:
        """((name in ``module``, parameter), ...) the plan covers through ``module``'s rule (its
        own trainable parameters; :meth:`covered_params` has the qualified names), empty if the plan
        has no rule for ``module``."""
        return tuple(self._params.get(module, ()))

    @property
    def gate(self) -> Gate:
        """The classifier of backward passes in use (:class:`fastclip.passes.Gate`): which
        backwards may enter the clipping step."""
        return self._gate

    def use_gate(self, gate: Gate) -> None:
        """Classify backward passes with ``gate`` from the next backward on, in place of the
        default :class:`fastclip.passes.Gate`; e.g. FSDP2's :class:`fastclip.fsdp.ShardedGate`,
        which asks about the unsharded parameter autograd sees for each shard. Call it right
        after attach, before any backward (``make_private`` does)."""
        if not isinstance(gate, Gate):
            raise TypeError(f"use_gate needs a fastclip.passes.Gate, got {type(gate).__name__}")
        self._gate.clear()
        self._gate = gate

    def covered_params(self) -> List[Tuple[str, nn.Parameter]]:
        """[(qualified name, parameter)] of every trainable parameter the plan covers, each once
        (a tied parameter under its first name), in plan order."""
        seen, out = set(), []
        for ps in self._params.values():
            for _, p in ps:
                if id(p) not in seen:
                    seen.add(id(p))
                    out.append((self._names[p], p))
        return out

    def rule_names(self) -> Dict[nn.Parameter, str]:
        """{parameter: the name of the rule that covers it} for every covered parameter."""
        return {p: self._rule_name(module) for module, ps in self._params.items() for _, p in ps}

    def _rule_name(self, module: nn.Module) -> str:
        return type(self._rules[module]).__name__

    # -- per-thread state -------------------------------------------------------------------
    @property
    def _states(self) -> Dict[nn.Module, List]:
        """This thread's capture state stack per module (a forward in another thread, e.g. an
        evaluation under no_grad, has its own)."""
        try:
            return self._tls.states
        except AttributeError:
            self._tls.states = defaultdict(list)
            return self._tls.states

    @property
    def _batches(self) -> List[Optional[int]]:
        """B of each model call in progress in this thread."""
        try:
            return self._tls.batches
        except AttributeError:
            self._tls.batches = []
            return self._tls.batches

    def current_batch_size(self) -> Optional[int]:
        """B of the innermost model call in progress in this thread (None outside a model call,
        or when its inputs hold no tensor with a batch dimension)."""
        return self._batches[-1] if self._batches else None

    def __getstate__(self):
        # copy.deepcopy(model) copies the hooks with their engine: the per-thread state is made
        # afresh, not copied.
        state = dict(self.__dict__)
        state["_tls"] = None
        for name in ("new_use", "expect", "record"):
            state.pop(name, None)
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._tls = threading.local()
        self._bind_schedule()

    def _bind_schedule(self):
        s = self._schedule
        # Engine.new_use / expect / record, documented in fastclip/scheduling.py.
        self.new_use, self.expect, self.record = s.new_use, s.expect, s.record

    # -- capture ----------------------------------------------------------------------------
    def _root_pre(self, module, args, kwargs):
        self.refresh()   # parameters unfrozen/replaced/added since the plan: clipped from now on
        self._auditor(args, kwargs)   # once: examples must not mix (a flag test afterwards)
        self._batches.append(_batch_of(args, kwargs))

    def _root_post(self, module, args, output):
        if self._batches:
            # Until the training loss has been audited once, the outputs are probes whose
            # backward checks that the loss does not mix examples (fastclip/audit.py).
            return self._auditor.probe(output, self._batches.pop())

    def _expand_broadcast(self, args, kwargs):
        """Inputs with leading dimension 1 while the batch is B != 1 (position ids of shape (1, T),
        a learned token) are expanded to B, as views: each example then has its own output and
        output gradient, so its share of the parameter gradient is seen, not the batch's sum.
        B = 0 (an empty Poisson batch) too: the use then has no example, like the others."""
        B = self.current_batch_size()
        if B is None or B == 1:
            return None
        if not kwargs and all(isinstance(t, Tensor) for t in args) and \
                not any(t.dim() > 0 and t.shape[0] == 1 for t in args):
            return None     # the common call: batch-first tensors, nothing to expand
        leaves, spec = tree_flatten((args, kwargs))
        hit = False
        for i, t in enumerate(leaves):
            if isinstance(t, Tensor) and t.dim() > 0 and t.shape[0] == 1:
                leaves[i] = t.expand(B, *t.shape[1:])
                hit = True
        return tree_unflatten(leaves, spec) if hit else None

    def _pre(self, module, args, kwargs):
        state = new = None
        if torch.is_grad_enabled() and not self._finalizing:
            rule = self._rules[module]
            new = (self._expand_broadcast(args, kwargs)
                   if rule.expand_broadcast and module not in self._time_major else None)
            if new is not None:
                args, kwargs = new
            state = (self._rules[module].pre_forward(self, module, args, kwargs),)
        self._states[module].append(state)
        return new

    def _post(self, module, args, kwargs, output):
        stack = self._states[module]
        state = stack.pop() if stack else None
        if state is None:
            return None
        return self._rules[module].post_forward(self, module, state[0], args, kwargs, output)

    def _outside_use_hook(self, p):
        def hook(grad):
            # Nanobatch mode differentiates the real parameters itself at finalize.
            if grad is not None and not self._finalizing:
                raise RuntimeError(
                    f"fastclip: parameter '{self._names.get(p, '?')}' received a gradient from a "
                    "use outside the leaf module(s) that own it (e.g. a weight passed to a "
                    "functional call in a parent's forward). Its per-example gradient would be "
                    "incomplete, so the step is refused; use the weight through a module instead")
            return grad
        return hook

    # -- the clipping step (fastclip/finalize.py); the schedule calls it ---------------------
    def _finalize(self, uses: List[Use]) -> None:
        """End of a backward, flat clipping: the per-example norms over every parameter the
        backward's ``uses`` touch, clip factors from the one bound C, the clipped sums added to
        ``p.grad`` (across pipeline stages: held back, :meth:`_defer`); the norms logged."""
        B = batch_size(uses)
        self._finalizing = True     # rules re-run modules: no capture
        try:
            sq = (self._defer(uses, B) if self.defer_flat and self.write_grads
                  else self._clip(uses, B, self.max_grad_norm))
        finally:
            self._finalizing = False
        if sq is None:
            return
        scale = float(B) if self.loss_reduction == "mean" else 1.0
        if self.clipping == "adaptive" and self.write_grads:
            self.unclipped += int((sq.sqrt() * scale <= self.max_grad_norm).sum())
        self.examples += B
        if self.keep_norms:
            self.norms_log.append(sq.sqrt() * scale)

    def _clip_layer(self, uses: List[Use], B: int, l: int) -> Optional[Tensor]:
        """Per-layer clipping, inside the backward: layer ``l``'s uses clipped to its bound."""
        prev, self._finalizing = self._finalizing, True  # rules re-run modules: no capture
        try:
            return self._clip(uses, B, self.bounds[l])
        finally:
            self._finalizing = prev

    def _log(self, sq: Tensor, B: int) -> None:
        """Per-layer clipping, end of a backward: its examples counted, the total norms kept."""
        self.examples += B
        if self.keep_norms:
            self.norms_log.append(sq.sqrt() * (float(B) if self.loss_reduction == "mean" else 1.0))

    def _clip(self, uses: List[Use], B: int, C: Optional[float],
              write: bool = True) -> Optional[Tensor]:
        """Per-example squared norms (B,) float64 of the gradient of the parameters ``uses``
        touch (None if they touch no trainable parameter) and, when gradients are written (and
        ``write``), their sums clipped to C added to ``p.grad``. The norms are of the true
        per-example gradients (times B for loss_reduction "mean")."""
        groups = group_uses(uses, self._params)
        if not groups:
            return None
        check_wanted(groups, self._schedule.wanted, self._names)
        try:
            sq = total_sq(self.param_sq_norms(groups), B)
            if write and self.write_grads:
                self._write_clipped(groups, uses, sq, B, C)
        finally:
            forget_memos(uses)
        return sq

    def param_sq_norms(self, groups: Groups) -> Dict[nn.Parameter, Tensor]:
        """Each parameter's per-example squared gradient norm, {p: (B,) float64}, for the uses
        of one clipping step by module (``groups``): what the clip factors come from, and what
        ``fastclip.validate`` reports per parameter. One kernel call per module."""
        return param_sq_norms(groups, self._rules, self.mode)

    def _write_clipped(self, groups: Groups, uses: List[Use], sq: Tensor, B: int, C: float):
        """Add ``sum_i c_i g_i`` to ``p.grad`` for every trainable parameter ``groups`` touches,
        with ``c_i = min(1, C / ||g_i||)`` from the squared norms ``sq`` (FSDP2: to the
        :attr:`grad_sink` instead)."""
        sink = self.grad_sink
        grads = clipped_sums(groups, uses, self._rules, sq, C,
                             float(B) if self.loss_reduction == "mean" else 1.0,
                             self.automatic, self.gamma, self._pool,
                             None if sink is None else sink.add)
        for p, grad in grads.items():
            grad = cast(grad, p.dtype)
            self.add_grad(p, grad if grad.shape == p.shape else grad.view(p.shape))

    # -- flat clipping across pipeline stages (fastclip.distributed.PipelineExchange) -------
    def _defer(self, uses: List[Use], B: int) -> Optional[Tensor]:
        """This backward's per-example squared norms over this stage's parameters, its uses kept
        (with their activations and output gradients) for :meth:`write_deferred` once the other
        stages' norms are known. Nothing is written."""
        sq = self._clip(uses, B, None, write=False)
        if sq is None:
            return None
        self._deferred.append((uses, B, sq))
        return sq

    def deferred_sq_norms(self) -> Tensor:
        """The squared norms of every deferred backward since the last step, concatenated in
        backward order ((sum of B,) float64; empty if none)."""
        if not self._deferred:
            return torch.zeros(0, dtype=torch.float64)
        return torch.cat([sq for _, _, sq in self._deferred])

    def deferred_sizes(self) -> List[int]:
        """B of each deferred backward, in order."""
        return [B for _, B, _ in self._deferred]

    def write_deferred(self, sq_total: Tensor) -> None:
        """Form the clipped sums of every deferred backward from ``sq_total`` (the squared norms
        over the whole model: every stage's, summed), add them to ``p.grad`` and drop the uses."""
        deferred, self._deferred = self._deferred, []
        if sq_total.numel() != sum(B for _, B, _ in deferred):
            raise RuntimeError(f"fastclip: {sq_total.numel()} summed squared norms for "
                               f"{sum(B for _, B, _ in deferred)} examples held back")
        off = 0
        for uses, B, sq in deferred:
            part = sq_total[off:off + B].to(device=sq.device, dtype=torch.float64)
            off += B
            prev, self._finalizing = self._finalizing, True  # rules re-run modules: no capture
            try:
                self._write_clipped(group_uses(uses, self._params), uses, part, B,
                                    self.max_grad_norm)
            finally:
                self._finalizing = prev
                forget_memos(uses)
            for u in uses:
                self._rules[u.module].release(u)

    def drop_deferred(self) -> None:
        """Forget the deferred backward passes (zero_grad): nothing of them is released; also
        the clipped sums the FSDP2 sink (:attr:`grad_sink`) holds."""
        self._deferred = []
        if self.grad_sink is not None:
            self.grad_sink.clear()
