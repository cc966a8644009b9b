"""fastclip with one of its own kernels on and off, beside non-private, steps interleaved in one process.

    python bench/kernel_switch.py --switch gemm --workloads transformer,bert,mlp --steps 10
    python bench/kernel_switch.py --switch conv --workloads cnn,resnet

Why it exists: whether fastclip's AVX-512 kernels beat the BLAS / torch paths depends on the core
(csrc/gemm_avx512.h: on AMD Zen 4 they do not), and two separate bench runs differ by more than the
kernels do on this machine's load. Here the same process runs three steppers in turn: non-private,
fastclip with the switch on, fastclip with it off (the switch flipped before each fastclip step;
both engines are built alike). ``gemm``: ``fastclip._C.set_gemm_kernels`` (a linear map's clipped
sum, the norms' Gram and direct tiles); ``conv``: ``fastclip._C.set_conv_direct_fused`` (the
direct conv norm). Ratios are fastclip / non-private medians from the same run.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

from fastclip import _C
from fastclip.benchmark import WORKLOADS, setup_fastclip, setup_nonprivate

SWITCHES = {"gemm": (_C.set_gemm_kernels, _C.gemm_kernels_enabled),
            "conv": (_C.set_conv_direct_fused, _C.conv_direct_fused_available)}


def measure(name: str, switch: str, steps: int, warmup: int, seed: int) -> dict:
    setter, _ = SWITCHES[switch]
    builder, batch = WORKLOADS[name]
    wl = builder(batch, torch.Generator().manual_seed(seed))
    methods = {"non-private": (None, setup_nonprivate(wl, copy.deepcopy(wl.model), batch)),
               "on": (True, setup_fastclip(wl, copy.deepcopy(wl.model), batch)),
               "off": (False, setup_fastclip(wl, copy.deepcopy(wl.model), batch))}
    times = {k: [] for k in methods}
    old = setter(True)
    try:
        for i in range(warmup + steps):
            x, y = wl.batches[i % len(wl.batches)]
            for k, (flag, step) in methods.items():
                if flag is not None:
                    setter(flag)
                t0 = time.perf_counter()
                step(x, y)
                if i >= warmup:
                    times[k].append(time.perf_counter() - t0)
    finally:
        setter(old)
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    return {"workload": name, "ms": med["non-private"],
            "on": med["on"] / med["non-private"], "off": med["off"] / med["non-private"]}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--switch", choices=sorted(SWITCHES), default="gemm")
    p.add_argument("--workloads", default="mlp,transformer,bert")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    setter, enabled = SWITCHES[a.switch]
    old = setter(True)
    runs = enabled()
    setter(old)
    if not runs:
        raise SystemExit(f"the {a.switch} kernels do not run here (fastclip._C.isa() is "
                         f"{_C.isa()!r}): nothing to compare")
    print(f"threads {a.threads}, median of {a.steps} interleaved steps, {a.switch} kernels "
          f"by default: {'on' if old else 'off'}")
    print(f"| workload | non-private ms | fastclip, {a.switch} kernels on | off |")
    print("|---|---|---|---|")
    for name in a.workloads.split(","):
        r = measure(name, a.switch, a.steps, a.warmup, a.seed)
        print(f"| {name} | {r['ms']:.1f} | {r['on']:.2f}x | {r['off']:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
