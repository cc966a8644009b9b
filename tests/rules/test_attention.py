"""Attention and transformers: fastclip.nn.MultiheadAttention, parameters used directly by a
parent module, custom leaves from other libraries, against tests/reference.py (float64)."""
import copy
import functools
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastclip
import fastclip.nn as fnn
import harness
import reference as R
from harness import CE, assert_close
from models import Attn, Conv1D, DecoderLM, GPT2ish, RMSNorm, Rotary, lm_loss  # shared test models

D64 = torch.float64


# harness.check in modes auto and nanobatch with this file's bound (module types unchanged,
# which the conversion of torch's attention must ensure, is part of the model left as found).
check = functools.partial(harness.check, modes=("auto", "nanobatch"), C=0.3)


# -- MultiheadAttention drop-in -------------------------------------------------------------------

MHA_OPTS = [
    dict(),
    dict(bias=False),
    dict(add_bias_kv=True),
    dict(add_zero_attn=True),
    dict(add_bias_kv=True, add_zero_attn=True, kdim=5, vdim=7),
    dict(kdim=5, vdim=7),
]


@pytest.mark.parametrize("opts", MHA_OPTS)
@pytest.mark.parametrize("batch_first", [True, False])
def test_mha_equals_torch_and_state_dicts_load_both_ways(opts, batch_first):
    ref = nn.MultiheadAttention(8, 2, batch_first=batch_first, **opts).double()
    ours = fnn.MultiheadAttention(8, 2, batch_first=batch_first, **opts).double()
    ours.load_state_dict(ref.state_dict())
    ref.load_state_dict(ours.state_dict())
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in ref.named_parameters()]
    B, L, S = 3, 4, 6
    kd, vd = opts.get("kdim", 8), opts.get("vdim", 8)
    shape = (lambda T, d: (B, T, d)) if batch_first else (lambda T, d: (T, B, d))
    q = torch.randn(shape(L, 8), dtype=D64)
    k = torch.randn(shape(S, kd), dtype=D64)
    v = torch.randn(shape(S, vd), dtype=D64)
    kpm = torch.zeros(B, S, dtype=torch.bool)
    kpm[0, -2:] = True
    am = torch.randn(L, S, dtype=D64)
    for kw in (dict(), dict(key_padding_mask=kpm, attn_mask=am), dict(average_attn_weights=False),
               dict(need_weights=False)):
        a, wa = ref(q, k, v, **kw)
        b, wb = ours(q, k, v, **kw)
        assert_close(b, a)
        if wa is not None:
            assert_close(wb, wa)
    if kd == 8 and vd == 8:  # self-attention, causal, unbatched
        x = q
        mask = nn.Transformer.generate_square_subsequent_mask(L, dtype=D64)
        assert_close(ours(x, x, x, attn_mask=mask, is_causal=True)[0],
                     ref(x, x, x, attn_mask=mask, is_causal=True)[0])
        assert_close(ours(x[:, 0] if not batch_first else x[0], x[:, 0] if not batch_first else x[0],
                          x[:, 0] if not batch_first else x[0])[0],
                     ref(x[:, 0] if not batch_first else x[0], x[:, 0] if not batch_first else x[0],
                         x[:, 0] if not batch_first else x[0])[0])


@pytest.mark.parametrize("opts", MHA_OPTS)
@pytest.mark.parametrize("B", [0, 1, 3])
def test_mha_norms_and_clipped_sums(opts, B):
    self_attn = "kdim" not in opts
    m = Attn(self_attn, **opts).double()
    x = torch.randn(B, 5, 8, dtype=D64)
    check(m, x, torch.randint(0, 3, (B,)))


def test_mha_float32_and_modes():
    m = Attn(True, add_bias_kv=True)
    x, y = torch.randn(4, 5, 8), torch.randint(0, 3, (4,))
    ref = R.norms(m, CE, x, y)
    for mode in ("auto", "ghost", "direct", "nanobatch"):
        assert_close(fastclip.per_sample_grad_norms(m, CE, x, y, mode=mode), ref, torch.float32)


def test_torch_mha_is_refused_by_a_bare_engine():
    with pytest.raises(ValueError, match="fastclip.nn.MultiheadAttention"):
        fastclip.Engine(Attn())


# -- transformers ---------------------------------------------------------------------------------


@pytest.mark.parametrize("B", [0, 1, 3])
def test_decoder_only_transformer(B):
    m = DecoderLM().double()
    tok = torch.randint(0, 11, (B, 6))
    check(m, tok, tok, loss=lm_loss)


def test_decoder_only_transformer_outputs_equal_torch():
    m = DecoderLM().double()
    tok = torch.randint(0, 11, (2, 6))
    want = m(tok)
    with fnn.converted(m) as c:
        assert any(isinstance(x, fnn.MultiheadAttention) for x in c.modules())
        assert_close(c(tok), want)
    assert not any(isinstance(x, fnn.MultiheadAttention) for x in m.modules())


class EncoderClassifier(nn.Module):
    def __init__(self, d=8, cls_token=True):
        super().__init__()
        self.inp = nn.Linear(4, d)
        self.cls = nn.Parameter(torch.randn(1, 1, d) * 0.1)
        layer = nn.TransformerEncoderLayer(d, 2, 16, dropout=0.0, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(d, 2)

    def forward(self, x, pad):
        h = self.inp(x)
        h = torch.cat([self.cls.expand(x.shape[0], -1, -1), h], 1)
        pad = torch.cat([torch.zeros_like(pad[:, :1]), pad], 1)
        h = self.enc(h, src_key_padding_mask=pad)
        return self.head(h[:, 0])


@pytest.mark.parametrize("B", [0, 1, 4])
def test_encoder_classifier(B):
    m = EncoderClassifier().double()
    x = torch.randn(B, 5, 4, dtype=D64)
    pad = torch.zeros(B, 5, dtype=torch.bool)
    if B:
        pad[0, -2:] = True
    check(m, (x, pad), torch.randint(0, 2, (B,)))


def test_decoder_layer_cross_attention():
    class Seq2Seq(nn.Module):
        def __init__(self):
            super().__init__()
            self.src = nn.Linear(3, 8)
            self.tgt = nn.Linear(3, 8)
            self.dec = nn.TransformerDecoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
            self.head = nn.Linear(8, 2)

        def forward(self, s, t):
            return self.head(self.dec(self.tgt(t), self.src(s)).mean(1))

    m = Seq2Seq().double()
    s, t = torch.randn(3, 5, 3, dtype=D64), torch.randn(3, 4, 3, dtype=D64)
    check(m, (s, t), torch.randint(0, 2, (3,)))


# -- time-major (batch_first=False, torch's default) transformer layers ------------------------

class TimeMajor(nn.Module):
    """A batch-first model around torch's time-major transformer modules: its Linear and LayerNorm
    leaves see (T, B, E), its attention (T, B, E) too; the rules know it from the module."""

    def __init__(self, kind, norm_first=False):
        super().__init__()
        self.kind = kind
        self.inp = nn.Linear(3, 8)
        opts = dict(dropout=0.0, norm_first=norm_first)
        if kind == "encoder":
            self.body = nn.TransformerEncoder(nn.TransformerEncoderLayer(8, 2, 16, **opts), 2,
                                              norm=nn.LayerNorm(8), enable_nested_tensor=False)
        elif kind == "decoder":
            self.body = nn.TransformerDecoderLayer(8, 2, 16, **opts)
        else:
            self.body = nn.Transformer(8, 2, 1, 1, 16, **opts)
        self.head = nn.Linear(8, 2)

    def forward(self, x, pad):
        h = self.inp(x).transpose(0, 1)                                  # (T, B, E)
        if self.kind == "encoder":
            h = self.body(h, src_key_padding_mask=pad)
        elif self.kind == "decoder":
            h = self.body(h[:3], h, memory_key_padding_mask=pad)
        else:
            h = self.body(h, h[:3], src_key_padding_mask=pad,
                          tgt_mask=nn.Transformer.generate_square_subsequent_mask(3, dtype=h.dtype))
        return self.head(h.mean(0))


@pytest.mark.parametrize("kind", ["encoder", "decoder", "transformer"])
@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.parametrize("B", [0, 1, 4])
def test_time_major_transformer_layers(kind, norm_first, B):
    m = TimeMajor(kind, norm_first).double()
    x = torch.randn(B, 5, 3, dtype=D64)
    pad = torch.zeros(B, 5, dtype=torch.bool)
    if B:
        pad[0, -2:] = True
    y = torch.randint(0, 2, (B,))
    check(m, (x, pad), y)
    if B:
        for mode in ("ghost", "direct"):
            assert_close(fastclip.per_sample_grad_norms(m, CE, (x, pad), y, mode=mode),
                         R.norms(m, CE, (x, pad), y))


def test_time_major_float32_and_step():
    m = TimeMajor("encoder").float()
    x, pad = torch.randn(4, 5, 3), torch.zeros(4, 5, dtype=torch.bool)
    check(m, (x, pad), torch.randint(0, 2, (4,)), dtype=torch.float32)
    ref_model = copy.deepcopy(m).double()
    y = torch.randint(0, 2, (4,))
    opt = torch.optim.SGD(m.parameters(), lr=1.0)
    pm, popt, _ = fastclip.make_private(m, opt, None, noise_multiplier=0.0, max_grad_norm=0.2,
                                        loss_reduction="sum", clipping="per_layer")
    before = {k: p.detach().clone() for k, p in pm.named_parameters()}
    popt.zero_grad()
    CE(pm(x, pad), y).sum().backward()
    popt.step()
    assert all(not torch.equal(before[k], p) for k, p in pm.named_parameters())
    n = fastclip.per_sample_grad_norms(ref_model, CE, (x.double(), pad), y)
    assert_close(n, R.norms(ref_model, CE, (x.double(), pad), y))


def test_custom_leaf_in_a_time_major_layer_is_refused():
    layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0)

    class Scale(nn.Module):
        def __init__(self):
            super().__init__()
            self.s = nn.Parameter(torch.ones(8))

        def forward(self, x):
            return x * self.s

    layer.dropout1 = Scale()   # a leaf with parameters and no layout-aware rule
    m = nn.Sequential(nn.Linear(3, 8), layer)
    with pytest.raises(ValueError, match=r"'1\.dropout1' \(Scale\).*time-major.*batch_first=True"):
        fastclip.per_sample_grad_norms(m, lambda o, y: o.sum((0, 2)), torch.randn(5, 2, 3), None)


def test_attention_mixed_with_lstm():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(13, 8)
            self.lstm = nn.LSTM(8, 8, batch_first=True)
            self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
            self.head = nn.Linear(8, 2)

        def forward(self, tok):
            h, _ = self.lstm(self.emb(tok))
            a, _ = self.attn(h, h, h)
            return self.head((a + h).mean(1))

    m = M().double()
    tok = torch.randint(0, 13, (3, 7))
    check(m, tok, torch.randint(0, 2, (3,)))


def test_make_private_transformer_step_is_clipped_mean():
    m = DecoderLM().double()
    ref_model = copy.deepcopy(m)
    tok = torch.randint(0, 11, (3, 6))
    opt = torch.optim.SGD(m.parameters(), lr=1.0)
    pm, popt, _ = fastclip.make_private(m, opt, None, noise_multiplier=0.0, max_grad_norm=0.2,
                                        poisson_sampling=False)
    assert any(isinstance(x, fnn.MultiheadAttention) for x in pm.modules())
    before = {k: p.detach().clone() for k, p in pm.named_parameters()}
    popt.zero_grad()
    lm_loss(pm(tok), tok).mean().backward()
    popt.step()
    ref = R.clipped_sum(ref_model, lm_loss, tok, tok, 0.2)
    for k, p in pm.named_parameters():
        assert_close(before[k] - p.detach(), ref[k] / 3)


# -- custom leaves from other libraries: the generic rule ------------------------------------------


@pytest.mark.parametrize("B", [0, 1, 3])
def test_custom_library_leaves_use_the_op_rule(B):
    m = GPT2ish().double()
    tok = torch.randint(0, 10, (B, 6))
    e = fastclip.Engine(m)
    try:
        assert dict(e.covered())["c_attn.weight"] == "PendingOpsRule"   # until its first forward
        m(tok)
        rules = dict(e.covered())
    finally:
        e.detach()
    # addmm with the weight stored (in, out) and a broadcast RMSNorm scale (layers/ops_rule.py)
    assert rules["c_attn.weight"] == rules["c_attn.bias"] == rules["norm.weight"] == "OpsRule"
    check(m, tok, torch.randint(0, 2, (B,)))


def test_a_refused_model_keeps_torch_attention():
    """make_private swaps torch's MultiheadAttention for the drop-in; a model it refuses is left
    exactly as found, attention included."""
    m = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    m.att = nn.MultiheadAttention(4, 2, batch_first=True)
    with pytest.raises(ValueError, match="BatchNorm1d"):
        fastclip.make_private(m, torch.optim.SGD(m.parameters(), lr=0.1), None,
                              noise_multiplier=1.0, max_grad_norm=1.0)
    assert type(m.att) is nn.MultiheadAttention
