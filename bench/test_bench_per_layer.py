"""Per-layer vs flat clipping: one DP step in the single-backward engine, mode "auto".

    pytest bench/test_bench_per_layer.py --benchmark-only

Workloads: the ``mlp`` and ``cnn`` builders of fastclip/benchmark.py at their default batch sizes
(256 and 128). A step is ``zero_grad, forward, loss (mean), backward``: the clipped gradients are
written, no noise is drawn and the optimizer does not step (the same for both). Both clippings
are set up in the same process on deep copies of one initial model (per-layer with the float
bound split evenly over the layers, so both have sensitivity 1) and timed alternately, one step
of each in turn, the order swapped every round, so load changes on the machine hit both alike.
pytest-benchmark's row is the time of the pair; the module prints each clipping's median, the
ratio per_layer / flat of the medians, and the peak memory of one step of each
(``fastclip.benchmark.peak_step_memory_mib``: CPU profiler allocation events, CUDA's peak counter).
"""
import copy
import statistics
import time

import pytest
import torch

import fastclip
from fastclip.benchmark import WORKLOADS, peak_step_memory_mib

CLIPPINGS = ("flat", "per_layer")
ROUNDS = {"mlp": 100, "cnn": 30}
_RESULTS = {}


def _step_fn(model, loss_fn, clipping):
    model, opt, _ = fastclip.make_private(model, torch.optim.SGD(model.parameters(), lr=0.1), None,
                                          noise_multiplier=0.0, max_grad_norm=1.0, mode="auto",
                                          clipping=clipping, loss_reduction="mean",
                                          poisson_sampling=False)

    def step(x, y):
        opt.zero_grad()
        loss_fn(model(x), y).mean().backward()

    return step, opt


@pytest.mark.parametrize("workload", ["mlp", "cnn"])
def test_step_per_layer_vs_flat(benchmark, workload):
    build, B = WORKLOADS[workload]
    wl = build(B, torch.Generator().manual_seed(0))
    steps = {}
    for c in CLIPPINGS:
        steps[c], opt = _step_fn(copy.deepcopy(wl.model), wl.loss_fn, c)
        if c == "per_layer":
            layers = len(opt.engine.layers)
    x, y = wl.batches[0]
    times = {c: [] for c in CLIPPINGS}
    order = list(CLIPPINGS)

    def pair():
        for c in order:
            t0 = time.perf_counter()
            steps[c](x, y)
            times[c].append(time.perf_counter() - t0)
        order.reverse()

    for _ in range(2):  # warm-up: allocator, scratch buffers, thread pool
        pair()
    for c in CLIPPINGS:
        times[c].clear()
    benchmark.group = f"dp-step|{workload}-B{B}"
    benchmark.extra_info.update(workload=workload, batch_size=B, layers=layers)
    benchmark.pedantic(pair, rounds=ROUNDS[workload], warmup_rounds=0, iterations=1)
    med = {c: statistics.median(times[c]) for c in CLIPPINGS}
    mem = {c: peak_step_memory_mib(steps[c], (x, y), x.device) for c in CLIPPINGS}
    benchmark.extra_info.update({f"{c}_median_ms": med[c] * 1e3 for c in CLIPPINGS})
    benchmark.extra_info.update({f"{c}_peak_mib": mem[c] for c in CLIPPINGS})
    benchmark.extra_info["ratio_per_layer_flat"] = med["per_layer"] / med["flat"]
    _RESULTS[benchmark.group] = (med, mem, len(times["flat"]), layers)


@pytest.fixture(scope="module", autouse=True)
def _report(request):
    # Printed at unconfigure (after pytest-benchmark's tables), outside output capture.
    rep = request.config.pluginmanager.get_plugin("terminalreporter")

    def fmt_mem(v):
        return "   n/a" if v is None else f"{v:6.1f}"

    def report():
        lines = [f"{group:20s} {layers} layers, {n} steps each: flat {med['flat'] * 1e3:8.2f} ms  "
                 f"per_layer {med['per_layer'] * 1e3:8.2f} ms  ratio {med['per_layer'] / med['flat']:5.3f}  "
                 f"peak MiB flat {fmt_mem(mem['flat'])} per_layer {fmt_mem(mem['per_layer'])}"
                 for group, (med, mem, n, layers) in sorted(_RESULTS.items())]
        if lines and rep is not None:
            rep.write_sep("-", "per_layer / flat step time (medians, alternated; < 1: per_layer faster)")
            for line in lines:
                rep.write_line(line)

    request.config.add_cleanup(report)
    yield
