"""``fastclip.validate``: check fastclip against an exact per-example computation on your model.

Runs the fast path (the engine, as make_private uses it) and an exact path (a float64 copy of the
model, one backward per example) on a small batch, and reports per trainable parameter the rule
that covers it and how well the per-example squared-norm contributions agree, plus the time of
each path.
"""
from __future__ import annotations

import copy
import time
from typing import Callable, Dict

import torch
from torch import Tensor, nn

from .engine import Engine, engine_class
from .nn.rnn import converted


class _Probe(Engine):
    """The engine, also keeping each parameter's per-example squared norm (B,): the very values
    the engine sums into the clipping norms (:meth:`Engine.param_sq_norms`)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.contrib: Dict[nn.Parameter, Tensor] = {}

    def param_sq_norms(self, groups):
        parts = super().param_sq_norms(groups)
        self.contrib.update(parts)
        return parts


class Report:
    """Result of :func:`validate`.

    Attributes:
        rows: one dict per trainable parameter: ``name``, ``rule``, ``shape``, ``max_rel_err``
            (max over examples of |fast - exact| / max(exact, 1e-6 x the example's total), on the
            per-example squared-norm contribution of that parameter).
        norms_max_rel_err: the same for the total per-example norms.
        fast_s, exact_s: seconds of the fast path (one forward + backward with the engine) and
            of the exact path (float64, one backward per example).
        ok: every error below ``tol``.
    """

    def __init__(self, rows, norms_err, fast_s, exact_s, tol):
        self.rows, self.norms_max_rel_err = rows, norms_err
        self.fast_s, self.exact_s, self.tol = fast_s, exact_s, tol
        self.ok = norms_err <= tol and all(r["max_rel_err"] <= tol for r in rows)

    def __str__(self):
        w = max([len(r["name"]) for r in self.rows] + [9])
        lines = [f"{'parameter':<{w}}  {'rule':<16} {'shape':<16} max rel err"]
        for r in self.rows:
            flag = "" if r["max_rel_err"] <= self.tol else "  <-- MISMATCH"
            lines.append(f"{r['name']:<{w}}  {r['rule']:<16} {str(r['shape']):<16} "
                         f"{r['max_rel_err']:.2e}{flag}")
        lines.append(f"per-example norms: max rel err {self.norms_max_rel_err:.2e} "
                     f"({'OK' if self.ok else 'FAILED'}, tol {self.tol:.0e})")
        ratio = self.exact_s / self.fast_s if self.fast_s > 0 else float("inf")
        lines.append(f"time: fast path {self.fast_s * 1e3:.1f} ms, exact per-example path "
                     f"{self.exact_s * 1e3:.1f} ms ({ratio:.1f}x)")
        return "\n".join(lines)

    __repr__ = __str__


def _rel_err(a: Tensor, b: Tensor, floor: Tensor) -> float:
    """max_i |a_i - b_i| / max(|b_i|, floor_i): a contribution that is a tiny part of its
    example's total is compared at the total's scale (floor_i = 1e-6 x the example's total)."""
    if a.numel() == 0:
        return 0.0
    scale = torch.maximum(b.abs(), floor).clamp_min(1e-300)
    return float(((a - b).abs() / scale).max())


def validate(model: nn.Module, loss_fn: Callable, inputs, targets, mode: str = "auto",
             tol: float = 1e-4, verbose: bool = True) -> Report:
    """Compare fastclip's per-example gradient norms with an exact computation on ``model``.

    Args:
        model: the model (left as found; no gradients written).
        loss_fn: ``loss_fn(output, targets)`` -> per-example losses (B,).
        inputs: a tensor (B, ...) or tuple of tensors; keep B small (the exact path runs one
            backward per example).
        targets: whatever ``loss_fn`` takes.
        mode: "auto", "ghost", "direct" or "nanobatch".
        tol: the relative error under which a parameter counts as agreeing.
        verbose: print the report.

    Returns:
        :class:`Report` (``print(report)`` shows the table; ``report.ok``).
    """
    inputs = inputs if isinstance(inputs, tuple) else (inputs,)
    B = next(x.shape[0] for x in inputs if isinstance(x, Tensor) and x.dim() > 0)
    saved = {p: p.grad for p in model.parameters()}
    from .functional import per_sample_grad_norms
    # audit=False: validate compares with the exact per-example path itself, and reports a model
    # that mixes examples as a mismatch instead of stopping at the first-step audit.
    per_sample_grad_norms(model, loss_fn, inputs, targets, mode=mode, audit=False)  # warm-up
    try:
        with converted(model) as m:
            # The book-keeping engine's parts come through _Probe; the nanobatch engine (a
            # sibling, fastclip/nanobatch.py) keeps each parameter's squared norms itself.
            cls = engine_class(mode)
            nano = cls is not Engine
            engine = (cls if nano else _Probe)(m, mode=mode, max_grad_norm=None,
                                               loss_reduction="sum", audit=False)
            try:   # from here on the hooks are attached: detached whatever happens
                engine.keep_norms = True
                if nano:
                    engine.by_param = True   # each parameter's squared norms (param_sq)
                t0 = time.perf_counter()
                losses = loss_fn(m(*inputs), targets)
                if losses.requires_grad:
                    torch.autograd.backward(losses.sum())
                fast_s = time.perf_counter() - t0
                # After the forward: a leaf's operation rule is resolved at its first forward.
                rules = engine.rule_names()
            finally:
                engine.detach()
            contrib = getattr(engine, "contrib", {})
            if nano and engine.param_sq is not None:
                contrib = {p: engine.param_sq[:, i]
                           for i, (_, p) in enumerate(engine.covered_params())}
            fast_norms = engine.norms_log[0] if engine.norms_log else torch.zeros(B, dtype=torch.float64)
        # exact: float64 copy, one backward per example
        ref = copy.deepcopy(model).double()
        named = [(n, p) for n, p in ref.named_parameters() if p.requires_grad]
        orig = {n: p for n, p in model.named_parameters() if p.requires_grad}
        sq = {n: torch.zeros(B, dtype=torch.float64) for n, _ in named}
        t0 = time.perf_counter()
        for i in range(B):
            xi = tuple(x[i:i + 1].double() if isinstance(x, Tensor) and x.is_floating_point()
                       else (x[i:i + 1] if isinstance(x, Tensor) and x.dim() > 0 else x)
                       for x in inputs)
            ti = targets[i:i + 1] if isinstance(targets, Tensor) and targets.dim() > 0 else targets
            if isinstance(ti, Tensor) and ti.is_floating_point():
                ti = ti.double()
            loss = loss_fn(ref(*xi), ti).sum()
            grads = torch.autograd.grad(loss, [p for _, p in named], allow_unused=True)
            for (n, _), g in zip(named, grads):
                if g is not None:
                    sq[n][i] = g.square().sum()
        exact_s = time.perf_counter() - t0
    finally:
        for p, g in saved.items():
            p.grad = g
    total = sum(sq.values()) if sq else torch.zeros(B, dtype=torch.float64)
    floor = 1e-6 * total
    rows = []
    for n, _ in named:
        p = orig[n]
        fast = contrib.get(p, torch.zeros(B, dtype=torch.float64))
        rows.append(dict(name=n, rule=rules.get(p, "?"), shape=tuple(p.shape),
                         max_rel_err=_rel_err(fast.cpu(), sq[n], floor)))
    exact_norms = total.sqrt()
    report = Report(rows, _rel_err(fast_norms.cpu(), exact_norms, 1e-6 * exact_norms), fast_s,
                    exact_s, tol)
    if verbose:
        print(report)
    return report
