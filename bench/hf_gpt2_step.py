"""Step time of a tiny-config Hugging Face GPT-2 (n_layer 4, n_embd 256, n_head 4, T 128, B 16):
non-private vs fastclip make_private (auto mode) with the operation rule on Conv1D, and with the
Conv1D leaves forced to the generic rule (what they got before the operation rule), interleaved.

    python bench/hf_gpt2_step.py [--steps 10] [--batch 16] [--seq 128]
"""
import argparse
import copy
import statistics
import time

import torch
import torch.nn.functional as F
import transformers

import fastclip
from fastclip.layers import ops_rule
from fastclip.layers.generic import GENERIC


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=128)
    a = ap.parse_args()
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=4, n_embd=256, n_head=4, n_positions=a.seq,
                                  vocab_size=1024, attn_implementation="eager",
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    base = transformers.GPT2LMHeadModel(cfg)
    tok = torch.randint(0, 1024, (a.batch, a.seq))

    def loss_fn(out):
        return F.cross_entropy(out.logits[:, :-1].reshape(-1, 1024), tok[:, 1:].reshape(-1),
                               reduction="none").view(a.batch, -1).sum(1)

    def setup(kind):
        m = copy.deepcopy(base)
        opt = torch.optim.SGD(m.parameters(), lr=1e-3)
        if kind == "non-private":
            return m, opt
        resolve = ops_rule.PendingOpsRule.resolve
        if kind == "generic Conv1D":
            ops_rule.PendingOpsRule.resolve = staticmethod(lambda *args: GENERIC)
        try:
            m, opt, _ = fastclip.make_private(m, opt, None, noise_multiplier=1.0,
                                              max_grad_norm=1.0, poisson_sampling=False)
            step(m, opt)    # resolves the rules
        finally:
            ops_rule.PendingOpsRule.resolve = resolve
        rules = {r for _, r in opt.engine.covered()}
        print(f"{kind}: rules {sorted(rules)}")
        return m, opt

    def step(m, opt):
        opt.zero_grad()
        loss_fn(m(tok)).mean().backward()
        opt.step()

    runs = {k: setup(k) for k in ("non-private", "op rule", "generic Conv1D")}
    times = {k: [] for k in runs}
    for _ in range(a.steps):
        for k, (m, opt) in runs.items():
            t0 = time.perf_counter()
            step(m, opt)
            times[k].append(time.perf_counter() - t0)
    base_t = statistics.median(times["non-private"])
    for k, ts in times.items():
        med = statistics.median(ts)
        print(f"{k:>15}: median {med * 1e3:8.1f} ms  ratio to non-private {med / base_t:5.2f}")


if __name__ == "__main__":
    main()
