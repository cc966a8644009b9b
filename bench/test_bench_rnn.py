"""Recurrent layers: fastclip.nn.LSTM / GRU (native loops over time) vs torch.nn's, and the
per-example weight norms (ghost, one shared Gram of G) vs the same algorithm in plain torch.

    pytest bench/test_bench_rnn.py --benchmark-only

Groups are ``rnn|{cell}-B{B}xT{T}x{d}x{h}`` at the e2e workload's shape (B=64, T=64, 128 -> 256).
``fwdbwd``: one forward and backward of the layer (gradient at every output), ``native`` =
fastclip.nn, ``torch`` = torch.nn (MKL-DNN on CPU), ``opacus`` = Opacus' DPLSTM (LSTM only).
``norms``: both weights' per-example squared norms from the recorded factors, ``native`` =
``ops.rnn_ghost_sq_norms``, ``torch`` = ``ops.rnn_ghost_sq_norms_torch``. The summary prints
torch/native ratios (bench/conftest.py).
"""
import pytest
import torch
from torch import nn

import fastclip.nn as fnn
from fastclip import ops

B, T, D, H = 64, 64, 128, 256
CELLS = {"LSTM": (nn.LSTM, fnn.LSTM), "GRU": (nn.GRU, fnn.GRU)}


def group(cell):
    return f"rnn|{cell}-B{B}xT{T}x{D}x{H}"


def fwdbwd_fn(cell, impl):
    gen = torch.Generator().manual_seed(0)
    tcls, fcls = CELLS[cell]
    ref = tcls(D, H, batch_first=True)
    if impl == "torch":
        m = ref
    elif impl == "native":
        m = fcls(D, H, batch_first=True)
        m.load_state_dict(ref.state_dict())
    else:
        if cell != "LSTM":
            pytest.skip("Opacus has DPLSTM/DPGRU; LSTM only here")
        try:
            from opacus.layers import DPLSTM
        except ImportError:
            pytest.skip("opacus is not installed")
        m = DPLSTM(D, H, batch_first=True)
        m.load_state_dict(ref.state_dict())
    x = torch.randn(B, T, D, generator=gen, requires_grad=True)
    g = torch.randn(B, T, H, generator=gen)

    def step():
        out, _ = m(x)
        out.backward(g)

    return step


@pytest.mark.parametrize("cell", list(CELLS))
@pytest.mark.parametrize("impl", ["native", "torch", "opacus"])
def test_fwdbwd(benchmark, cell, impl):
    fn = fwdbwd_fn(cell, impl)
    benchmark.group = group(cell)
    benchmark.extra_info.update(impl=impl, method="fwdbwd")
    benchmark.pedantic(fn, rounds=10, warmup_rounds=2, iterations=1)


@pytest.mark.parametrize("cell", list(CELLS))
@pytest.mark.parametrize("impl", ["native", "torch"])
def test_norms(benchmark, cell, impl):
    gen = torch.Generator().manual_seed(1)
    Gh = (4 if cell == "LSTM" else 3) * H
    x = torch.randn(B, T, D, generator=gen)
    hp = torch.randn(B, T, H, generator=gen)
    gi = torch.randn(B, T, Gh, generator=gen)
    gh = None if cell == "LSTM" else torch.randn(B, T, Gh, generator=gen)
    fn = ops.rnn_ghost_sq_norms if impl == "native" else ops.rnn_ghost_sq_norms_torch
    benchmark.group = group(cell)
    benchmark.extra_info.update(impl=impl, method="norms")
    benchmark.pedantic(lambda: fn(x, hp, gi, gh), rounds=20, warmup_rounds=2, iterations=1)
