"""Per-layer rules: how the engine captures a leaf module's uses and turns them into
per-example gradient norms and clipped gradient sums.

A rule is registered for module types with ``@register(nn.Linear, ...)``. Lookup walks the
module's MRO, so subclasses are covered; a rule may still decline a module (``supports``), for
example a Linear subclass whose ``forward`` is not Linear's. Every leaf module with trainable
parameters that no native rule takes is covered exactly by the generic rule (``generic.py``).

Writing a rule for your own layer (README.md, "Your own layers", has it whole and tested)::

    from fastclip.layers import OutputTapRule, register

    @register(MyLayer)
    class MyLayerRule(OutputTapRule):   # the capture: each call's Use (inputs, grads)
        def per_example(self, module, uses):   # {name: (B, *shape)}, summed over the uses
            A = torch.cat([u.inputs.flatten(1, -2) for u in uses], 1)     # the calls' inputs
            G = torch.cat([u.grads[0].flatten(1, -2) for u in uses], 1)   # output gradients
            return {"weight": torch.einsum("bti,bto->bio", A, G), "bias": G.sum(1)}

The capture comes from a strategy base class (below); a rule capturing on its own writes
``pre_forward`` / ``post_forward`` (see :class:`Rule`).

``sq_norms(module, uses, method)`` and ``clipped(module, uses, c, pool)`` default to
``per_example``; a rule overrides them to skip forming per-example gradients (a ghost norm, one
GEMM for the clipped sum: ``linear.py``).

Capture strategies (how a rule's uses get their inputs and output gradients while its
parameters get no autograd gradient); the ones that watch torch calls are one mode base class,
``capture.CaptureMode`` (a TorchFunctionMode active during one module's forward, one
``match(func, args, kwargs)`` hook):

* functional call keyed by the torch op (``capture.py``'s ``_Mode``, ``linear.py``'s
  ``_Capture``; ``ops_rule.py``'s ``_OpsMode`` for leaves of any class): the module's call of
  its torch function on its own weight runs in a capturing autograd Function;
* direct follow (``direct.py``'s ``_Follow``): a parameter a module uses itself beside children
  is followed through unbatched ops to the first op mixing it with batched data;
* output tap (``capture.OutputTapRule``; the generic rule, ``generic.py``, through the same
  ``_Tap``): parameters detached during the forward, outputs tapped, the use holding the inputs
  the rule asks for (``tap_inputs``) and the output gradients; a subclass writes only
  ``per_example`` (the generic rule: exact per-example VJPs of the module at finalize) (no mode);
* self-capture of ``fastclip.nn`` modules (``ModuleCaptureRule``): the modules' own Functions
  record their pieces (no mode).
"""
from __future__ import annotations

import math
from typing import Any, Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_map

from ..ops import cast


class Use:
    """One call of a leaf module inside a forward pass, completed by its backward.

    Attributes:
        module: the leaf module that was called.
        inputs: what the rule needs of the call's inputs (detached), set at forward or backward.
        grads: gradients at the call's outputs, set by the backward; a tuple of tensors
            (or None for an output that received no gradient).
        batch_size: B, the size of the leading dimension of the output gradients.
        expected: ``engine.record`` calls the forward announced and the backward has not made
            yet (``engine.new_use`` / ``engine.expect``; per-layer clipping only).
        recorded: whether the engine holds the use for the backward in progress.
        spent: whether a backward has taken the use into a step (a graph backpropagated again
            would count its examples twice: the engine refuses it).
        memo: what a rule's kernels keep of the use within one clipping step (per-example
            gradients formed by the norm pass for the clipped sum); the engine clears it when
            the step ends, when it zeroes examples, and ``release`` clears it.
    """

    __slots__ = ("module", "inputs", "grads", "batch_size", "extra", "expected", "recorded",
                 "spent", "memo", "__weakref__")

    def __init__(self, module: nn.Module, inputs: Any = None, extra: Any = None):
        self.module = module
        self.inputs = inputs
        self.grads: Optional[Tuple[Optional[Tensor], ...]] = None
        self.batch_size = -1
        self.extra = extra
        self.expected = 0
        self.recorded = False
        self.spent = False
        self.memo: Any = None


class Rule:
    """Base class of a layer rule. One instance serves every module of its types.

    Capture (forward time): ``pre_forward`` and ``post_forward`` are called around the module's
    forward while gradients are enabled; they must arrange for the module's trainable parameters
    to receive NO gradient through autograd and for ``engine.record(use)`` to be called from the
    backward with the use's output gradients. Make uses with ``engine.new_use(module, ...)``:
    the engine then knows how many uses each layer awaits (per-layer clipping clips a layer in
    the backward as soon as its last use is recorded; a ``Use`` made directly is clipped at the
    end of the backward instead).

    Finalize (after the backward): pure kernels called once per module and clipping step with
    ``uses``, the module's recorded uses in it, returning one entry per trainable parameter name
    of the module (``c`` = per-example clip factors times the loss scale, (B,)):

    * ``per_example(module, uses) -> {name: (B, *shape)}``: the per-example gradients, summed
      over the uses. Enough on its own: the two below default to it.
    * ``sq_norms(module, uses, method) -> {name: (B,)}``: their squared norms, where a kernel can
      avoid forming them (a ghost norm).
    * ``clipped(module, uses, c, pool) -> {name: Tensor}``: ``sum_i c_i grad_i``, shaped like the
      parameter; ``pool`` lends scratch buffers (:class:`Pool`).

    Work shared between the two passes of one step goes in ``use.memo`` (cleared by the engine
    when the step ends). A parameter shared between modules (tied weights) is exact: the engine
    adds each module's part and twice the inner products of the parts (:func:`register_cross`,
    else from ``per_example``).
    """

    # Inputs with leading dimension 1 while the batch is B are expanded to B before the module
    # runs (the engine's _expand_broadcast): right for batch-first inputs, wrong for modules whose
    # inputs have other leading dims (time-major sequences, (layers, B, h) states, (L, S) masks).
    expand_broadcast = True

    # Whether ``clipped`` takes half / bfloat16 captures as recorded and forms its sums in
    # float32 itself: the engine then skips its float32 copy of the module's captures for that
    # call (``fastclip.finalize.widened_module``), and the factor the rule rescales by c is
    # widened in the same pass as the rescaling (:func:`scaled_rows`), so no float32 copy of it
    # is made at all. False: ``clipped`` sees float32 (or wider) captures.
    widens_in_clipped = False

    def supports(self, module: nn.Module) -> bool:
        return True

    def check(self, module: nn.Module) -> Optional[str]:
        """Why this rule cannot make ``module`` private (an option it cannot honour), or None.
        Called when the engine attaches, so the error comes before any training."""
        return None

    def on_record(self, use: Use) -> None:
        """Called in the backward as soon as ``use.grads`` is set. A rule whose per-example
        gradients are small (a normalisation layer's (B, C)) can reduce the use here — store
        them in ``use.extra`` and drop ``use.inputs`` / ``use.grads`` — so the activation-sized
        tensors are freed during the backward instead of being held until its end."""

    def zero_examples(self, use: Use, bad: Tensor) -> None:
        """Zero the rows of the examples ``bad`` (B,) bool in everything the finalize reads of
        ``use``, so they contribute nothing to the clipped sum (0 * NaN is NaN in a product, so a
        zero clip factor alone is not enough). Copies, never writes into autograd's tensors."""
        use.inputs = zero_rows(use.inputs, bad)
        use.grads = zero_rows(use.grads, bad)

    def release(self, use: Use) -> None:
        """Called once the engine has used ``use`` for good in the backward (per-layer clipping
        clips a layer as soon as its last use is recorded): drop the tensors the backward set,
        so they are freed now rather than when autograd frees the graph that holds the use.
        Only what the backward sets again may go (a graph may be backpropagated again)."""
        use.grads = None
        use.memo = None

    def pre_forward(self, engine, module: nn.Module, args, kwargs):
        raise NotImplementedError

    def post_forward(self, engine, module: nn.Module, state, args, kwargs, output):
        raise NotImplementedError

    def per_example(self, module: nn.Module, uses: Sequence[Use]) -> Dict[str, Tensor]:
        """{name: per-example gradients (B, *shape)} of the module's trainable parameters,
        summed over ``uses``."""
        raise NotImplementedError(
            f"{type(self).__name__} defines no per_example kernel (per_example(module, uses) -> "
            "{name: (B, *shape)}), which its default sq_norms / clipped and the cross terms of a "
            "parameter tied to another module need")

    def sq_norms(self, module: nn.Module, uses: Sequence[Use], method: str) -> Dict[str, Tensor]:
        """{name: per-example squared norms (B,)} of the module's trainable parameters'
        gradients, summed over ``uses``; ``method`` is the engine's mode (ghost / direct / auto)."""
        return {n: sq_rows(g) for n, g in self.per_example(module, uses).items()}

    def clipped(self, module: nn.Module, uses: Sequence[Use], c: Tensor,
                pool: "Pool") -> Dict[str, Tensor]:
        """{name: sum_i c_i grad_i} of the module's trainable parameters, over ``uses``."""
        return {n: weighted_sum(c, g) for n, g in self.per_example(module, uses).items()}


def trainable(module, name: str) -> bool:
    """Whether ``module`` has a parameter ``name`` (not None) that requires grad."""
    p = getattr(module, name, None)
    return p is not None and p.requires_grad


def sq_rows(g: Tensor) -> Tensor:
    """Per-example squared norms (B,) of ``g`` (B, *shape), summed in float32 or wider (a bf16
    sum of squares under-clips, an fp16 one overflows)."""
    g = g.flatten(1)
    return cast(g, torch.promote_types(g.dtype, torch.float32)).square().sum(1)


def weighted_sum(c: Tensor, g: Tensor) -> Tensor:
    """``sum_i c_i g_i`` of per-example gradients ``g`` (B, *shape), in float32 or wider (the
    engine rounds it to the parameter's dtype once)."""
    wide = torch.promote_types(g.dtype, torch.float32)
    # A (B,) x (B, n) product: matmul, not tensordot (whose Python wrapper costs more than the
    # product on the small per-layer gradients of norm layers and biases).
    flat = g.reshape(g.shape[0], math.prod(g.shape[1:]))   # spelled out: B = 0 reshapes too
    return cast(c, wide).matmul(cast(flat, wide)).view(g.shape[1:])


def zero_rows(tree, bad: Tensor):
    """Copy of ``tree`` in which every tensor with leading dimension B = len(bad) has its rows
    ``bad`` set to 0; other leaves are kept."""
    B = bad.shape[0]

    def fix(t):
        if isinstance(t, Tensor) and t.dim() > 0 and t.shape[0] == B:
            t = t.clone()
            t[bad.to(t.device)] = 0
        return t

    return tree_map(fix, tree)


class Pool:
    """Scratch buffers the engine keeps across steps and lends to the ``clipped`` kernels, so a
    per-step temporary costs no fresh memory pages. One buffer per (dtype, device), grown as
    needed; what a method returns is valid until the pool's next call."""

    __slots__ = ("_buffers",)

    def __init__(self):
        self._buffers: Dict[Tuple[torch.dtype, torch.device], Tensor] = {}

    def scaled_rows(self, t: Tensor, c: Tensor) -> Tensor:
        """``t * c`` with ``c`` (B,) scaling dim 0 of ``t`` (B, ...), in a scratch buffer, in the
        wider of the two dtypes (:func:`scaled_rows`)."""
        dtype = torch.promote_types(t.dtype, c.dtype)
        c = cast(c, dtype).view((-1,) + (1,) * (t.dim() - 1))
        key = (dtype, t.device)
        buf = self._buffers.get(key)
        if buf is None or buf.numel() < t.numel():
            buf = self._buffers[key] = torch.empty(t.numel(), dtype=dtype, device=t.device)
        return torch.mul(t, c, out=buf[:t.numel()].view(t.shape))


def scaled_rows(t: Tensor, c: Tensor, pool: Optional[Pool] = None) -> Tensor:
    """``t * c`` with ``c`` (B,) scaling dim 0 of ``t`` (B, ...), for a clipped-sum product;
    in ``pool``'s scratch buffer when one is given (valid until the pool's next call). Formed in
    the wider of the two dtypes: a bf16 ``t`` with float32 factors gives float32 rows, widened
    and rescaled in one pass (callers pass ``c`` in the dtype of the product they form)."""
    if isinstance(pool, Pool):
        return pool.scaled_rows(t, c)
    dtype = torch.promote_types(t.dtype, c.dtype)
    return t * cast(c, dtype).view((-1,) + (1,) * (t.dim() - 1))


_RULES: Dict[type, Rule] = {}
_CROSS: Dict[Tuple[type, type], Any] = {}


def register(*module_types: type):
    """Class decorator registering a :class:`Rule` subclass for ``module_types`` (and subclasses).

    Raises:
        ValueError: a type already has a rule.
        TypeError: a type is not an nn.Module subclass, or the class is not a Rule.
    """
    if not module_types:
        raise TypeError("register() needs at least one nn.Module type")
    for t in module_types:
        if not (isinstance(t, type) and issubclass(t, nn.Module)):
            raise TypeError(f"register() takes nn.Module subclasses, got {t!r}")
        if t in _RULES:
            raise ValueError(f"{t.__name__} already has a rule: {type(_RULES[t]).__name__}")

    def deco(cls):
        if not (isinstance(cls, type) and issubclass(cls, Rule)):
            raise TypeError(f"@register decorates Rule subclasses, got {cls!r}")
        rule = cls()
        for t in module_types:
            _RULES[t] = rule
        return cls

    return deco


def register_cross(rule_a: type, rule_b: type):
    """Decorator registering ``fn(a, b, method) -> Tensor (B,)``, the per-example inner product
    <g_a, g_b> of one parameter's gradient parts from two modules (each a :class:`Part`: module,
    the parameter's name there, its uses) under rule_a and rule_b (a weight tied across modules,
    e.g. an embedding and an output projection). Without one, the engine multiplies the two
    parts' ``per_example`` gradients.
    """
    key = (rule_a, rule_b)
    if key in _CROSS or key[::-1] in _CROSS:
        raise ValueError(f"a cross rule for {rule_a.__name__} x {rule_b.__name__} exists already")

    def deco(fn):
        _CROSS[key] = fn
        return fn

    return deco


class Part(NamedTuple):
    """One module's part of a parameter's gradient in a clipping step."""
    module: nn.Module
    name: str
    uses: Sequence[Use]


def cross_inner(rule_a: Rule, a: Part, rule_b: Rule, b: Part, method: str) -> Tensor:
    """<g_a, g_b> per example (B,) of two modules' parts of one parameter (see register_cross)."""
    fn = _CROSS.get((type(rule_a), type(rule_b)))
    if fn is not None:
        return fn(a, b, method)
    fn = _CROSS.get((type(rule_b), type(rule_a)))
    if fn is not None:
        return fn(b, a, method)
    ga = rule_a.per_example(a.module, a.uses)[a.name]
    gb = rule_b.per_example(b.module, b.uses)[b.name]
    wide = torch.promote_types(torch.promote_types(ga.dtype, gb.dtype), torch.float32)
    return (ga.flatten(1).to(wide) * gb.flatten(1).to(wide)).sum(1)


def rule_for(module: nn.Module) -> Optional[Rule]:
    """The registered rule for ``module``, looked up along its MRO, or None."""
    for t in type(module).__mro__:
        rule = _RULES.get(t)
        if rule is not None:
            return rule if rule.supports(module) else None
    return None


def supported_types() -> List[str]:
    """Names of the module types with a registered native rule."""
    return sorted(t.__name__ for t in _RULES)


from . import linear, conv, embedding, norm  # noqa: E402,F401  (registers the built-in rules)
from . import rnn  # noqa: E402,F401  (fastclip.nn.RNN / GRU / LSTM)
from . import attention  # noqa: E402,F401  (fastclip.nn.MultiheadAttention)
# The capture strategies a rule for a user's layer subclasses (docs/design.md 4.2).
from .capture import FunctionalRule, OutputTapRule  # noqa: E402,F401
