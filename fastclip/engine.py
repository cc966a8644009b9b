"""Single-backward book-keeping engine.

While attached to a model, every leaf module with trainable parameters is captured by its rule
(``fastclip.layers``): the forward records each use, the backward delivers the output gradients
and skips the non-private parameter-gradient products. When the backward ends, ``_finalize``
turns the recorded uses into per-example gradient norms over all parameters, clip factors
``c_i = min(1, C / ||g_i||)`` and, per parameter, the clipped sum ``sum_i c_i g_i`` added to
``p.grad`` (several backward calls accumulate like ordinary gradients).

Per-layer clipping (``clipping="per_layer"``) clips each layer in the backward itself: rules make
their uses with ``new_use`` at forward time, so the engine knows how many uses each layer awaits;
when ``record`` has seen the last one, the layer's norms, clip factors and clipped sums are formed
right there and its uses' tensors are dropped. Uses whose backward never comes (an output not in
the loss) hold nothing up: what is left is clipped by ``_finalize``.

The engine owns all of its state (dicts keyed by module or parameter) and hook handles;
``detach()`` removes every hook and leaves the model as it was.
"""
from __future__ import annotations

import math
import operator
import threading
import weakref
from collections import defaultdict
from contextlib import contextmanager
from types import MappingProxyType
from typing import Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

from .audit import Auditor
from .clipping import (Bound, check_clipping, check_gamma, clip_factors, group_layers,
                       is_automatic, is_per_layer, resolve_bounds)
from .layers import Part, Pool, Rule, Use, cross_inner, rule_for
from .layers.capture import FunctionalRule
from .layers.direct import DIRECT
from .layers.linear import LinearRule
from .layers.generic import GENERIC, mixing_refusal, refusal
from .ops import cast_margin, widened
from .layers.ops_rule import PENDING
from .passes import NONE, THREADS, TWICE, Gate, partial_error

# Bumped whenever any module in the process registers a parameter or a submodule (a parameter
# replaced by assignment or load_state_dict(assign=True), a head appended): an engine then walks
# its model at the next forward to see whether its plan still fits (Engine.refresh).
_STRUCTURE = [0]


def _bump_structure(*args):
    _STRUCTURE[0] += 1


_REGISTRATION_HOOKS = ("register_module_parameter_registration_hook",
                       "register_module_module_registration_hook")
_HOOKED = all(hasattr(nn.modules.module, h) for h in _REGISTRATION_HOOKS)  # torch >= 2.0
if _HOOKED:
    for _register in _REGISTRATION_HOOKS:
        getattr(nn.modules.module, _register)(_bump_structure)

MODES = ("auto", "ghost", "direct", "nanobatch")
_LOW_PRECISION = (torch.float16, torch.bfloat16)


def _widen(uses: List[Use], rules: Dict) -> List:
    """Half / bfloat16 captures of ``uses`` seen as float32 by the rules for one finalize: norms
    and clip factors are computed in float32 or wider (a bf16 squared norm is 2^-8 off, which
    under-clips; an fp16 one overflows and drops the example), and the clipped sum is formed in
    float32 and rounded to the parameter's dtype once (``_write_clipped``). Returns what to put
    back. The generic rule re-runs its module, in the module's own dtype: it widens itself."""
    saved = []
    for u in uses:
        if rules.get(u.module) is GENERIC:
            continue
        if _low_precision(u.inputs, u.grads):
            saved.append((u, u.inputs, u.grads))
            u.inputs, u.grads = tree_map(widened, u.inputs), tree_map(widened, u.grads)
    return saved


def _low_precision(inputs, grads) -> bool:
    """Whether a half / bfloat16 tensor is among ``inputs`` and ``grads`` (any pytree); the
    common capture (a tensor and a tuple of tensors) is looked at without flattening."""
    if (inputs is None or isinstance(inputs, Tensor)) and type(grads) is tuple:
        if inputs is not None and inputs.dtype in _LOW_PRECISION:
            return True
        if all(g is None or isinstance(g, Tensor) for g in grads):
            return any(g is not None and g.dtype in _LOW_PRECISION for g in grads)
    leaves = tree_flatten((inputs, grads))[0]
    return any(isinstance(t, Tensor) and t.dtype in _LOW_PRECISION for t in leaves)


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


def _forget_memos(uses: List[Use]) -> None:
    """End of a clipping step: what the kernels memoised on ``uses`` (``Use.memo``) is dropped,
    also after an error, so no per-example result outlives the step."""
    for u in uses:
        u.memo = None


def _kernel_out(out: Dict[str, Tensor], name: str, module: nn.Module, rule: Rule, kernel: str):
    if name in out:
        return out[name]
    raise RuntimeError(f"fastclip: the {kernel} kernel of {type(rule).__name__} gave no result "
                       f"for the trainable parameter '{name}' of {type(module).__name__} "
                       f"(it gave {sorted(out)})")


# The uses of one clipping step by module: {module: (its uses, its trainable (name, parameter)s)}.
Groups = Dict[nn.Module, Tuple[List[Use], List[Tuple[str, nn.Parameter]]]]


# Rules whose use is one (input, output gradient) pair that may be recorded time-major and
# transposed to batch-first (Linear, LayerNorm and the other functional rules).
_TRANSPOSABLE = (LinearRule, FunctionalRule)
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


def _is_time_major(module: nn.Module) -> bool:
    """Whether ``module`` is a torch transformer container built with batch_first=False."""
    if isinstance(module, nn.Transformer):
        return not module.batch_first
    if isinstance(module, (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)):
        return not module.self_attn.batch_first
    if isinstance(module, (nn.TransformerEncoder, nn.TransformerDecoder)):
        return len(module.layers) > 0 and _is_time_major(module.layers[0])
    return False


def _is_leaf(module: nn.Module) -> bool:
    """No descendant of ``module`` holds a trainable parameter."""
    return not any(p.requires_grad for c in module.children() for p in c.parameters())


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

        self._rules: Dict[nn.Module, Rule] = {}
        self._params: Dict[nn.Module, List] = {}       # module -> [(name, parameter)]
        self._names: Dict[nn.Parameter, str] = {}      # parameter -> qualified name, for errors
        # Per thread (a TorchFunctionMode entered in a pre-hook is the thread's own): the capture
        # state stacks and the B of each model call in progress (properties _states, _batches).
        self._tls = threading.local()
        self._handles: List = []
        self._gate = Gate()      # which backward passes may enter the step (fastclip/passes.py)
        self._pool = Pool()         # scratch buffers lent to the rules' clipped kernels
        self._pending: List[Use] = []
        self._queued = False
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
        self._paths: Dict[nn.Module, str] = {}
        self._init_capture(nanobatch_size, num_threads)
        self._plan()
        self._plan_time_major()
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
        self._new_backward()
        self._attach()

    # -- planning ---------------------------------------------------------------------------
    def _plan(self):
        for name, p in self.model.named_parameters():
            self._names.setdefault(p, name)
        # Every module that mixes examples is named at once (a ResNet has 20 BatchNorms).
        mixing = [(path or "<root>", m) for path, m in self.model.named_modules()
                  if mixing_refusal(m) is not None]
        if mixing:
            names = ", ".join(f"'{label}' ({type(m).__name__})" for label, m in mixing)
            raise ValueError(f"fastclip cannot make {len(mixing)} module(s) private: {names}. "
                             f"{mixing_refusal(mixing[0][1])}")
        for path, module in self.model.named_modules(remove_duplicate=True):
            label = path or "<root>"
            why = refusal(module) if self._per_module else mixing_refusal(module)
            if why is not None:
                raise ValueError(f"fastclip cannot make module '{label}' ({type(module).__name__}) "
                                 f"private: {why}")
            own = [(n, p) for n, p in module.named_parameters(recurse=False) if p.requires_grad]
            if not own:
                continue
            if any(isinstance(p, nn.parameter.UninitializedParameter) for _, p in own):
                raise ValueError(f"module '{label}' has uninitialized (lazy) parameters; run one "
                                 "forward pass before making the model private")
            self._paths[module] = label
            self._params[module] = own
            if not self._per_module:
                continue  # the whole model's gradient per example: no per-module rule
            rule = rule_for(module)
            if rule is None:
                # A leaf (no descendant holds trainable parameters): the native rule of the
                # torch ops its forward applies to them, resolved at its first forward
                # (layers/ops_rule.py). Parameters used beside submodules with parameters (a
                # position table, a class token): exact through those ops (layers/direct.py).
                rule = PENDING if _is_leaf(module) else DIRECT
            why = rule.check(module)
            if why is not None:
                raise ValueError(f"fastclip cannot make module '{label}' ({type(module).__name__}) "
                                 f"private: {why}")
            self._rules[module] = rule

    def _plan_time_major(self):
        """Modules whose batch dimension is 1: the leaves of a time-major (batch_first=False)
        transformer layer, which see (T, B, E). MultiheadAttention handles its own layout (it
        works batch-first inside); a leaf whose rule cannot take a transposed use is refused."""
        self._time_major = set()
        if not self._per_module:
            return      # whole-model per-example gradients: no per-module layout
        for path, module in self.model.named_modules():
            if not _is_time_major(module):
                continue
            attention = [m for m in module.modules() if isinstance(m, nn.MultiheadAttention)]
            inside = {id(m) for a in attention for m in a.modules()}
            for sub_path, leaf in module.named_modules(prefix=path):
                if id(leaf) in inside or leaf not in self._params:
                    continue
                if not isinstance(self._rules[leaf], _TRANSPOSABLE):
                    raise ValueError(
                        f"fastclip cannot make module '{sub_path}' ({type(leaf).__name__}) private: "
                        f"it runs inside the time-major (batch_first=False) '{path or '<root>'}' "
                        f"({type(module).__name__}), where only Linear and normalisation layers are "
                        "supported; construct the transformer with batch_first=True, or use "
                        "mode='nanobatch'")
                self._time_major.add(leaf)

    def _set_layout(self, layers, bounds):
        """The clipping layout of the current plan, and the snapshot of the model's trainable
        parameters that :meth:`refresh` compares against."""
        self.layers, self.bounds = layers, bounds
        # Flat clipping's C (the total bound) for the finalize; per-layer uses self.bounds.
        self.max_grad_norm = self.sensitivity if bounds is None else None
        # Per-layer clipping in the backward (record): each module's layer, and per layer the
        # uses announced at forward and not recorded yet (weak: a forward never backpropagated
        # frees its uses, and with them its claim on the layer).
        self._layer_of = {m: i for i, layer in enumerate(layers) for m in layer.modules}
        self._open = ([weakref.WeakSet() for _ in layers]
                      if bounds is not None and self._per_module else None)
        self._covered = {p for ps in self._params.values() for _, p in ps}
        self._snapshot, self._all = self._scan()
        self._flags = [p.requires_grad for p in self._all]
        self._seen = _STRUCTURE[0]

    def _scan(self):
        """(every module owning trainable parameters followed by those parameters, in tree
        order; every parameter): the first changes when a parameter is unfrozen, frozen or
        replaced, or a module holding one is added or swapped. A bare walk of the module tree
        (no names, no memo)."""
        trainable, every = [], []
        stack = [self.model]
        while stack:
            m = stack.pop()
            if m is None:
                continue
            ps = m._parameters
            if ps:
                mark = True
                for p in ps.values():
                    if p is None:
                        continue
                    every.append(p)
                    if p.requires_grad:
                        if mark:
                            trainable.append(m)
                            mark = False
                        trainable.append(p)
            if m._modules:
                stack.extend(m._modules.values())
        return trainable, every

    def _changed(self, full: bool) -> bool:
        """Whether the model's trainable parameters differ from the plan's. At a forward (not
        ``full``) the walk runs only if some module registered a parameter or submodule since
        (torch's global registration hooks; an assignment straight into ``_parameters`` is seen
        at the optimizer's step, which always walks) or a parameter's requires_grad flipped:
        ~100 attribute reads for 100 parameters instead of a walk over every module."""
        if not full and _HOOKED and _STRUCTURE[0] == self._seen and \
                [p.requires_grad for p in self._all] == self._flags:
            return False
        trainable, every = self._scan()
        if len(trainable) == len(self._snapshot) and all(map(operator.is_, trainable,
                                                              self._snapshot)):
            self._all, self._flags = every, [p.requires_grad for p in every]
            self._seen = _STRUCTURE[0]
            return False
        return True

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
        if (not self._attached or self._batches or self._finalizing or self._queued
                or self._pending or self._waiting or self._deferred):
            return False
        if not self._changed(full):
            return False
        self._replan()
        return True

    def _replan(self):
        old = (self._names, self._paths, self._params, self._rules, self._time_major)
        self._names, self._paths, self._params, self._rules = {}, {}, {}, {}
        try:
            self._plan()
            self._plan_time_major()
            layers = group_layers(self._params, self._paths)
            bounds = self._rebound(layers)
        except BaseException:
            self._names, self._paths, self._params, self._rules, self._time_major = old
            raise
        for p, name in old[0].items():
            if p not in self._names:
                self._former[p] = name   # for the optimizer's error about a replaced parameter
        old_open = self._open
        self.detach()
        self._set_layout(layers, bounds)
        if old_open is not None:
            # Uses of forwards not backpropagated yet keep their claim on their module's layer.
            for group in old_open:
                for u in list(group):
                    l = self._layer_of.get(u.module)
                    if l is not None:
                        self._open[l].add(u)
        self._attach()

    def _rebound(self, layers) -> Optional[tuple]:
        """Per-layer bounds for a re-planned model; updates the sensitivity (never down)."""
        if self._bound_arg is None or not is_per_layer(self.clipping):
            return None
        if self._bound_of is None:
            bounds, sensitivity = resolve_bounds(self._bound_arg, self.clipping, layers)
        else:
            new = [layer.name for layer in layers if layer.name not in self._bound_of]
            if new:
                raise ValueError(
                    f"fastclip: clipping='per_layer' was given one bound per layer for the layers "
                    f"{list(self._bound_of)}, but the model's trainable parameters changed after "
                    f"make_private (unfrozen, replaced or added) and layer(s) {new} have no bound; "
                    "nothing can be clipped for them, so the forward is refused. Fix: pass one "
                    "float max_grad_norm (split evenly over the trainable layers), or make the "
                    "model private again with one bound per layer of: "
                    + ", ".join(layer.name for layer in layers))
            bounds = tuple(self._bound_of[layer.name] for layer in layers)
            sensitivity = math.sqrt(sum(c * c for c in bounds))
        self.sensitivity = max(self.sensitivity, sensitivity)
        return bounds

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

    def note_grad(self, p: Tensor, before: Optional[Tensor]) -> None:
        """After writing clipped sums into ``p.grad`` (added to ``before``, the p.grad found):
        the result is the engine's only if ``before`` was."""
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
        self._pending.clear()
        self._gate.clear()
        self._new_backward()

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
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._tls = threading.local()

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

    # -- uses -------------------------------------------------------------------------------
    def new_use(self, module: nn.Module, inputs=None, extra=None) -> Use:
        """A :class:`Use` of ``module`` made at forward time, whose backward will call
        :meth:`record` once. Rules make their uses here so that per-layer clipping knows how
        many uses each layer awaits (a Use made directly is clipped at the end of the backward)."""
        use = Use(module, inputs, extra)
        if self._open is not None:
            self.expect(use)
        return use

    def expect(self, use: Use):
        """Announce, at forward time, one more :meth:`record` call of ``use`` from the backward:
        a use completed in pieces (each layer and direction of an RNN, each attention projection)
        records once per piece."""
        if self._open is not None:
            use.expected += 1
            self._open[self._layer_of[use.module]].add(use)

    def record(self, use: Use) -> bool:
        """Called from a rule's backward once ``use.grads`` is set (and again for each further
        piece of a use announced in pieces, see :meth:`expect`). Returns whether the use entered
        the step: not in a backward that asks for no parameter's gradient
        (``torch.autograd.grad(loss, x)``), which the engine leaves alone."""
        if use.module not in self._rules:
            return False  # made before a re-plan (refresh) that dropped its module: nothing trainable
        if not self._queued or self._queued_cb() is None:
            self._start_backward()
        elif self._owner != threading.get_ident():
            raise RuntimeError(THREADS)
        if self._skip:
            return False
        if not use.recorded:
            if use.spent:
                raise RuntimeError(TWICE)
            use.spent = True
            use.recorded = True
            if use.module in self._time_major:     # (T, B, ...) -> (B, T, ...), as views
                use.inputs = use.inputs.transpose(0, 1)
                use.grads = tuple(None if g is None else g.transpose(0, 1) for g in use.grads)
            g0 = next((g for g in use.grads if g is not None), None)
            use.batch_size = g0.shape[0] if g0 is not None and g0.dim() > 0 else -1
            self._rules[use.module].on_record(use)
            if self._open is None:
                self._pending.append(use)
            else:
                self._waiting.setdefault(self._layer_of[use.module], []).append(use)
        if self._open is not None:
            self._arrived(use)
        return True

    def _start_backward(self):
        """First record of a backward: queue the finalize for its end. A finalize autograd
        dropped unrun (its backward failed) left that backward's uses behind: forget them.
        A backward that asks for no parameter's gradient is left alone to its end; one that asks
        for some but not all is refused (fastclip/passes.py)."""
        if self._queued:
            for u in self._pending:
                u.recorded = False
            self._pending = []
            self._new_backward()
        params = (p for ps in self._params.values() for _, p in ps)
        kind, self._wanted = self._gate.check(params, self._names)
        self._skip = kind == NONE
        self._owner = threading.get_ident()
        if self._skip:
            cb = lambda: self._new_backward()  # noqa: E731
        else:
            cb = lambda: self._finalize()  # noqa: E731  (weakly watched: freed unrun if the backward fails)
        self._queued_cb = weakref.ref(cb)
        self._queued = True
        torch.autograd.Variable._execution_engine.queue_callback(cb)

    def _arrived(self, use: Use):
        """Per-layer clipping: one announced record of ``use`` has come; clip its layer now if
        that was the last one the layer awaits."""
        l = self._layer_of[use.module]
        try:
            if l in self._clipped:
                raise RuntimeError(
                    f"fastclip: a use of layer '{self.layers[l].name}' was recorded after the layer "
                    "was clipped in this backward (a rule that makes its Use without "
                    "engine.new_use, a graph backpropagated again together with a new one, or a "
                    "forward run inside the backward); per-layer clipping cannot include it, so the "
                    "step is refused")
            if use.expected > 0:
                use.expected -= 1
                if use.expected == 0:
                    self._open[l].discard(use)
            else:
                self._late.add(l)  # not announced at forward: more may come, clip at the end
            if not self._open[l] and l not in self._late:
                self._clip_layer(l, self._waiting.pop(l))
        except BaseException:
            self._new_backward()  # this backward fails: the next one starts clean
            raise

    def _new_backward(self):
        """Forget the per-backward state (called when a backward ends or fails)."""
        for group in getattr(self, "_waiting", {}).values():
            for u in group:
                u.recorded = False
        self._waiting: Dict[int, List[Use]] = {}  # per-layer: layer -> its uses recorded so far
        self._clipped = set()   # layers clipped in this backward
        self._late = set()      # layers that got a use not announced at forward
        self._sq: Optional[Tensor] = None  # sum over clipped layers of squared norms (B,)
        self._B: Optional[int] = None
        self._sizes: List = []  # (module type, B) of the uses clipped so far, for errors
        self._queued = False
        self._queued_cb = None
        self._skip = False      # this backward asks for no parameter's gradient: left alone
        self._wanted = None     # the parameters it asks for, when not all (passes.SOME)
        self._owner = None      # the thread that runs it

    # -- finalize ---------------------------------------------------------------------------
    def _finalize(self):
        uses, self._pending, self._queued = self._pending, [], False
        if self._open is not None:
            uses = [u for group in self._waiting.values() for u in group]
            self._waiting = {}
            if not uses and self._sq is None:
                self._new_backward()
                return
        elif not uses:
            return
        self._finalizing = True
        try:
            self._clip(uses)
        finally:
            self._finalizing = False
            for u in uses:
                u.recorded = False
            if self._open is not None or self.bounds is not None:
                self._new_backward()

    def _clip(self, uses: List[Use]):
        """Clip the uses of one backward and log the per-example norms: flat, all of them
        together; per layer, the uses of each layer not clipped yet in this backward."""
        if self.bounds is None:
            B = self._batch_size(uses)
            sq = (self._defer(uses, B) if self.defer_flat and self.write_grads
                  else self._clip_params(uses, B, self.max_grad_norm))
            if sq is not None and self.clipping == "adaptive" and self.write_grads:
                scale = float(B) if self.loss_reduction == "mean" else 1.0
                self.unclipped += int((sq.sqrt() * scale <= self.max_grad_norm).sum())
        else:
            by_layer: Dict[int, List[Use]] = {}
            for u in uses:
                by_layer.setdefault(self._layer_of[u.module], []).append(u)
            for l, group in by_layer.items():
                self._clip_layer(l, group)
            sq, B = self._sq, self._B
        if sq is None:
            return
        scale = float(B) if self.loss_reduction == "mean" else 1.0
        self.examples += B
        if self.keep_norms:
            self.norms_log.append(sq.sqrt() * scale)

    def _groups(self, uses: List[Use]) -> Groups:
        """The uses of one clipping step by module, in order, with each module's trainable
        parameters (modules without one left out): each rule's kernels run once per module."""
        by_module: Dict[nn.Module, List[Use]] = {}
        for u in uses:
            us = by_module.get(u.module)
            if us is None:
                by_module[u.module] = [u]
            else:
                us.append(u)
        groups: Groups = {}
        for m, us in by_module.items():
            named = [(n, p) for n, p in self._params[m] if p.requires_grad]
            if named:
                groups[m] = (us, named)
        return groups

    def _check_wanted(self, groups: Groups) -> None:
        """Refuse a backward that asked for some parameters' gradients only (passes.SOME) when
        ``groups`` touches a trainable parameter it did not ask for."""
        if self._wanted is not None:
            missed = list({p: None for _, named in groups.values() for _, p in named
                           if p not in self._wanted})
            if missed:
                raise partial_error(missed, self._names)

    @contextmanager
    def _widened(self, uses: List[Use]) -> Iterator[None]:
        """``uses``' half / bfloat16 captures seen as float32 inside the block (:func:`_widen`),
        put back on leaving it, also on an error."""
        saved = _widen(uses, self._rules)
        try:
            yield
        finally:
            for u, inputs, grads in saved:
                u.inputs, u.grads = inputs, grads

    def _defer(self, uses: List[Use], B: int) -> Optional[Tensor]:
        """Flat clipping across pipeline stages: this backward's per-example squared norms over
        this stage's parameters, its uses kept (with their activations and output gradients) for
        :meth:`write_deferred` once the other stages' norms are known. Nothing is written."""
        groups = self._groups(uses)
        if not groups:
            return None
        self._check_wanted(groups)
        with self._widened(uses):
            try:
                sq = self._sq_norms(groups, B)
            finally:
                _forget_memos(uses)
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
            with self._widened(uses):
                try:
                    self._write_clipped(self._groups(uses), uses, part, B, self.max_grad_norm)
                finally:
                    self._finalizing = prev
                    _forget_memos(uses)
            for u in uses:
                self._rules[u.module].release(u)

    def drop_deferred(self) -> None:
        """Forget the deferred backward passes (zero_grad): nothing of them is released; also
        the clipped sums the FSDP2 sink (:attr:`grad_sink`) holds."""
        self._deferred = []
        if self.grad_sink is not None:
            self.grad_sink.clear()

    def _clip_layer(self, l: int, uses: List[Use]):
        """Per-layer clipping of layer ``l`` to its bound C_l from all of its uses in this
        backward; its squared norms are added to the backward's total, its uses released."""
        self._clipped.add(l)
        B = self._batch_size(uses, self._sizes)
        self._sizes.extend((type(u.module).__name__, u.batch_size) for u in uses)
        prev, self._finalizing = self._finalizing, True  # rules re-run modules: no capture
        try:
            sq = self._clip_params(uses, B, self.bounds[l])
        finally:
            self._finalizing = prev
        self._B = B
        if sq is not None:
            self._sq = sq if self._sq is None else self._sq + sq
        for u in uses:
            u.recorded = False
            self._rules[u.module].release(u)

    @staticmethod
    def _batch_size(uses: List[Use], earlier: Sequence = ()) -> int:
        """The B every use (and every earlier use of the backward, ``earlier``) agrees on."""
        sizes = {u.batch_size for u in uses}
        sizes.update(b for _, b in earlier)
        if len(sizes) != 1 or -1 in sizes:
            detail = ", ".join(f"{n}: {b}" for n, b in list(earlier) + [
                (type(u.module).__name__, u.batch_size) for u in uses])
            raise ValueError(f"fastclip: batch sizes differ between layer uses in one backward "
                             f"({detail}); every module must see the same batch, batch dimension first")
        return sizes.pop()

    def _clip_params(self, uses: List[Use], B: int, C: Optional[float]) -> Optional[Tensor]:
        """Per-example squared norms (B,) float64 of the gradient of the parameters ``uses``
        touch (None if they touch no trainable parameter) and, when gradients are written, their
        sums clipped to C added to ``p.grad``. The norms are of the true per-example gradients
        (times B for loss_reduction "mean")."""
        groups = self._groups(uses)
        if not groups:
            return None
        self._check_wanted(groups)
        with self._widened(uses):
            try:
                sq = self._sq_norms(groups, B)
                if self.write_grads:
                    self._write_clipped(groups, uses, sq, B, C)
            finally:
                _forget_memos(uses)
        return sq

    def param_sq_norms(self, groups: Groups) -> Dict[nn.Parameter, Tensor]:
        """Each parameter's per-example squared gradient norm, {p: (B,) float64}, for the uses
        of one clipping step by module (``groups``): what :meth:`_sq_norms` sums, and what
        ``fastclip.validate`` reports per parameter. One kernel call per module."""
        out: Dict[nn.Parameter, Tensor] = {}
        tied = False
        for m, (us, named) in groups.items():
            rule = self._rules[m]
            sqs = rule.sq_norms(m, us, self.mode)
            for n, p in named:
                sq = (sqs[n] if n in sqs else _kernel_out(sqs, n, m, rule, "sq_norms")
                      ).to(torch.float64)
                prev = out.get(p)
                if prev is None:
                    out[p] = sq
                else:
                    out[p], tied = prev + sq, True
        if tied:
            self._add_cross_terms(groups, out)
        return out

    def _add_cross_terms(self, groups: Groups, out: Dict[nn.Parameter, Tensor]) -> None:
        """A parameter shared between modules (tied weights): ||sum of parts||^2 = the sum of
        the parts' norms (in ``out``) + 2 * their inner products, exact without a per-example
        copy of every part where a cross kernel is registered."""
        parts: Dict[nn.Parameter, List[Part]] = {}
        for m, (us, named) in groups.items():
            for n, p in named:
                parts.setdefault(p, []).append(Part(m, n, us))
        for p, ps in parts.items():
            for i, a in enumerate(ps):
                for b in ps[i + 1:]:
                    out[p] = out[p] + 2 * cross_inner(self._rules[a.module], a,
                                                      self._rules[b.module], b,
                                                      self.mode).to(torch.float64)

    def _sq_norms(self, groups: Groups, B: int) -> Tensor:
        """sum over the parameters ``groups`` touch of each example's squared gradient norm,
        (B,) float64."""
        parts = self.param_sq_norms(groups)
        ref = next(iter(parts))
        sq = torch.zeros(B, dtype=torch.float64, device=ref.device)
        for part in parts.values():
            sq += part
        return sq

    def _write_clipped(self, groups: Groups, uses: List[Use], sq: Tensor,
                       B: int, C: float):
        """Add ``sum_i c_i g_i`` to ``p.grad`` for every trainable parameter ``groups`` touches,
        with ``c_i = min(1, C / ||g_i||)`` from the squared norms ``sq`` (times the loss scale)."""
        scale = float(B) if self.loss_reduction == "mean" else 1.0
        norms = sq.to(torch.float64).sqrt() * scale
        bad = ~torch.isfinite(norms)
        by_dtype: Dict[torch.dtype, Tensor] = {}

        def factors(dtype: torch.dtype) -> Tensor:
            # float64 factors; C shrunk by the margin of the dtype the sum is released in, so
            # rounding cannot lift an example's contribution above C (ops.cast_margin).
            if dtype not in by_dtype:
                c = clip_factors(norms, C * (1.0 - cast_margin(dtype)), self.automatic,
                                 self.gamma) * scale
                by_dtype[dtype] = torch.where(bad, torch.zeros_like(c), c)
            return by_dtype[dtype]

        if bad.any():
            # An example whose gradient is not finite (an overflow in its forward) must not
            # poison the sum, nor show in it: it contributes nothing, like an absent example.
            for u in uses:
                self._rules[u.module].zero_examples(u, bad)
                u.memo = None   # per-example results memoised from the bad rows
        grads: Dict[nn.Parameter, Tensor] = {}
        for m, (us, named) in groups.items():
            rule = self._rules[m]
            # One call per module; per parameter dtype when they differ (the clip factors are
            # shrunk by the margin of the dtype each sum is released in).
            dtypes = [named[0][1].dtype]
            for _, p in named:
                if p.dtype not in dtypes:
                    dtypes.append(p.dtype)
            for dtype in dtypes:
                sums = rule.clipped(m, us, factors(dtype), self._pool)
                if self.grad_sink is not None:
                    # FSDP2: p is this rank's shard; the module's full-size sums are handed to
                    # the bucketed reduce-scatter now (fastclip/fsdp.py), none is held here.
                    self.grad_sink.add([(p, _kernel_out(sums, n, m, rule, "clipped"))
                                        for n, p in named if p.dtype is dtype])
                    del sums
                    continue
                for n, p in named:
                    if p.dtype is dtype:
                        g = sums[n] if n in sums else _kernel_out(sums, n, m, rule, "clipped")
                        prev = grads.get(p)
                        grads[p] = g if prev is None else prev + g
        for p, grad in grads.items():
            grad = grad.to(p.dtype).view(p.shape)
            before = p.grad
            if p.grad is None:
                p.grad = grad
            else:
                p.grad.add_(grad)
            self.note_grad(p, before)
