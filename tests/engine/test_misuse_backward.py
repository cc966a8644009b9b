"""Issue 13, engine side: the backward passes a user's loop makes beside the training backward.

Each case is measured against the privacy invariant's definition where it applies (tests/
misuse_common.py: noise 0, SGD at lr 1, loss_reduction="sum", so a step's parameter change is
the released clipped sum; one example's influence on it is at most the sensitivity), and against
tests/reference.py's float64 clipped sum.
"""
from __future__ import annotations

import copy
import threading

import pytest
import torch
from torch import nn

import fastclip
from misuse_common import flat_params, influence, private, released
from reference import clipped_sum
from harness import CE, MODES

SINGLE = MODES[:3]          # the single-backward modes: auto, ghost, direct
C = 1.0
EPS = 0.1


class Net(nn.Module):
    """Conv, GroupNorm, Linear (native rules) and a parameter used in the model's own forward
    (the direct rule): every capture path of the single-backward engine."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3)
        self.norm = nn.GroupNorm(1, 3)
        self.fc = nn.Linear(3 * 4 * 4, 3)
        self.shift = nn.Parameter(0.1 * torch.randn(3 * 4 * 4))

    def forward(self, x):
        h = torch.tanh(self.norm(self.conv(x))).flatten(1)
        return self.fc(h + self.shift)


def setup(dtype=torch.float64, B=4, seed=0):
    torch.manual_seed(seed)
    base = Net().to(dtype)
    # Gradients large enough that every example is clipped (the bound matters).
    x = 3 * torch.randn(B, 1, 6, 6, dtype=dtype)
    y = torch.randint(0, 3, (B,))
    return base, x, y


def tol(dtype):
    return dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-9, atol=1e-10)


def reference(base, x, y, mode, clipping):
    """The released clipped sum of one plain step on (x, y), flat float64 vector: the float64
    reference for flat clipping; per layer, fastclip's functional clipped_grad on a fresh copy."""
    m = copy.deepcopy(base)
    if clipping == "flat":
        ref = clipped_sum(m, CE, x, y, C)
        return torch.cat([ref[n].flatten() for n, _ in m.named_parameters()])
    fastclip.clipped_grad(m, CE, x, y, C, mode=mode, clipping=clipping)
    return torch.cat([p.grad.detach().double().flatten() for p in m.parameters()])


def sensitivity(base, mode, clipping):
    _, opt, _ = private(copy.deepcopy(base), C, mode=mode, clipping=clipping)
    return opt.engine.sensitivity


def train_step(m, opt, x, y):
    opt.zero_grad()
    CE(m(x), y).sum().backward()
    opt.step()


# ---- 1. extra backward passes ----------------------------------------------------------------
def adversarial(m, x, y, steps):
    """FGSM (steps=1) / PGD: input gradients through the private model, no parameter gradient."""
    xa = x.clone()
    for _ in range(steps):
        xa = xa.detach().requires_grad_()
        (g,) = torch.autograd.grad(CE(m(xa), y).sum(), xa)
        xa = xa + EPS * g.sign()
    return xa.detach()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("clipping", ["flat", "per_layer"])
@pytest.mark.parametrize("mode", SINGLE)
@pytest.mark.parametrize("steps", [1, 3])
def test_adversarial_training_releases_the_clipped_sum_on_the_adversarial_batch(
        steps, mode, clipping, dtype):
    """Before: the input-gradient passes wrote clipped sums too (one example moved the step by
    2.0 with FGSM, 4.0 with PGD-3, C = 1)."""
    base, x, y = setup(dtype)
    B = x.shape[0]
    seen = {}

    def run(idx):
        def loop(m):
            m, opt, _ = private(m, C, mode=mode, clipping=clipping)
            opt.engine.keep_norms = True
            opt.zero_grad()        # the usual loop: zero_grad, attack, backward, step
            xa = adversarial(m, x[idx], y[idx], steps)
            # The input-gradient passes left the engine and p.grad untouched.
            assert all(p.grad is None for p in m.parameters())
            assert opt.engine.examples == 0 and opt.engine.norms_log == []
            seen[tuple(idx)] = xa
            CE(m(xa), y[idx]).sum().backward()
            opt.step()
            assert len(opt.engine.norms_log) == 1
            return m
        return released(base, loop)

    full = run(list(range(B)))
    torch.testing.assert_close(full, reference(base, seen[tuple(range(B))], y, mode, clipping),
                               **tol(dtype))
    assert influence(run, B) <= sensitivity(base, mode, clipping) * (1 + 1e-6)


def test_nanobatch_refuses_input_gradients_before_anything_is_written():
    base, x, y = setup()
    m, opt, _ = private(base, C, mode="nanobatch")
    with pytest.raises(ValueError, match="a model input requires grad"):
        adversarial(m, x, y, 1)
    assert all(p.grad is None for p in m.parameters()) and opt.engine.examples == 0


@pytest.mark.parametrize("mode", SINGLE)
def test_backward_towards_the_input_only_leaves_the_engine_alone(mode):
    """loss.backward(inputs=[x]) for the model's input x: no parameter gradient written, no
    example counted (before: a clipped sum written and the batch counted); the next training
    backward is the clipped sum."""
    base, x, y = setup()
    m, opt, _ = private(copy.deepcopy(base), C, mode=mode)
    opt.engine.keep_norms = True
    xr = x.clone().requires_grad_()
    CE(m(xr), y).sum().backward(inputs=[xr])
    assert xr.grad is not None
    assert all(p.grad is None for p in m.parameters())
    assert opt.engine.examples == 0 and opt.engine.norms_log == []
    before = flat_params(m)
    train_step(m, opt, x, y)
    torch.testing.assert_close(before - flat_params(m), reference(base, x, y, mode, "flat"),
                               **tol(torch.float64))


@pytest.mark.parametrize("clipping", ["flat", "per_layer"])
@pytest.mark.parametrize("mode", SINGLE)
def test_input_saliency_then_training_backward_of_the_same_graph(mode, clipping):
    """autograd.grad(loss, x, retain_graph=True) then loss.backward(): the first pass asks for no
    parameter, so the graph's one private backward is the second."""
    base, x, y = setup()

    def loop(m):
        m, opt, _ = private(m, C, mode=mode, clipping=clipping)
        xr = x.clone().requires_grad_()
        loss = CE(m(xr), y).sum()
        torch.autograd.grad(loss, xr, retain_graph=True)
        assert all(p.grad is None for p in m.parameters())
        loss.backward()
        opt.step()
        return m

    torch.testing.assert_close(released(base, loop), reference(base, x, y, mode, clipping),
                               **tol(torch.float64))


@pytest.mark.parametrize("clipping", ["flat", "per_layer"])
@pytest.mark.parametrize("mode", MODES)
def test_the_same_graph_backpropagated_twice_is_refused(mode, clipping):
    """Before: "cannot unpack non-iterable NoneType" (conv/norm), a TypeError (nanobatch), or
    every example counted twice. After: refused by name; the step the user may still take holds
    each example once, and the engine starts the next backward clean."""
    base, x, y = setup()

    def loop(m):
        m, opt, _ = private(m, C, mode=mode, clipping=clipping)
        loss = CE(m(x), y).sum()
        loss.backward(retain_graph=True)
        with pytest.raises(RuntimeError, match="already backpropagated once.*combine the losses"
                           .replace("combine", "Combine")):
            loss.backward()
        assert opt.engine.examples == x.shape[0]
        opt.step()
        return m

    ref = reference(base, x, y, mode, clipping)
    torch.testing.assert_close(released(base, loop), ref, **tol(torch.float64))

    m, opt, _ = private(copy.deepcopy(base), C, mode=mode, clipping=clipping)
    loss = CE(m(x), y).sum()
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="each example may enter a step once"):
        loss.backward()
    opt.zero_grad()
    before = flat_params(m)
    train_step(m, opt, x, y)
    torch.testing.assert_close(before - flat_params(m), ref, **tol(torch.float64))


@pytest.mark.parametrize("clipping", ["flat", "per_layer"])
@pytest.mark.parametrize("mode", MODES)
def test_backward_for_some_parameters_is_refused_before_anything_is_written(mode, clipping):
    base, x, y = setup()
    m, opt, _ = private(copy.deepcopy(base), C, mode=mode, clipping=clipping)
    for some in ([m.fc.weight], [m.fc.weight, m.fc.bias], [m.conv.weight], [m.shift]):
        with pytest.raises(RuntimeError, match="only some of the private model's parameters"):
            CE(m(x), y).sum().backward(inputs=some)
        assert all(p.grad is None for p in m.parameters()) and opt.engine.examples == 0
    with pytest.raises(RuntimeError, match="torch.autograd.grad asked for the gradient"):
        torch.autograd.grad(CE(m(x), y).sum(), [m.fc.weight])
    assert all(p.grad is None for p in m.parameters()) and opt.engine.examples == 0
    # Asking for all of them is the ordinary step.
    before = flat_params(m)
    CE(m(x), y).sum().backward(inputs=list(m.parameters()))
    opt.step()
    torch.testing.assert_close(before - flat_params(m), reference(base, x, y, mode, clipping),
                               **tol(torch.float64))


def test_plain_backward_of_a_loss_that_leaves_a_head_out_is_not_partial():
    """A parameter outside the loss's graph gets no gradient in a plain backward: not a partial
    backward (the check tells it from backward(inputs=[...]))."""

    class TwoHeads(nn.Module):
        def __init__(self):
            super().__init__()
            self.body, self.a, self.b = nn.Linear(4, 5), nn.Linear(5, 3), nn.Linear(5, 3)

        def forward(self, x):
            h = torch.tanh(self.body(x))
            return self.a(h), self.b(h)

    torch.manual_seed(0)
    base = TwoHeads().double()
    x, y = 3 * torch.randn(4, 4, dtype=torch.float64), torch.randint(0, 3, (4,))
    for mode in SINGLE:
        m, opt, _ = private(copy.deepcopy(base), C, mode=mode)
        CE(m(x)[0], y).sum().backward()
        assert m.b.weight.grad is None and m.a.weight.grad is not None
        assert opt.engine.examples == 4


# ---- 2. double backward -------------------------------------------------------------------------
@pytest.mark.parametrize("mode", MODES)
def test_create_graph_is_refused_before_anything_is_written(mode):
    """Before: "mul(): functions with out=... arguments don't support automatic differentiation"
    from inside the finalize (auto), or silently clipped sums without a graph (nanobatch)."""
    base, x, y = setup()
    m, opt, _ = private(copy.deepcopy(base), C, mode=mode)
    with pytest.raises(RuntimeError, match="create_graph=True"):
        CE(m(x), y).sum().backward(create_graph=True)
    with pytest.raises(RuntimeError, match="create_graph=True"):
        torch.autograd.grad(CE(m(x), y).sum(), list(m.parameters()), create_graph=True)
    if mode != "nanobatch":   # (nanobatch refuses inputs that require grad at the forward)
        xr = x.clone().requires_grad_()
        with pytest.raises(RuntimeError, match="create_graph=True"):
            torch.autograd.grad(CE(m(xr), y).sum(), xr, create_graph=True)
    assert all(p.grad is None for p in m.parameters()) and opt.engine.examples == 0
    before = flat_params(m)
    train_step(m, opt, x, y)
    torch.testing.assert_close(before - flat_params(m), reference(base, x, y, mode, "flat"),
                               **tol(torch.float64))


# ---- 3. threads ------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", MODES)
def test_an_evaluation_thread_beside_training(mode):
    """Before: "trying to pop from empty mode stack" in either thread. After: the training steps
    are those of a run without the evaluation thread, to the bit."""
    base, x, y = setup(torch.float32)
    steps = 15

    def train(m, opt):
        for _ in range(steps):
            train_step(m, opt, x, y)

    alone, opt_a, _ = private(copy.deepcopy(base), C, mode=mode, lr=0.1)
    train(alone, opt_a)
    m, opt, _ = private(copy.deepcopy(base), C, mode=mode, lr=0.1)
    stop, errors = threading.Event(), []

    def evaluate():
        try:
            while not stop.is_set():
                with torch.no_grad():
                    m(x)
        except Exception as e:  # noqa: BLE001  (reported by the main thread)
            errors.append(e)

    t = threading.Thread(target=evaluate)
    t.start()
    try:
        train(m, opt)
    finally:
        stop.set()
        t.join()
    assert errors == []
    assert torch.equal(flat_params(m), flat_params(alone))


@pytest.mark.parametrize("mode", SINGLE)
def test_two_threads_backpropagating_at_once_are_refused(mode):
    """Thread A is inside its backward (after its first record); thread B's backward through the
    same model is refused, and A's step holds A's examples only."""
    base, x, y = setup()
    x2, y2 = x.flip(0) + 1, y.flip(0)
    m, opt, _ = private(copy.deepcopy(base), C, mode=mode)
    inside, done, errors = threading.Event(), threading.Event(), []

    def other():
        inside.wait(30)
        try:
            CE(m(x2), y2).sum().backward()
        except RuntimeError as e:
            errors.append(str(e))
        finally:
            done.set()

    t = threading.Thread(target=other)
    t.start()
    before = flat_params(m)
    main = threading.current_thread()

    def pause(module, args, out):   # A's backward waits there, after fc's record, for B's
        if threading.current_thread() is main and out.requires_grad:
            out.register_hook(lambda g: (inside.set(), done.wait(30), None)[-1])

    handle = m.norm.register_forward_hook(pause)
    try:
        CE(m(x), y).sum().backward()
    finally:
        handle.remove()
        inside.set()
        t.join()
    assert len(errors) == 1 and "two threads backpropagate" in errors[0]
    opt.step()
    torch.testing.assert_close(before - flat_params(m), reference(base, x, y, mode, "flat"),
                               **tol(torch.float64))


# ---- 4. torch.compile --------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["auto", "nanobatch"])
def test_compile_after_make_private_is_exact(mode):
    """Compiled after make_private: the hooks break the graph (single-backward modes) and the
    nanobatch forward runs eagerly; the step is the exact clipped sum either way."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    x, y = 3 * torch.randn(4, 5, dtype=torch.float64), torch.randint(0, 3, (4,))

    def loop(m):
        m, opt, _ = private(m, C, mode=mode)
        train_step(torch.compile(m), opt, x, y)
        return m

    ref = clipped_sum(copy.deepcopy(base), CE, x, y, C)
    torch.testing.assert_close(released(base, loop),
                               torch.cat([ref[n].flatten() for n, _ in base.named_parameters()]),
                               rtol=1e-9, atol=1e-10)


# ---- 5. validate ---------------------------------------------------------------------------------
def _hookless(m):
    """No hook, wrapped forward or parameter hook of fastclip's left on ``m``."""
    return (all(not mod._forward_hooks and not mod._forward_pre_hooks and "forward" not in
                mod.__dict__ for mod in m.modules())
            and all(not p._backward_hooks for p in m.parameters()))


def _plain_grads(m, x, y):
    for p in m.parameters():
        p.grad = None
    CE(m(x), y).sum().backward()
    return [p.grad.clone() for p in m.parameters()]


def test_validate_in_nanobatch_mode_reports_every_parameter():
    """Before: a bare KeyError, and hooks left that made a later plain backward give no
    gradients."""
    base, x, y = setup(torch.float32)
    m = copy.deepcopy(base)
    report = fastclip.validate(m, CE, x, y, mode="nanobatch", verbose=False)
    assert report.ok
    assert [r["name"] for r in report.rows] == [n for n, _ in m.named_parameters()]
    assert {r["rule"] for r in report.rows} == {"NanoBatch"}
    assert _hookless(m)
    assert all(torch.equal(a, b) for a, b in zip(_plain_grads(m, x, y),
                                                 _plain_grads(copy.deepcopy(base), x, y)))


@pytest.mark.parametrize("mode", MODES)
def test_validate_leaves_the_model_as_found_when_the_loss_fails_midway(mode):
    base, x, y = setup(torch.float32)
    m = copy.deepcopy(base)
    calls = []

    def failing(out, t):
        calls.append(1)
        if len(calls) == 2:   # the first call is the warm-up; the second is validate's own pass
            raise RuntimeError("boom")
        return CE(out, t)

    with pytest.raises(RuntimeError, match="boom"):
        fastclip.validate(m, failing, x, y, mode=mode, verbose=False)
    assert _hookless(m)
    assert all(p.grad is None for p in m.parameters())
    assert all(torch.equal(a, b) for a, b in zip(_plain_grads(m, x, y),
                                                 _plain_grads(copy.deepcopy(base), x, y)))


# ---- 6. empty Poisson batch beside a broadcast input --------------------------------------------
class PosModel(nn.Module):
    def __init__(self, V=7, T=5, d=4):
        super().__init__()
        self.tok, self.pos, self.out = nn.Embedding(V, d), nn.Embedding(T, d), nn.Linear(d, 3)

    def forward(self, ids, pos):
        return self.out(torch.tanh(self.tok(ids) + self.pos(pos))).mean(1)


@pytest.mark.parametrize("clipping", ["flat", "per_layer"])
@pytest.mark.parametrize("mode", MODES)
def test_empty_batch_with_broadcast_position_ids_releases_the_noise_only_step(mode, clipping):
    """Before: "batch sizes differ" for ids (0, T) beside position ids (1, T) (single-backward
    modes). After: the noise-only step is released and accounted, as without the broadcast input;
    and with examples, the step is the exact clipped sum."""
    torch.manual_seed(0)
    base = PosModel().double()
    T = 5
    pos = torch.arange(T).unsqueeze(0)
    m, opt, _ = private(copy.deepcopy(base), C, mode=mode, clipping=clipping, noise_multiplier=1.0)
    before = flat_params(m)
    opt.zero_grad()
    CE(m(torch.zeros(0, T, dtype=torch.long), pos), torch.zeros(0, dtype=torch.long)).sum().backward()
    opt.step()
    assert opt.accountant.steps == 1
    assert (flat_params(m) - before).abs().min() > 0      # noise on every coordinate

    ids, y = torch.randint(0, 7, (3, T)), torch.randint(0, 3, (3,))

    def loop(mm):
        mm, o, _ = private(mm, C, mode=mode, clipping=clipping)
        o.zero_grad()
        CE(mm(ids, pos), y).sum().backward()
        o.step()
        return mm

    if clipping == "flat":
        ref = clipped_sum(copy.deepcopy(base), CE, (ids, pos), y, C)
        ref = torch.cat([ref[n].flatten() for n, _ in base.named_parameters()])
    else:
        r = copy.deepcopy(base)
        fastclip.clipped_grad(r, CE, (ids, pos), y, C, mode=mode, clipping=clipping)
        ref = torch.cat([p.grad.double().flatten() for p in r.parameters()])
    torch.testing.assert_close(released(base, loop), ref, rtol=1e-9, atol=1e-10)


# ---- modules that record in pieces (fastclip.nn LSTM, MultiheadAttention) ------------------------
class Seq(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn = nn.LSTM(4, 5, num_layers=2, batch_first=True)
        self.att = nn.MultiheadAttention(5, 1, batch_first=True, add_bias_kv=True)
        self.fc = nn.Linear(5, 3)

    def forward(self, x):
        h, _ = self.rnn(x)
        a, _ = self.att(h, h, h, need_weights=False)
        return self.fc(a.mean(1))


@pytest.mark.parametrize("mode", SINGLE)
def test_pieced_modules_saliency_then_training_and_twice(mode):
    """An input-gradient pass through the LSTM and attention adds no piece to their uses (the
    training backward of the same graph is the exact clipped sum); a third backward is refused."""
    torch.manual_seed(0)
    base = Seq().double()
    x, y = 3 * torch.randn(3, 4, 4, dtype=torch.float64), torch.randint(0, 3, (3,))
    m, opt, _ = private(copy.deepcopy(base), C, mode=mode)
    before = flat_params(m)
    xr = x.clone().requires_grad_()
    loss = CE(m(xr), y).sum()
    torch.autograd.grad(loss, xr, retain_graph=True)
    assert all(p.grad is None for p in m.parameters())
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="already backpropagated once"):
        loss.backward()
    opt.step()
    ref = clipped_sum(copy.deepcopy(base), CE, x, y, C)
    torch.testing.assert_close(before - flat_params(m),
                               torch.cat([ref[n].flatten() for n, _ in base.named_parameters()]),
                               rtol=1e-9, atol=1e-10)
