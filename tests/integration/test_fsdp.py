"""FSDP2 (torch.distributed.fsdp.fully_shard) under make_private: 2 and 4 processes on localhost
(gloo, 127.0.0.1 only), each block and the root sharded, the embedding and the output projection
tied inside the root's unit. The sharded update must equal the single-process update on the same
Poisson batches (fastclip in one process, and tests/reference.py's float64 per-example loop), flat
and per-layer; the noise is added once per shard (each coordinate N(0, sigma^2 C^2), the ranks'
shards independent); the clipped sums are reduce-scattered in buckets as the engine forms them,
several backward passes before a step add up exactly, and the per-rank peak of parameters +
gradients + Adam state + the full-size clipped sums fastclip holds shrinks with the shards; per-rank
checkpoints resume exactly; the misuses are refused with the fix.

The scenarios of each world size run in one set of processes, spawned once for the module
(bounded by a timeout); the single-process references are computed here."""
import math
import os

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import fastclip
from fastclip.benchmark import TiedTokenMLP
import reference as R
from harness import gloo_group, refusal, reference_per_layer, run_ranks

fsdp = pytest.importorskip("torch.distributed.fsdp")
if not hasattr(fsdp, "fully_shard"):
    pytest.skip("torch without FSDP2 (fully_shard)", allow_module_level=True)

TIMEOUT_S = 60
DELTA = 1e-5
SIGMA, C, LR = 1.3, 0.6, 0.5
SMALL = dict(V=11, d=6, h=7)          # dims not divisible by 4: padded and empty shards
WIDE = dict(V=64, d=32, h=128)        # ~19k parameters: the noise scenario
MEM = dict(V=64, d=32, h=128, L=4)    # ~36k parameters (285 KB): the memory scenario
# Buckets far smaller than the parameters, so that the small models send many buckets, during
# the backward too (per-layer clipping), and some parameters alone: 64 bytes, and 16 KiB for MEM
# (its largest module, a 32x128 Linear, is 33 KB of float64: one bucket, as a 25 MiB bucket is to
# a large model).
TINY_BUCKET_MB, MEM_BUCKET_MB = 2.0 ** -14, 2.0 ** -6


def _model(dims=SMALL, shard=False, root=True):
    torch.manual_seed(5)
    m = TiedTokenMLP(**dims).double()
    if shard:
        for block in m.blocks:
            fsdp.fully_shard(block)
        if root:
            fsdp.fully_shard(m)
    return m


def _data(V, N=40):
    g = torch.Generator().manual_seed(11)
    return TensorDataset(torch.randint(0, V, (N, 5), generator=g), torch.randint(0, V, (N,), generator=g))


def _full(m):
    """The whole model's parameters, flat (gathered from the shards: a collective)."""
    return torch.cat([(p.full_tensor() if hasattr(p, "full_tensor") else p).detach().flatten()
                      for p in m.parameters()])


def _local_bytes(m, opt, grads=True):
    """This rank's parameters + gradients (``grads``) + optimizer state, in bytes of local
    tensors."""
    loc = fastclip.fsdp.local
    ts = [loc(p) for p in m.parameters()]
    ts += [loc(p.grad) for p in m.parameters() if p.grad is not None and grads]
    ts += [loc(v) for s in opt.state.values() for v in s.values()
           if isinstance(v, torch.Tensor) and v.dim() > 0]
    return sum(t.numel() * t.element_size() for t in ts)


def _peak_bytes(m, opt):
    """This rank's peak over the steps run of parameters + gradients + Adam state + the
    full-size clipped sums fastclip held: the gradients (this rank's shards of the reduced sums,
    moved into p.grad at the step) and the full-size sums (the buckets, the module being
    clipped, received chunks) are the reducer's own most at once, counted with the parameters and
    the Adam state as if all were alive together (an upper bound)."""
    return _local_bytes(m, opt, grads=False) + opt.reducer.peak_bytes


def _train(shard, clipping="flat", noise=0.0, steps=2, dims=SMALL, adam=False, seed=7,
           bucket=None, split=1):
    """Poisson-sampled steps (``split``: each batch in that many backward passes before the
    step); returns (model, optimizer, loader, batches)."""
    m = _model(dims, shard)
    opt = torch.optim.Adam(m.parameters(), lr=1e-2) if adam else torch.optim.SGD(m.parameters(), lr=LR)
    bound = C if clipping == "flat" else [0.3, 0.2, 0.25, 0.2, 0.3, 0.35, 0.15]   # 7 layers
    m, opt, loader = fastclip.make_private(
        m, opt, DataLoader(_data(dims["V"]), batch_size=8), noise_multiplier=noise,
        max_grad_norm=bound, clipping=clipping, audit=not shard,
        generator=torch.Generator().manual_seed(seed), distributed=None if shard else False)
    if bucket is not None:
        opt.reducer.bucket_cap_mb = bucket
    batches = _steps(m, opt, iter(loader), steps, split)
    return m, opt, loader, batches


def _steps(m, opt, it, k, split=1):
    batches = []
    for _ in range(k):
        x, y = next(it)
        batches.append((x, y))
        opt.zero_grad()
        B = len(x)
        for i in range(split):      # the engine scales each part's mean back to a sum
            lo, hi = i * B // split, (i + 1) * B // split
            nn.functional.cross_entropy(m(x[lo:hi]), y[lo:hi]).backward()
        opt.step()
    return batches


def _resumed(outdir):
    """2 noisy Adam steps, per-rank checkpoints, a fresh run (other seeds) loads them, 1 step."""
    m, opt, loader, _ = _train(True, noise=SIGMA, steps=2, adam=True)
    path = os.path.join(outdir, "ckpt.rank{rank}.pt")
    fastclip.save_checkpoint(path, model=m, optimizer=opt)
    m, opt, loader, _ = _train(True, noise=SIGMA, steps=0, adam=True, seed=99)
    ckpt = fastclip.load_checkpoint(path)
    m.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["optimizer"])
    _steps(m, opt, iter(loader), 1)
    return _full(m), opt.steps


def _make(m, **kw):
    return fastclip.make_private(m, torch.optim.SGD(m.parameters(), lr=1.0), None,
                                 noise_multiplier=0.0, max_grad_norm=1.0, **{"audit": False, **kw})


def _misuses():
    ddp = nn.parallel.DistributedDataParallel.__new__(nn.parallel.DistributedDataParallel)
    nn.Module.__init__(ddp)
    ddp.module = _model(shard=True)
    return {
        "partial": refusal(lambda: _make(_model(shard=True, root=False))),
        "ddp": refusal(lambda: _make(ddp)),
        "audit": refusal(lambda: _make(_model(shard=True), audit=True)),
        "nanobatch": refusal(lambda: _make(_model(shard=True), mode="nanobatch")),
    }


def _worker2(rank, port, outdir):
    with gloo_group(rank, port, 2, TIMEOUT_S):
        out = {}
        for clipping in ("flat", "per_layer"):
            m, opt, _, batches = _train(True, clipping, bucket=TINY_BUCKET_MB)
            out[clipping] = (_full(m), [len(x) for x, _ in batches], opt.epsilon(DELTA),
                             opt.reducer.reductions)
            # a logical batch: each rank's share in two backward passes before the step
            out[clipping + "_split"] = _full(_train(True, clipping, bucket=TINY_BUCKET_MB,
                                                    split=2)[0])
        m, opt, _, _ = _train(True, noise=SIGMA, steps=1, dims=WIDE)
        out["noisy"] = [fastclip.fsdp.local(p).detach().flatten().clone() for p in m.parameters()]
        m, opt, _, _ = _train(True, steps=2, dims=MEM, adam=True, bucket=MEM_BUCKET_MB)
        out["bytes"] = (_peak_bytes(m, opt), opt.reducer.reductions)
        out["straight"] = _full(_train(True, noise=SIGMA, steps=3, adam=True)[0])
        out["resumed"] = _resumed(outdir)
        out["misuse"] = _misuses()
        torch.save(out, os.path.join(outdir, f"rank{rank}.pt"))


def _worker4(rank, port, outdir):
    with gloo_group(rank, port, 4, TIMEOUT_S):
        out = {c: _full(_train(True, c, bucket=TINY_BUCKET_MB)[0]) for c in ("flat", "per_layer")}
        torch.save(out, os.path.join(outdir, f"rank{rank}.pt"))


@pytest.fixture(scope="module")
def two():
    return run_ranks(_worker2, 2, TIMEOUT_S)


@pytest.fixture(scope="module")
def four():
    return run_ranks(_worker4, 4, TIMEOUT_S)


def _reference_step(clipping):
    """The first step by tests/reference.py on the single-process first batch (SGD, "mean")."""
    m, opt, _, batches = _train(False, clipping, steps=1)
    x, y = batches[0]
    start = _model()
    loss = nn.CrossEntropyLoss(reduction="none")
    if clipping == "flat":
        sums = R.clipped_sum(start, loss, x, y, C)
    else:
        sums = reference_per_layer(start, loss, x, y, list(opt.engine.bounds))
    ref = torch.cat([(p.detach() - LR * sums[n] / opt.expected_batch_size).flatten()
                     for n, p in start.named_parameters()])
    return ref, _full(m)


@pytest.mark.parametrize("clipping", ["flat", "per_layer"])
def test_one_process_is_the_reference(clipping):
    ref, single = _reference_step(clipping)
    torch.testing.assert_close(single, ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("clipping", ["flat", "per_layer"])
def test_two_processes_equal_one_process(two, clipping):
    m, opt, _, batches = _train(False, clipping)
    single = _full(m)
    moved = single - _full(_model())
    assert moved.abs().max() > 1e-3
    for r in range(2):
        got, sizes, eps, reductions = two[r][clipping]
        torch.testing.assert_close(got, single, rtol=1e-10, atol=1e-12)
        assert eps == pytest.approx(opt.epsilon(DELTA), rel=1e-12)
        # many buckets per step (64-byte buckets), not one reduction at the step
        assert reductions > 4 * len(batches)
        # the step's two backward passes (logical batch) add up to the one-backward update
        torch.testing.assert_close(two[r][clipping + "_split"], single, rtol=1e-10, atol=1e-12)
    # the ranks' batches are shards of the single-process batches
    assert [a + b for a, b in zip(two[0][clipping][1], two[1][clipping][1])] == \
        [len(x) for x, _ in batches]


@pytest.mark.parametrize("clipping", ["flat", "per_layer"])
def test_four_processes_equal_one_process(four, clipping):
    single = _full(_train(False, clipping)[0])
    for r in range(4):
        torch.testing.assert_close(four[r][clipping], single, rtol=1e-10, atol=1e-12)


def test_the_update_is_clipped():
    """Guard against a test that cannot fail: the clipped update is not the unclipped one."""
    m, _, _, batches = _train(False, steps=1)
    start = _model()
    x, y = batches[0]
    nn.functional.cross_entropy(start(x), y).backward()
    plain = torch.cat([p.grad.flatten() for p in start.parameters()])
    assert not torch.allclose(_full(m) - _full(start), -LR * plain, rtol=1e-3)


def test_noise_is_added_once_per_shard_with_the_known_std(two):
    m, opt, _, _ = _train(False, steps=1, dims=WIDE)
    clean = [p.detach() for p in m.parameters()]
    scale = LR * SIGMA * C / opt.expected_batch_size
    z = []          # per rank, per parameter: this rank's noise, in units of sigma C
    for r in range(2):
        parts = []
        for p, shard in zip(clean, two[r]["noisy"]):
            mine = p.chunk(2, 0)[r].flatten()
            parts.append((shard - mine) / scale)
        z.append(parts)
    for r in range(2):
        zr = torch.cat(z[r])
        n = zr.numel()
        assert n > 9000
        assert abs(zr.std().item() - 1) < 5 / math.sqrt(2 * n)      # once: N(0, 1); twice: sqrt 2
        assert abs(zr.mean().item()) < 5 / math.sqrt(n)
    # independent shards: the two ranks' draws are uncorrelated (the same stream would give 1)
    a, b = zip(*[(u, v) for u, v in zip(z[0], z[1]) if u.numel() == v.numel()])
    a, b = torch.cat(a), torch.cat(b)
    corr = ((a - a.mean()) * (b - b.mean())).mean() / (a.std() * b.std())
    assert abs(corr.item()) < 5 / math.sqrt(a.numel())


def test_per_rank_peak_memory_of_params_grads_adam_state_and_held_sums(two):
    """The peak over 2 Adam steps of parameters + gradients + Adam state + every full-size
    clipped sum fastclip holds (reduce-scattered in 16 KiB buckets as they are formed), per rank
    at 2 processes, against one process's parameters + gradients + Adam state. Holding the
    full-size sums until the step would give 0.75 here."""
    m, opt, _, _ = _train(False, steps=2, dims=MEM, adam=True)
    one = _local_bytes(m, opt)
    for r in range(2):
        peak, reductions = two[r]["bytes"]
        assert peak <= 0.6 * one, (peak, one, peak / one)
        assert reductions > 2 * 10      # buckets and lone large sums, not one send per step


def test_per_rank_checkpoints_resume_exactly(two):
    for r in range(2):
        got, steps = two[r]["resumed"]
        assert steps == 3
        assert torch.equal(got, two[r]["straight"])     # bitwise: noise, batches and Adam state


def test_misuses_are_refused_with_the_fix(two):
    for r in range(2):
        mis = two[r]["misuse"]
        assert mis["partial"].startswith("ValueError: fastclip:") and "fully_shard(model)" in mis["partial"]
        assert mis["ddp"].startswith("TypeError") and "DistributedDataParallel" in mis["ddp"]
        assert "audit=False" in mis["audit"] and "per_sample_grad_norms" in mis["audit"]
        assert "nanobatch" in mis["nanobatch"]
