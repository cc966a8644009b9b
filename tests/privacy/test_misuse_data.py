"""Misuse at the level of a step (issue 13): the data the accountant assumes, and checkpoints.

The privacy invariant: each released step is exactly the batch the Poisson sampler drew (what the
accountant counts), each example of it bounded by the sensitivity once. Measured by its definition
(tests/misuse_common.py: noise 0, SGD lr 1, "sum", so the parameter change is the released clipped
sum): a loop that breaks it is refused before anything is released (parameters, p.grad and the
accountant unchanged), and the loop done right releases at most C per example.

* counting what was drawn: a batch backpropagated twice, two batches stepped as one, a second
  step on one batch, training on the original loader: refused with the reason; logical batches
  (BatchMemoryManager) and empty batches (backward or not) keep working, secure mode included.
* the loader's own sampler: a SubsetRandomSampler is Poisson-sampled over its index set (rate
  1/len(loader), N its size, epsilon and make_private_with_epsilon accordingly); held-out
  examples never influence a step; other samplers are refused with the fix.
* checkpoints: a refused load changes nothing; a secure_mode switch warns; save_checkpoint is
  atomic (a save killed by SIGKILL leaves the previous checkpoint loadable).
"""
import copy
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from torch import nn
from torch.utils.data import (BatchSampler, DataLoader, RandomSampler, Sampler, SequentialSampler,
                              SubsetRandomSampler, TensorDataset, WeightedRandomSampler)
from torch.utils.data.distributed import DistributedSampler

import fastclip
from fastclip import accounting
from fastclip.data import PoissonBatchSampler
from misuse_common import flat_params, influence, private, released

DELTA = 1e-5
C = 0.5


def _data(N=12, d=4, seed=0):
    """(x, y, index): huge features so every example is clipped (its influence is exactly C)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, d, generator=g, dtype=torch.float64) * 50
    return TensorDataset(x, torch.randint(0, 3, (N,), generator=g), torch.arange(N))


def _model():
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()


def _loss(m, x, y):
    return nn.functional.cross_entropy(m(x), y, reduction="sum")


def _snapshot(m, opt):
    """Everything a released step would change."""
    grads = [None if p.grad is None else p.grad.clone() for p in m.parameters()]
    sampler = opt.sampler.state_dict() if opt.sampler is not None else None
    return (flat_params(m), grads, copy.deepcopy(opt.accountant.history), sampler,
            list(opt.sampler._handed) if opt.sampler is not None else None)


def _assert_same(a, b):
    assert torch.equal(a[0], b[0])                                   # parameters
    assert len(a[1]) == len(b[1])
    for g, h in zip(a[1], b[1]):                                     # p.grad
        assert (g is None and h is None) or torch.equal(g, h)
    assert a[2] == b[2]                                              # accountant
    if a[3] is not None:
        assert a[3]["consumed"] == b[3]["consumed"] and a[4] == b[4]
        assert (a[3]["generator"] is None) == (b[3]["generator"] is None)
        if a[3]["generator"] is not None:
            assert torch.equal(a[3]["generator"], b[3]["generator"])


def _nonempty(loader):
    for batch in loader:
        if len(batch[0]):
            return batch
    raise AssertionError("no non-empty batch in an epoch")


# ---- 1. counting what was drawn ------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["auto", "nanobatch"])
def test_a_batch_backpropagated_twice_is_refused_and_once_releases_at_most_C(mode):
    """batch_size = N: the Poisson rate is 1, so the drawn batch is the whole dataset and the
    step's one-example influence is measurable through the real loader."""
    ds = _data(6)

    def loop(twice):
        def run(idx):
            def one(m):
                m, opt, loader = private(m, C, mode=mode, loader=DataLoader(
                    TensorDataset(*ds[idx]), batch_size=len(idx)))
                x, y, _ = next(iter(loader))
                assert len(x) == len(idx)                # rate 1: every example drawn
                opt.zero_grad()
                _loss(m, x, y).backward()
                if twice:
                    _loss(m, x, y).backward()           # a second forward and backward, same batch
                before = _snapshot(m, opt)
                try:
                    opt.step()
                except RuntimeError as e:
                    assert f"covered {2 * len(idx)} examples" in str(e)
                    assert f"drew has {len(idx)}" in str(e) and "more than once" in str(e)
                    _assert_same(before, _snapshot(m, opt))   # nothing released
                    assert opt.steps == 0
                    raise
                assert opt.steps == 1
                return m
            return released(_model(), one)
        return run

    assert influence(loop(twice=False), 6) <= C * (1 + 1e-9)
    assert influence(loop(twice=False), 6) >= C * (1 - 1e-6)     # every example is clipped
    with pytest.raises(RuntimeError, match="fastclip: the backward passes of this step covered 12"):
        loop(twice=True)(list(range(6)))


@pytest.mark.parametrize("secure", [False, True])
def test_one_batch_trained_twice_is_refused_then_redone_once(secure):
    kw = dict(secure_mode=True) if secure else dict(generator=torch.Generator().manual_seed(3))
    # The loader's first batch, drawn again with a fresh model, optimizer and loader while it is
    # empty (0.75^12, about 1 in 30 secure-mode draws): skipping an empty batch without its step
    # is a misuse of its own, refused first ("2 batches ... handed out"), not the one tested here.
    for _ in range(100):
        m, opt, loader = private(_model(), C, loader=DataLoader(_data(), batch_size=3), **kw)
        x, y, _ = next(iter(loader))
        if len(x):
            break
    opt.zero_grad()
    _loss(m, torch.cat([x, x]), torch.cat([y, y])).backward()     # each example twice, one backward
    before = _snapshot(m, opt)
    with pytest.raises(RuntimeError, match=rf"covered {2 * len(x)} examples.*has {len(x)} .*nothing was "
                                           r"released"):
        opt.step()
    _assert_same(before, _snapshot(m, opt))
    # the refusal changed nothing: the same drawn batch, backpropagated once, is then released
    opt.zero_grad()
    _loss(m, x, y).backward()
    opt.step()
    assert opt.steps == 1 and not torch.equal(flat_params(m), before[0])
    assert opt.sampler._handed == []


def test_part_of_the_batch_left_out_is_refused():
    m, opt, loader = private(_model(), C, loader=DataLoader(_data(), batch_size=3),
                             generator=torch.Generator().manual_seed(4))
    x, y, _ = _nonempty(loader)
    opt.zero_grad()
    _loss(m, x[1:], y[1:]).backward()
    with pytest.raises(RuntimeError, match=rf"covered {len(x) - 1} examples.*has {len(x)} \(examples "
                                           "of the batch left out"):
        opt.step()
    assert opt.steps == 0


def test_logical_batches_keep_working_and_a_physical_batch_twice_is_refused():
    ds = _data(12)
    m, opt, loader = private(_model(), C, loader=DataLoader(ds, batch_size=6),
                             generator=torch.Generator().manual_seed(5))
    for epoch in range(3):
        with fastclip.BatchMemoryManager(loader, 2, opt) as batches:
            for x, y, _ in batches:
                opt.zero_grad()
                _loss(m, x, y).backward()
                opt.step()
    assert opt.steps == 6 == opt.sampler.consumed            # one step per drawn logical batch
    logical = last = 0
    with pytest.raises(RuntimeError) as info:
        for epoch in range(5):
            with fastclip.BatchMemoryManager(loader, 2, opt) as batches:
                for x, y, _ in batches:
                    opt.zero_grad()
                    _loss(m, x, y).backward()
                    logical += len(x)
                    if not opt.skips_step:
                        last = len(x)
                        if logical:
                            _loss(m, x, y).backward()    # the last physical batch twice
                        else:
                            assert len(x) == 0
                    opt.step()
                    if not opt.skips_step:
                        logical = 0
    assert f"covered {logical + last} examples, but the batch the private loader drew has " \
           f"{logical} (each example counted" in str(info.value)
    assert opt.steps == opt.sampler.consumed - 1


def test_empty_batches_are_noise_only_steps_with_or_without_a_backward():
    ds = _data(4)
    m, opt, loader = private(_model(), C, loader=DataLoader(ds, batch_size=1), noise_multiplier=1.0,
                             generator=torch.Generator().manual_seed(0))
    empty = skipped = 0
    for epoch in range(6):
        for x, y, _ in loader:
            opt.zero_grad()
            if len(x) == 0 and skipped <= empty:
                skipped += 1                          # no backward on an empty batch: still fine
            else:
                empty += len(x) == 0
                _loss(m, x, y).backward()
            before = flat_params(m)
            opt.step()
            assert not torch.equal(flat_params(m), before)     # the noise is released every step
    assert empty and skipped and opt.steps == 24 == opt.sampler.consumed
    assert opt.accountant.history == [[1.0, 0.25, 24]]


def test_two_batches_stepped_as_one_are_refused():
    """Gradient accumulation over two Poisson batches: each example in the step with probability
    ~2q while the accountant counts q."""
    m, opt, loader = private(_model(), C, loader=DataLoader(_data(), batch_size=3),
                             generator=torch.Generator().manual_seed(6))
    it = iter(loader)
    opt.zero_grad()
    sizes = []
    for _ in range(2):
        x, y, _ = next(it)
        sizes.append(len(x))
        if len(x):
            _loss(m, x, y).backward()
    before = _snapshot(m, opt)
    with pytest.raises(RuntimeError, match=rf"2 batches \(of \[{sizes[0]}, {sizes[1]}\] examples\).*"
                                           "once for every batch.*empty one included"):
        opt.step()
    _assert_same(before, _snapshot(m, opt))


def test_skipping_the_step_of_an_empty_batch_is_refused_at_the_next_step():
    m, opt, loader = private(_model(), C, loader=DataLoader(_data(4), batch_size=1),
                             generator=torch.Generator().manual_seed(0))
    with pytest.raises(RuntimeError, match="2 batches.*empty one included"):
        for _ in range(10):
            for x, y, _ in loader:
                if len(x) == 0:
                    continue                           # the loop skips the step: the schedule leaks
                opt.zero_grad()
                _loss(m, x, y).backward()
                opt.step()
    assert opt.steps == opt.sampler.consumed - 2       # every step released matches one draw


# ---- 2. another loader, a second step on one batch -----------------------------------------------

def test_training_on_the_original_loader_is_refused():
    dl = DataLoader(_data(), batch_size=3)
    m, opt, _ = private(_model(), C, loader=dl, noise_multiplier=1.0)
    for x, y, _ in dl:
        opt.zero_grad()
        _loss(m, x, y).backward()
        before = _snapshot(m, opt)
        with pytest.raises(RuntimeError, match="handed out no batch since the last step.*iterate over "
                                               "the loader make_private returned"):
            opt.step()
        _assert_same(before, _snapshot(m, opt))
        break
    assert opt.steps == 0
    assert opt.epsilon(DELTA) == 0.0                   # no Poisson step claimed that never happened


def test_a_second_step_on_one_drawn_batch_is_refused():
    m, opt, loader = private(_model(), C, loader=DataLoader(_data(), batch_size=3),
                             generator=torch.Generator().manual_seed(7))
    x, y, _ = _nonempty(loader)
    for k in range(2):
        opt.zero_grad()
        _loss(m, x, y).backward()
        if k == 0:
            opt.step()
        else:
            before = _snapshot(m, opt)
            with pytest.raises(RuntimeError, match="second step on the same batch"):
                opt.step()
            _assert_same(before, _snapshot(m, opt))
    assert opt.steps == 1
    # steps accounted == steps released == batches drawn, over a normal epoch after it
    released_steps = 1
    for x, y, _ in loader:
        opt.zero_grad()
        _loss(m, x, y).backward()
        opt.step()
        released_steps += 1
    assert opt.accountant.steps == released_steps == opt.sampler.consumed


def test_without_a_sampler_nothing_is_compared_and_no_epsilon_claimed():
    m, opt, _ = private(_model(), C, loader=None)
    x, y, _ = _data()[:5]
    for _ in range(2):
        opt.zero_grad()
        _loss(m, x, y).backward()
        opt.step()
    assert opt.steps == 2
    with pytest.raises(ValueError, match="sampling rate"):
        opt.epsilon(DELTA)


# ---- 3. the loader's own sampler ----------------------------------------------------------------

SUBSET = [1, 4, 5, 8, 11, 13, 17, 20, 22, 28]           # 10 of 30 examples


def _subset_loader(ds, bs=2, **kw):
    return DataLoader(ds, batch_size=bs, sampler=SubsetRandomSampler(SUBSET), **kw)


def test_subset_sampler_is_poisson_sampled_over_its_index_set():
    ds = _data(30)
    m, opt, loader = private(_model(), C, loader=_subset_loader(ds), noise_multiplier=1.0,
                             loss_reduction="mean", generator=torch.Generator().manual_seed(8))
    q = 1 / 5                                           # len(loader) = 10 / 2
    assert opt.sample_rate == pytest.approx(q) and opt.sampler.num_samples == 10
    assert opt.expected_batch_size == pytest.approx(10 * q)         # N is the subset's size
    counts = torch.zeros(30)
    steps = 0
    for epoch in range(40):
        for x, y, idx in loader:
            counts[idx] += 1
            opt.zero_grad()
            nn.functional.cross_entropy(m(x), y).backward()
            opt.step()
            steps += 1
    outside = [i for i in range(30) if i not in SUBSET]
    assert counts[outside].sum() == 0                    # a held-out example is never drawn
    assert (counts[SUBSET] > 0).all()
    freq = counts[SUBSET] / steps                       # each subset example at rate q
    assert (freq - q).abs().max() < 5 * (q * (1 - q) / steps) ** 0.5
    assert opt.steps == steps == 200
    assert opt.epsilon(DELTA) == accounting.epsilon(1.0, q, 200, DELTA)
    # make_private_with_epsilon calibrates for the subset's rate and steps, not the dataset's
    m2 = _model()
    _, opt2, _ = fastclip.make_private_with_epsilon(
        m2, torch.optim.SGD(m2.parameters(), lr=1), _subset_loader(ds), target_epsilon=2.0,
        target_delta=DELTA, epochs=3, max_grad_norm=C)
    assert opt2.sample_rate == pytest.approx(q)
    assert opt2.noise_multiplier == accounting.noise_multiplier_for(2.0, DELTA, q, 15)
    assert opt2.expected_batch_size == pytest.approx(2.0)


def test_a_held_out_example_never_influences_the_released_steps():
    """Neighbouring datasets differing in a held-out example (made enormous) release bitwise the
    same updates over many steps: it is not in any batch."""
    def run(ds):
        m, opt, loader = private(_model(), C, loader=_subset_loader(ds),
                                 generator=torch.Generator().manual_seed(9))
        for epoch in range(10):
            for x, y, _ in loader:
                opt.zero_grad()
                _loss(m, x, y).backward()
                opt.step()
        return flat_params(m)

    ds = _data(30)
    other = TensorDataset(*[t.clone() for t in ds.tensors])
    other.tensors[0][0] = 1e6                         # index 0 is held out
    assert not torch.equal(run(ds), flat_params(_model()))   # the steps did train
    assert torch.equal(run(ds), run(other))
    inside = TensorDataset(*[t.clone() for t in ds.tensors])
    inside.tensors[0][SUBSET[0]] = 1e6                # a subset example does influence them
    assert not torch.equal(run(ds), run(inside))


@pytest.mark.parametrize("make", [
    lambda ds: DataLoader(ds, batch_size=4),
    lambda ds: DataLoader(ds, batch_size=4, shuffle=True),
    lambda ds: DataLoader(ds, batch_size=4, sampler=SequentialSampler(ds)),
    lambda ds: DataLoader(ds, batch_size=4, sampler=DistributedSampler(ds, num_replicas=2, rank=1)),
    lambda ds: DataLoader(ds, batch_sampler=BatchSampler(RandomSampler(ds), 4, False)),
])
def test_default_samplers_sample_the_whole_dataset(make):
    ds = _data(12)
    loader = make(ds)
    _, opt, pl = private(_model(), C, loader=loader, loss_reduction="mean")
    assert opt.sampler.indices is None and opt.sampler.num_samples == 12
    assert opt.sample_rate == pytest.approx(1 / len(loader))
    assert opt.expected_batch_size == pytest.approx(12 / len(loader))


@pytest.mark.parametrize("make, match", [
    (lambda ds: DataLoader(ds, batch_size=4, sampler=WeightedRandomSampler([1.0] * 12, 12)),
     "WeightedRandomSampler \\(weighted sampling\\)"),
    (lambda ds: DataLoader(ds, batch_size=4, sampler=RandomSampler(ds, replacement=True)),
     "RandomSampler draws with replacement"),
    (lambda ds: DataLoader(ds, batch_size=4, sampler=RandomSampler(ds, num_samples=5)),
     "num_samples=5 of 12"),
    (lambda ds: DataLoader(ds, batch_size=4, sampler=list(range(6))), "its own list"),
    (lambda ds: DataLoader(ds, batch_size=4, sampler=SubsetRandomSampler([1, 1, 2])), "repeats"),
    (lambda ds: DataLoader(ds, batch_size=4, sampler=SubsetRandomSampler([3, 12])), r"outside.*\[12\]"),
    (lambda ds: DataLoader(ds, batch_sampler=[[0, 1], [2, 3]]), "own batch_sampler \\(list\\)"),
    (lambda ds: DataLoader(ds, batch_sampler=type("Mine", (BatchSampler,), {})(
        SequentialSampler(ds), 4, False)), "own batch_sampler \\(Mine\\)"),
    (lambda ds: DataLoader(ds, batch_size=None), "batch_size=None"),
])
def test_samplers_poisson_sampling_cannot_stand_for_are_refused(make, match):
    ds = _data(12)
    m = _model()
    with pytest.raises(ValueError, match="fastclip: .*" + match) as info:
        private(m, C, loader=make(ds))
    assert not any(mod._forward_hooks or mod._forward_pre_hooks for mod in m.modules())
    if "batch_size=None" not in match and "outside" not in match:      # those name their own fix
        assert "Subset" in str(info.value) and "poisson_sampling=False" in str(info.value)
    m = _model()
    with pytest.raises(ValueError, match=match):
        fastclip.make_private_with_epsilon(m, torch.optim.SGD(m.parameters(), lr=1), make(ds),
                                           target_epsilon=1.0, target_delta=DELTA, epochs=1,
                                           max_grad_norm=C)
    # without Poisson sampling the loader is the user's, used as given (no epsilon claimed)
    _, opt, same = private(_model(), C, loader=make(ds), poisson_sampling=False)
    assert opt.sampler is None and opt.sample_rate is None


@pytest.mark.parametrize("secure", [False, True])
def test_distributed_shards_of_a_subset_are_disjoint_and_make_up_its_batch(secure):
    idx = torch.tensor(SUBSET)
    n, q, world = len(SUBSET), 0.4, 3

    def sampler(rank, world_size):
        gen = None if secure else torch.Generator().manual_seed(12)
        return PoissonBatchSampler(n, q, 50, gen, secure, rank=rank, world_size=world_size,
                                   indices=idx)

    whole = list(sampler(0, 1))
    shards = [list(sampler(r, world)) for r in range(world)]
    seen = set()
    for k in range(50):
        parts = [set(shards[r][k]) for r in range(world)]
        for r in range(world):
            assert parts[r] <= set(SUBSET)
            assert all(SUBSET.index(i) % world == r for i in parts[r])     # sharded by position
            for s in range(r):
                assert not parts[r] & parts[s]
        union = set().union(*parts)
        seen |= union
        if not secure:
            assert union == set(whole[k])              # one global Poisson batch of the subset
    assert seen == set(SUBSET)


# ---- 4. checkpoints -------------------------------------------------------------------------------

def _trained(secure=False, seed=3, steps=2, bs=3, model=None):
    m = model if model is not None else _model()
    kw = dict(secure_mode=True) if secure else dict(generator=torch.Generator().manual_seed(seed))
    m, opt, loader = private(m, C, loader=DataLoader(_data(), batch_size=bs), noise_multiplier=1.0, **kw)
    it = iter(loader)
    for _ in range(steps):
        x, y, _ = next(it)
        opt.zero_grad()
        _loss(m, x, y).backward()
        opt.step()
    return m, opt, loader


def _opt_state(opt):
    return (copy.deepcopy(opt.accountant.history), opt.noise_multiplier,
            None if opt.generator is None else opt.generator.get_state().clone(),
            opt.sampler.state_dict(), copy.deepcopy(opt.original_optimizer.state_dict()))


def _assert_opt_same(a, b):
    assert a[0] == b[0] and a[1] == b[1]
    assert (a[2] is None and b[2] is None) or torch.equal(a[2], b[2])
    assert a[3]["consumed"] == b[3]["consumed"] and torch.equal(a[3]["generator"], b[3]["generator"])
    assert a[4]["param_groups"] == b[4]["param_groups"]


def _broken(sd, how):
    sd = copy.deepcopy(sd)
    priv = sd["fastclip"]
    if how == "noise generator":
        priv["generator"] = torch.zeros(3, dtype=torch.uint8)
    elif how == "sampler generator":
        priv["sampler"]["generator"] = torch.zeros(3, dtype=torch.uint8)
    elif how == "sampler consumed":
        priv["sampler"]["consumed"] = -1
    elif how == "sample rate":
        priv["sample_rate"] = 0.5
    elif how == "accountant":
        priv["accountant"]["history"] = [[1.0, 2.0, 3]]
    elif how == "missing":
        del priv["accountant"]
    elif how == "param groups":
        sd["param_groups"] = sd["param_groups"] * 2
    return sd


@pytest.mark.parametrize("how", ["noise generator", "sampler generator", "sampler consumed",
                                 "sample rate", "accountant", "missing", "param groups"])
def test_a_refused_load_changes_nothing(how):
    _, src, _ = _trained(steps=3, seed=1)
    m, opt, loader = _trained(steps=1, seed=2)
    before = _opt_state(opt)
    with pytest.raises(ValueError):
        opt.load_state_dict(_broken(src.state_dict(), how))
    _assert_opt_same(before, _opt_state(opt))
    assert opt.steps == 1
    opt.load_state_dict(src.state_dict())            # the intact checkpoint still loads
    assert opt.steps == 3 and opt.sampler.consumed == 3


@pytest.mark.parametrize("saved, loaded", [(True, False), (False, True)])
def test_a_secure_mode_switch_at_load_warns(saved, loaded):
    _, src, _ = _trained(secure=saved, steps=2)
    _, opt, _ = _trained(secure=loaded, steps=0)
    with pytest.warns(UserWarning, match=rf"saved with secure_mode={saved}, this run has "
                                         rf"secure_mode={loaded}.*accounting resumes exactly"):
        opt.load_state_dict(src.state_dict())
    assert opt.steps == 2 and opt.accountant.history == src.accountant.history


def test_same_secure_mode_load_is_silent(recwarn):
    for secure in (False, True):
        _, src, _ = _trained(secure=secure, steps=2)
        _, opt, _ = _trained(secure=secure, steps=0)
        opt.load_state_dict(src.state_dict())
        assert opt.steps == 2
    assert not [w for w in recwarn if "secure_mode" in str(w.message)]


def test_save_checkpoint_round_trip_resumes_exactly(tmp_path):
    path = tmp_path / "ckpt.pt"
    m, opt, loader = _trained(steps=2, seed=5)
    fastclip.save_checkpoint(path, model=m, optimizer=opt, epoch=4)
    assert os.listdir(tmp_path) == ["ckpt.pt"]        # no temporary file left
    ckpt = fastclip.load_checkpoint(path)             # weights_only: plain state dicts
    assert ckpt["epoch"] == 4
    m2, opt2, loader2 = _trained(steps=0, seed=99, model=nn.Sequential(
        nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double())
    m2.load_state_dict(ckpt["model"])
    opt2.load_state_dict(ckpt["optimizer"])
    for model, o, ld in ((m, opt, loader), (m2, opt2, loader2)):
        x, y, _ = next(iter(ld))        # the third batch of the run, in both
        o.zero_grad()
        _loss(model, x, y).backward()
        o.step()
    assert torch.equal(flat_params(m), flat_params(m2))
    assert opt2.accountant.history == opt.accountant.history and opt2.steps == 3
    with pytest.raises(ValueError, match="nothing to save"):
        fastclip.save_checkpoint(path)


_SAVER = textwrap.dedent("""
    import sys, time, torch
    sys.path.insert(0, {root!r})
    import fastclip

    class Slow:
        # Pickling sleeps: the save is in progress for as long as the test needs to kill it.
        def __reduce__(self):
            open({flag!r}, "w").close()
            time.sleep(60)
            return (int, (0,))

    path, atomic = sys.argv[1], sys.argv[2] == "1"
    if atomic:
        fastclip.save_checkpoint(path, step=2, payload=Slow())
    else:
        torch.save({{"step": 2, "payload": Slow()}}, path)
""")


def _kill_while_saving(tmp_path, atomic):
    path = tmp_path / "ckpt.pt"
    flag = tmp_path / "saving"
    fastclip.save_checkpoint(path, step=1, weights=torch.arange(5.0))      # the previous one
    script = tmp_path / "saver.py"
    root = os.path.dirname(os.path.dirname(os.path.abspath(fastclip.__file__)))
    script.write_text(_SAVER.format(root=root, flag=str(flag)))
    proc = subprocess.Popen([sys.executable, str(script), str(path), "1" if atomic else "0"])
    try:
        deadline = time.monotonic() + 60
        while not flag.exists():
            assert proc.poll() is None, "the saver exited before its save began"
            assert time.monotonic() < deadline
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    return path


def test_a_save_killed_midway_keeps_the_previous_checkpoint(tmp_path):
    path = _kill_while_saving(tmp_path, atomic=True)
    ckpt = fastclip.load_checkpoint(path)
    assert ckpt["step"] == 1 and torch.equal(ckpt["weights"], torch.arange(5.0))


def test_the_kill_test_can_fail_plain_torch_save_loses_the_checkpoint(tmp_path):
    """The same kill against torch.save(obj, path): the previous checkpoint is gone."""
    path = _kill_while_saving(tmp_path, atomic=False)
    with pytest.raises(Exception):
        ckpt = fastclip.load_checkpoint(path)
        assert ckpt["step"] == 1


# ---- distributed: one rank's refusal is every rank's --------------------------------------------

def _refusing_worker(rank, port, outdir):
    import torch.distributed as dist
    from datetime import timedelta
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"          # localhost only
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=timedelta(seconds=30))
    try:
        m, opt, loader = private(_model(), C, loader=DataLoader(_data(40), batch_size=8),
                                 distributed=True, generator=torch.Generator().manual_seed(7))
        x, y, _ = next(iter(loader))
        before = flat_params(m)
        opt.zero_grad()
        _loss(m, x, y).backward()
        if rank == 0:
            _loss(m, x, y).backward()                # rank 0's shard backpropagated twice
        try:
            opt.step()
            error = None
        except RuntimeError as e:
            error = str(e)
        unchanged = torch.equal(before, flat_params(m))
        opt.zero_grad()                              # redone once on every rank: released
        _loss(m, x, y).backward()
        opt.step()
        torch.save({"size": len(x), "error": error, "unchanged": unchanged, "steps": opt.steps,
                    "params": flat_params(m)}, os.path.join(outdir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_a_refusal_on_one_rank_refuses_the_step_on_every_rank():
    # Through harness.run_ranks (forkserver): spawned interpreters sometimes aborted at exit
    # ("terminate called without an active exception", after both ranks had saved their results:
    # 2 of 16 runs at d5fa1b9 as well), which failed the test without any assertion failing.
    from harness import run_ranks
    r0, r1 = run_ranks(_refusing_worker, 2, 60)
    assert r0["size"] > 0
    assert f"covered {2 * r0['size']} examples" in r0["error"]
    assert "another rank refused this step" in r1["error"]
    assert r0["unchanged"] and r1["unchanged"]
    assert r0["steps"] == r1["steps"] == 1 and torch.equal(r0["params"], r1["params"])
