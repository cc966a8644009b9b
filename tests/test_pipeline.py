"""Pipeline parallelism (torch.distributed.pipelining) under make_private: 2 processes on
localhost (gloo, 127.0.0.1 only), each one stage of a 2-stage pipeline, driven by torch's GPipe and
1F1B schedules over micro-batches. Each stage's update must equal the single-process update of the
whole model on the same Poisson batches (per-layer clipping: each stage clips its own layers; flat
clipping: the per-example squared norms exchanged between the stages), noise included (the same
seed gives the same noise), and epsilon agrees everywhere. The misuses are refused: a schedule
that divides the gradients by the number of micro-batches (scale_grads=True) and stage modules
made private as data-parallel replicas (FSDP2: tests/test_fsdp.py).

All scenarios run in one pair of processes, spawned once for the module (bounded by a timeout);
the single-process references are computed here."""
import os

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import fastclip
from harness import init_gloo, run_ranks

pytest.importorskip("torch.distributed.pipelining")

WORLD = 2
TIMEOUT_S = 60
DELTA = 1e-5
SIGMA, LR = 1.1, 0.5
MICRO = 2
SEED = 3                          # Poisson batches of 6 and 8: equal micro-batches (see _run)
BOUNDS = [0.3, 0.5, 0.4]          # one per layer of the whole model
SPLIT = 1                         # stage 0: layer 0; stage 1: layers 1, 2


def _data(N=40):
    g = torch.Generator().manual_seed(11)
    return TensorDataset(torch.randn(N, 6, generator=g, dtype=torch.float64) * 3,
                         torch.randint(0, 3, (N,), generator=g))


def _model():
    torch.manual_seed(5)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 5), nn.Tanh(),
                         nn.Linear(5, 3)).double()


def _stage(rank):
    layers = list(_model())
    return nn.Sequential(*(layers[:2] if rank == 0 else layers[2:]))


def _flat(m):
    return torch.cat([p.detach().flatten() for p in m.parameters()])


def _loss(out, y):
    return nn.functional.cross_entropy(out, y)     # each micro-batch's mean


def _run(rank, clipping, bounds, schedule="gpipe", noise=0.0, steps=2, scale_grads=False):
    """A few Poisson-sampled steps of the whole model (rank None) or of this rank's stage.
    Returns (flat parameters, epsilon, batch sizes)."""
    if rank is None:
        m, kw = _model(), dict(distributed=False)
        C = bounds
    else:
        from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe
        m, kw = _stage(rank), dict(pipeline=True)
        C = (bounds[:SPLIT] if rank == 0 else bounds[SPLIT:]) if isinstance(bounds, list) else bounds
    m, opt, loader = fastclip.make_private(
        m, torch.optim.SGD(m.parameters(), lr=LR), DataLoader(_data(), batch_size=8),
        noise_multiplier=noise, max_grad_norm=C, clipping=clipping,
        generator=torch.Generator().manual_seed(SEED), **kw)
    sizes, it = [], iter(loader)
    for _ in range(steps):
        x, y = next(it)
        sizes.append(len(x))
        assert len(x) % MICRO == 0 and len(x) > 0   # SEED draws 6, then 8
        if rank is not None:
            # Poisson batches vary in size and a stage fixes its micro-batch shapes at its first
            # step: a stage and schedule per batch (one small metadata exchange).
            stage = PipelineStage(m, rank, WORLD, torch.device("cpu"))
            S = ScheduleGPipe if schedule == "gpipe" else Schedule1F1B
            sched = S(stage, n_microbatches=MICRO, loss_fn=_loss, scale_grads=scale_grads)
        opt.zero_grad()
        if rank is None:
            _loss(m(x), y).backward()
        elif rank == 0:
            sched.step(x)
        else:
            sched.step(target=y)
        opt.step()
    return _flat(m), opt.epsilon(DELTA), sizes


SCENARIOS = {
    "per_layer_list_gpipe": dict(clipping="per_layer", bounds=BOUNDS, schedule="gpipe"),
    "per_layer_float_gpipe": dict(clipping="per_layer", bounds=0.6, schedule="gpipe"),
    "per_layer_float_1f1b": dict(clipping="per_layer", bounds=0.6, schedule="1f1b"),
    "flat_gpipe": dict(clipping="flat", bounds=0.5, schedule="gpipe"),
    "flat_1f1b": dict(clipping="flat", bounds=0.5, schedule="1f1b"),
    "flat_noisy_1f1b": dict(clipping="flat", bounds=0.5, schedule="1f1b", noise=SIGMA),
    "per_layer_noisy_gpipe": dict(clipping="per_layer", bounds=BOUNDS, schedule="gpipe",
                                  noise=SIGMA),
}


def _refusal(fn):
    try:
        fn()
    except Exception as e:       # noqa: BLE001 - the message is the result
        return f"{type(e).__name__}: {e}"
    return None


def _replicas_misused(rank):
    """Two different stages of equal shapes made private as data-parallel replicas."""
    torch.manual_seed(rank)
    m = nn.Linear(4, 4).double()
    m, opt, _ = fastclip.make_private(m, torch.optim.SGD(m.parameters(), lr=1.0), None,
                                      noise_multiplier=0.0, max_grad_norm=1.0)
    before = _flat(m)
    opt.zero_grad()
    m(torch.ones(3, 4, dtype=torch.float64)).sum().backward()
    try:
        opt.step()
    finally:
        assert torch.equal(before, _flat(m))     # nothing released
        opt.zero_grad()


def _noise_only(rank, clipping):
    """A step on an empty batch (Poisson sampling draws one now and then): no schedule run, the
    noise alone, on every stage (flat clipping exchanges zero norms)."""
    m = _model() if rank is None else _stage(rank)
    kw = dict(distributed=False) if rank is None else dict(pipeline=True)
    m, opt, _ = fastclip.make_private(m, torch.optim.SGD(m.parameters(), lr=LR), None,
                                      noise_multiplier=SIGMA, max_grad_norm=0.5, clipping=clipping,
                                      generator=torch.Generator().manual_seed(SEED), **kw)
    before = _flat(m)
    opt.zero_grad()
    opt.step()
    return _flat(m) - before


def _worker(rank, port, outdir):
    init_gloo(rank, port, WORLD, TIMEOUT_S)
    try:
        out = {name: _run(rank, **kw) for name, kw in SCENARIOS.items()}
        out["noise_only"] = {c: _noise_only(rank, c) for c in ("flat", "per_layer")}
        out["scale_grads"] = _refusal(lambda: _run(rank, "per_layer", BOUNDS, scale_grads=True))
        out["replicas"] = _refusal(lambda: _replicas_misused(rank))
        torch.save(out, os.path.join(outdir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks():
    return run_ranks(_worker, WORLD, TIMEOUT_S)


def _split(flat):
    n0 = sum(p.numel() for p in _stage(0).parameters())
    return flat[:n0], flat[n0:]


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_each_stage_equals_one_process_on_the_whole_model(ranks, name):
    kw = SCENARIOS[name]
    single, eps, sizes = _run(None, **{k: v for k, v in kw.items() if k != "schedule"})
    start = _flat(_model())
    for r, part in enumerate(_split(single)):
        got = ranks[r][name][0]
        moved = part - _split(start)[r]
        assert moved.abs().max() > 1e-3          # the step moved this stage
        torch.testing.assert_close(got, part, rtol=1e-12, atol=1e-13)
        assert ranks[r][name][2] == sizes        # every stage drew the single-process batches
        assert ranks[r][name][1] == pytest.approx(eps, rel=1e-12)


def test_the_update_is_clipped(ranks):
    """Guard against a test that cannot fail: the clipped update is not the unclipped one."""
    m = _model()
    x, y = _data()[:8]
    _loss(m(x), y).backward()
    plain = torch.cat([p.grad.flatten() for p in m.parameters()])
    single, _, _ = _run(None, "flat", 0.5, steps=1)
    assert not torch.allclose(single - _flat(_model()), -LR * plain, rtol=1e-3)


def test_scale_grads_is_refused_on_every_stage(ranks):
    for r in range(WORLD):
        assert "scale_grads=False" in ranks[r]["scale_grads"]
        assert ranks[r]["scale_grads"].startswith("RuntimeError: fastclip:")


def test_stages_made_private_as_replicas_are_refused(ranks):
    for r in range(WORLD):
        assert "pipeline=True" in ranks[r]["replicas"]
        assert "different parameters" in ranks[r]["replicas"]


def test_pipeline_needs_a_process_group():
    m = _model()
    with pytest.raises(ValueError, match="init_process_group"):
        fastclip.make_private(m, torch.optim.SGD(m.parameters(), lr=1.0), None,
                              noise_multiplier=0.0, max_grad_norm=1.0, pipeline=True)


@pytest.mark.parametrize("clipping", ["flat", "per_layer"])
def test_an_empty_batch_is_a_noise_only_step_on_every_stage(ranks, clipping):
    single = _split(_noise_only(None, clipping))
    for r in range(WORLD):
        got = ranks[r]["noise_only"][clipping]
        assert got.abs().min() > 0                        # every coordinate noised
        torch.testing.assert_close(got, single[r], rtol=1e-12, atol=1e-14)
