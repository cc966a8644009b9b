"""Page faults and wall time per step, non-private beside fastclip, steps interleaved in one process.

    python bench/page_faults.py --workloads cnn,resnet --steps 20
    FASTCLIP_KEEP_HEAP=0 python bench/page_faults.py --workloads cnn,resnet --steps 20

Why it exists: glibc hands the freed top of its heap back to the OS after a step and the next one
faults every page in again (fastclip/heap.py). Every fastclip engine fixes that for its process;
run the second line (malloc's own settings) beside the first to see what it is worth. The fault
counts are the process's minor faults (ru_minflt, all threads) during each method's steps; time
is the median wall time per step; ratio = fastclip / non-private from the same run.
"""
from __future__ import annotations

import argparse
import copy
import resource
import statistics
import time

import torch

from fastclip.benchmark import WORKLOADS, setup_fastclip, setup_nonprivate
from fastclip.heap import keep_heap


def _faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def measure(name: str, steps: int, warmup: int, seed: int) -> dict:
    builder, batch = WORKLOADS[name]
    wl = builder(batch, torch.Generator().manual_seed(seed))
    x, y = wl.batches[0]
    methods = {"non-private": setup_nonprivate(wl, copy.deepcopy(wl.model), batch),
               "fastclip": setup_fastclip(wl, copy.deepcopy(wl.model), batch)}
    for _ in range(warmup):
        for step in methods.values():
            step(x, y)
    times = {k: [] for k in methods}
    faults = {k: 0 for k in methods}
    for _ in range(steps):
        for k, step in methods.items():
            f0, t0 = _faults(), time.perf_counter()
            step(x, y)
            times[k].append(time.perf_counter() - t0)
            faults[k] += _faults() - f0
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    return {"workload": name, "ms": med, "faults": {k: v / steps for k, v in faults.items()},
            "ratio": med["fastclip"] / med["non-private"]}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workloads", default="cnn,resnet")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    print(f"threads {a.threads}, median of {a.steps} interleaved steps; "
          f"heap kept between steps: {keep_heap()}")
    print("| workload | non-private ms (faults/step) | fastclip ms (faults/step) | ratio |")
    print("|---|---|---|---|")
    for name in a.workloads.split(","):
        r = measure(name, a.steps, a.warmup, a.seed)
        cells = [f"{r['ms'][k]:.1f} ({r['faults'][k]:.0f})" for k in ("non-private", "fastclip")]
        print(f"| {name} | {cells[0]} | {cells[1]} | {r['ratio']:.2f}x |")


if __name__ == "__main__":
    main()
