"""NanoBatch mode benchmark: one DP-SGD step of mode="nanobatch" beside Opacus's functorch mode,
a plain per-example loop, fastclip's single-backward mode="auto" and non-private torch, for
1..N threads; then peak memory against the batch size.

    python bench/nanobatch.py                      # mlp and cnn, threads 1..torch.get_num_threads()
    python bench/nanobatch.py --workloads mlp --steps 5 --sizes 1,8 --memory-batches 32,128,512

Every method trains a deep copy of the same initial model on the same batches; timed steps
alternate round-robin between methods (a change in machine load hits them all alike); the table
gives medians and the ratio to non-private measured in this run. Peak memory is the memory
allocated during one step above what was allocated when it began (torch's CPU profiler), so the
native core's numpy buffers are included only where they are torch tensors (the nanobatch
accumulators are), and only the calling thread's allocations are seen (nanobatch runs with one
thread in that table).
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import warnings
from typing import Callable, Dict, List

import torch
from torch import Tensor, nn

import fastclip
from fastclip.benchmark import (WORKLOADS, NotInstalled, _opacus_setup, _plain_loop, _sgd,
                                _time_one, environment, peak_step_memory_mib, setup_nonprivate)

StepFn = Callable[[Tensor, Tensor], None]


def setup_fastclip(mode: str, **kw):
    def setup(wl, model, batch_size):
        model, opt, _ = fastclip.make_private(model, _sgd(model), None, noise_multiplier=1.0,
                                              max_grad_norm=1.0, mode=mode, poisson_sampling=False,
                                              **kw)
        return _plain_loop(model, opt, wl.loss_fn)
    return setup


def setup_loop(wl, model, batch_size):
    """One forward and backward per example, clip, add: the textbook DP-SGD step."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = _sgd(model)

    def step(x, y):
        acc = [torch.zeros_like(p) for p in params]
        for i in range(x.shape[0]):
            g = torch.autograd.grad(wl.loss_fn(model(x[i:i + 1]), y[i:i + 1]).sum(), params)
            c = min(1.0, 1.0 / (float(torch.sqrt(sum(t.square().sum() for t in g))) + 1e-12))
            for a, t in zip(acc, g):
                a.add_(t, alpha=c)
        for p, a in zip(params, acc):
            p.grad = (a + torch.randn_like(a)) / x.shape[0]
        opt.step()
    return step


def setup_opacus_functorch(wl, model, batch_size):
    dp_model, optimizer, _ = _opacus_setup(wl, model, batch_size, "functorch")
    return _plain_loop(dp_model, optimizer, wl.loss_fn)


def methods(threads: List[int], sizes: List[int]) -> Dict[str, Callable]:
    out = {"non-private": setup_nonprivate, "fastclip auto": setup_fastclip("auto")}
    for k in sizes:
        for t in threads:
            out[f"nanobatch k={k} t={t}"] = setup_fastclip("nanobatch", nanobatch_size=k,
                                                          num_threads=t)
    out["per-example loop"] = setup_loop
    out["opacus functorch"] = setup_opacus_functorch
    return out


def time_workload(name: str, ms: Dict[str, Callable], warmup: int, steps: int, seed: int = 0):
    builder, bs = WORKLOADS[name]
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    wl = builder(bs, gen)
    steppers, rows = {}, {}
    for mname, setup in ms.items():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                step = setup(wl, copy.deepcopy(wl.model), bs)
                for i in range(warmup):
                    step(*wl.batches[i % len(wl.batches)])
            steppers[mname], rows[mname] = step, []
        except NotInstalled:
            rows[mname] = "not installed"
        except Exception as e:  # report and go on
            rows[mname] = f"error: {type(e).__name__}: {e}"
    for i in range(steps):
        x, y = wl.batches[(warmup + i) % len(wl.batches)]
        for mname, step in steppers.items():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                rows[mname].append(_time_one(step, x, y, torch.device("cpu")))
    base = statistics.median(rows["non-private"])
    print(f"\n{name} (batch {bs}), median of {steps} steps, ms (ratio to non-private):")
    for mname, r in rows.items():
        if isinstance(r, str):
            print(f"  {mname:24s} {r}")
        else:
            med = statistics.median(r)
            print(f"  {mname:24s} {med:10.2f} ({med / base:6.2f}x)")
    sys.stdout.flush()


def memory_vs_batch(name: str, batches: List[int], seed: int = 0):
    builder, _ = WORKLOADS[name]
    print(f"\n{name}: peak MiB allocated during one step, by batch size:")
    ms = {"non-private": setup_nonprivate, "fastclip auto": setup_fastclip("auto"),
          # One thread: the profiler sees allocations of the calling thread only. Each further
          # thread adds one accumulator and one nanobatch's gradients (parameters x (1 + k)).
          "nanobatch k=1 t=1": setup_fastclip("nanobatch", num_threads=1)}
    print("  " + f"{'batch':>6s}" + "".join(f"{m:>20s}" for m in ms))
    for bs in batches:
        gen = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)
        wl = builder(bs, gen)
        cells = []
        for setup in ms.values():
            step = setup(wl, copy.deepcopy(wl.model), bs)
            step(*wl.batches[0])
            mib = peak_step_memory_mib(step, wl.batches[0], torch.device("cpu"))
            cells.append("n/a" if mib is None else f"{mib:.1f}")
        print("  " + f"{bs:6d}" + "".join(f"{c:>20s}" for c in cells))
        sys.stdout.flush()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workloads", default="mlp,cnn")
    p.add_argument("--threads", default=None, help="comma list (default 1..torch.get_num_threads())")
    p.add_argument("--sizes", default="1,8", help="nanobatch sizes (default 1,8)")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--memory-batches", default="32,128,512",
                   help="batch sizes of the memory table ('' skips it)")
    args = p.parse_args(argv)
    n = torch.get_num_threads()
    threads = [int(t) for t in args.threads.split(",")] if args.threads else list(range(1, n + 1))
    sizes = [int(k) for k in args.sizes.split(",")]
    env = environment()
    print(f"torch {env['torch']}, opacus {env['opacus'] or 'not installed'}, {n} torch threads, "
          f"{env['cpu_count']} CPUs, load average at start {env['loadavg_1min_at_start']}")
    for name in args.workloads.split(","):
        time_workload(name, methods(threads, sizes), args.warmup, args.steps)
    if args.memory_batches:
        for name in args.workloads.split(","):
            memory_vs_batch(name, [int(b) for b in args.memory_batches.split(",")])
    return 0


if __name__ == "__main__":
    sys.exit(main())
