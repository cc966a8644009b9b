"""The fixed cost of a private step: fastclip beside non-private on a model too small to compute.

    python bench/step_overhead.py [--sizes 16,16,16,10] [--batch-size 8] [--steps 400] [--threads 2]
    python bench/step_overhead.py --profile 30      # also the private step's top cProfile entries

Why it exists: on small models (the mlp workload, 7 ms a step) the private step's extra time is
not arithmetic but Python and dispatch: the hooks, the capture Function of every layer, the
per-module finalize loop, the clip factors, the noise call. On a tiny MLP of the same depth the
two steps' arithmetic is negligible, so the difference of their medians is that fixed cost, the
part of the mlp workload's gap no kernel change can remove. Steps of the two methods are
interleaved in one process (the machine's load hits both alike); same init, same batch.
"""
from __future__ import annotations

import argparse
import copy
import cProfile
import pstats
import statistics
import time

import torch
from torch import nn

import fastclip


def build(sizes, batch_size: int, seed: int = 0):
    torch.manual_seed(seed)
    layers = []
    for a, b in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    model = nn.Sequential(*layers[:-1])
    x = torch.randn(batch_size, sizes[0])
    y = torch.randint(0, sizes[-1], (batch_size,))
    return model, x, y


def stepper(model: nn.Module, x, y, private: bool):
    model = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    if private:
        model, opt, _ = fastclip.make_private(model, opt, None, noise_multiplier=1.0,
                                              max_grad_norm=1.0, loss_reduction="mean",
                                              poisson_sampling=False)
    loss_fn = nn.CrossEntropyLoss()

    def step():
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()

    return step


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default="16,16,16,10", help="layer widths, input first")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--profile", type=int, default=0, metavar="N",
                   help="then profile the private step alone and print its top N entries")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    sizes = [int(s) for s in args.sizes.split(",")]
    model, x, y = build(sizes, args.batch_size)
    plain, private = stepper(model, x, y, False), stepper(model, x, y, True)
    for _ in range(args.warmup):
        plain()
        private()
    tp, tf = [], []
    for _ in range(args.steps):
        t = time.perf_counter()
        plain()
        tp.append(time.perf_counter() - t)
        t = time.perf_counter()
        private()
        tf.append(time.perf_counter() - t)
    mp, mf = statistics.median(tp) * 1e6, statistics.median(tf) * 1e6
    print(f"MLP {args.sizes}, batch {args.batch_size}, {args.threads} threads, median of "
          f"{args.steps} interleaved steps: non-private {mp:.0f} us, fastclip {mf:.0f} us, "
          f"fixed cost of the private step {mf - mp:.0f} us")
    if args.profile:
        pr = cProfile.Profile()
        pr.enable()
        for _ in range(args.steps):
            private()
        pr.disable()
        st = pstats.Stats(pr)
        print(f"{st.total_calls / args.steps:.0f} Python-level calls per private step")
        st.sort_stats("tottime").print_stats(args.profile)


if __name__ == "__main__":
    main()
