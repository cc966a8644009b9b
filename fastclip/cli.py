"""Command line: ``python -m fastclip {demo,bench} [options]``.

* ``demo``  -- a short DP-SGD training run on synthetic data, fastclip's step time beside
  non-private training's, with the loss going down and the privacy spent.
* ``bench`` -- the end-to-end step-time table: non-private torch, fastclip, Opacus (see
  :mod:`fastclip.benchmark`).
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from typing import List, Optional, Sequence

import torch
from torch import nn


def _synthetic_data(n: int, dim: int, classes: int, gen: torch.Generator, latent: int = 16):
    """A learnable synthetic task: inputs on a random low-dimensional subspace (plus a little
    noise), labelled by a fixed random teacher network acting on the latent coordinates."""
    teacher = nn.Sequential(nn.Linear(latent, 32), nn.Tanh(), nn.Linear(32, classes))
    with torch.no_grad():
        for p in teacher.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) / p.shape[-1] ** 0.5 * 2.0)
        z = torch.randn(n, latent, generator=gen)
        y = teacher(z).argmax(1)
        basis = torch.randn(latent, dim, generator=gen) / latent ** 0.5
        x = z @ basis + 0.1 * torch.randn(n, dim, generator=gen)
    return x, y


def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    was_training = model.training
    model.eval()
    with torch.no_grad():
        acc = (model(x).argmax(1) == y).float().mean().item()
    model.train(was_training)
    return acc


class _Trainer:
    """The usual PyTorch loop, one step at a time; records step wall time (zero_grad .. step) and loss."""

    def __init__(self, model, optimizer, loader, loss_fn):
        self.model, self.optimizer, self.loader, self.loss_fn = model, optimizer, loader, loss_fn
        self.times: List[float] = []
        self.losses: List[float] = []

    def step(self, x, y) -> None:
        t0 = time.perf_counter()
        self.optimizer.zero_grad()
        loss = self.loss_fn(self.model(x), y).mean()
        loss.backward()
        self.optimizer.step()
        self.times.append((time.perf_counter() - t0) * 1e3)
        if x.shape[0] > 0:  # Poisson sampling may draw an empty batch
            self.losses.append(loss.item())

    def summary(self):
        """(median step ms, mean loss) since the last call."""
        out = statistics.median(self.times), sum(self.losses) / max(len(self.losses), 1)
        self.times, self.losses = [], []
        return out


def _epoch(trainers: Sequence[_Trainer]) -> None:
    """One epoch of every trainer, their steps alternating so machine load hits them alike."""
    iters = [iter(t.loader) for t in trainers]
    active = list(range(len(trainers)))
    while active:
        for k in list(active):
            batch = next(iters[k], None)
            if batch is None:
                active.remove(k)
            else:
                trainers[k].step(*batch)


def demo(args: argparse.Namespace) -> int:
    import fastclip
    from fastclip.benchmark import mlp
    from torch.utils.data import DataLoader, TensorDataset

    if not hasattr(fastclip, "make_private"):
        print("fastclip.make_private is not available in this build", file=sys.stderr)
        return 1
    gen = torch.Generator().manual_seed(args.seed)
    torch.manual_seed(args.seed)
    x, y = _synthetic_data(args.train_size + args.test_size, 784, 10, gen)
    x_train, y_train = x[: args.train_size], y[: args.train_size]
    x_test, y_test = x[args.train_size:], y[args.train_size:]
    dataset = TensorDataset(x_train, y_train)
    loss_fn = nn.CrossEntropyLoss(reduction="none")

    init = mlp((784, 512, 512, 10))
    plain_model = copy.deepcopy(init)
    plain = _Trainer(plain_model, torch.optim.SGD(plain_model.parameters(), lr=args.lr),
                     DataLoader(dataset, batch_size=args.batch_size, shuffle=True, generator=gen), loss_fn)

    dp_model = copy.deepcopy(init)
    dp_model, dp_opt, dp_loader = fastclip.make_private(
        dp_model, torch.optim.SGD(dp_model.parameters(), lr=args.lr),
        DataLoader(dataset, batch_size=args.batch_size, shuffle=True, generator=gen),
        noise_multiplier=args.noise_multiplier, max_grad_norm=args.max_grad_norm,
        mode="auto", clipping="flat", loss_reduction="mean", poisson_sampling=True,
    )
    dp = _Trainer(dp_model, dp_opt, dp_loader, loss_fn)

    print(f"fastclip demo: MLP 784-512-512-10, {args.train_size} synthetic examples "
          f"(labels from a random teacher net), batch {args.batch_size}, SGD lr {args.lr}, "
          f"torch threads {torch.get_num_threads()}")
    try:
        from fastclip import ops

        core = ops.blas_info() if getattr(ops, "HAS_NATIVE", False) else "native core not built: plain torch ops"
    except Exception as e:  # informative only
        core = f"unknown ({type(e).__name__})"
    print(f"fastclip {getattr(fastclip, '__version__', '?')} from {os.path.dirname(fastclip.__file__)}; core: {core}")
    print(f"DP-SGD: noise multiplier {args.noise_multiplier}, max grad norm {args.max_grad_norm}, "
          f"Poisson sampling; step times are medians over the epoch, the two runs' steps alternating")
    print(f"{'epoch':>5} | {'non-private loss':>16} {'ms/step':>8} | {'DP loss':>8} {'ms/step':>8} | {'DP/non-private':>14}")
    t_start = time.perf_counter()
    for epoch in range(1, args.epochs + 1):
        _epoch([plain, dp])
        p_ms, p_loss = plain.summary()
        d_ms, d_loss = dp.summary()
        print(f"{epoch:>5} | {p_loss:>16.4f} {p_ms:>8.2f} | {d_loss:>8.4f} {d_ms:>8.2f} | {d_ms / p_ms:>13.2f}x",
              flush=True)
    print(f"test accuracy: non-private {_accuracy(plain_model, x_test, y_test):.3f}, "
          f"DP {_accuracy(dp_model, x_test, y_test):.3f} (chance 0.1)")
    try:
        eps = dp_opt.epsilon(delta=args.delta)
        print(f"privacy spent: epsilon = {eps:.2f} at delta = {args.delta:g}")
    except (NotImplementedError, ImportError) as e:  # accounting or its dependency missing
        print(f"privacy spent: not reported ({type(e).__name__}: {e})")
    print(f"done in {time.perf_counter() - t_start:.1f} s")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from fastclip import benchmark

    parser = argparse.ArgumentParser(prog="python -m fastclip",
                                     description="fastclip: fast, exact per-example gradient clipping for DP-SGD.")
    sub = parser.add_subparsers(dest="command", metavar="{demo,bench}")
    sub.required = True

    d = sub.add_parser("demo", help="short DP training run: fastclip step time vs non-private, loss going down",
                       description="Train an MLP with DP-SGD (fastclip) and without, on synthetic data; "
                                   "print per-epoch loss and step times side by side.")
    d.add_argument("--epochs", type=int, default=5)
    d.add_argument("--batch-size", type=int, default=256)
    d.add_argument("--train-size", type=int, default=8192)
    d.add_argument("--test-size", type=int, default=2048)
    d.add_argument("--lr", type=float, default=0.5)
    d.add_argument("--noise-multiplier", type=float, default=1.0)
    d.add_argument("--max-grad-norm", type=float, default=1.0)
    d.add_argument("--delta", type=float, default=1e-5)
    d.add_argument("--seed", type=int, default=0)
    d.set_defaults(func=demo)

    b = sub.add_parser("bench", help="end-to-end step time: non-private vs fastclip vs Opacus",
                       description=benchmark.__doc__.split("\n\n")[0])
    benchmark.add_arguments(b)
    b.set_defaults(func=benchmark.run)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)
