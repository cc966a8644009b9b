"""The shared test harness: every mode's per-example norms and clipped sums against
tests/reference.py (float64, one backward per example), in one ``check``.

    from harness import CE, MODES, assert_close, check
    check(model, x, y, loss=CE, modes=MODES, C=0.5, dtype=torch.float32)

Per-file helpers wrap ``check`` where a file asserts something more (test_norm: which rule covers
the layer; test_conv: a bound from the reference norms). Opacus' tests/grad_samples/common.py
``run_test`` is the model.
"""
from __future__ import annotations

import contextlib
import os
import socket
import tempfile
import time
from datetime import timedelta
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import fastclip
import reference as R
from conftest import tol
from fastclip.engine import Engine
from fastclip.nn.rnn import converted

MODES = ("auto", "ghost", "direct", "nanobatch")
CE = nn.CrossEntropyLoss(reduction="none")


def mse(out, y):
    """Per-example squared error summed over every non-batch dimension: (B,)."""
    return (out - y).square().flatten(1).sum(1)


def assert_close(a, b, dtype=torch.float64, msg=None, same_dtype=False):
    """``a`` equals ``b`` within ``tol(dtype)``, both compared in float64 (``same_dtype``: and
    ``a`` and ``b`` have one dtype)."""
    if same_dtype:
        assert a.dtype == b.dtype, (a.dtype, b.dtype)
    rtol, atol = tol(dtype)
    torch.testing.assert_close(a.double(), b.double(), rtol=rtol, atol=atol, msg=msg)


def flat_grad(model):
    """Every parameter's .grad, flattened and concatenated in float64."""
    return torch.cat([p.grad.flatten().double() for p in model.parameters()])


# ---- per-layer clipping's reference --------------------------------------------------------

def layer_groups(model, bound):
    """[(parameter names of a layer, its bound)] as the engine groups the model's layers."""
    names = {id(p): n for n, p in model.named_parameters()}
    with converted(model) as m:
        eng = Engine(m, max_grad_norm=bound, clipping="per_layer")
        eng.detach()
    return [([names[id(p)] for p in layer.params], C) for layer, C in zip(eng.layers, eng.bounds)]


def reference_per_layer(model, loss_fn, x, y, bound):
    """{name: sum_i clip_l(g_i restricted to layer l)} in float64 (the engine's layers, the
    reference's gradients)."""
    g = R.per_example_grads(model, loss_fn, x, y)
    out = {}
    for names, C in layer_groups(model, bound):
        sq = sum(g[n].flatten(1).square().sum(1) for n in names)
        norm = sq.sqrt()
        c = torch.clamp(C / norm, max=1.0)
        c[norm == 0] = 1.0
        for n in names:
            out[n] = torch.tensordot(c, g[n], dims=1)
    return out


# ---- the model left as found ---------------------------------------------------------------

def _snapshot(model):
    return dict(
        types=[type(m) for m in model.modules()],
        params=[(n, p, p.detach().clone(), p.requires_grad) for n, p in model.named_parameters()],
        hooks=[(len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks))
               for m in model.modules()],
        attrs=[sorted(vars(m)) for m in model.modules()],
        training=[m.training for m in model.modules()],
    )


def _assert_as_found(model, before, mode):
    now = _snapshot(model)
    assert now["types"] == before["types"], f"{mode}: module types changed"
    assert [(n, id(p)) for n, p, _, _ in now["params"]] == \
        [(n, id(p)) for n, p, _, _ in before["params"]], f"{mode}: parameters replaced"
    for (n, p, _, rg), (_, _, v, rg0) in zip(now["params"], before["params"]):
        assert isinstance(p, nn.Parameter) and rg == rg0, f"{mode}: {n} changed kind"
        assert torch.equal(p.detach(), v), f"{mode}: {n} changed value"
    assert now["hooks"] == before["hooks"], f"{mode}: hooks left on the model"
    assert now["attrs"] == before["attrs"], f"{mode}: attributes left on the model"
    assert now["training"] == before["training"], f"{mode}: train/eval changed"


# ---- check ---------------------------------------------------------------------------------

def _cast(t, dtype):
    return t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t


def _clip(model, loss, xs, y, C, mode, clipping, reduction, kw):
    """Set p.grad = sum_i clip(g_i); the (B,) norms the call reports."""
    if reduction == "sum":
        return fastclip.clipped_grad(model, loss, xs, y, max_grad_norm=C, mode=mode,
                                     clipping=clipping, **kw)
    # "mean": the user's own backward of the mean loss through an attached engine, which
    # scales the batch size back in: p.grad is the clipped sum again. (An empty batch's mean is
    # NaN, so B = 0 backpropagates the sum, which is what a mean over no example contributes.)
    B = xs[0].shape[0]
    with converted(model) as m:
        eng = Engine(m, mode=mode, max_grad_norm=C, loss_reduction="mean", clipping=clipping,
                     **kw)
        eng.keep_norms = True
        try:
            losses = loss(m(*xs), y)
            (losses.mean() if B else losses.sum()).backward()
        finally:
            eng.detach()
    for p in model.parameters():
        if p.requires_grad and p.grad is None:
            p.grad = torch.zeros_like(p)
    return torch.cat(eng.norms_log) if eng.norms_log else torch.zeros(B, dtype=torch.float64)


def check(model: nn.Module, x, y, *, loss: Callable = CE, modes: Sequence[str] = MODES,
          clipping: str = "flat", C=1.0, reduction: str = "sum",
          dtype: torch.dtype = torch.float64, cast: bool = False,
          grad_tol: Optional[Tuple[float, float]] = None, **engine_kw) -> Dict[str, torch.Tensor]:
    """In every mode, per-example norms and clipped sums equal tests/reference.py's, and the
    model is left as found.

    Args:
        model, x, y, loss: ``loss(model(*x), y)`` -> (B,); ``x`` a tensor (B, ...) or a tuple.
        modes: the engine modes to run.
        clipping: "flat" or "per_layer" (the reference clips the engine's layers).
        C: the bound (a list per layer with "per_layer"); a callable gets the reference norms
            and returns the bound (1.0 for an empty batch); None checks the norms only.
        reduction: "sum": ``fastclip.clipped_grad``; "mean": an attached Engine with
            ``loss_reduction="mean"`` and the user's ``loss.mean().backward()``.
        dtype: the tolerance, ``conftest.tol(dtype)``; with ``cast`` also the model's, the
            floating inputs' and the targets' dtype.
        grad_tol: (rtol, atol) for the clipped sums instead of ``tol(dtype)``.
        engine_kw: to both calls (nanobatch_size, num_threads, audit).

    Asserted per mode: ``per_sample_grad_norms`` is (B,) float64 and equals the reference; the
    clipping call reports the same norms; every trainable parameter's .grad has its parameter's
    dtype and shape and equals the reference clipped sum (exactly 0 for B = 0); a frozen
    parameter's .grad stays None; the model has the same modules, parameters (objects, values,
    requires_grad), hooks, attributes and train/eval flags as before.

    Returns:
        {mode: the (B,) norms per_sample_grad_norms reported}.
    """
    if clipping not in ("flat", "per_layer"):
        raise ValueError(f"check: clipping must be 'flat' or 'per_layer', got {clipping!r}")
    if reduction not in ("sum", "mean"):
        raise ValueError(f"check: reduction must be 'sum' or 'mean', got {reduction!r}")
    xs = x if isinstance(x, tuple) else (x,)
    if cast:
        model = model.to(dtype)
        xs, y = tuple(_cast(t, dtype) for t in xs), _cast(y, dtype)
    B = xs[0].shape[0]
    rtol, atol = tol(dtype)
    g_rtol, g_atol = grad_tol or (rtol, atol)
    ref_n = R.norms(model, loss, xs, y) if B else None
    if callable(C):
        C = C(ref_n) if B else 1.0
    ref = None
    if B and C is not None:
        ref = (R.clipped_sum(model, loss, xs, y, C) if clipping == "flat" else
               reference_per_layer(model, loss, xs, y, C))
    out = {}
    for mode in modes:
        before = _snapshot(model)
        n = fastclip.per_sample_grad_norms(model, loss, xs, y, mode=mode, **engine_kw)
        assert n.shape == (B,) and n.dtype == torch.float64, (mode, n.shape, n.dtype)
        if B:
            torch.testing.assert_close(n, ref_n, rtol=rtol, atol=atol, msg=mode)
        out[mode] = n
        if C is not None:
            for p in model.parameters():
                p.grad = None
            got = _clip(model, loss, xs, y, C, mode, clipping, reduction, engine_kw)
            assert got.shape == (B,), (mode, got.shape)
            if B:
                torch.testing.assert_close(got.double(), ref_n, rtol=rtol, atol=atol, msg=mode)
            for k, p in model.named_parameters():
                if not p.requires_grad:
                    assert p.grad is None, f"{mode}: frozen {k} has a .grad"
                    continue
                assert p.grad is not None and p.grad.dtype == p.dtype and \
                    p.grad.shape == p.shape, f"{mode}: {k}"
                if B:
                    # atol in units of the sum's own scale: an entry where the examples'
                    # terms cancel keeps the rounding of the terms (float32: 2e-6 on a
                    # conv weight of scale 26, where a float32 per-example loop is off 9e-7)
                    scale = max(1.0, float(ref[k].abs().max()))
                    torch.testing.assert_close(p.grad.double(), ref[k], rtol=g_rtol,
                                               atol=g_atol * scale, msg=f"{mode} {k}")
                else:
                    assert not p.grad.any(), f"{mode}: {k} nonzero for an empty batch"
        _assert_as_found(model, before, mode)
    return out


# -- multi-process tests (gloo) ----------------------------------------------------------------

def assert_bad_example_dropped(model: nn.Module, x, y, bad: int, **kw) -> None:
    """``fastclip.clipped_grad`` on a batch whose example ``bad`` has a non-finite gradient equals
    it on the batch without that example: the example contributes nothing (kernels' memos and
    kept rows included)."""
    fastclip.clipped_grad(model, CE, x, y, **kw)
    got = {n: p.grad.clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = None
    keep = [i for i in range(x.shape[0]) if i != bad]
    fastclip.clipped_grad(model, CE, x[keep], y[keep], **kw)
    for n, p in model.named_parameters():
        torch.testing.assert_close(got[n], p.grad, msg=n)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def refusal(fn: Callable) -> Optional[str]:
    """In a worker: ``fn()``'s error as "Type: message" (a string the parent can check), or None
    if it raised nothing."""
    try:
        fn()
    except Exception as e:       # noqa: BLE001 - the message is the result
        return f"{type(e).__name__}: {e}"
    return None


@contextlib.contextmanager
def gloo_group(rank: int, port: int, world: int, timeout_s: float):
    """In a spawned worker: one CPU thread and a gloo process group on localhost only, destroyed
    when the block ends (also on an error)."""
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=timedelta(seconds=timeout_s))
    try:
        yield
    finally:
        dist.destroy_process_group()


# Modules the workers' server imports once (forkserver): each worker is forked from it with
# torch and fastclip loaded, instead of importing them itself (about 2.5 s of CPU per process).
_PRELOAD = ["torch", "torch.distributed", "torch.distributed.fsdp",
            "torch.distributed.pipelining", "fastclip", "reference", "harness"]


def _start_method() -> str:
    """"forkserver" (a clean server process, not a fork of pytest's, that preloads _PRELOAD) where
    the platform has it, else "spawn"."""
    import multiprocessing
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return "spawn"
    multiprocessing.get_context("forkserver").set_forkserver_preload(_PRELOAD)
    return "forkserver"


def child_env(**extra: str) -> Dict[str, str]:
    """The environment for a child ``python`` that must import the very fastclip these tests run
    (the source tree or site-packages): its parent directory first on PYTHONPATH, and
    PYTHONSAFEPATH so that ``-c`` or a script does not put a checkout's uncompiled ./fastclip
    first. ``extra``: more variables."""
    parent = os.path.dirname(os.path.dirname(os.path.abspath(fastclip.__file__)))
    path = os.pathsep.join([parent] + [p for p in [os.environ.get("PYTHONPATH")] if p])
    return dict(os.environ, PYTHONPATH=path, PYTHONSAFEPATH="1", **extra)


def _in_worker(rank: int, worker: Callable, fastclip_file: str, *args) -> None:
    """Runs ``worker(rank, *args)`` after checking the worker imported the parent's fastclip: a
    source checkout's ``fastclip/`` (no compiled core) on the worker's path would silently run
    every op in plain torch, and its noise on other streams than the parent's."""
    if os.path.abspath(fastclip.__file__) != fastclip_file:
        raise RuntimeError(f"worker imported {fastclip.__file__}, the tests run {fastclip_file}")
    worker(rank, *args)


def run_ranks(worker: Callable, world: int, timeout_s: float, *extra) -> List[dict]:
    """Spawn ``world`` processes running ``worker(rank, port, outdir, *extra)``, each of which
    saves its results to ``outdir/rank{r}.pt``; returns them by rank. A process still running
    after ``2 * timeout_s`` is killed and the test fails (a hang must not stall the suite).
    Pass what the workers need as ``extra`` arguments, not through ``os.environ``: the workers
    fork from a server started by the first test file that spawned any, with its environment."""
    with tempfile.TemporaryDirectory() as outdir:
        # The forkserver runs ``python -c``, which puts the current directory first on sys.path:
        # from a source checkout it would import ./fastclip (no compiled core) instead of the
        # installed package. PYTHONSAFEPATH (Python >= 3.11) leaves it out; set only while the
        # server may start, so other subprocesses of the tests keep their usual path.
        safe = os.environ.get("PYTHONSAFEPATH")
        os.environ["PYTHONSAFEPATH"] = "1"
        try:
            ctx = mp.start_processes(_in_worker, nprocs=world, join=False,
                                     args=(worker, os.path.abspath(fastclip.__file__),
                                           _free_port(), outdir) + extra,
                                     start_method=_start_method())
        finally:
            if safe is None:
                os.environ.pop("PYTHONSAFEPATH")
            else:
                os.environ["PYTHONSAFEPATH"] = safe
        deadline = time.monotonic() + 2 * timeout_s
        try:
            while not ctx.join(timeout=1):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"the {world} processes did not finish in {2 * timeout_s} s")
        finally:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
                    p.join(5)
        return [torch.load(os.path.join(outdir, f"rank{r}.pt")) for r in range(world)]
