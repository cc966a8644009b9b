"""Embedding per-example norm kernels: native core vs plain torch ops.

    pytest bench/test_bench_embedding.py --benchmark-only

Groups ``embedding|B{B}-T{T}-V{V}-p{p}``: the native unique-token norms (``ops.embedding_sq_norms``)
against two torch implementations, each measured as its own pair in the summary:
  * method ``unique``: the same algorithm in torch (``embedding_sq_norms_torch``: unique keys and
    one ``index_add``);
  * method ``ghost``: the O(T^2 p) ghost formula in torch ops, ``<[x_s == x_t], G G^T>``.

Groups ``embedding-tied|B{B}-T{T}-V{V}-d{d}``: the cross term <E_i, L_i> of a weight tied between
an embedding and an output projection (ids and H of T positions each, output gradients (B, T, V)):
  * method ``same-algo``: ``embedding_linear_cross_torch`` (M = g H^T, then a gather);
  * method ``materialise``: both per-example gradients formed as (B, V, d) tensors and multiplied,
    what the engine's generic cross path would do.
The summary at the end (bench/conftest.py) prints torch/native time ratios from the same run.
"""
import functools

import pytest
import torch

from fastclip import ops

V = 10000
NORM_CASES = [(B, T, p) for B in (32, 64) for T in (64, 128) for p in (128, 256)]
CROSS_CASES = [(32, T, d) for T in (64, 128) for d in (128, 256)]


@functools.lru_cache(maxsize=None)
def norm_inputs(B, T, p):
    g = torch.Generator().manual_seed(0)
    # Zipf-like ids: frequent tokens repeat within an example, as in text.
    probs = 1.0 / torch.arange(1, V + 1, dtype=torch.float64)
    ids = torch.multinomial(probs, B * T, replacement=True, generator=g).reshape(B, T)
    return ids, torch.randn(B, T, p, generator=g)


def ghost_torch(ids, g, num_embeddings, padding_idx=None):
    same = (ids.unsqueeze(2) == ids.unsqueeze(1)).to(g.dtype)
    return (torch.bmm(g, g.transpose(1, 2)) * same).sum((1, 2))


NORM_IMPLS = {
    ("unique", "native"): ops.embedding_sq_norms,
    ("unique", "torch"): ops.embedding_sq_norms_torch,
    ("ghost", "native"): ops.embedding_sq_norms,
    ("ghost", "torch"): ghost_torch,
}


@pytest.mark.parametrize("method,impl", list(NORM_IMPLS), ids=[f"{m}-{i}" for m, i in NORM_IMPLS])
@pytest.mark.parametrize("B,T,p", NORM_CASES, ids=[f"B{B}-T{T}-p{p}" for B, T, p in NORM_CASES])
def test_embedding_sq_norms(benchmark, B, T, p, method, impl):
    ids, g = norm_inputs(B, T, p)
    benchmark.group = f"embedding|B{B}-T{T}-V{V}-p{p}"
    benchmark.extra_info.update(impl=impl, method=method)
    benchmark.pedantic(NORM_IMPLS[method, impl], args=(ids, g, V), rounds=30, warmup_rounds=2,
                       iterations=1)


@functools.lru_cache(maxsize=None)
def cross_inputs(B, T, d):
    ids, ge = norm_inputs(B, T, d)
    g = torch.Generator().manual_seed(1)
    return ids, ge, torch.randn(B, T, d, generator=g), torch.randn(B, T, V, generator=g)


def materialise(ids, ge, h, go):
    B, T, d = ge.shape
    E = ge.new_zeros(B, V, d).scatter_add_(1, ids.unsqueeze(-1).expand(B, T, d), ge)
    L = torch.bmm(go.transpose(1, 2), h)
    return (E * L).sum((1, 2))


CROSS_IMPLS = {
    ("same-algo", "native"): ops.embedding_linear_cross,
    ("same-algo", "torch"): ops.embedding_linear_cross_torch,
    ("materialise", "native"): ops.embedding_linear_cross,
    ("materialise", "torch"): materialise,
}


@pytest.mark.parametrize("method,impl", list(CROSS_IMPLS), ids=[f"{m}-{i}" for m, i in CROSS_IMPLS])
@pytest.mark.parametrize("B,T,d", CROSS_CASES, ids=[f"B{B}-T{T}-d{d}" for B, T, d in CROSS_CASES])
def test_embedding_linear_cross(benchmark, B, T, d, method, impl):
    args = cross_inputs(B, T, d)
    benchmark.group = f"embedding-tied|B{B}-T{T}-V{V}-d{d}"
    benchmark.extra_info.update(impl=impl, method=method)
    rounds = 5 if (method, impl) == ("materialise", "torch") else 20
    benchmark.pedantic(CROSS_IMPLS[method, impl], args=args, rounds=rounds, warmup_rounds=1,
                       iterations=1)


def test_implementations_agree():
    ids, g = norm_inputs(4, 64, 128)
    ref = ops.embedding_sq_norms_torch(ids, g.double(), V)
    for fn in (ops.embedding_sq_norms, ghost_torch):
        torch.testing.assert_close(fn(ids, g, V).double(), ref, rtol=1e-4, atol=1e-4)
    ids, ge, h, go = (t[:4] for t in cross_inputs(32, 64, 128))
    ref = materialise(ids, ge.double(), h.double(), go.double())
    for fn in (ops.embedding_linear_cross, ops.embedding_linear_cross_torch):
        torch.testing.assert_close(fn(ids, ge, h, go).double(), ref, rtol=1e-3, atol=1e-2)
