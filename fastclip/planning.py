"""Planning: which rule covers each trainable parameter of a model, and whether that still holds.

:func:`plan` walks the model once: every module owning trainable parameters gets a rule
(``fastclip.layers``: a registered rule looked up along the MRO; else, for a leaf, the
provisional operation rule resolved at its first forward; else the direct rule for parameters a
parent uses itself), and modules that cannot be made private are refused with their names.
:class:`Watch` is the snapshot the engine's ``refresh`` compares against at every forward (a
parameter unfrozen, frozen or replaced, a module added); :func:`rebound` gives the per-layer
bounds of a re-planned model. All are functions of their arguments: the engine
(``fastclip/engine.py``) keeps the result.
"""
from __future__ import annotations

import math
import operator
from typing import Dict, List, Optional, Set

from torch import nn

from .clipping import is_per_layer, resolve_bounds
from .layers import Rule, rule_for
from .layers.capture import FunctionalRule
from .layers.direct import DIRECT
from .layers.generic import mixing_refusal, refusal
from .layers.linear import LinearRule
from .layers.ops_rule import PENDING

# Bumped whenever any module in the process registers a parameter or a submodule (a parameter
# replaced by assignment or load_state_dict(assign=True), a head appended): an engine then walks
# its model at the next forward to see whether its plan still fits (Watch.changed).
STRUCTURE = [0]


def _bump_structure(*args):
    STRUCTURE[0] += 1


_REGISTRATION_HOOKS = ("register_module_parameter_registration_hook",
                       "register_module_module_registration_hook")
HOOKED = all(hasattr(nn.modules.module, h) for h in _REGISTRATION_HOOKS)  # torch >= 2.0
if HOOKED:
    for _register in _REGISTRATION_HOOKS:
        getattr(nn.modules.module, _register)(_bump_structure)

# Rules whose use is one (input, output gradient) pair that may be recorded time-major and
# transposed to batch-first (Linear, LayerNorm and the other functional rules).
_TRANSPOSABLE = (LinearRule, FunctionalRule)


class Plan:
    """The result of :func:`plan` (the engine's own dicts from then on)."""

    __slots__ = ("names", "paths", "params", "rules", "time_major")

    def __init__(self):
        self.names: Dict[nn.Parameter, str] = {}     # parameter -> qualified name, for errors
        self.paths: Dict[nn.Module, str] = {}        # module -> its path ("<root>" for the model)
        self.params: Dict[nn.Module, List] = {}      # module -> [(name, trainable parameter)]
        self.rules: Dict[nn.Module, Rule] = {}       # module -> its rule (per_module only)
        self.time_major: Set[nn.Module] = set()      # leaves that see their batch in dim 1


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


def plan(model: nn.Module, per_module: bool = True) -> Plan:
    """Plan ``model``: names, paths and trainable parameters of every module owning some, and,
    ``per_module`` (the book-keeping engine; not the nanobatch engine, which differentiates the
    whole model per example), each one's rule and the time-major leaves. Raises ValueError
    naming every module that mixes examples, or the first one that cannot be made private."""
    out = Plan()
    for name, p in model.named_parameters():
        out.names.setdefault(p, name)
    # Every module that mixes examples is named at once (a ResNet has 20 BatchNorms).
    mixing = [(path or "<root>", m) for path, m in model.named_modules()
              if mixing_refusal(m) is not None]
    if mixing:
        names = ", ".join(f"'{label}' ({type(m).__name__})" for label, m in mixing)
        raise ValueError(f"fastclip cannot make {len(mixing)} module(s) private: {names}. "
                         f"{mixing_refusal(mixing[0][1])}")
    for path, module in model.named_modules(remove_duplicate=True):
        label = path or "<root>"
        why = refusal(module) if per_module else mixing_refusal(module)
        if why is not None:
            raise ValueError(f"fastclip cannot make module '{label}' ({type(module).__name__}) "
                             f"private: {why}")
        own = [(n, p) for n, p in module.named_parameters(recurse=False) if p.requires_grad]
        if not own:
            continue
        if any(isinstance(p, nn.parameter.UninitializedParameter) for _, p in own):
            raise ValueError(f"module '{label}' has uninitialized (lazy) parameters; run one "
                             "forward pass before making the model private")
        out.paths[module] = label
        out.params[module] = own
        if not per_module:
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
        out.rules[module] = rule
    if per_module:
        out.time_major = time_major_leaves(model, out.params, out.rules)
    return out


def time_major_leaves(model: nn.Module, params: Dict, rules: Dict) -> Set[nn.Module]:
    """Modules whose batch dimension is 1: the leaves of a time-major (batch_first=False)
    transformer layer, which see (T, B, E). MultiheadAttention handles its own layout (it
    works batch-first inside); a leaf whose rule cannot take a transposed use is refused."""
    out = set()
    for path, module in model.named_modules():
        if not _is_time_major(module):
            continue
        attention = [m for m in module.modules() if isinstance(m, nn.MultiheadAttention)]
        inside = {id(m) for a in attention for m in a.modules()}
        for sub_path, leaf in module.named_modules(prefix=path):
            if id(leaf) in inside or leaf not in params:
                continue
            if not isinstance(rules[leaf], _TRANSPOSABLE):
                raise ValueError(
                    f"fastclip cannot make module '{sub_path}' ({type(leaf).__name__}) private: "
                    f"it runs inside the time-major (batch_first=False) '{path or '<root>'}' "
                    f"({type(module).__name__}), where only Linear and normalisation layers are "
                    "supported; construct the transformer with batch_first=True, or use "
                    "mode='nanobatch'")
            out.add(leaf)
    return out


def scan(model: nn.Module):
    """(every module owning trainable parameters followed by those parameters, in tree
    order; every parameter): the first changes when a parameter is unfrozen, frozen or
    replaced, or a module holding one is added or swapped. A bare walk of the module tree
    (no names, no memo)."""
    trainable, every = [], []
    stack = [model]
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


class Watch:
    """The model's trainable parameters as planned (:func:`scan`), to tell when they changed."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.snapshot, self.all = scan(model)
        self.flags = [p.requires_grad for p in self.all]
        self.seen = STRUCTURE[0]

    def changed(self, full: bool) -> bool:
        """Whether the model's trainable parameters differ from the plan's. At a forward (not
        ``full``) the walk runs only if some module registered a parameter or submodule since
        (torch's global registration hooks; an assignment straight into ``_parameters`` is seen
        at the optimizer's step, which always walks) or a parameter's requires_grad flipped:
        ~100 attribute reads for 100 parameters instead of a walk over every module."""
        if not full and HOOKED and STRUCTURE[0] == self.seen and \
                [p.requires_grad for p in self.all] == self.flags:
            return False
        trainable, every = scan(self.model)
        if len(trainable) == len(self.snapshot) and all(map(operator.is_, trainable,
                                                             self.snapshot)):
            self.all, self.flags = every, [p.requires_grad for p in every]
            self.seen = STRUCTURE[0]
            return False
        return True


def rebound(bound_arg, bound_of: Optional[Dict[str, float]], clipping: str, layers,
            sensitivity: float):
    """(per-layer bounds, sensitivity) for a re-planned model: None bounds for flat clipping;
    a float bound split again over ``layers``; with a list of bounds (``bound_of``: {layer
    name: bound} as given), every layer must be one the list was given for, else ValueError.
    The sensitivity never decreases (a layer frozen keeps its share of the noise)."""
    if bound_arg is None or not is_per_layer(clipping):
        return None, sensitivity
    if bound_of is None:
        bounds, new_sensitivity = resolve_bounds(bound_arg, clipping, layers)
    else:
        new = [layer.name for layer in layers if layer.name not in bound_of]
        if new:
            raise ValueError(
                f"fastclip: clipping='per_layer' was given one bound per layer for the layers "
                f"{list(bound_of)}, but the model's trainable parameters changed after "
                f"make_private (unfrozen, replaced or added) and layer(s) {new} have no bound; "
                "nothing can be clipped for them, so the forward is refused. Fix: pass one "
                "float max_grad_norm (split evenly over the trainable layers), or make the "
                "model private again with one bound per layer of: "
                + ", ".join(layer.name for layer in layers))
        bounds = tuple(bound_of[layer.name] for layer in layers)
        new_sensitivity = math.sqrt(sum(c * c for c in bounds))
    return bounds, max(sensitivity, new_sensitivity)
