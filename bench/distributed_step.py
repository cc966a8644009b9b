"""Step time of multi-process DP-SGD (fastclip.distributed) against one process, on the e2e CNN
workload (fastclip/benchmark.py "cnn"), with torch's non-private step beside it (plain for one
process, DistributedDataParallel for several) as the baseline.

The global batch is fixed (``--batch-size``, default 128) and split evenly over the processes;
every process gets ``--threads`` intra-op threads (default 1: on a 2-core machine, 2 processes
with 1 thread each against 1 process with 1 thread is the fair comparison). Processes talk over
gloo on 127.0.0.1 only. Reports the median step time on rank 0 over ``--steps`` timed steps
(after ``--warmup``), each step started by a barrier, and for fastclip the median time spent in
the all-reduce of the clipped sums (inside ``optimizer.step``).

    python bench/distributed_step.py --processes 1,2 --threads 1 --steps 10
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _timed(step, batches, warmup, steps, distributed):
    times = []
    for i in range(warmup + steps):
        x, y = batches[i % len(batches)]
        if distributed:
            dist.barrier()
        t0 = time.perf_counter()
        step(x, y)
        if i >= warmup:
            times.append((time.perf_counter() - t0) * 1e3)
    return times


def _worker(rank, world, port, args, outdir):
    from fastclip import benchmark as B
    import fastclip

    torch.set_num_threads(args.threads)
    distributed = world > 1
    if distributed:
        os.environ["GLOO_SOCKET_IFNAME"] = "lo"
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=world, timeout=timedelta(seconds=120))
    try:
        local = args.batch_size // world
        wl = B.WORKLOADS["cnn"][0](local, torch.Generator().manual_seed(args.seed + rank))
        out = {}

        torch.manual_seed(args.seed)
        model = wl.model
        plain = nn.parallel.DistributedDataParallel(model) if distributed else model
        step = B._plain_loop(plain, torch.optim.SGD(plain.parameters(), lr=0.1), wl.loss_fn)
        out["torch"] = _timed(step, wl.batches, args.warmup, args.steps, distributed)

        torch.manual_seed(args.seed)
        model = B.cnn()
        model, opt, _ = fastclip.make_private(model, torch.optim.SGD(model.parameters(), lr=0.1), None,
                                              noise_multiplier=1.0, max_grad_norm=1.0,
                                              poisson_sampling=False, distributed=distributed)
        reduce_ms = []
        if opt.reducer is not None:
            inner = opt.reducer.reduce

            def reduce(params, engine):
                t0 = time.perf_counter()
                inner(params, engine)
                reduce_ms.append((time.perf_counter() - t0) * 1e3)
            opt.reducer.reduce = reduce
        step = B._plain_loop(model, opt, wl.loss_fn)
        out["fastclip"] = _timed(step, wl.batches, args.warmup, args.steps, distributed)
        out["allreduce"] = reduce_ms[args.warmup:]
        if rank == 0:
            with open(os.path.join(outdir, f"p{world}.json"), "w") as f:
                json.dump(out, f)
    finally:
        if distributed:
            dist.destroy_process_group()


def run_processes(world: int, args) -> dict:
    with tempfile.TemporaryDirectory() as outdir:
        ctx = mp.start_processes(_worker, args=(world, _free_port(), args, outdir), nprocs=world,
                                 join=False, start_method="spawn")
        deadline = time.monotonic() + args.timeout
        try:
            while not ctx.join(timeout=1):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{world} processes did not finish in {args.timeout} s")
        finally:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
                    p.join(5)
        with open(os.path.join(outdir, f"p{world}.json")) as f:
            return json.load(f)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--processes", default="1,2", help="comma-separated process counts")
    p.add_argument("--threads", type=int, default=1, help="intra-op threads per process")
    p.add_argument("--batch-size", type=int, default=128, help="global batch, split over processes")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=300, help="seconds per process count")
    args = p.parse_args(argv)
    counts = [int(c) for c in args.processes.split(",")]
    print(f"cnn, global batch {args.batch_size}, {args.threads} thread(s) per process, "
          f"{os.cpu_count()} cores, loadavg {os.getloadavg()[0]:.2f}, torch {torch.__version__}")
    print(f"{'processes':>9} | {'torch ms':>9} | {'fastclip ms':>11} | {'fastclip/torch':>14} | "
          f"{'all-reduce ms':>13} | {'fastclip speed-up vs 1':>22}")
    base = None
    for world in counts:
        r = run_processes(world, args)
        t, f = statistics.median(r["torch"]), statistics.median(r["fastclip"])
        ar = statistics.median(r["allreduce"]) if r["allreduce"] else 0.0
        base = base or (f if world == 1 else None)
        up = f"{base / f:.2f}x" if base else "-"
        print(f"{world:>9} | {t:>9.1f} | {f:>11.1f} | {f / t:>14.2f} | {ar:>13.2f} | {up:>22}")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
