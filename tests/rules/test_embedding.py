"""Embeddings: the unique-token norm op, the tied embedding / output-projection cross term, the
nn.Embedding rule against tests/reference.py, refused options, and hostile input to the bindings."""
import functools

import numpy as np
import pytest
import torch
from torch import nn

import fastclip
import harness
from conftest import DTYPES, tol
from harness import CE, MODES, assert_close
from fastclip import _C, ops

# harness.check with this file's bound, in one mode (auto unless a test names another)
check = functools.partial(harness.check, C=0.4, modes=("auto",))


def dense_grads(ids, g, V, pad=None):
    """(B, V, p) float64 per-example embedding gradients, one position at a time."""
    B = ids.shape[0]
    T = int(np.prod(ids.shape[1:]))
    ids2 = ids.reshape(B, T)
    g3 = g.reshape(B, T, g.shape[-1]).double()
    out = torch.zeros(B, V, g.shape[-1], dtype=torch.float64)
    for i in range(B):
        for t in range(ids2.shape[1]):
            v = int(ids2[i, t])
            if pad is None or v != pad % V:
                out[i, v] += g3[i, t]
    return out


# -- the norm op ---------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(0, 5), (1, 7), (6, 9), (6,), (3, 4, 5), (4, 0)])
@pytest.mark.parametrize("pad", [None, 0, -1])
@pytest.mark.parametrize("idtype", [torch.int64, torch.int32])
@pytest.mark.parametrize("impl", [ops.embedding_sq_norms, ops.embedding_sq_norms_torch])
def test_sq_norms_op(dtype, shape, pad, idtype, impl):
    V, p = 5, 3  # few tokens: every example repeats some
    ids = torch.randint(0, V, shape, dtype=idtype)
    g = torch.randn(*shape, p, dtype=dtype)
    got = impl(ids, g, V, pad)
    assert got.shape == (shape[0],) and got.dtype == dtype
    ref = dense_grads(ids, g, V, pad).flatten(1).square().sum(1)
    assert_close(got, ref, dtype)


def test_sq_norms_op_threads_and_strides():
    # Big enough for the pool; a non-contiguous G and expanded (stride-0) ids.
    B, T, p, V = 64, 40, 48, 30
    ids = torch.randint(0, V, (1, T)).expand(B, T)
    g = torch.randn(B, p, T).transpose(1, 2)
    ref = dense_grads(ids, g, V, 3).flatten(1).square().sum(1)
    for threads in (1, 2, 3):
        old = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            assert_close(ops.embedding_sq_norms(ids, g, V, 3), ref, torch.float32)
        finally:
            torch.set_num_threads(old)
    assert_close(ops.embedding_sq_norms_torch(ids, g, V, 3), ref, torch.float32)


def test_sq_norms_op_all_same_and_all_distinct():
    g = torch.randn(2, 10, 4, dtype=torch.float64)
    same = torch.full((2, 10), 3)
    assert_close(ops.embedding_sq_norms(same, g, 10), g.sum(1).square().sum(1), torch.float64)
    distinct = torch.arange(10).repeat(2, 1)
    assert_close(ops.embedding_sq_norms(distinct, g, 10), g.square().sum((1, 2)), torch.float64)
    assert_close(ops.embedding_sq_norms(same, g, 10, padding_idx=3), torch.zeros(2), torch.float64)


# -- the cross term op ---------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B", [0, 1, 5])
@pytest.mark.parametrize("shapes", [((7,), (6,)), ((), ()), ((3, 2), (4,)), ((300,), (270,))])
@pytest.mark.parametrize("pad", [None, 2])
@pytest.mark.parametrize("impl", [ops.embedding_linear_cross, ops.embedding_linear_cross_torch])
def test_cross_op(dtype, B, shapes, pad, impl):
    (te, to), V, d = shapes, 9, 4
    ids = torch.randint(0, V, (B,) + te)
    ge = torch.randn((B,) + te + (d,), dtype=dtype)
    h = torch.randn((B,) + to + (d,), dtype=dtype)
    go = torch.randn((B,) + to + (V,), dtype=dtype)
    got = impl(ids, ge, h, go, pad)
    E = dense_grads(ids, ge, V, pad)
    L = torch.einsum("bsv,bsd->bvd", go.reshape(B, int(np.prod(to)), V).double(),
                     h.reshape(B, int(np.prod(to)), d).double())
    rtol, atol = tol(dtype)
    torch.testing.assert_close(got.double(), (E * L).sum((1, 2)), rtol=rtol, atol=atol * 100)


# -- the rule, against tests/reference.py --------------------------------------------------------

class Bag(nn.Module):
    """Embedding -> mean over positions -> Linear."""

    def __init__(self, V=6, d=5, k=3, padding_idx=None):
        super().__init__()
        self.emb = nn.Embedding(V, d, padding_idx=padding_idx)
        self.out = nn.Linear(d, k)

    def forward(self, x):
        e = self.emb(x)
        return self.out(torch.tanh(e if x.dim() == 1 else e.mean(1)))


class Twice(nn.Module):
    """One embedding called on two inputs: its gradient is the sum of both uses."""

    def __init__(self, V=7, d=4):
        super().__init__()
        self.emb = nn.Embedding(V, d, padding_idx=1)
        self.out = nn.Linear(d, 3)

    def forward(self, a, b):
        return self.out(torch.tanh(self.emb(a).sum(1) * self.emb(b).mean(1)))


class TinyLM(nn.Module):
    """Decoder-only LM: tied embedding / output weights, learned positions."""

    def __init__(self, V=13, d=8, T=6, positions=True, padding_idx=None):
        super().__init__()
        self.tok = nn.Embedding(V, d, padding_idx=padding_idx)
        self.pos = nn.Embedding(T, d) if positions else None
        self.a = nn.Linear(d, d)
        self.b = nn.Linear(d, d)
        self.head = nn.Linear(d, V, bias=False)
        self.head.weight = self.tok.weight

    def forward(self, x):
        h = self.tok(x)
        if self.pos is not None:
            h = h + self.pos(torch.arange(x.shape[1]).unsqueeze(0))  # (1, T): broadcast over B
        h = torch.tanh(self.a(h))
        h = torch.tanh(self.b(h)) + h
        return self.head(h)


def lm_loss(out, y):
    return CE(out.transpose(1, 2), y).mean(1)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B", [0, 1, 7])
@pytest.mark.parametrize("ids_shape", ["B", "BT"])
@pytest.mark.parametrize("pad", [None, 2])
def test_embedding_rule(dtype, B, ids_shape, pad):
    m = Bag(padding_idx=pad).to(dtype)
    x = torch.randint(0, 6, (B,) if ids_shape == "B" else (B, 9))
    if ids_shape == "BT" and B:
        x[0, :3] = 4  # a token repeated in one example
    check(m, x, torch.randint(0, 3, (B,)), dtype=dtype)


def test_embedding_rule_is_native():
    from fastclip.engine import Engine
    e = Engine(TinyLM())
    try:
        rules = set(e.covered())
    finally:
        e.detach()
    # the tied weight is covered by both of its modules' rules
    assert {("tok.weight", "EmbeddingRule"), ("tok.weight", "LinearRule"),
            ("pos.weight", "EmbeddingRule")} <= rules


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", MODES)
def test_embedding_called_twice(dtype, mode):
    m = Twice().to(dtype)
    a, b = torch.randint(0, 7, (5, 4)), torch.randint(0, 7, (5, 6))
    check(m, (a, b), torch.randint(0, 3, (5,)), dtype=dtype, modes=(mode,))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("B", [1, 4])
@pytest.mark.parametrize("pad", [None, 0])
def test_tied_language_model(dtype, mode, B, pad):
    m = TinyLM(positions=False, padding_idx=pad).to(dtype)
    x, y = torch.randint(0, 13, (B, 6)), torch.randint(0, 13, (B, 6))
    x[:, 0] = 0
    check(m, x, y, loss=lm_loss, dtype=dtype, modes=(mode,))


def test_tied_cross_term_is_used_and_exact():
    # Summing the two parts' norms without the cross term would be wrong: make sure it is not.
    m = TinyLM(positions=False).double()
    x, y = torch.randint(0, 13, (3, 6)), torch.randint(0, 13, (3, 6))
    calls = []
    orig = ops.embedding_linear_cross

    def spy(*a, **k):
        calls.append(1)
        return orig(*a, **k)
    ops.embedding_linear_cross = spy
    try:
        check(m, x, y, loss=lm_loss, dtype=torch.float64)
    finally:
        ops.embedding_linear_cross = orig
    assert calls


@pytest.mark.parametrize("dtype", DTYPES)
def test_position_ids_broadcast_over_batch(dtype):
    # pos(arange(T)[None]) has shape (1, T) while the batch is B: the engine expands it to B.
    m = TinyLM(positions=True).to(dtype)
    x, y = torch.randint(0, 13, (4, 6)), torch.randint(0, 13, (4, 6))
    check(m, x, y, loss=lm_loss, dtype=dtype)


@pytest.mark.parametrize("kwargs,match", [
    (dict(max_norm=1.0), r"Embedding.*max_norm=1\.0.*max_norm=None"),
    (dict(sparse=True), r"Embedding.*sparse=True.*sparse=False"),
    (dict(scale_grad_by_freq=True), r"Embedding.*scale_grad_by_freq=True.*scale_grad_by_freq=False"),
])
def test_refused_options(kwargs, match):
    m = nn.Sequential(nn.Embedding(5, 3, **kwargs), nn.Flatten(1), nn.Linear(6, 2))
    before = m[0].weight.detach().clone()
    x, y = torch.randint(0, 5, (3, 2)), torch.zeros(3, dtype=torch.long)
    with pytest.raises(ValueError, match=match):
        fastclip.per_sample_grad_norms(m, CE, x, y)
    assert torch.equal(m[0].weight, before)
    for mod in m.modules():
        assert not mod._forward_hooks and not mod._forward_pre_hooks


# -- hostile input -------------------------------------------------------------------------------

def arr(*shape, dtype=np.float32):
    return np.random.default_rng(0).standard_normal(shape).astype(dtype)


def ids_(*shape, V=5, dtype=np.int64):
    return np.random.default_rng(0).integers(0, V, shape).astype(dtype)


@pytest.mark.parametrize("fn", ["norms", "cross"])
@pytest.mark.parametrize("bad,match", [(7, r"ids\[1, 2\] = 7 is out of range"),
                                       (-1, r"ids\[1, 2\] = -1 is out of range"),
                                       (5, r"ids\[1, 2\] = 5 is out of range.*num_embeddings = 5")])
def test_binding_ids_out_of_range(fn, bad, match):
    ids = ids_(3, 4)
    ids[1, 2] = bad
    with pytest.raises(ValueError, match=match):
        if fn == "norms":
            _C.embedding_sq_norms(ids, arr(3, 4, 2), 5)
        else:
            _C.embedding_linear_cross(ids, arr(3, 4, 2), arr(3, 6, 2), arr(3, 6, 5))


def test_binding_1d_ids_out_of_range():
    ids = ids_(4)
    ids[3] = 2**40
    with pytest.raises(ValueError, match=r"ids\[3\] = 1099511627776 is out of range"):
        _C.embedding_sq_norms(ids, arr(4, 2), 5)


@pytest.mark.parametrize("ids,G,exc,match", [
    (ids_(3, 4).astype(np.float32), arr(3, 4, 2), TypeError, "ids must be int64 or int32.*float32"),
    (ids_(3, 4).astype(np.uint8), arr(3, 4, 2), TypeError, "ids must be int64 or int32.*uint8"),
    ([[1, 2]], arr(1, 2, 2), TypeError, "ids must be a numpy.ndarray, got list"),
    (torch.zeros(3, 4, dtype=torch.long), arr(3, 4, 2), TypeError, "ids must be a numpy.ndarray, got Tensor"),
    (ids_(3, 4), ids_(3, 4, 2), TypeError, "gradients must be float32 or float64"),
    (ids_(3, 4, 2), arr(3, 4, 2), ValueError, r"ids must be 1-D \(B,\) or 2-D \(B, T\), got 3-D"),
    (np.array(3), arr(3, 2), ValueError, "ids must be 1-D .* got 0-D"),
    (ids_(3, 4), arr(3, 4), ValueError, r"gradients must be 3-D \(B, T, p\) for 2-D ids, got 2-D"),
    (ids_(3), arr(3, 1, 2), ValueError, r"gradients must be 2-D \(B, p\) for 1-D ids, got 3-D"),
    (ids_(3, 4), arr(2, 4, 2), ValueError, "batch sizes differ: ids 3 vs gradients 2"),
    (ids_(3, 4), arr(3, 5, 2), ValueError, r"positions \(T\) differ: ids 4 vs gradients 5"),
    (ids_(3, 4)[:, ::-1], arr(3, 4, 2), ValueError, "ids has a negative stride"),
    (ids_(3, 4), arr(3, 4, 2)[..., ::-1], ValueError, "negative stride"),
    (ids_(3, 4), np.asfortranarray(arr(3, 4, 2)), ValueError, "unit stride on its last dim"),
])
def test_binding_norms_hostile(ids, G, exc, match):
    with pytest.raises(exc, match=match):
        _C.embedding_sq_norms(ids, G, 5)


def test_binding_norms_bad_scalars():
    with pytest.raises(ValueError, match="num_embeddings must be >= 0, got -1"):
        _C.embedding_sq_norms(ids_(3, 4), arr(3, 4, 2), -1)
    with pytest.raises(ValueError, match=r"padding_idx must be in \[0, num_embeddings = 5\), got 5"):
        _C.embedding_sq_norms(ids_(3, 4), arr(3, 4, 2), 5, 5)
    with pytest.raises(TypeError, match="padding_idx must be None or an int, got float"):
        _C.embedding_sq_norms(ids_(3, 4), arr(3, 4, 2), 5, 1.0)
    with pytest.raises(ValueError, match="num_threads must be >= 1, got 0"):
        _C.embedding_sq_norms(ids_(3, 4), arr(3, 4, 2), 5, None, 0)


def test_binding_huge_broadcast_mismatch_reads_nothing():
    huge = np.broadcast_to(np.zeros((1, 4), np.int64), (10**9, 4))
    with pytest.raises(ValueError, match=f"batch sizes differ: ids {10**9} vs gradients 3"):
        _C.embedding_sq_norms(huge, arr(3, 4, 2), 5)


def test_binding_empty_and_zero_vocab():
    assert _C.embedding_sq_norms(ids_(0, 4), arr(0, 4, 2), 0).shape == (0,)
    np.testing.assert_array_equal(_C.embedding_sq_norms(ids_(2, 0), arr(2, 0, 3), 0), [0, 0])
    with pytest.raises(ValueError, match="out of range"):
        _C.embedding_sq_norms(ids_(2, 1), arr(2, 1, 3), 0)


@pytest.mark.parametrize("args,exc,match", [
    ((ids_(3, 4), arr(3, 4, 2), arr(3, 6, 2), arr(3, 6, 5, dtype=np.float64)), TypeError, "dtypes differ"),
    ((ids_(3, 4), arr(3, 4, 2), arr(3, 6, 2), arr(3, 5)), ValueError, "ranks differ: 3-D vs 2-D"),
    ((ids_(3, 4), arr(3, 4, 2), arr(2, 6, 2), arr(2, 6, 5)), ValueError, "batch sizes differ"),
    ((ids_(3, 4), arr(3, 4, 2), arr(3, 6, 2), arr(3, 7, 5)), ValueError, r"positions \(T\) differ: activations 6"),
    ((ids_(3, 4), arr(3, 4, 2), arr(3, 6, 3), arr(3, 6, 5)), ValueError, "widths differ: .* d = 2, activations d = 3"),
    ((ids_(3, 4), arr(3, 5, 2), arr(3, 6, 2), arr(3, 6, 5)), ValueError, r"positions \(T\) differ: ids 4"),
    ((ids_(3, 4), arr(3, 4, 2), arr(3, 6, 2), arr(3, 6, 4)), ValueError, "out of range"),
    ((ids_(3, 4).astype(np.float64), arr(3, 4, 2), arr(3, 6, 2), arr(3, 6, 5)), TypeError, "ids must be int64"),
    ((ids_(3, 4), arr(3, 4, 2), arr(3, 6, 2), [[0.0]]), TypeError, "output gradients must be a numpy.ndarray"),
    ((ids_(3, 4), arr(3, 4, 2), arr(3, 6, 2, 1), arr(3, 6, 5)), ValueError, "activations must be 2-D or 3-D"),
])
def test_binding_cross_hostile(args, exc, match):
    with pytest.raises(exc, match=match):
        _C.embedding_linear_cross(*args)


def test_binding_cross_padding_out_of_range():
    with pytest.raises(ValueError, match=r"padding_idx must be in \[0, num_embeddings = 5\), got -2"):
        _C.embedding_linear_cross(ids_(3, 4), arr(3, 4, 2), arr(3, 6, 2), arr(3, 6, 5), -2)


@pytest.mark.parametrize("fn", [ops.embedding_sq_norms, ops.embedding_sq_norms_torch])
def test_ops_hostile(fn):
    g = torch.randn(3, 4, 2)
    with pytest.raises(TypeError, match="ids must be int64 or int32, got torch.float32"):
        fn(torch.zeros(3, 4), g, 5)
    with pytest.raises(ValueError, match="out of range"):
        fn(torch.full((3, 4), -1), g, 5)
    with pytest.raises(ValueError, match="out of range"):
        fn(torch.full((3, 4), 5), g, 5)
    with pytest.raises(ValueError, match=r"gradients must be ids.shape \+ \(p,\)"):
        fn(torch.zeros(3, 5, dtype=torch.long), g, 5)
    with pytest.raises(TypeError, match="gradients must have a floating dtype"):
        fn(torch.zeros(3, 4, dtype=torch.long), torch.zeros(3, 4, 2, dtype=torch.long), 5)
    with pytest.raises(ValueError, match="padding_idx must be in"):
        fn(torch.zeros(3, 4, dtype=torch.long), g, 5, 5)
    # a negative padding_idx counts from the end, as in nn.Embedding
    ids = torch.randint(0, 5, (3, 4))
    assert_close(fn(ids, g, 5, -1), fn(ids, g, 5, 4), torch.float32)


# -- other paths: the generic cross term, EmbeddingBag and subclasses --------------------------

class TiedToCustom(nn.Module):
    """An embedding weight shared with a leaf the generic rule covers: the engine's generic cross
    path uses EmbeddingRule.per_example."""

    class Proj(nn.Module):
        def __init__(self, V, d):
            super().__init__()
            self.w = nn.Parameter(torch.randn(V, d))

        def forward(self, h):
            return torch.sin(h @ self.w.t())

    def __init__(self, V=7, d=4):
        super().__init__()
        self.emb = nn.Embedding(V, d, padding_idx=3)
        self.proj = self.Proj(V, d)
        self.proj.w = self.emb.weight

    def forward(self, x):
        return self.proj(torch.tanh(self.emb(x).mean(1)))


@pytest.mark.parametrize("dtype", DTYPES)
def test_tied_to_generic_rule(dtype):
    m = TiedToCustom().to(dtype)
    x = torch.randint(0, 7, (5, 6))
    check(m, x, torch.randint(0, 7, (5,)), dtype=dtype)


@pytest.mark.parametrize("mode", ["sum", "mean", "max"])
def test_embedding_bag_is_exact_through_the_generic_rule(mode):
    # Left to the generic rule (exact; memory B x V x d): see fastclip/layers/embedding.py.
    m = nn.Sequential(nn.EmbeddingBag(7, 4, mode=mode, padding_idx=1), nn.Linear(4, 3)).double()
    x = torch.randint(0, 7, (5, 6))
    x[0, :2] = 1
    check(m, x, torch.randint(0, 3, (5,)), dtype=torch.float64)


def test_embedding_subclass():
    class Plain(nn.Embedding):
        pass

    class Scaled(nn.Embedding):
        def forward(self, x):
            return super().forward(x) * 2.0

    from fastclip.layers import rule_for
    from fastclip.layers.embedding import EmbeddingRule
    assert isinstance(rule_for(Plain(3, 2)), EmbeddingRule)
    assert rule_for(Scaled(3, 2)) is None  # its own forward: the generic rule covers it
    for cls in (Plain, Scaled):
        m = nn.Sequential(cls(6, 3), nn.Flatten(1), nn.Linear(12, 2)).double()
        check(m, torch.randint(0, 6, (4, 4)), torch.randint(0, 2, (4,)), dtype=torch.float64)
