"""Per-layer rules: how the engine captures a leaf module's uses and turns them into
per-example gradient norms and clipped gradient sums.

A rule is registered for module types with ``@register(nn.Linear, ...)``. Lookup walks the
module's MRO, so subclasses are covered; a rule may still decline a module (``supports``), for
example a Linear subclass whose ``forward`` is not Linear's. Every leaf module with trainable
parameters that no native rule takes is covered exactly by the generic rule (``generic.py``).

Writing a rule for your own layer::

    from fastclip.layers import Rule, register

    @register(MyLayer)
    class MyLayerRule(Rule):
        ...  # capture (pre_forward/post_forward) plus the three finalize-time methods
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_map


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
    """

    __slots__ = ("module", "inputs", "grads", "batch_size", "extra", "expected", "recorded",
                 "spent", "__weakref__")

    def __init__(self, module: nn.Module, inputs: Any = None, extra: Any = None):
        self.module = module
        self.inputs = inputs
        self.grads: Optional[Tuple[Optional[Tensor], ...]] = None
        self.batch_size = -1
        self.extra = extra
        self.expected = 0
        self.recorded = False
        self.spent = False


# One entry of a parameter's uses: (module, name of the parameter in that module, use).
Entry = Tuple[nn.Module, str, Use]


class Rule:
    """Base class of a layer rule. One instance serves every module of its types.

    Capture (forward time): ``pre_forward`` and ``post_forward`` are called around the module's
    forward while gradients are enabled; they must arrange for the module's trainable parameters
    to receive NO gradient through autograd and for ``engine.record(use)`` to be called from the
    backward with the use's output gradients. Make uses with ``engine.new_use(module, ...)``:
    the engine then knows how many uses each layer awaits (per-layer clipping clips a layer in
    the backward as soon as its last use is recorded; a ``Use`` made directly is clipped at the
    end of the backward instead).

    Finalize (after the backward, ``c`` = per-example clip factors times the loss scale):
    ``sq_norms`` for a parameter all of whose uses belong to this rule, ``per_example_grad`` when
    a parameter is shared with modules of another rule, ``clipped_grad`` always. ``cache`` is a
    dict private to one finalize call, for work shared between the parameters of one use.
    """

    # Inputs with leading dimension 1 while the batch is B are expanded to B before the module
    # runs (the engine's _expand_broadcast): right for batch-first inputs, wrong for modules whose
    # inputs have other leading dims (time-major sequences, (layers, B, h) states, (L, S) masks).
    expand_broadcast = True

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

    def pre_forward(self, engine, module: nn.Module, args, kwargs):
        raise NotImplementedError

    def post_forward(self, engine, module: nn.Module, state, args, kwargs, output):
        raise NotImplementedError

    def sq_norms(self, entries: Sequence[Entry], method: str, cache: Dict) -> Tensor:
        """Per-example squared norms (B,) of ONE parameter's gradient, summed over its uses."""
        g = sum(self.per_example_grad(m, n, u, cache) for m, n, u in entries)
        return g.flatten(1).square().sum(1)

    def per_example_grad(self, module: nn.Module, name: str, use: Use, cache: Dict) -> Tensor:
        """Per-example gradients (B, *param.shape) of parameter ``name`` from one use."""
        raise NotImplementedError

    def clipped_grad(self, module: nn.Module, name: str, use: Use, c: Tensor, cache: Dict) -> Tensor:
        """sum_i c_i * grad_i of parameter ``name`` from one use, shaped like the parameter."""
        raise NotImplementedError


# A kernel that reads G for a weight's norms can give the bias's norms in the same pass; the
# bias's own sq_norms call then takes them from the finalize cache instead of reading G again.
def _bias_key(entries: Sequence[Entry]):
    return ("bias-of-uses", tuple(id(u) for _, _, u in entries))


def bias_in_same_pass(entries: Sequence[Entry]) -> bool:
    """Whether all of a weight's uses share one trainable ``bias`` (whose uses are then the same)."""
    return (all(m.bias is not None and m.bias.requires_grad for m, _, _ in entries)
            and len({id(m.bias) for m, _, _ in entries}) == 1)


def keep_bias(entries: Sequence[Entry], cache: Dict, b: Tensor) -> None:
    cache[_bias_key(entries)] = b


def take_bias(entries: Sequence[Entry], cache: Dict) -> Optional[Tensor]:
    """The bias norms kept by the weight's pass over the same uses, or None."""
    return cache.pop(_bias_key(entries), None)


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


def scaled_rows(t: Tensor, c: Tensor, cache: Dict) -> Tensor:
    """``t * c`` with ``c`` (B,) scaling dim 0 of ``t`` (B, ...), for a clipped-sum product.

    Written into a scratch buffer the engine keeps across steps (``cache["scratch"]``), so the
    per-step temporary costs no fresh memory pages. The result is valid until the next call.
    """
    scratch = cache.get("scratch")
    c = c.to(t.dtype).view((-1,) + (1,) * (t.dim() - 1))
    if scratch is None:
        return t * c
    key = (t.dtype, t.device)
    buf = scratch.get(key)
    if buf is None or buf.numel() < t.numel():
        buf = scratch[key] = torch.empty(t.numel(), dtype=t.dtype, device=t.device)
    return torch.mul(t, c, out=buf[:t.numel()].view(t.shape))


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
    """Decorator registering ``fn(entries_a, entries_b, method, cache) -> Tensor (B,)``, the
    per-example inner product <g_a, g_b> of one parameter's gradient parts from uses under
    rule_a and rule_b (a weight tied across layer types, e.g. an embedding and an output
    projection). Without one, the engine forms both parts' per-example gradients and multiplies.
    """
    key = (rule_a, rule_b)
    if key in _CROSS or key[::-1] in _CROSS:
        raise ValueError(f"a cross rule for {rule_a.__name__} x {rule_b.__name__} exists already")

    def deco(fn):
        _CROSS[key] = fn
        return fn

    return deco


def cross_inner(rule_a: Rule, entries_a: Sequence[Entry], rule_b: Rule, entries_b: Sequence[Entry],
                method: str, cache: Dict) -> Tensor:
    """<g_a, g_b> per example for one parameter used under two rules (see register_cross)."""
    fn = _CROSS.get((type(rule_a), type(rule_b)))
    if fn is not None:
        return fn(entries_a, entries_b, method, cache)
    fn = _CROSS.get((type(rule_b), type(rule_a)))
    if fn is not None:
        return fn(entries_b, entries_a, method, cache)
    ga = sum(rule_a.per_example_grad(m, n, u, cache) for m, n, u in entries_a)
    gb = sum(rule_b.per_example_grad(m, n, u, cache) for m, n, u in entries_b)
    return (ga.flatten(1) * gb.flatten(1)).sum(1)


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
