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
    python bench/distributed_step.py --pipeline --threads 1 --steps 10   # 2 pipeline stages
    python bench/distributed_step.py --fsdp --processes 2 --threads 1 --steps 10   # FSDP2

``--fsdp``: a small token model (embedding tied to the output projection, pre-norm MLP blocks)
with every block and the root passed to ``fully_shard``: torch's non-private FSDP2 step beside
fastclip's (flat and per-layer clipping) at the same process count, the time of fastclip's
reduce-scatter of the clipped sums, and rank 0's bytes of parameters + gradients + Adam state.
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


def _pipeline_worker(rank, world, port, args, outdir):
    """One stage of an MLP per rank (GPipe, 4 micro-batches): torch's non-private pipeline step,
    then fastclip per-layer and flat (pipeline=True), steps timed the same way."""
    import fastclip
    from torch.distributed.pipelining import PipelineStage, ScheduleGPipe

    torch.set_num_threads(args.threads)
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=timedelta(seconds=120))
    try:
        width, per_stage, micro = 512, 2, 4
        g = torch.Generator().manual_seed(args.seed)
        batches = [(torch.randn(args.batch_size, width, generator=g),
                    torch.randint(0, 10, (args.batch_size,), generator=g)) for _ in range(4)]
        loss_fn = lambda out, y: nn.functional.cross_entropy(out, y)  # noqa: E731

        def stage_module():
            torch.manual_seed(args.seed + rank)
            layers = []
            for i in range(per_stage):
                last = rank == world - 1 and i == per_stage - 1
                layers += [nn.Linear(width, 10 if last else width)] + ([] if last else [nn.Tanh()])
            return nn.Sequential(*layers)

        def loop(module, opt, private):
            sched = ScheduleGPipe(PipelineStage(module, rank, world, torch.device("cpu")),
                                  n_microbatches=micro, loss_fn=loss_fn, scale_grads=not private)

            def step(x, y):
                opt.zero_grad()
                if rank == 0:
                    sched.step(x)
                elif rank == world - 1:
                    sched.step(target=y)
                else:
                    sched.step()
                opt.step()
            return step

        out = {}
        m = stage_module()
        out["torch"] = _timed(loop(m, torch.optim.SGD(m.parameters(), lr=0.1), False), batches,
                              args.warmup, args.steps, True)
        for clipping in ("per_layer", "flat"):
            m = stage_module()
            m, opt, _ = fastclip.make_private(m, torch.optim.SGD(m.parameters(), lr=0.1), None,
                                              noise_multiplier=1.0, max_grad_norm=1.0,
                                              clipping=clipping, pipeline=True,
                                              poisson_sampling=False)
            out[clipping] = _timed(loop(m, opt, True), batches, args.warmup, args.steps, True)
        if rank == 0:
            with open(os.path.join(outdir, f"p{world}.json"), "w") as f:
                json.dump(out, f)
    finally:
        dist.destroy_process_group()


def _fsdp_worker(rank, world, port, args, outdir):
    """torch's non-private FSDP2 step, then fastclip flat and per-layer on the same sharded model
    (audit=False: the audit cannot run sharded, see fastclip/fsdp.py), Adam, steps timed the same
    way; each rank trains on its share of the global batch."""
    import fastclip
    from fastclip import benchmark as B
    from torch.distributed.fsdp import fully_shard

    torch.set_num_threads(args.threads)
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=timedelta(seconds=120))
    try:
        local_b, T, V = args.batch_size // world, 32, 2048
        g = torch.Generator().manual_seed(args.seed + rank)
        batches = B.make_batches(g, 4, (local_b, T), V, vocab=V)

        def sharded():
            torch.manual_seed(args.seed)
            m = B.TiedTokenMLP(V, 256, 1024, L=4)
            for block in m.blocks:
                fully_shard(block)
            fully_shard(m)
            return m

        def loop(m, opt):
            def step(x, y):
                opt.zero_grad()
                nn.functional.cross_entropy(m(x), y).backward()
                opt.step()
            return step

        def nbytes(m, opt):
            loc = fastclip.fsdp.local
            ts = [loc(p) for p in m.parameters()] + [loc(p.grad) for p in m.parameters()
                                                      if p.grad is not None]
            ts += [loc(v) for st in opt.state.values() for v in st.values()
                   if isinstance(v, torch.Tensor) and v.dim() > 0]
            return sum(t.numel() * t.element_size() for t in ts)

        out, mem = {}, {}
        m = sharded()
        opt = torch.optim.Adam(m.parameters(), lr=1e-3)
        out["torch"] = _timed(loop(m, opt), batches, args.warmup, args.steps, True)
        mem["torch"] = nbytes(m, opt)
        for clipping in ("flat", "per_layer"):
            m = sharded()
            m, opt, _ = fastclip.make_private(m, torch.optim.Adam(m.parameters(), lr=1e-3), None,
                                              noise_multiplier=1.0, max_grad_norm=1.0,
                                              clipping=clipping, poisson_sampling=False,
                                              audit=False)
            # The reduce-scatters run as the clipped sums are formed (buckets, during or at the
            # end of the backward) and at the step (the last bucket): their time per step.
            rs, red, spent, inside = opt.reducer, [], [0.0], [False]

            def timed(fn, spent=spent, inside=inside):
                def run(*a, **k):
                    if inside[0]:
                        return fn(*a, **k)
                    inside[0], t0 = True, time.perf_counter()
                    try:
                        return fn(*a, **k)
                    finally:
                        inside[0] = False
                        spent[0] += (time.perf_counter() - t0) * 1e3
                return run
            rs._flush, rs._direct, inner = timed(rs._flush), timed(rs._direct), timed(rs.reduce)

            def reduce(params, engine, inner=inner, red=red, spent=spent):
                inner(params, engine)
                red.append(spent[0])
                spent[0] = 0.0
            rs.reduce = reduce
            out[clipping] = _timed(loop(m, opt), batches, args.warmup, args.steps, True)
            out[clipping + "_reduce"] = red[args.warmup:]
            mem[clipping] = nbytes(m, opt)
        out["bytes"] = mem
        if rank == 0:
            with open(os.path.join(outdir, f"p{world}.json"), "w") as f:
                json.dump(out, f)
    finally:
        dist.destroy_process_group()


def run_pipeline(world: int, args) -> dict:
    return run_processes(world, args, worker=_pipeline_worker)


def run_processes(world: int, args, worker=None) -> dict:
    with tempfile.TemporaryDirectory() as outdir:
        ctx = mp.start_processes(worker or _worker, args=(world, _free_port(), args, outdir),
                                 nprocs=world,
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
    p.add_argument("--pipeline", action="store_true",
                   help="2-stage pipeline (GPipe, 4 micro-batches) of a 512-wide MLP instead: "
                        "torch's non-private pipeline step beside fastclip per-layer and flat")
    p.add_argument("--fsdp", action="store_true",
                   help="FSDP2 (fully_shard) token model at each of --processes (>= 2): torch's "
                        "non-private FSDP step beside fastclip flat and per-layer")
    args = p.parse_args(argv)
    if args.fsdp:
        print(f"fsdp token model (V 2048, d 256, 4 blocks, T 32, tied head), Adam, global batch "
              f"{args.batch_size}, {args.threads} thread(s) per process, {os.cpu_count()} cores, "
              f"loadavg {os.getloadavg()[0]:.2f}, torch {torch.__version__}")
        print(f"{'processes':>9} | {'step':>18} | {'ms':>8} | {'/torch':>6} | "
              f"{'reduce-scatter ms':>17} | {'rank-0 MiB p+g+adam':>19}")
        for world in [int(c) for c in args.processes.split(",")]:
            if world < 2:
                continue
            r = run_processes(world, args, worker=_fsdp_worker)
            t = statistics.median(r["torch"])
            for k in ("torch", "flat", "per_layer"):
                v = statistics.median(r[k])
                rs = f"{statistics.median(r[k + '_reduce']):.1f}" if k != "torch" else "-"
                name = "torch FSDP2" if k == "torch" else "fastclip " + k
                print(f"{world:>9} | {name:>18} | {v:>8.1f} | {v / t:>6.2f} | {rs:>17} | "
                      f"{r['bytes'][k] / 2**20:>19.2f}")
        sys.stdout.flush()
        return 0
    if args.pipeline:
        r = run_pipeline(2, args)
        t = statistics.median(r["torch"])
        print(f"pipeline mlp 4x512, 2 stages, GPipe 4 micro-batches, global batch "
              f"{args.batch_size}, {args.threads} thread(s) per process, torch {torch.__version__}")
        print(f"{'step':>18} | {'ms':>8} | {'/torch':>6}")
        for k in ("torch", "per_layer", "flat"):
            v = statistics.median(r[k])
            print(f"{'torch' if k == 'torch' else 'fastclip ' + k:>18} | {v:>8.1f} | {v / t:>6.2f}")
        sys.stdout.flush()
        return 0
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
