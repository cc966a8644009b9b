"""Multi-process DP-SGD (fastclip.distributed): 2 processes on localhost (gloo, 127.0.0.1 only)
give the single-process result on the union batch, add the noise exactly once with the known std,
stay identical on every rank, handle an empty local batch, and account the same epsilon.

The 2-process runs are spawned once for the module (each scenario in the same pair of
processes, bounded by a timeout); the tests check their results against one process here."""
import math
import os

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import fastclip
from harness import gloo_group, run_ranks
from fastclip.data import PoissonBatchSampler

WORLD = 2
TIMEOUT_S = 60
DELTA = 1e-5
SIGMA, C, LR = 1.3, 0.7, 0.5


# ---- the scenarios, run identically by one process (here) and by each of 2 ranks ---------------

def _data(N=40):
    g = torch.Generator().manual_seed(11)
    return TensorDataset(torch.randn(N, 6, generator=g, dtype=torch.float64) * 3,
                         torch.randint(0, 3, (N,), generator=g))


def _model(width=8):
    torch.manual_seed(5)
    return nn.Sequential(nn.Linear(6, width), nn.Tanh(), nn.Linear(width, 3)).double()


def _flat(m):
    return torch.cat([p.detach().flatten() for p in m.parameters()])


def _train(noise, distributed, steps=3, secure=False, width=8, bucket_cap_mb=None):
    """A few Poisson-sampled steps; returns (final flat parameters, local batch sizes, epsilon)."""
    m = _model(width)
    kw = dict(secure_mode=True) if secure else dict(generator=torch.Generator().manual_seed(7))
    m, opt, loader = fastclip.make_private(m, torch.optim.SGD(m.parameters(), lr=LR),
                                           DataLoader(_data(), batch_size=8), noise_multiplier=noise,
                                           max_grad_norm=C, distributed=distributed, **kw)
    if bucket_cap_mb is not None:
        opt.reducer.bucket_cap_mb = bucket_cap_mb
    sizes, it = [], iter(loader)
    for _ in range(steps):
        x, y = next(it)
        sizes.append(len(x))
        opt.zero_grad()
        nn.functional.cross_entropy(m(x), y).backward()
        opt.step()
    return _flat(m), sizes, opt.epsilon(DELTA), opt.expected_batch_size


def _local_batch(rank):
    """Rank 0: 5 examples, rank 1: none (and one process: the same 5)."""
    x, y = _data()[:5]
    return (x, y) if rank == 0 else (x[:0], y[:0])


def _uneven(distributed, rank=0):
    m = _model()
    m, opt, _ = fastclip.make_private(m, torch.optim.SGD(m.parameters(), lr=LR), None,
                                      noise_multiplier=0.0, max_grad_norm=C, distributed=distributed)
    x, y = _local_batch(rank)
    opt.zero_grad()
    nn.functional.cross_entropy(m(x), y).backward()   # "mean" with no sample rate: / global count
    opt.step()
    return _flat(m)


def _worker(rank, port, outdir):
    with gloo_group(rank, port, WORLD, TIMEOUT_S):
        out = {}
        out["plain"] = _train(0.0, None, bucket_cap_mb=1e-4)       # auto-detected; tiny buckets
        out["noisy"] = _train(SIGMA, True, steps=1, width=2000)    # ~18k parameters
        out["secure"] = _train(SIGMA, None, steps=2, secure=True)
        out["uneven"] = _uneven(True, rank)
        out["examples"] = _examples_seen(rank)
        out["resumed"] = _resumed()
        torch.save(out, os.path.join(outdir, f"rank{rank}.pt"))


def _examples_seen(rank):
    m = _model()
    m, opt, _ = fastclip.make_private(m, torch.optim.SGD(m.parameters(), lr=LR), None,
                                      noise_multiplier=0.0, max_grad_norm=C, loss_reduction="sum")
    x, y = _local_batch(rank)
    nn.functional.cross_entropy(m(x), y, reduction="sum").backward()
    opt.reducer.reduce([p for p in m.parameters()], opt.engine)
    return opt.engine.examples


def _resumed():
    """2 noisy steps, rank 0's checkpoint loaded by every rank into a fresh run, 1 more step."""
    def build(seed):
        m = _model()
        return (m, *fastclip.make_private(m, torch.optim.SGD(m.parameters(), lr=LR),
                                          DataLoader(_data(), batch_size=8), noise_multiplier=SIGMA,
                                          max_grad_norm=C, generator=torch.Generator().manual_seed(seed))[1:])

    def steps(m, opt, loader, k):
        it = iter(loader)
        for _ in range(k):
            x, y = next(it)
            opt.zero_grad()
            nn.functional.cross_entropy(m(x), y).backward()
            opt.step()

    m, opt, loader = build(7)
    steps(m, opt, loader, 2)
    ckpt = [(m.state_dict(), opt.state_dict())]
    dist.broadcast_object_list(ckpt, 0)
    m, opt, loader = build(99)          # other seeds: everything must come from the checkpoint
    m.load_state_dict(ckpt[0][0])
    opt.load_state_dict(ckpt[0][1])
    steps(m, opt, loader, 1)
    return _flat(m), opt.steps


@pytest.fixture(scope="module")
def ranks():
    """The results of every scenario on each of the 2 ranks."""
    return run_ranks(_worker, WORLD, TIMEOUT_S)


# ---- two processes ---------------------------------------------------------------------------

def test_two_processes_equal_one_process_on_the_union_batch(ranks):
    single, sizes, _, E = _train(0.0, False)
    for r in range(WORLD):
        torch.testing.assert_close(ranks[r]["plain"][0], single, rtol=1e-12, atol=1e-14)
    assert torch.equal(ranks[0]["plain"][0], ranks[1]["plain"][0])     # bitwise, on every rank
    # the ranks' batches are shards of the single-process batch; the divisor is global (N q)
    assert [a + b for a, b in zip(ranks[0]["plain"][1], ranks[1]["plain"][1])] == sizes
    assert ranks[0]["plain"][3] == ranks[1]["plain"][3] == E == pytest.approx(8)


def test_noise_is_added_once_with_the_known_std_and_identically(ranks):
    noisy = ranks[0]["noisy"][0]
    assert torch.equal(noisy, ranks[1]["noisy"][0])
    clean, _, _, E = _train(0.0, False, steps=1, width=2000)
    z = (noisy - clean) / (LR * SIGMA * C / E)        # noise once: N(0, 1); twice: std sqrt(2)
    n = z.numel()
    assert n > 15000
    assert abs(z.std().item() - 1) < 5 / math.sqrt(2 * n)
    assert abs(z.mean().item()) < 5 / math.sqrt(n)
    # the same seed in one process gives the same noise (rank 0's seed is everyone's)
    single, _, _, _ = _train(SIGMA, False, steps=1, width=2000)
    torch.testing.assert_close(noisy, single, rtol=1e-10, atol=1e-10)


def test_secure_mode_ranks_agree(ranks):
    assert torch.equal(ranks[0]["secure"][0], ranks[1]["secure"][0])
    assert torch.isfinite(ranks[0]["secure"][0]).all()


def test_an_empty_local_batch_works(ranks):
    assert ranks[0]["examples"] == ranks[1]["examples"] == 5
    single = _uneven(False)
    for r in range(WORLD):
        torch.testing.assert_close(ranks[r]["uneven"], single, rtol=1e-12, atol=1e-14)


def test_rank_0_checkpoint_resumes_every_rank_exactly(ranks):
    single, _, _, _ = _train(SIGMA, False, steps=3)
    assert torch.equal(ranks[0]["resumed"][0], ranks[1]["resumed"][0])
    assert ranks[0]["resumed"][1] == 3
    torch.testing.assert_close(ranks[0]["resumed"][0], single, rtol=1e-10, atol=1e-10)


def test_epsilon_is_global_and_the_same_on_every_rank(ranks):
    _, _, eps, _ = _train(0.0, False)
    assert ranks[0]["plain"][2] == ranks[1]["plain"][2] == pytest.approx(eps, rel=1e-12)
    assert ranks[0]["noisy"][2] == ranks[1]["noisy"][2]


# ---- one process -----------------------------------------------------------------------------

@pytest.mark.parametrize("secure", [False, True])
def test_sampler_shards_are_disjoint_and_make_up_the_global_batch(secure):
    N, q = 101, 0.3
    gen = (lambda: None) if secure else (lambda: torch.Generator().manual_seed(4))
    whole = list(PoissonBatchSampler(N, q, 4, gen(), secure=secure))
    shards = [list(PoissonBatchSampler(N, q, 4, gen(), secure=secure, rank=r, world_size=3))
              for r in range(3)]
    for b in range(4):
        parts = [set(s[b]) for s in shards]
        assert all(i % 3 == r for r, p in enumerate(parts) for i in p)
        if not secure:
            assert sorted(parts[0] | parts[1] | parts[2]) == whole[b]
    with pytest.raises(ValueError, match="rank must be an integer in \\[0, 2\\), got 2"):
        PoissonBatchSampler(N, q, rank=2, world_size=2)


def test_ddp_wrapping_and_forced_distribution_without_a_group_are_refused():
    m = _model()
    opt = torch.optim.SGD(m.parameters(), lr=1.0)
    with pytest.raises(ValueError, match="init_process_group"):
        fastclip.make_private(m, opt, None, noise_multiplier=0.0, max_grad_norm=1.0, distributed=True)
    with pytest.raises(ValueError, match="distributed must be"):
        fastclip.make_private(m, opt, None, noise_multiplier=0.0, max_grad_norm=1.0, distributed="yes")
    ddp = nn.parallel.DistributedDataParallel.__new__(nn.parallel.DistributedDataParallel)
    with pytest.raises(TypeError, match="DistributedDataParallel"):
        fastclip.make_private(ddp, opt, None, noise_multiplier=0.0, max_grad_norm=1.0)
    # not distributed: no reducer
    _, popt, _ = fastclip.make_private(m, opt, None, noise_multiplier=0.0, max_grad_norm=1.0)
    assert popt.reducer is None
