"""Issue 13 case 4: models and losses that mix examples (fastclip/audit.py, fastclip/losses.py).

Each leak is first reproduced with the audit off (one example moves the released sum by more
than the bound), then refused with the audit on before anything changes. The negatives: ordinary
models pass the audit in every mode without touching the RNG stream or train/eval flags.
"""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastclip
from fastclip.audit import Auditor, MixingError
from misuse_common import flat_params, influence, private, released
from harness import MODES

C = 1.0


def _private(model, mode="auto", **kw):
    if mode == "nanobatch":
        kw.setdefault("nanobatch_size", 2)
    return private(model, C=C, mode=mode, **kw)


def step_update(base, forward_loss, audit=True, mode="auto"):
    """update(idx): the released update of one step on the examples idx (float64)."""
    def update(idx):
        def loop(m):
            m, opt, _ = _private(m, mode=mode, audit=audit)
            opt.zero_grad()
            forward_loss(m, idx).backward()
            opt.step()
            opt.engine.detach()
            return m
        return released(base, loop)
    return update


def replace_influence(update, B, replace_with):
    """max over j of ||update(batch) - update(batch with example j replaced)||."""
    full = update(list(range(B)))
    return max((full - update([replace_with if i == j else i for i in range(B)])).norm().item()
               for j in range(B))


def assert_refused_before_release(base, forward_loss, B, mode="auto", match="mixes examples"):
    m = copy.deepcopy(base)
    before = flat_params(m)
    m, opt, _ = _private(m, mode=mode)
    opt.zero_grad()
    with pytest.raises(MixingError, match=match) as info:
        forward_loss(m, list(range(B))).backward()
        opt.step()
    assert str(info.value).startswith("fastclip:")
    assert torch.equal(flat_params(m), before)
    assert opt.steps == 0 and all(p.grad is None for p in m.parameters())
    # refused again, not remembered as passed
    with pytest.raises(MixingError):
        forward_loss(m, list(range(B)))
    opt.engine.detach()
    return str(info.value)


# -- model mixing: batch statistics inside the model ------------------------------------------
class Centered(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 16), nn.Linear(16, 3)

    def forward(self, x):
        h = torch.tanh(self.a(x))
        return self.b(h - h.mean(0))     # batch statistics: every row depends on every example


def _data(B, *shape, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, *shape, generator=g, dtype=torch.float64)


def test_batch_statistics_leak_and_refusal():
    B = 6
    x, y = _data(B, 4) * 3, torch.arange(B) % 3
    base = Centered().double()

    def fl(m, idx):
        return F.cross_entropy(m(x[idx]), y[idx], reduction="none").sum()

    leak = influence(step_update(base, fl, audit=False), B)
    assert leak > 1.1 * C, leak       # 1.21: the leak is real without the audit
    msg = assert_refused_before_release(base, fl, B)
    assert "batch" in msg and "audit=False" in msg


@pytest.mark.parametrize("mode", MODES)
def test_batch_statistics_refused_in_every_mode(mode):
    B = 4
    x, y = _data(B, 4), torch.arange(B) % 3
    assert_refused_before_release(
        Centered().double(), lambda m, idx: F.cross_entropy(m(x[idx]), y[idx], reduction="none").sum(),
        B, mode=mode)


# -- model mixing: attention across the batch -------------------------------------------------
class MisfedAttention(nn.Module):
    """batch_first=False attention fed (B, T, E): it attends across the batch."""

    def __init__(self, batch_first=False, transpose=False):
        super().__init__()
        self.emb = nn.Linear(4, 8)
        self.att = nn.MultiheadAttention(8, 2, batch_first=batch_first)
        self.out = nn.Linear(8, 3)
        self.transpose = transpose

    def forward(self, x):                 # x: (B, T, 4)
        h = self.emb(x)
        if self.transpose:                # the correct use of batch_first=False: (T, B, E)
            h = h.transpose(0, 1)
        h = self.att(h, h, h, need_weights=False)[0]
        if self.transpose:
            h = h.transpose(0, 1)
        return self.out(h).mean(1)


def test_attention_across_batch_leak_and_refusal():
    B = 5
    x = _data(B + 1, B, 4, seed=2) * 4    # T == B: the batch sizes agree, the leak is silent
    y = torch.arange(B + 1) % 3
    torch.manual_seed(3)
    base = MisfedAttention().double()

    def fl(m, idx):
        return F.cross_entropy(m(x[idx]), y[idx], reduction="none").sum()

    leak = replace_influence(step_update(base, fl, audit=False), B, replace_with=B)
    assert leak > 2 * C, leak        # replace-one bound is 2C
    assert_refused_before_release(base, fl, B)


# -- model mixing: a loss computed inside the model (Hugging Face labels=) ---------------------
def _gpt2(seed=0):
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=50, n_positions=16,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return transformers.GPT2LMHeadModel(cfg).double()


def _lm_batch(B=8, T=8):
    """One long example and B - 1 identical short ones (aligned gradients): removing the long
    one changes the batch's token count, and with it every other example's gradient."""
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, 50, (B, T), generator=g)
    ids[1:] = ids[1]
    mask = torch.zeros(B, T, dtype=torch.long)
    mask[0] = 1
    mask[1:, :3] = 1
    return ids, mask, ids.masked_fill(mask == 0, -100)


def test_hf_labels_loss_leaks_and_is_refused():
    base = _gpt2()
    ids, mask, labels = _lm_batch()
    B = ids.shape[0]

    def fl(m, idx):
        # Hugging Face's own loss: a token mean over the whole (padded) batch; the weight 0.6
        # keeps the examples just unclipped, where the rescaling by the token count shows most
        return 0.6 * m(input_ids=ids[idx], attention_mask=mask[idx], labels=labels[idx]).loss

    leak = influence(step_update(base, fl, audit=False), B)
    assert leak > 2 * C, leak
    msg = assert_refused_before_release(base, fl, B, match="no batch dimension")
    assert "output.loss" in msg and "fastclip.lm_loss" in msg


def test_hf_lm_loss_through_make_private_is_bounded():
    base = _gpt2()
    ids, mask, labels = _lm_batch()
    B = ids.shape[0]

    def fl(m, idx):
        logits = m(input_ids=ids[idx], attention_mask=mask[idx]).logits
        return k * fastclip.lm_loss(logits, labels[idx]).sum()

    for k in (0.1, 0.6, 3.0):     # unclipped, near the bound, clipped
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)   # the audit ran: no "NOT checked"
            assert influence(step_update(base, fl), B) <= C * (1 + 1e-9)


def test_labels_added_after_the_first_step_are_audited():
    """The audit is per call signature: a later call that passes labels= is refused too."""
    m = _gpt2()
    ids, mask, labels = _lm_batch()
    m, opt, _ = _private(m)
    fastclip.lm_loss(m(input_ids=ids, attention_mask=mask).logits, labels).sum().backward()
    opt.step()
    before = flat_params(m)
    opt.zero_grad()
    with pytest.raises(MixingError, match="output.loss"):
        m(input_ids=ids, attention_mask=mask, labels=labels)
    assert torch.equal(flat_params(m), before) and opt.steps == 1


# -- loss mixing: in-batch contrastive loss ----------------------------------------------------
class Encoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 8)

    def forward(self, x):
        return F.normalize(self.a(x), dim=-1)


def contrastive(z, y, tau=0.1):
    """In-batch negatives: example i's loss depends on every other example's embedding."""
    return F.cross_entropy(z @ z.T / tau, torch.arange(z.shape[0]), reduction="none")


def _contrastive_case():
    B = 8
    x = _data(B, 4, seed=7) + _data(1, 4, seed=8)
    torch.manual_seed(0)
    return Encoder().double(), x, B, lambda m, idx: 2.0 * contrastive(m(x[idx]), None, tau=1.0).sum()


def test_contrastive_loss_leaks_under_make_private_without_audit():
    base, x, B, fl = _contrastive_case()
    leak = influence(step_update(base, fl, audit=False), B)
    assert leak > 1.3 * C, leak


@pytest.mark.parametrize("mode", MODES)
def test_contrastive_loss_refused_under_make_private(mode):
    """The user's own loss is probed on the first step: its backward is refused before any
    gradient is written, and again on the next try."""
    base, x, B, fl = _contrastive_case()
    assert_loss_refused(base, fl, B, mode=mode)


def assert_loss_refused(base, forward_loss, B, mode="auto"):
    m = copy.deepcopy(base)
    before = flat_params(m)
    m, opt, _ = _private(m, mode=mode)
    for attempt in range(2):    # refused again: a caught exception does not let a step through
        opt.zero_grad()
        with pytest.raises(MixingError, match="the loss mixes examples") as info:
            forward_loss(m, list(range(B))).backward()
        assert "lm_loss" in str(info.value) and "audit=False" in str(info.value)
    assert torch.equal(flat_params(m), before)
    assert opt.steps == 0 and all(p.grad is None for p in m.parameters())
    opt.engine.detach()


def test_loss_probe_through_torch_autograd_backward_and_two_forwards():
    """torch.autograd.backward(loss) is probed like loss.backward(); a loss over two forwards
    (a siamese pair loss: example i against example i of the other forward) is per example and
    passes, while pairing examples of one forward is refused."""
    base, x, B, fl = _contrastive_case()
    m, opt, _ = _private(copy.deepcopy(base))
    with pytest.raises(MixingError, match="the loss mixes examples"):
        torch.autograd.backward(fl(m, list(range(B))))
    assert all(p.grad is None for p in m.parameters())
    opt.engine.detach()

    def siamese(m, idx):
        z1, z2 = m(x[idx]), m(x[idx].flip(1))
        return ((z1 - z2).square().sum(1)).sum()

    upd = step_update(base, siamese)
    want = [influence(upd, B)]
    assert want[0] <= C * (1 + 1e-9)

    def neighbours(m, idx):
        z = m(x[idx])
        return (z[1:] * z[:-1]).sum()     # example i paired with example i - 1 of the batch

    assert_loss_refused(base, neighbours, B)


def test_loss_probe_passes_ordinary_losses_and_stops_after_the_first_step():
    base = Encoder().double()
    x, y = _data(6, 4, seed=3), torch.randint(0, 8, (6,))
    m, opt, _ = _private(copy.deepcopy(base))
    for step in range(3):
        opt.zero_grad()
        out = m(x)
        assert (type(out) is not torch.Tensor) == (step == 0)    # probed until audited once
        F.cross_entropy(out, y, reduction="none").mean().backward()
        opt.step()
    assert opt.steps == 3
    # a loss that is linear in the outputs has nothing to mix
    m, opt, _ = _private(copy.deepcopy(base))
    opt.zero_grad()
    (m(x) * _data(6, 8, seed=4)).sum().backward()
    opt.step()
    assert opt.steps == 1


@pytest.mark.parametrize("fn", ["clipped_grad", "per_sample_grad_norms"])
@pytest.mark.parametrize("mode", MODES)
def test_contrastive_loss_refused_by_functional_api(fn, mode):
    B = 6
    x = _data(B, 4, seed=7) * 2
    m = Encoder().double()
    before = flat_params(m)
    kw = dict(max_grad_norm=C) if fn == "clipped_grad" else {}
    with pytest.raises(MixingError, match="the loss mixes examples"):
        getattr(fastclip, fn)(m, contrastive, x, None, mode=mode, **kw)
    assert torch.equal(flat_params(m), before) and all(p.grad is None for p in m.parameters())
    assert not m._forward_pre_hooks and "forward" not in m.__dict__   # engine detached


def test_batch_token_mean_loss_refused_by_functional_api():
    """The token mean over the whole padded batch, written by hand: the gradient rows are
    scaled by the batch's token count, not the example's."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(20, 8), nn.Linear(8, 20)).double()
    ids = torch.randint(0, 20, (4, 6))
    labels = ids.clone()
    labels[0, 2:] = -100
    labels[3, 4:] = -100

    def batch_mean(logits, y):
        tok = F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=-100, reduction="none")
        return tok.view(y.shape).sum(1) / (y != -100).sum()    # batch-wide count

    with pytest.raises(MixingError, match="gradient"):
        fastclip.clipped_grad(model, batch_mean, ids, labels, max_grad_norm=C)
    # the per-example normalisation passes, and equals the reference
    fastclip.clipped_grad(model, lambda o, y: fastclip.lm_loss(o, y, shift=False), ids, labels,
                          max_grad_norm=C)


def test_audit_false_skips_the_functional_loss_audit():
    x = _data(4, 4)
    norms = fastclip.per_sample_grad_norms(Encoder().double(), contrastive, x, None, audit=False)
    assert norms.shape == (4,)


# -- negatives: ordinary models pass in every mode ---------------------------------------------
class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 3))

    def forward(self, x):
        return self.net(x)


class CNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.norm = nn.GroupNorm(2, 4)
        self.drop = nn.Dropout(0.2)
        self.fc = nn.Linear(4 * 5 * 5, 3)

    def forward(self, x):
        return self.fc(self.drop(F.relu(self.norm(self.conv(x)))).flatten(1))


class LSTMNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(6, 8, batch_first=True)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        return self.fc(self.lstm(x)[0][:, -1])


class Transformer(nn.Module):
    """Attention masks as inputs: a (B, T) padding mask and a (T, T) causal mask, with T == B
    (the audit must not slice the causal mask as if it were per example); dropout on."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(11, 8)
        self.layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.1, batch_first=True)
        self.fc = nn.Linear(8, 3)

    def forward(self, ids, pad, causal):
        h = self.layer(self.emb(ids), src_mask=causal, src_key_padding_mask=pad)
        return self.fc(h.mean(1))


class PositionIds(nn.Module):
    """Position ids broadcast over the batch: (1, T), passed whole."""

    def __init__(self):
        super().__init__()
        self.tok, self.pos = nn.Embedding(11, 8), nn.Embedding(6, 8)
        self.fc = nn.Linear(8, 3)

    def forward(self, ids, pos):
        return self.fc((self.tok(ids) + self.pos(pos)).mean(1))


class TimeMajor(nn.Module):
    """batch_first=False attention and transformer layer fed (T, B, E) correctly."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Linear(6, 8)
        self.att = nn.MultiheadAttention(8, 2, dropout=0.1)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):                       # x: (B, T, 6)
        h = self.emb(x).transpose(0, 1)         # (T, B, E)
        h = h + self.att(h, h, h, need_weights=False)[0]
        return self.fc(h.transpose(0, 1).mean(1))


def _ordinary(name, B=5, T=None):
    g = torch.Generator().manual_seed(11)
    if name == "mlp":
        return MLP(), (torch.randn(B, 6, generator=g),)
    if name == "cnn":
        return CNN(), (torch.randn(B, 2, 5, 5, generator=g),)
    if name == "lstm":
        return LSTMNet(), (torch.randn(B, 4, 6, generator=g),)
    if name == "transformer":
        T = T or B
        pad = torch.zeros(B, T, dtype=torch.bool)
        pad[1, 3:] = True
        causal = torch.triu(torch.full((T, T), float("-inf")), 1)
        return Transformer(), (torch.randint(0, 11, (B, T), generator=g), pad, causal)
    if name == "position_ids":
        return PositionIds(), (torch.randint(0, 11, (B, 6), generator=g), torch.arange(6)[None])
    if name == "time_major":
        return TimeMajor(), (torch.randn(B, 4, 6, generator=g),)
    raise KeyError(name)


ORDINARY = ["mlp", "cnn", "lstm", "transformer", "position_ids", "time_major"]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", ORDINARY)
def test_ordinary_models_pass_the_audit(name, mode):
    torch.manual_seed(0)
    # nanobatch mode itself splits every input whose first dimension is B: no (B, B) mask there
    model, inputs = _ordinary(name, T=6 if mode == "nanobatch" else None)
    y = torch.arange(inputs[0].shape[0]) % 3
    model, opt, _ = _private(model, mode=mode)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            opt.zero_grad()
            F.cross_entropy(model(*inputs), y).backward()
            opt.step()
    assert not [w for w in caught if "NOT checked" in str(w.message)]
    assert opt.engine._auditor._passed, "the audit did not run"
    assert opt.steps == 2
    opt.engine.detach()


@pytest.mark.parametrize("mode", MODES)
def test_audit_keeps_rng_stream_and_train_eval_flags(mode):
    model, (x,) = _ordinary("mlp")
    model.net[1].eval()            # a submodule the user keeps in eval mode: kept so
    flags = [m.training for m in model.modules()]

    def run(audit):
        m = copy.deepcopy(model)
        m, opt, _ = _private(m, mode=mode, audit=audit)
        torch.manual_seed(123)
        out = m(x)                 # dropout mask drawn from the user's stream
        after = torch.rand(4)
        out.sum().backward()
        opt.engine.detach()
        return out.detach(), after, [mm.training for mm in m.modules()], opt.engine._auditor

    out_a, rand_a, flags_a, auditor = run(True)
    out_b, rand_b, flags_b, _ = run(False)
    assert auditor._passed                               # the audit did run ...
    assert torch.equal(out_a, out_b) and torch.equal(rand_a, rand_b)   # ... invisibly
    assert flags_a == flags == flags_b


def test_audit_runs_once_per_signature(monkeypatch):
    calls = []
    real = Auditor._audit
    monkeypatch.setattr(Auditor, "_audit", lambda self, a, k: calls.append(1) or real(self, a, k))
    model, (x,) = _ordinary("mlp")
    model, opt, _ = _private(model)
    y = torch.zeros(x.shape[0], dtype=torch.long)
    for _ in range(3):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    assert len(calls) == 1
    with torch.no_grad():
        model(x)                   # evaluation is never audited
    assert len(calls) == 1


def test_single_example_batches_wait_for_a_real_batch():
    model, (x,) = _ordinary("mlp")
    centered = Centered()
    centered, opt, _ = _private(centered)
    centered(torch.randn(1, 4)).sum().backward()          # B = 1: nothing to mix, no verdict
    assert not opt.engine._auditor._passed
    with pytest.raises(MixingError):
        centered(torch.randn(3, 4))


def test_engine_and_validate_keep_working_on_a_mixing_model():
    """validate() reports mixing as a mismatch instead of stopping at the audit."""
    x, y = _data(4, 4).float(), torch.arange(4) % 3
    report = fastclip.validate(Centered(), lambda o, t: F.cross_entropy(o, t, reduction="none"),
                               x, y, verbose=False)
    assert not report.ok


# -- lm_loss --------------------------------------------------------------------------------
def _lm_reference(logits, labels, ignore_index=-100, shift=True):
    out = []
    for lg, lb in zip(logits, labels):
        if shift:
            lg, lb = lg[:-1], lb[1:]
        keep = lb != ignore_index
        out.append(F.cross_entropy(lg[keep], lb[keep], reduction="sum") / keep.sum()
                   if keep.any() else lg.sum() * 0)
    return torch.stack(out)


@pytest.mark.parametrize("shift", [True, False])
def test_lm_loss_matches_direct_computation(shift):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 7, 13, dtype=torch.float64, generator=g, requires_grad=True)
    labels = torch.randint(0, 13, (5, 7), generator=g)
    labels[1, 3:] = -100
    labels[2, :] = -100                     # no tokens at all
    labels[3, 1:] = -100                    # shifted: none left either
    labels[4, 0] = -100
    got = fastclip.lm_loss(logits, labels, shift=shift)
    want = _lm_reference(logits, labels, shift=shift)
    assert got.shape == (5,) and torch.allclose(got, want, rtol=1e-12, atol=1e-12)
    assert got[2] == 0 and torch.isfinite(got).all()
    (grad,) = torch.autograd.grad(got.sum(), logits)
    assert torch.isfinite(grad).all() and grad[2].abs().sum() == 0
    # normalised per example: example 0's loss does not change with other examples' lengths
    labels2 = labels.clone()
    labels2[4, :] = -100
    assert fastclip.lm_loss(logits, labels2, shift=shift)[0] == got[0]


def test_lm_loss_ignore_index_low_precision_and_errors():
    logits = torch.randn(2, 4, 6, dtype=torch.bfloat16)
    labels = torch.tensor([[1, 2, 0, 0], [3, 0, 0, 0]])
    out = fastclip.lm_loss(logits, labels, ignore_index=0)
    assert out.dtype == torch.float32
    assert torch.allclose(out, _lm_reference(logits.float(), labels, ignore_index=0))
    with pytest.raises(ValueError, match="logits must be"):
        fastclip.lm_loss(torch.randn(2, 6), labels)
    with pytest.raises(ValueError, match="labels must be"):
        fastclip.lm_loss(logits, labels[:, :3])
    with pytest.raises(TypeError, match="integer"):
        fastclip.lm_loss(logits, labels.float())


# -- a leaf whose input does not follow the batch (T5's relative position bias) ---------------
class SharedBias(nn.Module):
    """An Embedding looked up on (q, q) position buckets shared by every example, broadcast over
    the batch afterwards: its rows are positions, not examples."""

    def __init__(self, q):
        super().__init__()
        self.q = q
        self.bias = nn.Embedding(2 * q, 4)
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        rel = torch.arange(self.q)[:, None] - torch.arange(self.q)[None] + self.q
        return self.lin(x) + self.bias(rel).mean((0, 1))


@pytest.mark.parametrize("q", [3, 5])      # q == B (rows look like examples) and q != B
@pytest.mark.parametrize("mode", ["auto", "ghost", "direct"])
def test_leaf_input_without_batch_dimension_refused_even_when_its_size_is_B(q, mode):
    B = 3
    x = _data(B, 4, seed=5)
    base = SharedBias(q).double()
    m, opt, _ = _private(copy.deepcopy(base), mode=mode)
    before = flat_params(m)
    for attempt in range(2):      # every forward, not just the first
        with pytest.raises(MixingError, match=r"'bias' \(leading size %d\).*requires_grad_\(False\)"
                                              r".*nanobatch" % q):
            m(x)
    assert torch.equal(flat_params(m), before) and opt.steps == 0
    # the fix the message names: freezing it makes the step exact
    m.bias.weight.requires_grad_(False)
    opt.zero_grad()
    m(x).square().sum(1).sum().backward()
    opt.step()
    assert opt.steps == 1
    opt.engine.detach()
    # nanobatch mode differentiates whole examples: exact with the table trainable
    upd = step_update(base, lambda m, idx: m(x[idx]).square().sum(1).sum(), mode="nanobatch")
    assert influence(upd, B) <= C * (1 + 1e-9)
