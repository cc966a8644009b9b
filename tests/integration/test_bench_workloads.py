"""Every benchmark workload runs a fastclip step with no parameter on the generic rule (issue 15:
the benchmark measures the native rules, never the re-running fallback), and the small models
(resnet, vit) run every method the benchmark times."""
import pytest
import torch

from fastclip import benchmark

# Batch 2: the rules are chosen per module class and per forward, not per batch size.
B = 2


@pytest.mark.parametrize("name", sorted(benchmark.WORKLOADS))
def test_no_workload_module_on_the_generic_rule(name):
    builder, _ = benchmark.WORKLOADS[name]
    torch.manual_seed(0)
    wl = builder(B, torch.Generator().manual_seed(0))
    model, optimizer = benchmark.make_fastclip(wl.model)
    step = benchmark._plain_loop(model, optimizer, wl.loss_fn, wl.autocast)
    step(*wl.batches[0])
    covered = optimizer.engine.covered()
    assert covered, name
    # every trainable parameter has a rule (a tied weight is named once per module using it)
    assert len({param for param, _ in covered}) == sum(1 for p in model.parameters() if p.requires_grad)
    off = [(param, rule) for param, rule in covered if rule in ("GenericRule", "PendingOpsRule")]
    assert not off, f"{name}: parameters on the generic (or an unresolved) rule: {off}"


@pytest.mark.parametrize("name", ["resnet", "vit"])
def test_vision_workload_runs(name):
    results = benchmark.run_workload(name, batch_size=B, warmup=1, steps=1,
                                     device=torch.device("cpu"), memory=True,
                                     methods=("non-private", "fastclip"))
    by = {r.method: r for r in results}
    for method in ("non-private", "fastclip"):
        assert by[method].status == "ok", by[method].error
        assert by[method].median_ms > 0
        assert by[method].peak_mib is not None
    assert by["fastclip"].limit is not None   # its budget is written down (bench/README.md)


def test_limit_for_every_float32_workload():
    for name, (builder, _) in benchmark.WORKLOADS.items():
        if name.endswith("-bf16"):
            continue
        wl = builder(B, torch.Generator().manual_seed(0))
        assert wl.limit is not None and 1.0 <= wl.limit < 2.0, (name, wl.limit)


def test_native_scratch_is_reported():
    _C = pytest.importorskip("fastclip._C")
    import numpy as np

    # One conv norm call (direct or ghost): per thread one example's unfold K x P = 27 x 64 and
    # products; the counter holds them during the call only.
    x = np.random.default_rng(0).standard_normal((4, 3, 8, 8)).astype(np.float32)
    g = np.random.default_rng(1).standard_normal((4, 5, 8, 8)).astype(np.float32)
    _C.scratch_reset_peak()
    before = _C.scratch_bytes()
    _C.conv_sq_norms(x, g, [3, 3], [1, 1], [1, 1], [1, 1], 1, "auto", True, 2)
    assert _C.scratch_bytes() == before
    assert _C.scratch_peak_bytes() - before >= 27 * 64 * 4
    # The bench's memory of a step counts it: a fastclip conv step reports native scratch.
    results = benchmark.run_workload("cnn", batch_size=B, warmup=1, steps=1,
                                     device=torch.device("cpu"), memory=True,
                                     methods=("non-private", "fastclip"))
    by = {r.method: r for r in results}
    assert by["fastclip"].native_mib > 0 and by["non-private"].native_mib == 0
    assert by["fastclip"].mem_ratio is not None


def test_step_memory_does_not_depend_on_what_was_profiled_before():
    # A step that frees memory of the step before (zero_grad's gradients) and allocates as much
    # again: the profiler reports that free only once it has seen the block allocated (a second
    # profiled step), which once made the column read the step's peak or nothing. Both reads
    # must give the step's own peak, what it holds above its start.
    n = 1 << 18   # 1 MiB of float32
    held = {"t": torch.ones(n)}

    def step(x, y):
        held["t"] = None            # the previous step's tensor goes...
        held["t"] = torch.ones(n)   # ... and the step allocates as much again

    reads = [benchmark.step_memory_mib(step, (None, None), torch.device("cpu"))[0]
             for _ in range(3)]
    assert all(r is not None for r in reads), reads
    assert reads[0] == reads[1] == reads[2], reads
    assert abs(reads[0] - 1.0) < 0.05, reads


def _mlp_floor():
    import importlib.util
    import os
    path = os.path.join(os.path.dirname(__file__), "..", "..", "bench", "mlp_floor.py")
    spec = importlib.util.spec_from_file_location("mlp_floor", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_mlp_floor_step_is_fastclips_dp_sgd_step(monkeypatch):
    """bench/mlp_floor.py's hand-written step is the floor of the same DP-SGD step: from the same
    weights, noise off, it leaves the parameters fastclip's step leaves; and the comparison sees
    a different clipping bound (so it is not vacuous)."""
    floor = _mlp_floor()
    gen = torch.Generator().manual_seed(0)
    model = benchmark.mlp((12, 8, 8, 3))
    x = torch.randn(16, 12, generator=gen) * 4    # large enough that examples are clipped
    y = torch.randint(0, 3, (16,), generator=gen)
    assert floor.check(model, x, y) <= 1e-5
    monkeypatch.setattr(floor.ByHand, "max_grad_norm", 0.5)   # the hand-written step alone
    with pytest.raises(AssertionError, match="differs"):
        floor.check(model, x, y)
