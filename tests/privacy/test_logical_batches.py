"""Logical batches larger than memory (fastclip.optim.BatchMemoryManager): a logical batch split
into physical batches gives the update of the whole batch in one backward (noise once, one step
accounted, "mean" over the expected logical batch size), empty logical batches still step, no
other physical batch is empty, leaving the loop restores one step per call, checkpoints resume
exactly."""
import copy
import io
from collections import namedtuple

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import fastclip
import reference as R
from fastclip.data import split_batch
from fastclip.optim import BatchMemoryManager
from harness import MODES

DELTA = 1e-5
C = 0.4
B = 7          # the logical batch of the equality tests
N = 28         # dataset size: with batch_size 7, q = 1/4 and the expected batch size E = 7


class Net(nn.Module):
    """Embedding over a sequence, LayerNorm, Linear over positions, and a head: native rules with
    T > 1 (ghost and direct really differ) beside T = 1."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 5)
        self.ln = nn.LayerNorm(5)
        self.seq = nn.Linear(5, 6)
        self.head = nn.Linear(6 + 3, 3)

    def forward(self, tokens, feats):
        h = torch.tanh(self.seq(self.ln(self.emb(tokens)))).mean(1)
        return self.head(torch.cat([h, feats], 1))


def ce(out, y):
    return nn.functional.cross_entropy(out, y, reduction="none")


def _batch(seed, size=B):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 10, (size, 4), generator=g)
    feats = torch.randn(size, 3, generator=g, dtype=torch.float64) * 3
    feats[:2] *= 100                               # some examples are clipped, some not
    return tokens, feats, torch.randint(0, 3, (size,), generator=g)


def _private(mode, reduction, noise=1.3, seed=5, lr=0.5, loader=True, opt_cls=torch.optim.SGD,
             clipping="flat"):
    """(private model, DPOptimizer, a copy of the model before make_private)."""
    torch.manual_seed(0)
    m = Net().double()
    base = copy.deepcopy(m)       # before make_private attaches its hooks
    ds = TensorDataset(*_batch(99, N))
    m, opt, _ = fastclip.make_private(
        m, opt_cls(m.parameters(), lr=lr), DataLoader(ds, batch_size=B) if loader else None,
        noise_multiplier=noise, max_grad_norm=C, mode=mode, loss_reduction=reduction,
        generator=torch.Generator().manual_seed(seed), clipping=clipping)
    if loader:
        # The tests train on batches of their own, which the loader's sampler never drew (step()
        # refuses those): the same optimizer, told the loader's sampling rate and expected batch
        # size explicitly, without the sampler.
        opt = fastclip.DPOptimizer(opt.original_optimizer, opt.engine, noise, opt.expected_batch_size,
                                   opt.generator, opt.sample_rate)
    return m, opt, base


def _loss(m, batch, reduction):
    tokens, feats, y = batch
    loss = ce(m(tokens, feats), y)
    return loss.mean() if reduction == "mean" else loss.sum()


def _flat(m):
    return torch.cat([p.detach().flatten() for p in m.parameters()])


def _train(m, opt, batches, reduction, max_physical=None, zero_first=True):
    """One step per batch in ``batches`` (logical batches); through the manager when
    ``max_physical`` is given. Returns the physical batch sizes."""
    sizes = []
    loader = batches if max_physical is None else BatchMemoryManager(batches, max_physical, opt)
    for batch in loader:
        sizes.append(len(batch[0]))
        if zero_first:
            opt.zero_grad()
        _loss(m, batch, reduction).backward()
        opt.step()
        if not zero_first:
            opt.zero_grad()
    return sizes


# ---- a split logical batch gives the update of the whole batch ----------------------------------

@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("max_physical, sizes", [
    (7, [7]), (8, [7]),                    # k = 1
    (4, [4, 3]),                           # k = 2, uneven
    (3, [3, 3, 1]),                        # k = 3, uneven
    (1, [1] * 7),                          # physical size 1
])
@pytest.mark.parametrize("zero_first", [True, False])
@pytest.mark.parametrize("clipping", ["flat", "per_layer"])
def test_split_logical_batch_gives_the_update_of_one_batch(mode, reduction, max_physical, sizes,
                                                           zero_first, clipping):
    batches = [_batch(1), _batch(2)]           # two logical batches: the second starts clean
    m1, opt1, _ = _private(mode, reduction, opt_cls=torch.optim.Adam, clipping=clipping)
    _train(m1, opt1, batches, reduction)
    m2, opt2, _ = _private(mode, reduction, opt_cls=torch.optim.Adam, clipping=clipping)
    got = _train(m2, opt2, batches, reduction, max_physical, zero_first)
    assert got == sizes * 2
    torch.testing.assert_close(_flat(m2), _flat(m1), rtol=1e-10, atol=1e-12)
    assert opt2.steps == opt1.steps == 2
    assert opt2.accountant.history == opt1.accountant.history
    assert opt2.epsilon(DELTA) == opt1.epsilon(DELTA)
    assert not opt2.skips_step and opt2.expected_batch_size == opt1.expected_batch_size


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("max_physical", [1, 3, 4])
def test_split_update_is_the_reference_clipped_sum(mode, reduction, max_physical):
    """Noise 0, SGD lr 1: the parameters move by -sum_i clip(g_i) / E ("mean", E the expected
    logical batch size, not the physical one) or -sum_i clip(g_i) ("sum")."""
    m, opt, m0 = _private(mode, reduction, noise=0.0, lr=1.0)
    batch = _batch(3)
    _train(m, opt, [batch], reduction, max_physical)
    ref = R.clipped_sum(m0, ce, batch[:2], batch[2], C)
    E = opt.expected_batch_size if reduction == "mean" else 1.0
    assert reduction == "sum" or E == pytest.approx(B)
    for (name, p), p0 in zip(m.named_parameters(), m0.parameters()):
        torch.testing.assert_close(p - p0, -ref[name] / E, rtol=1e-10, atol=1e-12)


def test_mean_without_a_sample_rate_divides_by_the_logical_batch():
    """No loader: "mean" divides by the examples seen since the last step, all physical batches."""
    m1, opt1, _ = _private("auto", "mean", loader=False)
    m2, opt2, _ = _private("auto", "mean", loader=False)
    assert opt1.expected_batch_size is None
    batch = _batch(4, 10)
    _train(m1, opt1, [batch], "mean")
    _train(m2, opt2, [batch], "mean", max_physical=3)
    torch.testing.assert_close(_flat(m2), _flat(m1), rtol=1e-10, atol=1e-12)


def test_step_on_a_non_final_physical_batch_is_a_documented_no_op():
    m, opt, _ = _private("auto", "sum")
    before = _flat(m)
    batch = _batch(5)
    mgr = BatchMemoryManager([batch], 3, opt)
    it = iter(mgr)
    part = next(it)
    assert opt.skips_step
    calls = []

    def closure():
        calls.append(1)
        opt.zero_grad()                     # ignored once the logical batch has begun
        loss = _loss(m, part, "sum")
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert calls == [1] and torch.is_tensor(loss)          # the closure ran, its loss returned
    grads = [p.grad.clone() for p in m.parameters()]
    opt.step()
    opt.zero_grad()                                        # kept: the logical batch is unfinished
    assert opt.steps == 0 and torch.equal(_flat(m), before)
    assert all(torch.equal(g, p.grad) for g, p in zip(grads, m.parameters()))
    assert opt.engine.examples == 3
    mgr.close()


def test_reduction_across_ranks_runs_once_per_logical_batch(monkeypatch):
    calls = []

    class CountingReducer:
        def reduce(self, params, engine):
            calls.append(engine.examples)

    monkeypatch.setattr(fastclip.distributed, "agree_seed", lambda seed, src=0: seed)
    m, opt, _ = _private("auto", "mean")
    opt.reducer = CountingReducer()
    empty = tuple(t[:0] for t in _batch(6))
    _train(m, opt, [_batch(6), empty, _batch(7, 5)], "mean", max_physical=2)
    assert calls == [7, 0, 5] and opt.steps == 3


# ---- Poisson-sampled logical batches through make_private's loader -------------------------------

def _poisson_run(max_physical=None, epochs=6, seed=3):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(8)
    ds = TensorDataset(torch.randn(6, 4, generator=g, dtype=torch.float64) * 2,
                       torch.randint(0, 3, (6,), generator=g))
    m = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    m, opt, loader = fastclip.make_private(m, torch.optim.SGD(m.parameters(), lr=0.3),
                                           DataLoader(ds, batch_size=2), noise_multiplier=1.1,
                                           max_grad_norm=0.5, generator=torch.Generator().manual_seed(seed))
    logical, physical, current = [], [], 0
    steps_before = opt.steps
    for _ in range(epochs):
        batches = loader if max_physical is None else BatchMemoryManager(loader, max_physical, opt)
        for x, y in batches:
            physical.append(len(x))
            current += len(x)
            last = not opt.skips_step
            opt.zero_grad()
            nn.functional.cross_entropy(m(x), y).backward()
            opt.step()
            if last:
                logical.append(current)
                current = 0
                assert opt.steps == steps_before + 1
                steps_before = opt.steps
            else:
                assert opt.steps == steps_before
    assert current == 0
    return _flat(m), opt, logical, physical


def test_poisson_logical_batches_one_step_each_empty_ones_included():
    params, opt, logical, physical = _poisson_run()
    params2, opt2, logical2, physical2 = _poisson_run(max_physical=1)
    assert logical == physical and logical2 == logical       # the same Poisson draws
    assert 0 in logical and max(logical) > 1                  # empty draws, and splits
    assert opt2.steps == opt.steps == len(logical) == 18
    assert opt2.accountant.history == opt.accountant.history == [[1.1, 1 / 3, 18]]
    assert opt2.epsilon(DELTA) == opt.epsilon(DELTA)
    # one empty physical batch per empty logical batch, no other
    assert physical2.count(0) == logical.count(0)
    assert all(s == 1 for s in physical2 if s != 0)
    assert len(physical2) == sum(max(s, 1) for s in logical)
    torch.testing.assert_close(params2, params, rtol=1e-10, atol=1e-12)


def test_empty_logical_batch_is_one_noise_only_step():
    m1, opt1, _ = _private("auto", "mean")
    m2, opt2, _ = _private("auto", "mean")
    before = _flat(m2)
    empty = tuple(t[:0] for t in _batch(8))
    _train(m1, opt1, [empty], "mean")
    got = _train(m2, opt2, [empty], "mean", max_physical=2)
    assert got == [0] and opt2.steps == 1
    assert not torch.equal(_flat(m2), before)        # the noise was released
    assert torch.equal(_flat(m2), _flat(m1))


# ---- splitting ----------------------------------------------------------------------------------

Pair = namedtuple("Pair", "a b")


@pytest.mark.parametrize("size", range(0, 11))
@pytest.mark.parametrize("M", [1, 2, 3, 4, 10, 11])
def test_split_batch_covers_the_batch_without_empty_parts(size, M):
    batch = {"x": torch.arange(size * 2).reshape(size, 2),
             "pair": Pair(torch.arange(size), [torch.ones(size, 3), "name"]), "k": 3}
    parts = split_batch(batch, M)
    lens = [len(p["x"]) for p in parts]
    if size == 0:
        assert lens == [0] and parts[0] is batch
        return
    assert all(1 <= n <= M for n in lens) and sum(lens) == size and len(parts) == -(-size // M)
    assert torch.equal(torch.cat([p["x"] for p in parts]), batch["x"])
    assert torch.equal(torch.cat([p["pair"].a for p in parts]), batch["pair"].a)
    for p in parts:
        assert isinstance(p["pair"], Pair) and p["pair"].b[1] == "name" and p["k"] == 3
        assert len(p["pair"].b[0]) == len(p["x"])
        assert p["x"].data_ptr() >= batch["x"].data_ptr()    # views, no copies


def test_split_batch_errors_name_the_sizes():
    with pytest.raises(ValueError, match=r"different batch sizes \[3, 4\]"):
        split_batch((torch.zeros(4, 2), torch.zeros(3)), 2)
    with pytest.raises(ValueError, match="holds no tensor"):
        split_batch(["a", "b"], 2)
    with pytest.raises(ValueError, match="0-d tensor"):
        split_batch((torch.zeros(4), torch.tensor(1.0)), 2)


def test_argument_errors_name_the_values():
    m, opt, _ = _private("auto", "sum")
    for bad in (0, -3, 2.5, True, "4", None):
        with pytest.raises(ValueError, match=rf"max_physical_batch_size must be an integer >= 1, got {bad!r}"):
            BatchMemoryManager([], bad, opt)
    with pytest.raises(TypeError, match="DPOptimizer.*got SGD"):
        BatchMemoryManager([], 4, opt.original_optimizer)
    with pytest.raises(TypeError, match="iterable.*got int"):
        BatchMemoryManager(3, 4, opt)


# ---- leaving the loop -----------------------------------------------------------------------------

def test_breaking_out_restores_normal_steps_and_discards_the_unfinished_logical_batch():
    m, opt, m0 = _private("auto", "sum", noise=0.0, lr=1.0)
    for batch in BatchMemoryManager([_batch(9)], 3, opt):
        opt.zero_grad()
        _loss(m, batch, "sum").backward()
        opt.step()                       # skipped: not the last physical batch
        assert opt.skips_step and opt.steps == 0
        break
    assert not opt.skips_step
    assert all(p.grad is None for p in m.parameters())      # nothing of it can be released
    # the usual loop steps on every call again; without zero_grad first, only this batch counts
    batch = _batch(10)
    _loss(m, batch, "sum").backward()
    opt.step()
    assert opt.steps == 1
    ref = R.clipped_sum(m0, ce, batch[:2], batch[2], C)
    for (name, p), p0 in zip(m.named_parameters(), m0.parameters()):
        torch.testing.assert_close(p - p0, -ref[name], rtol=1e-10, atol=1e-12)


def test_leaving_the_with_block_or_an_exception_restores():
    m, opt, _ = _private("auto", "sum")
    with BatchMemoryManager([_batch(11)], 2, opt) as mgr:
        it = iter(mgr)                   # kept alive past the block
        next(it)
        assert opt.skips_step
    assert not opt.skips_step
    with pytest.raises(RuntimeError, match="boom"):
        for batch in BatchMemoryManager([_batch(11)], 2, opt):
            _loss(m, batch, "sum").backward()
            opt.step()
            raise RuntimeError("boom")
    assert not opt.skips_step and all(p.grad is None for p in m.parameters())
    # a new iteration takes over from one left hanging (a stale iterator never closed)
    stale = iter(BatchMemoryManager([_batch(11)], 2, opt))
    next(stale)
    assert opt.skips_step
    _train(m, opt, [_batch(12)], "sum", max_physical=3)
    assert opt.steps == 1 and not opt.skips_step
    del stale                            # closing it late changes nothing
    assert not opt.skips_step and opt.steps == 1


# ---- checkpoints ----------------------------------------------------------------------------------

def _ckpt_run(total, stop=None, resume=None, seed=11, workers=0, init_seed=0):
    """As tests/privacy/test_privacy.py's checkpoint run, with logical batches split in physical ones of
    at most 3 examples: 3 epochs of 5 Poisson batches (E = 8), Adam, noise on."""
    torch.manual_seed(init_seed)
    g = torch.Generator().manual_seed(99)
    ds = TensorDataset(torch.randn(40, 5, generator=g), torch.randint(0, 3, (40,), generator=g))
    m = nn.Sequential(nn.Linear(5, 6), nn.LayerNorm(6), nn.Tanh(), nn.Linear(6, 3))
    m, opt, loader = fastclip.make_private(
        m, torch.optim.Adam(m.parameters(), lr=0.05), DataLoader(ds, batch_size=8, num_workers=workers),
        noise_multiplier=1.2, max_grad_norm=0.7, generator=torch.Generator().manual_seed(seed))
    if resume is not None:
        ckpt = torch.load(io.BytesIO(resume), weights_only=False)
        m.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
    while opt.steps < total:
        with BatchMemoryManager(loader, 3, opt) as batches:
            for x, y in batches:
                opt.zero_grad()
                nn.functional.cross_entropy(m(x), y).backward()
                opt.step()
                if opt.steps == stop and not opt.skips_step:
                    assert loader.state_dict()["consumed"] == stop      # logical batches
                    buf = io.BytesIO()
                    torch.save({"model": m.state_dict(), "optimizer": opt.state_dict()}, buf)
                    return buf.getvalue()
    assert opt.steps == total
    return _flat(m), opt.epsilon(DELTA), opt.accountant.history


@pytest.mark.parametrize("stop, workers", [(5, 0), (7, 0), (7, 2)])
def test_checkpoint_resume_is_exact_with_the_manager(stop, workers):
    params, eps, history = _ckpt_run(15, workers=workers)
    ckpt = _ckpt_run(15, stop=stop, workers=workers)
    params2, eps2, history2 = _ckpt_run(15, resume=ckpt, seed=12345, workers=workers, init_seed=1)
    assert torch.equal(params, params2)
    assert eps == eps2 and history == history2 == [[1.2, 0.2, 15]]
