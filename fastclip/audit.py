"""First-step audit: refuse models and losses that mix examples, before anything is released.

Clipping bounds one example's influence on the released sum only if each example's gradient
depends on that example alone. A model or loss that mixes examples breaks this: an in-batch
contrastive loss (``z @ z.T``), batch statistics inside the model (``h - h.mean(0)``), attention
across the batch (a ``batch_first=False`` attention fed batch-first input), a token mean over the
whole batch (Hugging Face's ``model(..., labels=...).loss``). Through the mixing, removing one
example changes every other example's gradient, and the released sum moves by more than C.

The audit runs once, on the first forward with grad enabled of an attached engine that has at
least two examples (with one example there is nothing to mix):

* model: a few examples (2-3) are recomputed alone and compared with their rows of a batched
  forward, in eval mode (dropout off), with the engine's capture off, the RNG state forked (the
  user's random stream is unchanged) and every module's train/eval mode restored. Input tensors
  with leading dimension B are sliced, the others passed whole (broadcast position ids). The
  tolerance fits the output's dtype: batched and single GEMMs differ by rounding only.
* model outputs that require grad and have no batch dimension (a scalar loss computed inside
  the model) are refused: their gradient is the batch's, not an example's.
* loss (functional API, where ``loss_fn`` is known): the same comparison on the loss, values
  and ``d loss_i / d output_i`` against the rows of the batched gradient.
* loss of the training loop (make_private, where the user computes it): until it has been
  audited once, the model's per-example outputs are returned as probes (a Tensor subclass that
  ops propagate, so the loss is one too, behind an identity node that marks each output). The
  loss's ``backward()`` first checks, by one double backward per probed example j, that
  ``d loss / d output_j`` does not respond to other examples' outputs (an in-batch contrastive
  loss does; any sum or mean of per-example terms does not), then runs. A normaliser computed
  from the targets alone (a batch-wide token count) is invisible to this check.

After the audit has passed for a call signature, a forward with that signature costs a set
lookup. A refused signature is audited (and refused) again at every forward, so a caught
exception cannot let a mixing step through.
"""
from __future__ import annotations

import contextlib
import itertools
import threading
import warnings
from collections.abc import Mapping
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import torch
from torch import Tensor, nn
from torch.autograd.graph import GradientEdge
from torch.nn.utils.rnn import PackedSequence
from torch.utils._pytree import tree_flatten, tree_unflatten

from ._rng import forked_rng
from .layers.capture import ModuleCaptureRule

__all__ = ["Auditor", "MixingError", "audit_loss"]


class MixingError(ValueError):
    """The model or the loss mixes examples: clipping would not bound one example's influence."""


# Relative tolerance on max |single - batched row| / max |batched rows compared|, by dtype.
# Batched and single-example forwards run the same ops on different GEMM shapes: they differ by
# rounding (float32: ~1e-6 relative per op, more through deep nets), mixing by O(1).
_TOL = {torch.float64: 1e-7, torch.float32: 2e-3, torch.complex128: 1e-7, torch.complex64: 2e-3}
_TOL_LOW = 5e-2   # float16 / bfloat16

_FIX_MODEL = ("make the model compute each example from its own inputs only: no statistics over "
              "the batch (BatchNorm in training mode: fastclip.fix(model) uses GroupNorm), no "
              "attention or similarity across the batch dimension (pass batch_first=True to "
              "attention/RNN modules fed (B, T, ...) input), batch dimension first in every input "
              "and output")

_FIX_LOSS = ("compute one loss per example from that example's output and target alone (e.g. "
             "nn.CrossEntropyLoss(reduction='none'); for language models fastclip.lm_loss(logits, "
             "labels), normalised per example), then reduce them with .sum() or .mean() as "
             "loss_reduction says. A loss over pairs of examples (in-batch contrastive "
             "negatives) or normalised by a batch-wide count cannot be clipped per example")


def _tol(dtype: torch.dtype) -> float:
    return _TOL.get(dtype, _TOL_LOW)


def _indices(B: int) -> List[int]:
    """The examples recomputed alone: first, middle, last (2 or 3 of them)."""
    return sorted({0, B // 2, B - 1})


def _named_tensors(obj, prefix: str = "output") -> Iterator[Tuple[str, Tensor]]:
    """(name, tensor) for every tensor in a model output: tuples, lists, namedtuples, dicts and
    Hugging Face ModelOutput (a Mapping). Other objects (a KV cache) are not walked."""
    if isinstance(obj, Tensor):
        yield prefix, obj
    elif isinstance(obj, Mapping):
        for k, v in obj.items():
            yield from _named_tensors(v, f"{prefix}.{k}" if prefix == "output" else f"{prefix}[{k!r}]")
    elif isinstance(obj, tuple) and hasattr(obj, "_fields"):
        for k, v in zip(obj._fields, obj):
            yield from _named_tensors(v, f"{prefix}.{k}")
    elif isinstance(obj, (tuple, list)):
        for i, v in enumerate(obj):
            yield from _named_tensors(v, f"{prefix}[{i}]")


def _differs(batched: Tensor, single: Tensor) -> Optional[float]:
    """None if ``single`` (the example alone) equals ``batched`` (its row of the batch) to the
    dtype's rounding, else the relative difference (inf for a shape mismatch)."""
    if batched.shape != single.shape:
        return float("inf")
    if batched.numel() == 0:
        return None
    a = batched.detach().to(torch.complex128 if batched.is_complex() else torch.float64)
    b = single.detach().to(a.dtype).to(a.device)
    both_nan = a.isnan() & b.isnan()
    diff = torch.where(both_nan, torch.zeros_like(a), a - b).abs()
    diff = torch.where(torch.isinf(a) & (a == b), torch.zeros_like(diff), diff)
    finite = a.abs()[torch.isfinite(a.abs())]
    scale = float(finite.max()) if finite.numel() else 0.0
    err = float(diff.max())
    if err != err:     # a NaN on one side only
        return float("inf")
    rel = err / max(scale, 1e-30)
    return None if err <= _tol(batched.dtype) * max(scale, 1e-12) else rel


@contextlib.contextmanager
def _quiet_model(model: nn.Module, tensors: List[Tensor]):
    """Eval mode (dropout off) and a forked RNG (of ``tensors``' devices) for the audit's
    forwards; every module's own train/eval flag and the RNG streams are as before afterwards."""
    modes = [(m, m.training) for m in model.modules()]
    try:
        with forked_rng(tensors):
            model.eval()
            yield
    finally:
        for m, t in modes:
            m.training = t


@contextlib.contextmanager
def _no_capture(engine):
    """The engine captures nothing while the audit runs the model (its own flag for forwards
    that rules re-run at finalize; nanobatch mode's re-entrance guard)."""
    with engine.no_capture():
        yield


class _LeadingDims:
    """Records the leading size of the first tensor input of each leaf in a forward."""

    def __init__(self, modules: Dict[nn.Module, str]):
        self.paths = modules
        self.dims: Dict[nn.Module, Dict[str, int]] = {}
        self.phase = None
        self.thread = threading.get_ident()
        self.handles = [m.register_forward_pre_hook(self._hook, with_kwargs=True) for m in modules]

    def _hook(self, module, args, kwargs):
        if self.phase is None or threading.get_ident() != self.thread:
            return      # another thread running the model (an evaluation thread)
        t = next((x for x in tree_flatten((args, kwargs))[0]
                  if isinstance(x, Tensor) and x.dim() > 0), None)
        if t is not None:
            self.dims.setdefault(module, {}).setdefault(self.phase, t.shape[0])

    def run(self, phase, model, args, kwargs):
        self.phase = phase
        try:
            return model(*args, **kwargs)
        finally:
            self.phase = None

    def constant(self) -> Dict[nn.Module, Tuple[str, int]]:
        """Leaves whose input had the same leading size != 1 batched and for one example."""
        return {m: (self.paths[m], d["batched"]) for m, d in self.dims.items()
                if "single" in d and d["batched"] == d["single"] != 1}

    def remove(self):
        for h in self.handles:
            h.remove()


def _slice_leaves(leaves, batched_at, i):
    return [t[i:i + 1] if k in batched_at else t for k, t in enumerate(leaves)]


class Auditor:
    """The engine's first-step audit of the model (see the module docstring).

    The audit runs once per call signature of the model (positional argument types, keyword
    names, which keywords are None), so a later call that adds an argument (``labels=``) is
    audited too; a call whose signature passed costs a tuple built and looked up in a set.

    Args:
        engine: the :class:`fastclip.engine.Engine` it audits for.
        enabled: False skips the audit (``make_private(audit=False)``).
    """

    def __init__(self, engine, enabled: bool = True):
        self.engine = engine
        self.enabled = bool(enabled)
        # Also in nanobatch mode (which runs each example alone under vmap or one by one): an
        # output without batch dimension is refused with the fix, and a model whose output
        # depends on the batch would train on other outputs than those it computes batched.
        self._skip = not enabled
        self._passed = set()     # call signatures audited (or reported unauditable)
        self._running = False
        self._loss_done = False  # the training loop's loss audited (probe)
        # Leaves whose input does not follow the batch: {module: (path, leading dim)}.
        self._constant_leading: Dict[nn.Module, Tuple[str, int]] = {}
        self._probe_cls = None

    def __call__(self, args, kwargs) -> None:
        """Called at the start of every model call (engine root pre-hook / nanobatch forward)."""
        if self._skip or self._running:
            return
        if self._constant_leading:
            self._refuse_constant_leading()     # every forward, not just the audited one
        key = (tuple(type(a) for a in args), tuple((k, v is None) for k, v in kwargs.items()))
        if key in self._passed or not torch.is_grad_enabled() or self.engine.finalizing:
            return
        self._running = True
        try:
            if self._audit(args, kwargs):
                self._passed.add(key)
        finally:
            self._running = False

    def _audit(self, args, kwargs) -> bool:
        """True when this signature is settled (passed, or reported unauditable); False when
        there were fewer than two examples; raises MixingError on mixing."""
        model = self.engine.model
        packed = tree_flatten((args, kwargs), is_leaf=lambda t: isinstance(t, PackedSequence))[0]
        if any(isinstance(t, PackedSequence) for t in packed):
            warnings.warn("fastclip: the model's input is a PackedSequence, which the first-step "
                          "audit cannot split into examples: the model was NOT checked for mixing "
                          "examples. You are responsible for each example's output depending on "
                          "that example alone", RuntimeWarning, stacklevel=4)
            return True
        leaves, spec = tree_flatten((args, kwargs))
        B = next((t.shape[0] for t in leaves if isinstance(t, Tensor) and t.dim() > 0), None)
        if B is None or B < 2:
            return False   # nothing to mix yet: audited on the first batch of two or more
        batched_at = [k for k, t in enumerate(leaves)
                      if isinstance(t, Tensor) and t.dim() > 0 and t.shape[0] == B]
        tensors = [t for t in leaves if isinstance(t, Tensor)]
        tensors += list(itertools.islice(model.parameters(), 1))
        with _quiet_model(model, tensors), _no_capture(self.engine):
            leading = _LeadingDims(self._layered_leaves())
            try:
                with torch.enable_grad():     # to see which outputs carry gradients
                    out = leading.run("batched", model, args, kwargs)
                with torch.no_grad():
                    try:
                        a, kw = tree_unflatten(_slice_leaves(leaves, set(batched_at), 0), spec)
                        leading.run("single", model, a, kw)
                    except Exception:   # noqa: BLE001  (_compare below reports it)
                        pass
            finally:
                leading.remove()
            named = [(n, t.detach()) for n, t in _named_tensors(out)]
            for n, t in _named_tensors(out):
                if t.requires_grad and (t.dim() == 0 or t.shape[0] != B):
                    self._refuse(
                        f"fastclip: the model's {n} (shape {tuple(t.shape)}) requires grad "
                        f"but has no batch dimension of size {B} first: its gradient is the "
                        "whole batch's, not one example's, and cannot be clipped per example. "
                        "A loss computed inside the model (Hugging Face model(..., labels=...)"
                        ".loss averages tokens over the whole batch) leaks across examples: "
                        "call the model without labels and compute per-example losses from the "
                        "logits, e.g. fastclip.lm_loss(model(input_ids).logits, labels)")
            del out
            rows = [(n, t) for n, t in named
                    if t.dim() > 0 and t.shape[0] == B and (t.is_floating_point() or t.is_complex())]
            if not rows:
                return True
            with torch.no_grad():
                found = self._compare(model, leaves, spec, batched_at, B, rows)
        if found is None or found[3] is not None:
            # Checked after the comparison: a model that mixes (attention across the batch also
            # changes its leaves' layout) gets the mixing message and its fix.
            self._constant_leading = leading.constant()
            self._refuse_constant_leading()
        if found is None:
            return True
        name, i, rel, exc = found
        if exc is not None:
            warnings.warn(f"fastclip: the first-step audit could not run the model on example {i} "
                          f"alone ({type(exc).__name__}: {exc}): the model was NOT checked for "
                          "mixing examples. Poisson sampling also draws batches of one example; "
                          "a model that fails on them must be fixed", RuntimeWarning, stacklevel=4)
            return True
        what = "has another shape" if rel == float("inf") else f"differs by {rel:.2e} (relative)"
        self._refuse(
            f"fastclip: the model mixes examples: its {name} for example {i} computed alone "
            f"{what} from its row of the batched output (eval mode, B={B}), so each example's "
            "gradient depends on the other examples and clipping cannot bound its influence. "
            f"Fix: {_FIX_MODEL}. (make_private(audit=False) skips this check; you are then "
            "responsible for the privacy guarantee)")

    def _compare(self, model, leaves, spec, batched_at, B, rows):
        """None if the examples alone match their rows; else (output name, example, relative
        difference, exception). An input with leading dimension B that is not per example (an
        (L, L) mask with L == B) is retried passed whole."""
        ambiguous = batched_at[1:]
        choices = [()] + [c for r in range(1, min(len(ambiguous), 3) + 1)
                          for c in itertools.combinations(ambiguous, r)]
        first = None
        for whole in choices[:8]:
            at = set(batched_at) - set(whole)
            result = None
            for i in _indices(B):
                try:
                    a, kw = tree_unflatten(_slice_leaves(leaves, at, i), spec)
                    single = dict(_named_tensors(model(*a, **kw)))
                except Exception as exc:    # noqa: BLE001  (reported, or another slicing tried)
                    result = ("", i, float("inf"), exc)
                    break
                for n, t in rows:
                    s = single.get(n)
                    rel = float("inf") if s is None else _differs(t[i:i + 1], s)
                    if rel is not None:
                        result = (n, i, rel, None)
                        break
                if result is not None:
                    break
            if result is None:
                return None
            if first is None or (first[3] is not None and result[3] is None):
                first = result   # a measured difference outranks an exception
        return first

    @staticmethod
    def _refuse(message: str):
        raise MixingError(message)

    def _layered_leaves(self) -> Dict[nn.Module, str]:
        """The leaves whose rule reads the batch from dim 0 of their input: {module: path}.
        Recurrent and attention drop-ins, and the leaves of time-major transformers, know their
        layout from the module; nanobatch mode has no per-leaf rule."""
        eng = self.engine   # (nanobatch mode: no per-module rules, so none)
        return {m: eng.path_of(m) for m, r in eng.rules.items()
                if not isinstance(r, ModuleCaptureRule) and not eng.is_time_major(m)}

    def _refuse_constant_leading(self):
        """A covered leaf whose input keeps its leading size when the batch shrinks to one
        example (T5's relative position bias: an Embedding of (q, k) buckets shared by every
        example) would have its rows taken for examples, which is right only when the size
        happens to be B. Refused while the leaf has trainable parameters."""
        live = [(path, n) for m, (path, n) in self._constant_leading.items()
                if any(p.requires_grad for p in m.parameters(recurse=False))]
        if not live:
            return
        names = ", ".join(f"'{path}' (leading size {n})" for path, n in live)
        raise MixingError(
            f"fastclip: the input of {names} does not have the batch dimension first: its leading "
            "size is the same for one example alone as for the batch (e.g. position buckets "
            "shared by every example, broadcast over the batch later), so its parameters' "
            "per-example gradients cannot be formed at that layer. Freeze its parameters "
            "(requires_grad_(False)) or use mode='nanobatch' (exact for any model)")

    # -- the user's loss (make_private), checked at the first backward ----------------------
    def probe(self, output, B: Optional[int]):
        """The model's output, its per-example tensors turned into probes while the loss of the
        training loop has not been audited yet (see :class:`_LossProbe`); else ``output``."""
        if (self._skip or self._loss_done or B is None or B < 2 or not torch.is_grad_enabled()
                or self.engine.finalizing or torch.compiler.is_compiling()):
            return output
        if self._probe_cls is None:
            state = _ProbeState(self)
            self._probe_cls = type("_LossProbe", (_LossProbe,), {"_state": state})
        cls = self._probe_cls

        def wrap(t):
            if (t.requires_grad and t.dim() > 0 and t.shape[0] == B and t.is_floating_point()
                    and type(t) is Tensor):
                return _Mark.apply(B, t).as_subclass(cls)
            return t

        return _map_tensors(output, wrap)

    def _loss_checked(self, found):
        """Called by the probe at the first backward of a probed loss."""
        if found is None:
            self._loss_done = True
            self._probe_cls._state.done = True
            return
        if isinstance(found, Exception):
            self._loss_done = True
            self._probe_cls._state.done = True
            warnings.warn(f"fastclip: the first-step audit could not differentiate the loss twice "
                          f"({type(found).__name__}: {found}): the training loss was NOT checked "
                          "for mixing examples. You are responsible for each example's loss "
                          f"depending on its own output alone. {_FIX_LOSS}", RuntimeWarning,
                          stacklevel=5)
            return
        # Audited again at the next backward: a caught exception must not let a step through.
        raise MixingError(f"fastclip: the loss mixes examples: {found}, so each example's "
                          "gradient depends on the others and clipping cannot bound its "
                          f"influence; the backward is refused before any gradient is written. "
                          f"Fix: {_FIX_LOSS}. (make_private(audit=False) skips this check; you "
                          "are then responsible for the privacy guarantee)")


# -- the training loop's own loss (make_private): probed on the first step --------------------

_BACKWARDS = (Tensor.backward, torch.autograd.backward)
_WALK = 100_000   # nodes of the loss's graph searched for the marked outputs (a loss is small)


class _Mark(torch.autograd.Function):
    """Identity on a probed model output whose backward node carries B: the loss audit finds the
    outputs by walking the loss's graph, so it holds no tensor and keeps no graph alive."""

    @staticmethod
    def forward(ctx, B, x):
        ctx.B = B
        # A copy, not a view: a view returned from a custom Function may not be changed in place.
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return None, g


class _LossProbe(Tensor):
    """The model's outputs on an audited step. Tensor ops propagate the type (torch's default
    ``__torch_function__``), so the user's loss is a probe too, and its ``backward`` reaches
    :meth:`_ProbeState.check` before anything runs. A subclass per audit carries its state."""

    _state: "_ProbeState"

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        state = cls._state
        if func in _BACKWARDS and not state.done:
            state.check(func, args, kwargs)
        if func is torch.autograd.grad or func in _BACKWARDS:
            # Gradients (an FGSM step's input gradient) are plain tensors: nothing downstream of
            # them is the loss of this forward.
            with torch._C.DisableTorchFunctionSubclass():
                return func(*args, **kwargs)
        return super().__torch_function__(func, types, args, kwargs)


class _ProbeState:
    """One pending loss audit: whether it is done (it holds no tensor)."""

    def __init__(self, auditor):
        self.auditor = auditor
        self.done = False

    def check(self, func, args, kwargs):
        """The loss must not mix examples through the model outputs: for a per-example loss
        (any sum or mean of per-example terms), d loss / d y_i depends on y_i alone, so the
        Hessian of the loss in the outputs is block-diagonal by example. One double backward per
        probed example j: H v (v random on row j) must vanish on every other row."""
        if func is Tensor.backward:
            loss = args[0]
            grad = kwargs.get("gradient", args[1] if len(args) > 1 else None)
        else:
            tensors = args[0] if args else kwargs["tensors"]
            loss = tensors if isinstance(tensors, Tensor) else next(iter(tensors), None)
            g = kwargs.get("grad_tensors", args[1] if len(args) > 1 else None)
            grad = g if g is None or isinstance(g, Tensor) else next(iter(g), None)
        with torch._C.DisableTorchFunctionSubclass():
            found = self._mixing(loss, grad)
        self.auditor._loss_checked(found)

    @staticmethod
    def _marks(loss: Tensor):
        """The _Mark nodes (probed model outputs) the loss was computed from."""
        stack, seen, marks = [loss.grad_fn], set(), []
        while stack and len(seen) < _WALK:
            node = stack.pop()
            if node is None or node in seen:
                continue
            seen.add(node)
            if isinstance(node, _Mark._backward_cls):
                marks.append(node)
                continue            # the model's graph below: not the loss
            stack.extend(f for f, _ in node.next_functions)
        return marks

    def _mixing(self, loss, grad):
        """None (no mixing, or nothing to check), a string describing the mixing, or an
        exception the check could not get past."""
        if not isinstance(loss, Tensor) or not loss.requires_grad or loss.grad_fn is None:
            return None
        marks = self._marks(loss)
        if not marks:
            return None
        edges = [GradientEdge(m, 0) for m in marks]
        try:
            G = torch.autograd.grad(loss, edges, grad_outputs=grad, create_graph=True,
                                    retain_graph=True, allow_unused=True)
            for mark, g in zip(marks, G):
                B = mark.B
                if g is None or not g.requires_grad or B < 2:
                    continue   # the loss does not use this output, or is linear in it
                for j in sorted({0, B // 2}):
                    v = torch.zeros_like(g)
                    v[j] = torch.randn(g[j].shape, dtype=g.dtype, device=g.device,
                                       generator=_generator(g.device))
                    H = torch.autograd.grad((g * v).sum(), edges, retain_graph=True,
                                            allow_unused=True)
                    for h in H:
                        if h is None or h.dim() == 0 or not h.numel():
                            continue
                        # Row j of every output is example j (several forwards of one batch:
                        # a siamese loss); only the other rows must not respond.
                        scale = float(h.abs().max())
                        others = torch.cat([h[:j], h[j + 1:]])
                        worst = float(others.abs().max()) if others.numel() else 0.0
                        if worst > _tol_hessian(h.dtype) * max(scale, 1e-30) and worst > 0:
                            return (f"the gradient of the loss with respect to example {j}'s "
                                    f"output changes with other examples' outputs (relative "
                                    f"{worst / max(scale, 1e-30):.2e}, B={B})")
        except RuntimeError as exc:     # an op without double backward
            return exc
        return None


def _generator(device):
    # A private generator: the audit must not move the user's random stream.
    return torch.Generator(device=device).manual_seed(0)


def _tol_hessian(dtype) -> float:
    # Structurally zero for a per-example loss (0 times finite values), so far below rounding.
    return 1e-6 if dtype in (torch.float32, torch.float64) else 1e-3


def _map_tensors(obj, fn):
    """``obj`` with ``fn`` applied to every tensor inside tuples, lists, namedtuples and
    mappings (Hugging Face ModelOutput, whose items are set in place)."""
    if isinstance(obj, Tensor):
        return fn(obj)
    if isinstance(obj, Mapping):
        new = {k: _map_tensors(v, fn) for k, v in obj.items()}
        if isinstance(obj, dict) and type(obj) is not dict:
            for k, v in new.items():
                if v is not obj[k]:
                    obj[k] = v
            return obj
        return type(obj)(new) if type(obj) is dict else obj
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):
        return type(obj)(*[_map_tensors(v, fn) for v in obj])
    if isinstance(obj, (tuple, list)):
        return type(obj)(_map_tensors(v, fn) for v in obj)
    return obj


def audit_loss(loss_fn: Callable, output, targets, B: int) -> None:
    """Refuse a ``loss_fn`` that mixes examples (functional API: the loss is known).

    For a few examples i, ``loss_fn`` on example i alone (its rows of ``output`` and
    ``targets``) must give the batched loss's entry i and the same gradient with respect to
    example i's output as the batched ``sum_j loss_j`` does (a loss over pairs of examples
    changes the second even where the first agrees).

    Args:
        loss_fn: ``loss_fn(output, targets)`` -> (B,).
        output: the model output (a tensor (B, ...) or a structure of them).
        targets: whatever ``loss_fn`` takes; tensors with leading dimension B are sliced.
        B: the batch size.

    Raises:
        MixingError: the loss of an example depends on other examples.
    """
    if B < 2:
        return
    o_leaves, o_spec = tree_flatten(output)
    per = [isinstance(t, Tensor) and t.dim() > 0 and t.shape[0] == B for t in o_leaves]
    diff_at = [k for k, t in enumerate(o_leaves)
               if per[k] and (t.is_floating_point() or t.is_complex())]
    if not diff_at:
        return
    t_leaves, t_spec = tree_flatten(targets)
    t_per = [isinstance(t, Tensor) and t.dim() > 0 and t.shape[0] == B for t in t_leaves]

    def leaves_for(i):
        sel = (lambda t, b: t[i:i + 1] if b else t) if i is not None else (lambda t, b: t)
        out = [sel(t.detach(), b) if isinstance(t, Tensor) else t for t, b in zip(o_leaves, per)]
        for k in diff_at:
            out[k] = out[k].clone().requires_grad_()
        tg = [sel(t, b) if isinstance(t, Tensor) else t for t, b in zip(t_leaves, t_per)]
        return out, tree_unflatten(out, o_spec), tree_unflatten(tg, t_spec)

    ref = next((o_leaves[k] for k in diff_at), None)
    with forked_rng([ref] if ref is not None else []), torch.enable_grad():
        leaves_b, out_b, tg_b = leaves_for(None)
        loss_b = loss_fn(out_b, tg_b)
        if not isinstance(loss_b, Tensor) or loss_b.shape != (B,) or not loss_b.requires_grad:
            return   # the caller reports a wrong shape; a loss without gradient releases nothing
        grads_b = torch.autograd.grad(loss_b.sum(), [leaves_b[k] for k in diff_at], allow_unused=True)
        for i in _indices(B):
            leaves_i, out_i, tg_i = leaves_for(i)
            try:
                loss_i = loss_fn(out_i, tg_i)
                grads_i = torch.autograd.grad(loss_i.sum(), [leaves_i[k] for k in diff_at],
                                              allow_unused=True)
            except Exception as exc:   # noqa: BLE001
                warnings.warn(f"fastclip: the loss audit could not run loss_fn on example {i} alone "
                              f"({type(exc).__name__}: {exc}): the loss was NOT checked for mixing "
                              "examples", RuntimeWarning, stacklevel=3)
                return
            problems = []
            if not isinstance(loss_i, Tensor) or loss_i.numel() != 1:
                problems.append(f"loss_fn gives {tuple(getattr(loss_i, 'shape', ()))} values for "
                                "one example")
            else:
                rel = _differs(loss_b.detach()[i:i + 1], loss_i.detach().reshape(1))
                if rel is not None:
                    problems.append(f"its loss alone differs by {rel:.2e} (relative) from its "
                                    "entry of the batched loss")
            for k, gb, gi in zip(diff_at, grads_b, grads_i):
                gb = torch.zeros_like(o_leaves[k][:1]) if gb is None else gb[i:i + 1]
                gi = torch.zeros_like(gb) if gi is None else gi
                rel = _differs(gb, gi)
                if rel is not None:
                    problems.append(f"the gradient of the batched loss with respect to its output "
                                    f"differs by {rel:.2e} (relative) from its own loss's")
                    break
            if problems:
                raise MixingError(f"fastclip: the loss mixes examples: for example {i}, "
                                  f"{'; '.join(problems)} (B={B}), so its gradient depends on other "
                                  f"examples and clipping cannot bound its influence. Fix: {_FIX_LOSS}")
