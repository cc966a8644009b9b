"""The mlp workload's DP step written by hand: what the step costs without a framework.

    PYTHONPATH=. python bench/mlp_floor.py [--steps 60] [--threads 2] [--batch-size 256]

Three steps on the same model and batches, interleaved in one process (the machine's load hits
all alike), medians reported with their ratio to the non-private one:

* ``non-private``: the bench's own step (autograd, ``torch.optim.SGD``);
* ``fastclip``: the bench's fastclip step (``fastclip.benchmark.make_fastclip``);
* ``by hand``: the same DP-SGD step in plain torch ops, no hooks, no autograd, no engine: the
  forward keeping each layer's input, the backward of the mean cross-entropy through the ReLUs
  (input gradients only), each example's squared norm ``sum_l ||a_l||^2 ||g_l||^2 + ||g_l||^2``
  (a T = 1 layer's weight and bias, by fastclip's native kernel ``ops.linear_sq_norms``), the
  clip factors ``min(1, C / ||g_i||)``, one GEMM per layer
  ``(G diag(c))^T A`` and the bias ``sum_i c_i g_i``, fastclip's native noise call
  (``fastclip.ops.add_gaussian_noise_checked_``: finite check, noise, 1 / B) and the SGD update.

Why it exists: ``bench/budget.py`` prices what exact clipping adds in FLOPs and measured noise;
this measures a real step that does exactly that and nothing else, so fastclip's gap to it is
framework cost (capture, per-layer Python, extra passes), not arithmetic. ``--check`` first runs
one step of the hand-written and the fastclip step with the noise off from the same weights and
asserts the parameters they produce agree (the hand-written step is the same DP-SGD, not a
cheaper computation).
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time
from typing import List

import torch
from torch import Tensor, nn

import fastclip
from fastclip import benchmark, ops

LR, C, SIGMA = 0.1, 1.0, 1.0   # the bench's SGD lr, max_grad_norm and noise_multiplier


class ByHand:
    """DP-SGD on an ``nn.Sequential`` of Linear and ReLU layers with a mean cross-entropy loss."""

    max_grad_norm = C

    def __init__(self, model: nn.Sequential, sigma: float = SIGMA, seed: int = 0):
        self.layers = [m for m in model if isinstance(m, nn.Linear)]
        self.params = [t for m in self.layers for t in (m.weight, m.bias)]
        self.sigma = sigma
        self.gen = torch.Generator().manual_seed(seed)

    @torch.no_grad()
    def step(self, x: Tensor, y: Tensor) -> None:
        acts: List[Tensor] = [x]
        h = x
        for i, m in enumerate(self.layers):
            h = torch.addmm(m.bias, h, m.weight.t())
            if i < len(self.layers) - 1:
                h = torch.relu(h)
            acts.append(h)
        B = x.shape[0]
        # Per-example gradients of each example's own loss at the logits: softmax - onehot.
        g = torch.softmax(acts[-1], 1)
        g[torch.arange(B), y] -= 1
        gs: List[Tensor] = [g] * len(self.layers)
        for i in range(len(self.layers) - 1, 0, -1):
            gs[i] = g
            g = g.mm(self.layers[i].weight) * (acts[i] > 0)
        gs[0] = g
        sq = torch.zeros(B, dtype=torch.float64)
        for a, g in zip(acts, gs):
            w_sq, b_sq = ops.linear_sq_norms(a, g, bias=True)   # fastclip's native kernel
            sq += w_sq
            sq += b_sq
        c = (self.max_grad_norm / sq.sqrt()).clamp_(max=1.0).to(torch.float32)
        grads: List[Tensor] = []
        for a, g in zip(acts, gs):
            gc = g * c[:, None]
            grads += [gc.t().mm(a), gc.sum(0)]
        seed = int(torch.randint(0, 1 << 62, (1,), generator=self.gen))
        if not ops.add_gaussian_noise_checked_(grads, self.sigma * self.max_grad_norm, 1.0 / B,
                                               [seed + k for k in range(len(grads))]):
            raise RuntimeError("non-finite gradient")
        for p, grad in zip(self.params, grads):
            p.add_(grad, alpha=-LR)


def check(model: nn.Sequential, x: Tensor, y: Tensor, atol: float = 1e-5) -> float:
    """One step of the hand-written and of fastclip's DP-SGD, noise off, from the same weights:
    the largest difference of the parameters they leave (AssertionError above ``atol``)."""
    hand = copy.deepcopy(model)
    ByHand(hand, sigma=0.0).step(x, y)
    priv = copy.deepcopy(model)
    opt = torch.optim.SGD(priv.parameters(), lr=LR)
    priv, opt, _ = fastclip.make_private(priv, opt, None, noise_multiplier=0.0, max_grad_norm=C,
                                         loss_reduction="mean", poisson_sampling=False)
    opt.zero_grad()
    nn.CrossEntropyLoss(reduction="none")(priv(x), y).mean().backward()
    opt.step()
    diff = max(float((a - b).detach().abs().max()) for a, b in zip(hand.parameters(), priv.parameters()))
    assert diff <= atol, f"hand-written step differs from fastclip's by {diff}"
    return diff


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--check", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    builder, _ = benchmark.WORKLOADS["mlp"]
    wl = builder(args.batch_size, torch.Generator().manual_seed(0))
    if args.check:
        print(f"check: hand-written vs fastclip, noise off: max |diff| "
              f"{check(wl.model, *wl.batches[0]):.2e}")
    plain = copy.deepcopy(wl.model)
    plain_opt = torch.optim.SGD(plain.parameters(), lr=LR)
    priv, priv_opt = benchmark.make_fastclip(copy.deepcopy(wl.model))
    hand = ByHand(copy.deepcopy(wl.model))

    def loop(model, opt):
        def step(x, y):
            opt.zero_grad()
            wl.loss_fn(model(x), y).mean().backward()
            opt.step()
        return step

    methods = {"non-private": loop(plain, plain_opt), "fastclip": loop(priv, priv_opt),
               "by hand": hand.step}
    times = {k: [] for k in methods}
    for i in range(args.warmup + args.steps):
        x, y = wl.batches[i % len(wl.batches)]
        for name, step in methods.items():
            t0 = time.perf_counter()
            step(x, y)
            if i >= args.warmup:
                times[name].append(time.perf_counter() - t0)
    base = statistics.median(times["non-private"])
    print(f"mlp 784-512-512-10, batch {args.batch_size}, {args.threads} threads, median of "
          f"{args.steps} interleaved steps")
    for name, ts in times.items():
        m = statistics.median(ts)
        print(f"  {name:12s} {m * 1e3:7.2f} ms  {m / base:.2f}x")


if __name__ == "__main__":
    main()
