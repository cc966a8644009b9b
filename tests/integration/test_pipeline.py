"""Pipeline parallelism (torch.distributed.pipelining) under make_private: 2 processes on
localhost (gloo, 127.0.0.1 only), each one stage of a 2-stage pipeline, and 4 processes, each one
stage of a 4-stage pipeline, driven by torch's GPipe and 1F1B schedules over micro-batches. Each stage's update must equal the single-process update of the
whole model on the same Poisson batches (per-layer clipping: each stage clips its own layers; flat
clipping: the per-example squared norms exchanged between the stages), noise included (the same
seed gives the same noise), and epsilon agrees everywhere. The misuses are refused: a schedule
that divides the gradients by the number of micro-batches (scale_grads=True) and stage modules
made private as data-parallel replicas (FSDP2: tests/integration/test_fsdp.py). Per-stage checkpoints saved
after 2 noisy steps and loaded by other processes (ranks 0 and 1 of the 4-process run, regrouped)
continue exactly as the straight 3-step run.

The scenarios of each world size run in one set of processes, spawned once for the module
(bounded by a timeout); the single-process references are computed here."""
import os
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import fastclip
from harness import gloo_group, refusal, run_ranks

pytest.importorskip("torch.distributed.pipelining")

WORLD = 2
TIMEOUT_S = 60
DELTA = 1e-5
SIGMA, LR = 1.1, 0.5
MICRO = {2: 2, 4: 4}              # 1F1B needs at least as many micro-batches as stages
SEED = {2: 3, 4: 6}               # Poisson batches of 6, 8, 10 / 4, 8: equal micro-batches
WIDTHS = {2: [6, 8, 5, 3], 4: [6, 8, 7, 5, 3]}    # the Linear layers' widths
CUTS = {2: [0, 1, 3], 4: [0, 1, 2, 3, 4]}         # stage r: Linear layers CUTS[r] .. CUTS[r+1]-1
BOUNDS = [0.3, 0.5, 0.4]          # one per layer of the whole model
BOUNDS4 = [0.3, 0.5, 0.4, 0.35]


def _data(N=40):
    g = torch.Generator().manual_seed(11)
    return TensorDataset(torch.randn(N, 6, generator=g, dtype=torch.float64) * 3,
                         torch.randint(0, 3, (N,), generator=g))


def _model(world=WORLD):
    """Linear, Tanh, ..., Linear (the widths of the world size's pipeline)."""
    torch.manual_seed(5)
    w, layers = WIDTHS[world], []
    for a, b in zip(w, w[1:]):
        layers += [nn.Linear(a, b), nn.Tanh()]
    return nn.Sequential(*layers[:-1]).double()


def _stage(rank, world=WORLD):
    layers, cut = list(_model(world)), CUTS[world]
    return nn.Sequential(*layers[2 * cut[rank]:2 * cut[rank + 1]])


def _flat(m):
    return torch.cat([p.detach().flatten() for p in m.parameters()])


def _loss(out, y):
    return nn.functional.cross_entropy(out, y)     # each micro-batch's mean


def _run(rank, clipping, bounds, schedule="gpipe", noise=0.0, steps=2, scale_grads=False,
         world=WORLD, seed=None, save=None, load=None):
    """A few Poisson-sampled steps of the whole model (rank None) or of this rank's stage;
    ``load``: first resume from the per-stage checkpoint ``load`` (``{rank}`` in it), ``save``:
    save one there after the steps. Returns (flat parameters, epsilon, batch sizes)."""
    micro = MICRO[world]
    if rank is None:
        m, kw = _model(world), dict(distributed=False)
        C = bounds
    else:
        from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe
        m, kw = _stage(rank, world), dict(pipeline=True)
        cut = CUTS[world]
        C = bounds[cut[rank]:cut[rank + 1]] if isinstance(bounds, list) else bounds
    m, opt, loader = fastclip.make_private(
        m, torch.optim.SGD(m.parameters(), lr=LR), DataLoader(_data(), batch_size=8),
        noise_multiplier=noise, max_grad_norm=C, clipping=clipping,
        generator=torch.Generator().manual_seed(SEED[world] if seed is None else seed), **kw)
    if load is not None:
        ckpt = fastclip.load_checkpoint(load)
        m.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
    sizes, it = [], iter(loader)
    for _ in range(steps):
        x, y = next(it)
        sizes.append(len(x))
        assert len(x) % micro == 0 and len(x) > 0   # SEED[world] draws such batches
        if rank is not None:
            # Poisson batches vary in size and a stage fixes its micro-batch shapes at its first
            # step: a stage and schedule per batch (one small metadata exchange).
            stage = PipelineStage(m, rank, world, torch.device("cpu"))
            S = ScheduleGPipe if schedule == "gpipe" else Schedule1F1B
            sched = S(stage, n_microbatches=micro, loss_fn=_loss, scale_grads=scale_grads)
        opt.zero_grad()
        if rank is None:
            _loss(m(x), y).backward()
        elif rank == 0:
            sched.step(x)
        else:
            sched.step(target=y)
        opt.step()
    if save is not None:
        fastclip.save_checkpoint(save, model=m, optimizer=opt)
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
SCENARIOS4 = {
    "per_layer_list_gpipe": dict(clipping="per_layer", bounds=BOUNDS4, schedule="gpipe"),
    "flat_1f1b": dict(clipping="flat", bounds=0.5, schedule="1f1b"),
    "flat_noisy_gpipe": dict(clipping="flat", bounds=0.5, schedule="gpipe", noise=SIGMA),
}
RESUME = dict(clipping="flat", bounds=0.5, schedule="1f1b", noise=SIGMA)


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
                                      generator=torch.Generator().manual_seed(SEED[WORLD]), **kw)
    before = _flat(m)
    opt.zero_grad()
    opt.step()
    return _flat(m) - before


def _worker(rank, port, outdir, ckpt):
    with gloo_group(rank, port, WORLD, TIMEOUT_S):
        out = {name: _run(rank, **kw) for name, kw in SCENARIOS.items()}
        out["noise_only"] = {c: _noise_only(rank, c) for c in ("flat", "per_layer")}
        out["scale_grads"] = refusal(lambda: _run(rank, "per_layer", BOUNDS, scale_grads=True))
        out["replicas"] = refusal(lambda: _replicas_misused(rank))
        out["straight"] = _run(rank, **RESUME, steps=3)[0]
        _run(rank, **RESUME, steps=2, save=os.path.join(ckpt, "stage{rank}.pt"))
        torch.save(out, os.path.join(outdir, f"rank{rank}.pt"))


def _worker4(rank, port, outdir, ckpt):
    with gloo_group(rank, port, 4, TIMEOUT_S):
        out = {name: _run(rank, **kw, world=4) for name, kw in SCENARIOS4.items()}
    if rank < WORLD:
        # Processes other than the ones that saved (ranks 0 and 1, regrouped as a 2-stage
        # pipeline) load the per-stage checkpoints of 2 steps and run the third; fresh objects
        # with another seed, so everything comes from the checkpoint.
        dist.init_process_group("gloo", init_method="file://" + os.path.join(outdir, "regroup"),
                                rank=rank, world_size=WORLD,
                                timeout=timedelta(seconds=TIMEOUT_S))
        try:
            out["resumed"] = _run(rank, **RESUME, steps=1, seed=99,
                                  load=os.path.join(ckpt, "stage{rank}.pt"))[0]
        finally:
            dist.destroy_process_group()
    torch.save(out, os.path.join(outdir, f"rank{rank}.pt"))


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return str(tmp_path_factory.mktemp("pipeline_ckpt"))   # the per-stage checkpoints' folder


@pytest.fixture(scope="module")
def ranks(ckpt):
    return run_ranks(_worker, WORLD, TIMEOUT_S, ckpt)


@pytest.fixture(scope="module")
def four(ranks, ckpt):
    return run_ranks(_worker4, 4, TIMEOUT_S, ckpt)     # after ranks: it loads ranks' checkpoints


def _split(flat, world=WORLD):
    sizes = [sum(p.numel() for p in _stage(r, world).parameters()) for r in range(world)]
    return list(flat.split(sizes))


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


@pytest.mark.parametrize("name", list(SCENARIOS4))
def test_four_stages_equal_one_process_on_the_whole_model(four, name):
    kw = SCENARIOS4[name]
    single, eps, sizes = _run(None, **{k: v for k, v in kw.items() if k != "schedule"}, world=4)
    start = _split(_flat(_model(4)), 4)
    for r, part in enumerate(_split(single, 4)):
        got = four[r][name][0]
        assert (part - start[r]).abs().max() > 1e-3          # the step moved this stage
        torch.testing.assert_close(got, part, rtol=1e-12, atol=1e-13)
        assert four[r][name][2] == sizes
        assert four[r][name][1] == pytest.approx(eps, rel=1e-12)


def test_per_stage_checkpoints_resume_exactly_in_other_processes(ranks, four):
    for r in range(WORLD):
        assert torch.equal(four[r]["resumed"], ranks[r]["straight"])  # bitwise: noise, batches


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
