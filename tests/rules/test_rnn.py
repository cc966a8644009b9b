"""Recurrent layers: fastclip.nn.RNN / GRU / LSTM against torch.nn's (outputs and gradients,
every option), per-example norms and clipped sums against tests/reference.py through the public
API (torch.nn modules converted automatically), state dicts both ways, the conversion leaving
the user's model as found, hostile input."""
import copy
import itertools

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import fastclip
import fastclip.nn as fnn
import reference as R
from conftest import DTYPES
from fastclip import _C, ops
from harness import CE, assert_close

KINDS = [(nn.LSTM, fnn.LSTM, {}), (nn.GRU, fnn.GRU, {}), (nn.RNN, fnn.RNN, {}),
         (nn.RNN, fnn.RNN, {"nonlinearity": "relu"})]
KIND_IDS = ["lstm", "gru", "rnn_tanh", "rnn_relu"]


def pair(kind, d=5, h=4, **kw):
    tcls, fcls, extra = kind
    ref = tcls(d, h, **extra, **kw).double()
    mine = fcls(d, h, **extra, **kw).double()
    mine.load_state_dict(ref.state_dict())
    return ref, mine


def flat_states(s):
    return list(s) if isinstance(s, tuple) else [s]


def loss_of(out, states):
    if isinstance(out, nn.utils.rnn.PackedSequence):
        out = out.data
    return (out * torch.linspace(-1, 1, out.shape[-1], dtype=out.dtype)).square().sum() + \
        sum((s ** 3).sum() for s in states)


# -- drop-in: outputs and gradients equal torch.nn's ----------------------------------------------

@pytest.mark.parametrize("kind", KINDS, ids=KIND_IDS)
@pytest.mark.parametrize("layers,bidir,batch_first,bias,given", [
    c for c in itertools.product([1, 2], [False, True], [False, True], [True, False], [False, True])
    if not (c[3] is False and c[4] is True and c[0] == 1 and c[1] is False)])
def test_matches_torch(kind, layers, bidir, batch_first, bias, given):
    ref, mine = pair(kind, num_layers=layers, bidirectional=bidir, batch_first=batch_first, bias=bias)
    B, T, D = 3, 5, 2 if bidir else 1
    x = torch.randn((B, T, 5) if batch_first else (T, B, 5), dtype=torch.float64, requires_grad=True)
    hx = None
    if given:
        h0 = torch.randn(layers * D, B, 4, dtype=torch.float64, requires_grad=True)
        c0 = torch.randn(layers * D, B, 4, dtype=torch.float64, requires_grad=True)
        hx = (h0, c0) if kind[0] is nn.LSTM else h0
    o1, s1 = ref(x, hx)
    o2, s2 = mine(x, hx)
    assert_close(o2, o1)
    for a, b in zip(flat_states(s2), flat_states(s1)):
        assert_close(a, b)
    inputs = [x] + ([t for t in (hx if isinstance(hx, tuple) else (hx,))] if given else [])
    g1 = torch.autograd.grad(loss_of(o1, flat_states(s1)), inputs + list(ref.parameters()))
    g2 = torch.autograd.grad(loss_of(o2, flat_states(s2)), inputs + list(mine.parameters()))
    for a, b in zip(g2, g1):
        assert_close(a, b)


@pytest.mark.parametrize("kind", KINDS, ids=KIND_IDS)
@pytest.mark.parametrize("bidir", [False, True])
@pytest.mark.parametrize("batch_first", [False, True])
def test_packed_unsorted(kind, bidir, batch_first):
    ref, mine = pair(kind, num_layers=2, bidirectional=bidir, batch_first=batch_first)
    lengths = torch.tensor([3, 6, 1, 6, 4])
    B, T = len(lengths), int(lengths.max())
    x = torch.randn((B, T, 5) if batch_first else (T, B, 5), dtype=torch.float64, requires_grad=True)
    packed = pack_padded_sequence(x, lengths, batch_first=batch_first, enforce_sorted=False)
    D = 2 if bidir else 1
    h0 = torch.randn(2 * D, B, 4, dtype=torch.float64, requires_grad=True)
    hx = (h0, torch.randn_like(h0)) if kind[0] is nn.LSTM else h0
    o1, s1 = ref(packed, hx)
    o2, s2 = mine(packed, hx)
    assert isinstance(o2, nn.utils.rnn.PackedSequence)
    assert torch.equal(o2.batch_sizes, o1.batch_sizes)
    assert torch.equal(o2.sorted_indices, o1.sorted_indices)
    assert_close(o2.data, o1.data)
    for a, b in zip(flat_states(s2), flat_states(s1)):
        assert_close(a, b)
    g1 = torch.autograd.grad(loss_of(o1, flat_states(s1)), [x, h0] + list(ref.parameters()),
                             retain_graph=True)  # the packing graph is shared
    g2 = torch.autograd.grad(loss_of(o2, flat_states(s2)), [x, h0] + list(mine.parameters()))
    for a, b in zip(g2, g1):
        assert_close(a, b)
    p1, _ = pad_packed_sequence(o1, batch_first=True)
    p2, _ = pad_packed_sequence(o2, batch_first=True)
    assert_close(p2, p1)


@pytest.mark.parametrize("kind", KINDS, ids=KIND_IDS)
def test_unbatched_and_float32(kind):
    ref, mine = pair(kind, num_layers=2, bidirectional=True)
    x = torch.randn(6, 5, dtype=torch.float64)
    o1, s1 = ref(x)
    o2, s2 = mine(x)
    assert o2.shape == o1.shape
    assert_close(o2, o1)
    for a, b in zip(flat_states(s2), flat_states(s1)):
        assert_close(a, b)
    ref, mine = ref.float(), mine.float()
    x = torch.randn(4, 7, 5)
    assert_close(mine(x)[0], ref(x)[0], torch.float32)


@pytest.mark.parametrize("kind", KINDS, ids=KIND_IDS)
def test_torch_fallback_ops_match_native(kind):
    cell = {nn.LSTM: "lstm", nn.GRU: "gru"}.get(kind[0]) or (
        "rnn_relu" if kind[2].get("nonlinearity") == "relu" else "rnn_tanh")
    G = ops.RNN_CELLS[cell]
    B, T, d, h = 4, 6, 3, 5
    x = torch.randn(B, T, d, dtype=torch.float64)
    w_ih, w_hh = torch.randn(G * h, d, dtype=torch.float64), torch.randn(G * h, h, dtype=torch.float64)
    b_ih, b_hh = torch.randn(G * h, dtype=torch.float64), torch.randn(G * h, dtype=torch.float64)
    h0 = torch.randn(B, h, dtype=torch.float64)
    c0 = torch.randn(B, h, dtype=torch.float64) if cell == "lstm" else None
    lengths = torch.tensor([6, 2, 5, 1])
    for rev in (False, True):
        a = ops.rnn_forward(cell, x, w_ih, w_hh, b_ih, b_hh, h0, c0, lengths, rev)
        b = ops.rnn_forward_torch(cell, x, w_ih, w_hh, b_ih, b_hh, h0, c0, lengths, rev)
        for u, v in zip(a, b):
            if u is not None:
                assert_close(u, v)
        d_out, d_hn = torch.randn(B, T, h, dtype=torch.float64), torch.randn(B, h, dtype=torch.float64)
        d_cn = torch.randn(B, h, dtype=torch.float64) if cell == "lstm" else None
        ga = ops.rnn_backward(cell, d_out, d_hn, d_cn, w_ih, w_hh, a[3], a[4], a[5], a[6], lengths, rev)
        gb = ops.rnn_backward_torch(cell, d_out, d_hn, d_cn, w_ih, w_hh, a[3], a[4], a[5], a[6],
                                    lengths, rev)
        for u, v in zip(ga, gb):
            if u is not None:
                assert_close(u, v)


@pytest.mark.parametrize("kind", KINDS, ids=KIND_IDS)
@pytest.mark.parametrize("lengths", [False, True])
@pytest.mark.parametrize("B", [13, 16])
def test_float32_products_match_float64(kind, lengths, B):
    # float32 on an AVX-512 CPU runs the recurrent products in small_gemm (csrc/gemm_avx512.h):
    # hidden 37 gives gate widths of 148 / 111 / 37 columns (full 64-column blocks and partial
    # vectors), d = 23, 13 examples split into slices of 6 / 7 rows (row blocks with tails) or 16
    # into slices of 8 (the 8-row blocks); with lengths the input projection runs per example.
    # Against the float64 torch loops.
    cell = {nn.LSTM: "lstm", nn.GRU: "gru"}.get(kind[0]) or (
        "rnn_relu" if kind[2].get("nonlinearity") == "relu" else "rnn_tanh")
    G = ops.RNN_CELLS[cell]
    T, d, h = 9, 23, 37
    gen = torch.Generator().manual_seed(G + lengths)
    r = lambda *shape: torch.randn(*shape, generator=gen, dtype=torch.float64) * 0.3
    x, w_ih, w_hh, b_ih, b_hh = r(B, T, d), r(G * h, d), r(G * h, h), r(G * h), r(G * h)
    h0, c0 = r(B, h), (r(B, h) if cell == "lstm" else None)
    lens = torch.randint(1, T + 1, (B,), generator=gen) if lengths else None
    f32 = lambda t: None if t is None else t.float()
    # float32 rounding through 9 steps of the recurrence (values of order 1): the same bound
    # holds for the BLAS path (FASTCLIP_ISA=avx2).
    close32 = lambda u, v: torch.testing.assert_close(u.double(), v, rtol=1e-4, atol=1e-5)
    for rev in (False, True):
        a = ops.rnn_forward(cell, *map(f32, (x, w_ih, w_hh, b_ih, b_hh, h0, c0)), lens, rev)
        b = ops.rnn_forward_torch(cell, x, w_ih, w_hh, b_ih, b_hh, h0, c0, lens, rev)
        for u, v in zip(a, b):
            if u is not None:
                assert u.dtype == torch.float32
                close32(u, v)
        d_out, d_hn = r(B, T, h), r(B, h)
        d_cn = r(B, h) if cell == "lstm" else None
        ga = ops.rnn_backward(cell, f32(d_out), f32(d_hn), f32(d_cn), f32(w_ih), f32(w_hh),
                              *map(f32, b[3:7]), lens, rev)
        gb = ops.rnn_backward_torch(cell, d_out, d_hn, d_cn, w_ih, w_hh, *b[3:7], lens, rev)
        for u, v in zip(ga, gb):
            if u is not None:
                close32(u, v)
        # The batch is sliced per thread (and the row blocks follow the slices): small_gemm
        # gives the same bits on one thread as on two. (OpenBLAS does not: its float32 results
        # depend on the slice's row count, so the BLAS path is left out of this check.)
        if not _C.small_gemm_available():
            continue
        old = torch.get_num_threads()
        runs = []
        try:
            for n in (1, 2):
                torch.set_num_threads(n)
                runs.append(ops.rnn_forward(cell, *map(f32, (x, w_ih, w_hh, b_ih, b_hh, h0, c0)),
                                            lens, rev))
        finally:
            torch.set_num_threads(old)
        for u, v in zip(*runs):
            assert (u is None and v is None) or torch.equal(u, v)


def test_dropout_trains_and_evals():
    m = fnn.LSTM(5, 4, num_layers=2, dropout=0.5)
    ref = nn.LSTM(5, 4, num_layers=2, dropout=0.5)
    ref.load_state_dict(m.state_dict())
    x = torch.randn(6, 3, 5)
    m.eval(), ref.eval()
    assert_close(m(x)[0], ref(x)[0], torch.float32)
    m.train()
    out, _ = m(x)
    out.sum().backward()
    assert all(p.grad is not None for p in m.parameters())


def test_state_dicts_both_ways_and_names():
    for tcls, fcls, extra in KINDS:
        t = tcls(5, 4, num_layers=2, bidirectional=True, **extra)
        f = fcls(5, 4, num_layers=2, bidirectional=True, **extra)
        assert [n for n, _ in t.named_parameters()] == [n for n, _ in f.named_parameters()]
        f.load_state_dict(t.state_dict())
        t2 = tcls(5, 4, num_layers=2, bidirectional=True, **extra)
        t2.load_state_dict(f.state_dict())
        for (_, a), (_, b) in zip(t.named_parameters(), t2.named_parameters()):
            assert torch.equal(a, b)


# -- per-example norms and clipped sums through the public API ------------------------------------

class Net(nn.Module):
    """Embedding -> recurrent -> Linear on the last step (torch.nn modules: converted by fastclip)."""

    def __init__(self, rnn_cls=nn.LSTM, V=11, E=6, H=5, **kw):
        super().__init__()
        self.emb = nn.Embedding(V, E)
        self.rnn = rnn_cls(E, H, batch_first=True, **kw)
        D = 2 if kw.get("bidirectional") else 1
        self.fc = nn.Linear(H * D, 3)

    def forward(self, x):
        out, _ = self.rnn(self.emb(x))
        return self.fc(out[:, -1])


@pytest.mark.parametrize("kind", KINDS, ids=KIND_IDS)
@pytest.mark.parametrize("mode", ["auto", "ghost", "direct", "nanobatch"])
@pytest.mark.parametrize("B", [1, 5])
def test_norms_and_clipped_vs_reference(kind, mode, B):
    torch.manual_seed(1)
    model = Net(kind[0], num_layers=2, bidirectional=True, **kind[2]).double()
    x, y = torch.randint(0, 11, (B, 7)), torch.randint(0, 3, (B,))
    ref_norms = R.norms(model, CE, x, y)
    before = copy.deepcopy(model.state_dict())
    norms = fastclip.per_sample_grad_norms(model, CE, x, y, mode=mode)
    assert_close(norms, ref_norms)
    assert type(model.rnn) is kind[0]  # the user's model is left as it was found
    C = float(ref_norms.median())
    ref = R.clipped_sum(model, CE, x, y, C)
    fastclip.clipped_grad(model, CE, x, y, max_grad_norm=C, mode=mode)
    assert type(model.rnn) is kind[0]
    for n, p in model.named_parameters():
        assert_close(p.grad, ref[n])
        assert torch.equal(p.detach(), before[n])


@pytest.mark.parametrize("dtype", DTYPES)
def test_lstm_norms_float_and_single_layer(dtype):
    model = Net(nn.LSTM).to(dtype)
    x, y = torch.randint(0, 11, (6, 9)), torch.randint(0, 3, (6,))
    assert_close(fastclip.per_sample_grad_norms(model, CE, x, y), R.norms(model, CE, x, y), dtype)


def test_empty_batch():
    model = Net(nn.LSTM).double()
    x, y = torch.randint(0, 11, (0, 7)), torch.randint(0, 3, (0,))
    norms = fastclip.per_sample_grad_norms(model, CE, x, y)
    assert norms.shape == (0,)
    fastclip.clipped_grad(model, CE, x, y, max_grad_norm=1.0)
    for p in model.parameters():
        assert p.grad is not None and not p.grad.any()


class PackedNet(nn.Module):
    """Time-major GRU over packed variable-length sequences with given initial states."""

    def __init__(self):
        super().__init__()
        self.rnn = nn.GRU(4, 5, num_layers=1)
        self.fc = nn.Linear(5, 2)

    def forward(self, x, lengths, h0):
        packed = pack_padded_sequence(x.transpose(0, 1), lengths, enforce_sorted=False)
        _, h_n = self.rnn(packed, h0.transpose(0, 1).contiguous())
        return self.fc(h_n[-1])


def test_packed_time_major_with_states_vs_reference():
    model = PackedNet().double()
    B = 5
    x = torch.randn(B, 6, 4, dtype=torch.float64)
    lengths = torch.tensor([2, 6, 3, 1, 6])
    h0 = torch.randn(B, 1, 5, dtype=torch.float64)
    y = torch.randint(0, 2, (B,))
    ref = R.norms(model, CE, (x, lengths, h0), y)
    got = fastclip.per_sample_grad_norms(model, CE, (x, lengths, h0), y)
    assert_close(got, ref)


def test_make_private_converts_in_place_and_steps_exactly():
    torch.manual_seed(3)
    model = Net(nn.LSTM).double()
    x, y = torch.randint(0, 11, (4, 5)), torch.randint(0, 3, (4,))
    C = 0.5
    ref = R.clipped_sum(model, CE, x, y, C)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    params = list(model.parameters())
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    model2, dp_opt, _ = fastclip.make_private(model, opt, None, noise_multiplier=0.0,
                                              max_grad_norm=C, poisson_sampling=False)
    assert model2 is model and isinstance(model.rnn, fnn.LSTM)
    assert all(a is b for a, b in zip(params, model.parameters()))  # the same Parameter objects
    dp_opt.zero_grad()
    CE(model(x), y).mean().backward()
    dp_opt.step()
    for n, p in model.named_parameters():
        assert_close(p.detach(), before[n] - ref[n] / 4)


def test_convert_recurrent_root_and_shared():
    lstm = nn.LSTM(3, 4)
    new = fnn.convert_recurrent(lstm)
    assert isinstance(new, fnn.LSTM) and new.weight_ih_l0 is lstm.weight_ih_l0
    x = torch.randn(5, 2, 3)
    assert_close(new(x)[0], lstm(x)[0], torch.float32)
    shared = nn.GRU(3, 3)
    seq = nn.Sequential(shared, )
    seq.add_module("again", shared)
    fnn.convert_recurrent(seq)
    assert seq[0] is seq.again and isinstance(seq[0], fnn.GRU)


# -- hostile input --------------------------------------------------------------------------------

def test_hostile_inputs():
    m = fnn.LSTM(5, 4, num_layers=2)
    with pytest.raises(ValueError, match="input_size"):
        m(torch.randn(3, 2, 6))
    with pytest.raises(ValueError, match="2D or 3D"):
        m(torch.randn(3, 2, 5, 1))
    h = torch.zeros(2, 2, 4)
    with pytest.raises(ValueError, match=r"Expected hidden size \(2, 2, 4\)"):
        m(torch.randn(3, 2, 5), (h, torch.zeros(1, 2, 4)))
    with pytest.raises(ValueError, match="tuple"):
        m(torch.randn(3, 2, 5), h)
    with pytest.raises(RuntimeError):  # torch's error type for the same mistakes, too
        m(torch.randn(3, 2, 6))
    with pytest.raises(ValueError, match="proj_size"):
        fnn.LSTM(5, 4, proj_size=2)
    with pytest.raises(ValueError, match="proj_size"):
        fnn.convert_recurrent(nn.LSTM(5, 4, proj_size=2))
    with pytest.raises(RuntimeError, match="sorted"):  # torch's own check, before we run
        pack_padded_sequence(torch.randn(3, 2, 5), torch.tensor([1, 3]), enforce_sorted=True)


def test_binding_hostile():
    x = np.zeros((2, 3, 5))
    w_ih, w_hh = np.zeros((16, 5)), np.zeros((16, 4))
    with pytest.raises(ValueError, match="cell"):
        _C.rnn_forward("lstmx", x, w_ih, w_hh)
    with pytest.raises(ValueError, match=r"w_ih must have shape \(16, 5\)"):
        _C.rnn_forward("lstm", x, np.zeros((16, 6)), w_hh)
    with pytest.raises(ValueError, match="w_hh"):
        _C.rnn_forward("gru", x, np.zeros((12, 5)), w_hh)
    with pytest.raises(TypeError, match="dtype"):
        _C.rnn_forward("lstm", x, w_ih.astype(np.float32), w_hh)
    with pytest.raises(ValueError, match=r"h0 must have shape \(2, 4\)"):
        _C.rnn_forward("lstm", x, w_ih, w_hh, h0=np.zeros((3, 4)))
    with pytest.raises(ValueError, match="lengths"):
        _C.rnn_forward("lstm", x, w_ih, w_hh, lengths=np.array([4, 1]))
    with pytest.raises(ValueError, match="c0 is for LSTM only"):
        _C.rnn_forward("gru", x, np.zeros((12, 5)), np.zeros((12, 4)), c0=np.zeros((2, 4)))
    with pytest.raises(ValueError, match="3-D"):
        _C.rnn_forward("lstm", np.zeros((2, 5)), w_ih, w_hh)
    with pytest.raises(TypeError):
        _C.rnn_forward("lstm", x.astype(np.int64), w_ih, w_hh)
    out = _C.rnn_forward("lstm", np.zeros((0, 3, 5)), w_ih, w_hh)
    assert out[0].shape == (0, 3, 4)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("B,T", [(0, 4), (1, 1), (5, 7)])
def test_ghost_sq_norms_op(dtype, shared, B, T):
    x = torch.randn(B, T, 3, dtype=dtype)
    hp = torch.randn(B, 2 * T, 5, dtype=dtype)[:, ::2]  # strided along T
    gi = torch.randn(B, T, 8, dtype=dtype)
    gh = None if shared else torch.randn(B, T, 8, dtype=dtype)
    w_ih, w_hh = ops.rnn_ghost_sq_norms(x, hp, gi, gh)
    ref_ih = torch.einsum("btp,btd->bpd", gi.double(), x.double()).flatten(1).square().sum(1)
    g2 = (gi if gh is None else gh).double()
    ref_hh = torch.einsum("btp,btd->bpd", g2, hp.double()).flatten(1).square().sum(1)
    assert_close(w_ih, ref_ih, dtype)
    assert_close(w_hh, ref_hh, dtype)
    t_ih, t_hh = ops.rnn_ghost_sq_norms_torch(x, hp, gi, gh)
    assert_close(t_ih, ref_ih, dtype)
    assert_close(t_hh, ref_hh, dtype)
