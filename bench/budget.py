"""The physical budget of a DP step per benchmark workload (issue 15; bench/README.md, "Budget").

    PYTHONPATH=. python bench/budget.py [--workloads resnet,vit] [--threads 2] [--rounds 10]

For each workload of ``python -m fastclip bench`` (same builder, same default batch):

* the non-private step's FLOPs (torch.utils.flop_counter over forward, loss and backward: the
  forward, the input gradients and the weight gradients);
* per trainable layer, what exact clipping cannot avoid beyond that: the cheaper norm pass of
  ghost (``B T^2 (d + p)``, the two Gram matrices by SYRK) and direct (the per-example gradients
  ``2 B T d p`` replace the weight gradient, then the clipped sum is ``c @ (B, d p)``: ``2 B d p``,
  convs where they are no larger than the output gradient they replace, or fit the step ledger
  ``fastclip.layers.keep.KEEP_STEP_BYTES``); T = 1 layers
  ``2 B (d + p)``; embeddings ``B T d``;
* the noise, finite check and 1/B scale of every parameter: the native fused call
  (``fastclip.ops.noise.add_gaussian_noise_checked_``), timed interleaved with non-private steps
  of the bench's own closure, in one process, in CPU time (both threads: robust to other load).

limit = 1 + extra FLOPs / non-private FLOPs + noise ms / non-private ms: the extra products are
assumed to run at the non-private step's own average rate.
"""
from __future__ import annotations

import argparse
import statistics
import time
from typing import Dict, List

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from fastclip import benchmark
from fastclip.ops.noise import add_gaussian_noise_checked_

KEEP = 64 * 2**20   # bytes of kept per-example gradients per layer


def _layer_extra(kind: str, B: int, T: int, d: int, p: int) -> Dict[str, float]:
    """The layer's cheapest exact norm pass without keeping anything (``norm``), and what keeping
    its per-example gradients would cost instead (``kept``, ``kept_bytes``)."""
    if kind == "emb":
        return dict(norm=B * T * d, method="tokens", kept=None, kept_bytes=0)
    if T <= 1:
        return dict(norm=2 * B * (d + p), method="T=1", kept=None, kept_bytes=0)
    ghost = B * T * T * (d + p)
    direct = 2 * B * T * d * p      # forms the per-example gradients; the wgrad is then redone
    return dict(norm=min(ghost, direct), method="ghost" if ghost <= direct else "direct",
                kept=2 * B * d * p, kept_bytes=4 * B * d * p)


def keep_within(rows: List[Dict], allowance: float) -> None:
    """Keep per-example gradients (the clipped sum then costs ``2 B d p``) where that saves the most
    FLOPs per byte, within ``allowance`` bytes and 64 MiB per layer, all kept until the step's
    norms are known."""
    cands = [r for r in rows if r["kept"] is not None and r["kept"] < r["norm"]
             and r["kept_bytes"] <= KEEP]
    cands.sort(key=lambda r: -(r["norm"] - r["kept"]) / r["kept_bytes"])
    for r in cands:
        if r["kept_bytes"] <= allowance:
            allowance -= r["kept_bytes"]
            r["norm"], r["method"] = r["kept"], "kept"


def layers_of(model: nn.Module, x, B: int) -> List[Dict]:
    """Each trainable layer's (kind, T, d, p) from one forward's shapes."""
    rows: List[Dict] = []
    hooks = []

    def add(name, kind, T, d, p):
        rows.append(dict(name=name, kind=kind, T=T, d=d, p=p, **_layer_extra(kind, B, T, d, p)))

    for name, m in model.named_modules():
        def hook(mod, args, out, name=name):
            a = args[0] if args else None
            if isinstance(mod, nn.Linear):
                add(name, "linear", a[0].numel() // a.shape[-1] if a.dim() > 1 else 1,
                    mod.in_features, mod.out_features) if a.dim() == 2 else \
                    add(name, "linear", a.numel() // (a.shape[0] * a.shape[-1]), mod.in_features, mod.out_features)
            elif isinstance(mod, nn.Conv2d):
                K = mod.in_channels // mod.groups * mod.kernel_size[0] * mod.kernel_size[1]
                add(name, "conv", out.shape[2] * out.shape[3], K, mod.out_channels)
            elif isinstance(mod, nn.Embedding):
                add(name, "emb", a.numel() // a.shape[0], mod.embedding_dim, mod.num_embeddings)
            elif isinstance(mod, nn.LSTM):
                T = a.shape[1] if mod.batch_first else a.shape[0]
                add(name + ".ih", "lstm", T, mod.input_size, 4 * mod.hidden_size)
                add(name + ".hh", "lstm", T, mod.hidden_size, 4 * mod.hidden_size)
            elif isinstance(mod, nn.MultiheadAttention):
                T = a.shape[1] if mod.batch_first else a.shape[0]
                add(name + ".in_proj", "linear", T, mod.embed_dim, 3 * mod.embed_dim)
                add(name + ".out_proj", "linear", T, mod.embed_dim, mod.embed_dim)
            elif type(mod).__name__ == "Conv1D":   # Hugging Face GPT-2's (d, p) linear
                add(name, "linear", a.shape[1], mod.weight.shape[0], mod.weight.shape[1])

        if isinstance(m, (nn.Linear, nn.Conv2d, nn.Embedding, nn.LSTM, nn.MultiheadAttention)) or \
                type(m).__name__ == "Conv1D":
            hooks.append(m.register_forward_hook(hook))
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in hooks:
            h.remove()
    # nn.MultiheadAttention applies out_proj's weight itself: its Linear hook never fires.
    return rows


def budget(name: str, rounds: int) -> Dict:
    builder, B = benchmark.WORKLOADS[name]
    torch.manual_seed(0)
    wl = builder(B, torch.Generator().manual_seed(0))
    model = wl.model
    x, y = wl.batches[0]
    rows = layers_of(model, x, B)
    step = benchmark.setup_nonprivate(wl, model, B)
    step(x, y)
    with FlopCounterMode(display=False) as fc:
        step(x, y)
    counts = dict(fc.get_flop_counts().get("Global", {}))
    # The flop counter has no formula for torch's fused LSTM: forward 2 B T 4h (E + h), backward
    # twice that (input and weight gradients).
    for r in rows:
        if r["kind"] == "lstm":
            counts["lstm " + r["name"]] = 3 * 2 * B * r["T"] * r["d"] * r["p"]
    total = sum(counts.values())
    # Memory target 1.3x: what the kept per-example gradients may add to the step's peak.
    torch_mib, _ = benchmark.step_memory_mib(step, (x, y), torch.device("cpu"))
    keep_within(rows, 0.3 * (torch_mib or 0.0) * 2**20)
    params = [p for p in model.parameters() if p.requires_grad]
    n_params = sum(p.numel() for p in params)
    bufs = [torch.zeros_like(p) for p in params]
    t_np, t_noise = [], []
    # Interleaved, and in CPU time of this process (both threads): on a loaded machine the wall
    # time of a memory-bound call and of a GEMM-bound step stretch differently.
    for _ in range(rounds):
        t0 = time.process_time()
        step(x, y)
        t_np.append(time.process_time() - t0)
        t0 = time.process_time()
        add_gaussian_noise_checked_(bufs, 1.0, 1.0 / B, list(range(len(bufs))))
        t_noise.append(time.process_time() - t0)
    np_ms, noise_ms = 1e3 * statistics.median(t_np), 1e3 * statistics.median(t_noise)
    extra = sum(r["norm"] for r in rows)
    limit = 1 + extra / total + noise_ms / np_ms
    return dict(name=name, B=B, rows=rows, flops=total, counts=counts, params=n_params, peak_mib=torch_mib,
                np_ms=np_ms, noise_ms=noise_ms, extra=extra, limit=limit)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workloads", default="lstm,transformer,resnet,vit,gpt2,bert")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=10)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    for name in args.workloads.split(","):
        if name not in benchmark.WORKLOADS:
            print(f"{name}: not registered (transformers missing?)")
            continue
        b = budget(name, args.rounds)
        print(f"\n## {name}  B {b['B']}, {b['params']:,} parameters, non-private step "
              f"{b['flops'] / 1e9:.2f} GFLOP in {b['np_ms']:.1f} CPU ms "
              f"({b['flops'] / b['np_ms'] / 1e6:.1f} GFLOP per CPU s), peak {b['peak_mib']:.1f} MiB")
        top = sorted(b["counts"].items(), key=lambda kv: -kv[1])[:6]
        print("  ops: " + ", ".join(f"{str(k).split('.')[-1]} {v / 1e9:.2f} G" for k, v in top))
        for r in b["rows"]:
            print(f"  {r['name']:<40} {r['kind']:<6} T {r['T']:<5} d {r['d']:<5} p {r['p']:<6} "
                  f"norm {r['norm'] / 1e6:9.1f} M ({r['method']})")
        print(f"  extra {b['extra'] / 1e6:.0f} MFLOP = {b['extra'] / b['flops']:.3f} of the step; "
              f"noise+check+scale {b['noise_ms']:.2f} CPU ms = {b['noise_ms'] / b['np_ms']:.3f}; "
              f"limit {b['limit']:.2f}x")


if __name__ == "__main__":
    main()
