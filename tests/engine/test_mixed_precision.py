"""Mixed precision (issue 14 part 1): torch.autocast (bf16, fp16) and bf16 parameters in every
mode, flat and per-layer clipping.

Three references, each with the tolerance its rounding allows:

* ``amp_grads``: autocast's own per-example gradients (one plain-torch forward and backward per
  example under the same autocast, on the same fastclip.nn modules), widened to float64. fastclip
  forms G^T A from the very bf16 factors autocast computed with, in float32; autocast rounds each
  weight gradient entry to bf16 (its mm outputs bf16), and a batch of one may round an activation
  1 ulp differently from a batch of B. So: per-example norms within 1% and clipped sums within
  1% of their norm (bf16's unit roundoff is 2^-8 = 0.4%: a few roundings, not a systematic error).
* ``factors``: for a single Linear / Conv layer the exact float64 norm of G^T A_bf16 from autocast's
  own G and the input rounded to bf16 as autocast rounds it: within 1e-5 (float32 accumulation).
  This is what tells recording A in the op's dtype from recording the float32 input (~2^-9 off).
* ``reference.py`` (float64, the float32 model): the autocast model only approximates it, by about
  bf16's roundoff per layer: 5% of the norm for bf16, 1% for fp16 (2^-11).
"""
from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastclip
import reference
from misuse_common import flat_params, influence, private
from harness import CE, MODES

AMP = [torch.bfloat16, torch.float16]


def _ce(out, y):
    return CE(out.float(), y)   # the loss in float32, as under autocast (cross_entropy is fp32)


# -- models ------------------------------------------------------------------------------------

class Conv1D(nn.Module):
    """Hugging Face GPT-2's Conv1D: weight stored (in, out), ``addmm``; no registered rule, so
    the operation rule covers it."""

    def __init__(self, nf, nx):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.3)
        self.bias = nn.Parameter(torch.randn(nf) * 0.1)

    def forward(self, x):
        shape = x.shape[:-1] + (self.weight.shape[1],)
        return torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight).view(shape)


class Pool(nn.Module):
    def forward(self, h):
        return h.mean(1)


class Transformer(nn.Module):
    """Embedding + MultiheadAttention + LayerNorm + MLP (a TransformerEncoderLayer), time-major
    inside when ``batch_first`` is False."""

    def __init__(self, batch_first: bool, V=11, E=8):
        super().__init__()
        self.batch_first = batch_first
        self.emb = nn.Embedding(V, E)
        self.layer = nn.TransformerEncoderLayer(E, 2, dim_feedforward=12, dropout=0.0,
                                                batch_first=batch_first)
        self.head = nn.Linear(E, 3)

    def forward(self, ids):
        h = self.emb(ids)
        if not self.batch_first:
            h = self.layer(h.transpose(0, 1)).transpose(0, 1)
        else:
            h = self.layer(h)
        return self.head(h.mean(1))


class LSTMNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(4, 5)
        self.rnn = nn.LSTM(5, 6, batch_first=True)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        out, _ = self.rnn(self.inp(x))
        return self.head(out[:, -1])


class PosNet(nn.Module):
    """A learned position table used by the model itself, beside its children: the direct rule."""

    def __init__(self):
        super().__init__()
        self.pos = nn.Parameter(torch.randn(4, 6) * 0.5)
        self.inp, self.head = nn.Linear(6, 6), nn.Linear(6, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.inp(x) + self.pos).mean(1))


def _model(kind):
    """(model, input maker (B, generator) -> x)"""
    if kind == "linear":
        return (nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)),
                lambda B, g: torch.randn(B, 3, 6, generator=g).mean(1) * 2)
    if kind == "linear_seq":
        return (nn.Sequential(nn.Linear(6, 8), nn.Tanh(), Pool(), nn.Linear(8, 3)),
                lambda B, g: torch.randn(B, 4, 6, generator=g))
    if kind == "conv1d":
        return (nn.Sequential(nn.Conv1d(2, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(24, 3)),
                lambda B, g: torch.randn(B, 2, 8, generator=g))
    if kind == "conv2d":
        return (nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.Tanh(), nn.Flatten(),
                              nn.Linear(3 * 5 * 5, 3)),
                lambda B, g: torch.randn(B, 2, 5, 5, generator=g))
    if kind == "layernorm":
        return (nn.Sequential(nn.Linear(6, 6), nn.LayerNorm(6), nn.Linear(6, 3)),
                lambda B, g: torch.randn(B, 6, generator=g))
    if kind == "embedding":
        return (nn.Sequential(nn.Embedding(12, 5), nn.Flatten(), nn.Linear(15, 3)),
                lambda B, g: torch.randint(0, 12, (B, 3), generator=g))
    if kind in ("transformer", "transformer_tm"):
        return (Transformer(batch_first=kind == "transformer"),
                lambda B, g: torch.randint(0, 11, (B, 5), generator=g))
    if kind == "gpt2_conv1d":
        return (nn.Sequential(Conv1D(8, 6), nn.GELU(), Conv1D(3, 8), Pool()),
                lambda B, g: torch.randn(B, 4, 6, generator=g))
    if kind == "lstm":
        return LSTMNet(), lambda B, g: torch.randn(B, 4, 4, generator=g)
    if kind == "position":
        return PosNet(), lambda B, g: torch.randn(B, 4, 6, generator=g)
    raise ValueError(kind)


KINDS = ["linear", "linear_seq", "conv1d", "conv2d", "layernorm", "embedding", "transformer",
         "transformer_tm", "gpt2_conv1d", "lstm", "position"]


def _data(kind, B, seed=0):
    torch.manual_seed(seed)
    model, make = _model(kind)
    g = torch.Generator().manual_seed(seed + 1)
    x = make(B, g)
    y = torch.randint(0, 3, (B,), generator=g)
    return model, x, y


# -- references ----------------------------------------------------------------------------------

def amp_grads(model, x, y, dtype, amp: bool):
    """Per-example gradients {name: (B, *shape)} float64 of ``model`` (converted to fastclip.nn
    modules, as the engine runs it) computed by plain torch one example at a time, under
    autocast(dtype) when ``amp``, else in the parameters' own dtype."""
    m = fastclip.nn.convert_modules(copy.deepcopy(model))
    named = [(n, p) for n, p in m.named_parameters() if p.requires_grad]
    B = x.shape[0]
    out = {n: torch.zeros((B,) + p.shape, dtype=torch.float64) for n, p in named}
    for i in range(B):
        with torch.autocast("cpu", dtype=dtype, enabled=amp):
            loss = _ce(m(x[i:i + 1]), y[i:i + 1]).sum()
        got = torch.autograd.grad(loss, [p for _, p in named], allow_unused=True)
        for (n, _), g in zip(named, got):
            if g is not None:
                out[n][i] = g.double()
    return out


def _norms(grads, B):
    sq = torch.zeros(B, dtype=torch.float64)
    for g in grads.values():
        sq += g.reshape(B, math.prod(g.shape[1:])).square().sum(1)
    return sq.sqrt()


def _clipped(grads, B, C):
    n = _norms(grads, B)
    c = torch.where(n > C, C / n, torch.ones_like(n))
    return {k: torch.tensordot(c, v, dims=1) for k, v in grads.items()}


def _flat(d, names):
    return torch.cat([d[n].flatten() for n in names]) if names else torch.zeros(0)


def _close_rel(got, want, rtol):
    """||got - want|| <= rtol * ||want|| (+ a floor for an all-zero want)."""
    err = (got - want).norm().item()
    assert err <= rtol * want.norm().item() + 1e-6, (err, want.norm().item())


def _fastclip(model, x, y, mode, C, dtype, amp, clipping="flat"):
    """(norms (B,) float64, {name: p.grad as float64}, {name: p.grad dtype}) of one private
    backward under autocast(dtype) when ``amp``."""
    m = copy.deepcopy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torch.autocast("cpu", dtype=dtype, enabled=amp):
            norms = fastclip.per_sample_grad_norms(m, _ce, x, y, mode=mode)
        m2 = copy.deepcopy(model)
        with torch.autocast("cpu", dtype=dtype, enabled=amp):
            fastclip.clipped_grad(m2, _ce, x, y, max_grad_norm=C, mode=mode, clipping=clipping)
    grads = {n: (p.grad.double() if p.grad is not None else torch.zeros_like(p, dtype=torch.float64))
             for n, p in m2.named_parameters()}
    dtypes = {n: (p.grad.dtype if p.grad is not None else None) for n, p in m2.named_parameters()}
    return norms.double(), grads, dtypes


# -- under autocast and with bf16 parameters, every layer family and mode ----------------------

PRECISIONS = [("amp", torch.bfloat16), ("amp", torch.float16), ("params", torch.bfloat16)]


@pytest.mark.parametrize("B", [0, 1, 5])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("prec", PRECISIONS, ids=lambda p: f"{p[0]}-{str(p[1])[6:]}")
@pytest.mark.parametrize("kind", KINDS)
def test_norms_and_clipped_sum_match_autocasts_own_gradients(kind, prec, mode, B):
    how, dtype = prec
    amp = how == "amp"
    model, x, y = _data(kind, B)
    if not amp:
        model = model.to(dtype)
        x = x.to(dtype) if x.is_floating_point() else x
    names = [n for n, p in model.named_parameters()]
    ref = amp_grads(model, x, y, dtype, amp)
    want_n = _norms(ref, B)
    C = 0.5 * want_n.median().item() if B else 1.0   # about half the examples clipped
    norms, grads, dtypes = _fastclip(model, x, y, mode, C, dtype, amp)
    assert norms.shape == (B,)
    torch.testing.assert_close(norms, want_n, rtol=1e-2, atol=1e-5)
    # p.grad in the parameter's dtype: float32 parameters under autocast keep float32 gradients.
    pdt = {n: p.dtype for n, p in model.named_parameters()}
    assert all(dtypes[n] in (None, pdt[n]) for n in names), (dtypes, pdt)
    if B:
        assert all(dtypes[n] == pdt[n] for n in names), dtypes
    # Released in bf16, C is shrunk by the cast margin (5 * 2^-9, about 2%) so that rounding
    # cannot lift an example above C (ops.cast_margin): the reference clips to that bound too.
    Cm = C * (1 - fastclip.ops.cast_margin(next(model.parameters()).dtype))
    _close_rel(_flat(grads, names), _flat(_clipped(ref, B, Cm), names), 1e-2)
    if amp and B:
        # The autocast model approximates the float64 model (tests/reference.py): a few bf16
        # roundings per layer (5%), fp16's eight times finer (1%).
        rtol = 5e-2 if dtype == torch.bfloat16 else 1e-2
        ref64 = reference.per_example_grads(fastclip.nn.convert_modules(copy.deepcopy(model)),
                                            _ce, x, y)
        torch.testing.assert_close(norms, _norms(ref64, B), rtol=rtol, atol=1e-5)


def test_the_models_exercise_the_rules_they_are_named_for():
    """What the test above covers: the Conv1D leaf on the operation rule, the attention, the
    recurrent layer and the norm layer on their native rules (not the generic fallback)."""
    want = {"gpt2_conv1d": {"0.weight": "OpsRule"}, "transformer": {
        "layer.self_attn.in_proj_weight": "AttentionRule", "layer.norm1.weight": "NormRule",
        "layer.linear1.weight": "LinearRule", "emb.weight": "EmbeddingRule"},
        "transformer_tm": {"layer.self_attn.in_proj_weight": "AttentionRule"},
        "lstm": {"rnn.weight_hh_l0": "RecurrentRule"}, "conv2d": {"0.weight": "ConvRule"},
        "position": {"pos": "DirectRule"}}
    for kind, rules in want.items():
        model, x, y = _data(kind, 2)
        report = fastclip.validate(model, _ce, x, y)
        got = {r["name"]: r["rule"] for r in report.rows}
        for n, r in rules.items():
            assert got.get(n) == r, (kind, n, got)


# -- the recorded factors are the ones the op computed with -------------------------------------

@pytest.mark.parametrize("dtype", AMP)
@pytest.mark.parametrize("mode", ["auto", "ghost", "direct"])
@pytest.mark.parametrize("kind", ["linear", "conv2d", "gpt2"])
def test_single_layer_norms_are_those_of_the_bf16_input(kind, mode, dtype):
    """Under autocast the weight gradient is G^T A_bf16 (the input cast before the product);
    fastclip's norms are those of exactly that, to float32 accumulation (1e-5). Recording the
    float32 input instead is ~2^-9 off and fails here."""
    torch.manual_seed(3)
    B = 6
    if kind == "linear":
        layer, x = nn.Linear(16, 5), torch.randn(B, 7, 16)
    elif kind == "conv2d":
        layer, x = nn.Conv2d(3, 5, 3), torch.randn(B, 3, 6, 6)
    else:
        layer, x = Conv1D(5, 16), torch.randn(B, 7, 16)
    y = torch.randint(0, 5, (B,))

    def loss_fn(out, t):   # a nonlinear loss of the mean over positions
        out = out.float()
        return CE(out.flatten(2).mean(2) if kind == "conv2d" else out.mean(1), t)

    model = nn.Sequential(layer)
    with torch.autocast("cpu", dtype=dtype):
        out = copy.deepcopy(model)(x)
    out = out.detach().requires_grad_()
    (G,) = torch.autograd.grad(loss_fn(out, y).sum(), out)   # autocast's own G (out is bf16)
    assert G.dtype == dtype
    A = x.to(dtype).double()        # autocast's cast of the input, exact in float64
    G = G.double()
    if kind == "conv2d":
        U = F.unfold(A, 3)                                   # (B, 27, P)
        gw = torch.einsum("bop,bkp->bok", G.flatten(2), U)
        gb = G.flatten(2).sum(2)
    else:
        gw = torch.einsum("btp,btd->bpd", G, A)
        gb = G.sum(1)
    want = (gw.flatten(1).square().sum(1) + gb.square().sum(1)).sqrt()
    with torch.autocast("cpu", dtype=dtype):
        got = fastclip.per_sample_grad_norms(model, loss_fn, x, y, mode=mode)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=0)
    wrong = (torch.einsum("btp,btd->bpd", G, x.double()) if kind != "conv2d" else
             torch.einsum("bop,bkp->bok", G.flatten(2), F.unfold(x.double(), 3)))
    wrong = (wrong.flatten(1).square().sum(1) + gb.square().sum(1)).sqrt()
    assert (wrong - want).abs().max() > 10 * (got.double() - want).abs().max()  # it can tell


@pytest.mark.parametrize("dtype", AMP)
@pytest.mark.parametrize("kind", ["linear", "conv2d", "layernorm", "gpt2_conv1d", "transformer",
                                  "lstm"])
def test_input_gradient_is_autocasts_own(kind, dtype):
    """The captures compute the gradient reaching the layer's input as autocast's own graph does
    (its casts, its bf16 products), with the backward run outside the autocast block as
    recommended: d loss / d x with and without fastclip are equal."""
    model, x, y = _data(kind, 4)
    if kind == "transformer":   # float input: the attention's own input gradient
        model = nn.Sequential(nn.TransformerEncoderLayer(8, 2, 12, dropout=0.0, batch_first=True),
                              Pool(), nn.Linear(8, 3))
        x = torch.randn(4, 5, 8)
    m_ref = fastclip.nn.convert_modules(copy.deepcopy(model))
    xr = x.clone().requires_grad_()
    with torch.autocast("cpu", dtype=dtype):
        loss = _ce(m_ref(xr), y).sum()
    (want,) = torch.autograd.grad(loss, xr)
    m = copy.deepcopy(model)
    xf = x.clone().requires_grad_()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m, opt, _ = private(m, C=1.0)
    with torch.autocast("cpu", dtype=dtype):
        loss = _ce(m(xf), y).sum()
    loss.backward()
    assert xf.grad.dtype == x.dtype
    torch.testing.assert_close(xf.grad, want, rtol=0, atol=0)


# -- per-layer clipping ---------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["auto", "ghost", "direct"])
@pytest.mark.parametrize("dtype", AMP)
@pytest.mark.parametrize("kind", ["linear", "transformer", "lstm"])
def test_per_layer_clipping_under_autocast(kind, dtype, mode):
    model, x, y = _data(kind, 5)
    ref = amp_grads(model, x, y, dtype, True)
    B = x.shape[0]
    conv = fastclip.nn.convert_modules(copy.deepcopy(model))
    name_of = {p: n for n, p in conv.named_parameters()}
    layers = fastclip.Engine(conv, max_grad_norm=1.0, clipping="per_layer").layers
    Cs = 0.05
    Cl = Cs / math.sqrt(len(layers))   # a float bound is split evenly over the layers
    want = {}
    for layer in layers:   # each layer's per-example gradient clipped to its own bound
        want.update(_clipped({name_of[p]: ref[name_of[p]] for p in layer.params}, B, Cl))
    assert len(want) == len(ref)
    m = copy.deepcopy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torch.autocast("cpu", dtype=dtype):
            fastclip.clipped_grad(m, _ce, x, y, max_grad_norm=Cs, mode=mode, clipping="per_layer")
    names = [n for n, _ in model.named_parameters()]
    got = torch.cat([p.grad.double().flatten() for _, p in m.named_parameters()])
    n_clipped = sum(int((_norms({k: ref[name_of[p]] for p in layer.params for k in [name_of[p]]},
                                B) > Cl).sum()) for layer in layers)
    assert n_clipped > 0   # the test clips for real
    _close_rel(got, _flat(want, names), 1e-2)


# -- make_private under autocast: the step and one example's influence ---------------------------

def _step(base, x, y, mode, C, dtype, amp=True, clipping="flat"):
    """The released sum (float64) of one make_private step, noise 0, SGD lr 1, sum reduction,
    the forward under autocast(dtype): p.grad as the optimizer applied it. (Not the parameters'
    change: p - fl(p - g) in float32 carries |p| 2^-24 of rounding that is not g's; the update is
    post-processing of the released g.)"""
    m = copy.deepcopy(base)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m, opt, _ = private(m, C=C, mode=mode, clipping=clipping)
    opt.zero_grad()
    with torch.autocast("cpu", dtype=dtype, enabled=amp):
        loss = _ce(m(x), y).sum()
    loss.backward()          # outside the autocast block, as torch recommends
    before = flat_params(m)
    opt.step()
    assert all(p.dtype == q.dtype == p.grad.dtype for p, q in zip(m.parameters(), base.parameters()))
    released = torch.cat([p.grad.double().flatten() for p in m.parameters()])
    # SGD at lr 1 applied exactly that (to the parameters' rounding)
    torch.testing.assert_close(before - flat_params(m), released, rtol=0, atol=1e-2 if
                               base.parameters().__next__().dtype == torch.bfloat16 else 1e-6)
    return released


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", AMP)
@pytest.mark.parametrize("kind", ["linear", "conv2d", "transformer", "gpt2_conv1d", "lstm"])
def test_make_private_step_under_autocast(kind, dtype, mode):
    model, x, y = _data(kind, 5)
    ref = amp_grads(model, x, y, dtype, True)
    C = 0.5 * _norms(ref, 5).median().item()
    got = _step(model, x, y, mode, C, dtype)
    names = [n for n, _ in model.named_parameters()]
    _close_rel(got, _flat(_clipped(ref, 5, C), names), 1e-2)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("prec", PRECISIONS, ids=lambda p: f"{p[0]}-{str(p[1])[6:]}")
@pytest.mark.parametrize("kind", ["linear", "transformer", "lstm", "gpt2_conv1d"])
def test_one_example_influence_at_most_C(kind, prec, mode):
    """The privacy invariant by its definition: remove one example, the released sum moves by at
    most C, measured in float64 (the cast margin of the parameters' dtype covers the rounding)."""
    how, dtype = prec
    model, x, y = _data(kind, 5, seed=4)
    if how == "params":
        model = model.to(dtype)
        x = x.to(dtype) if x.is_floating_point() else x
    C = 0.05   # every example clipped: the worst case for the bound
    worst = influence(lambda idx: _step(model, x[idx], y[idx], mode, C, dtype, how == "amp"), 5)
    assert 0.5 * C < worst <= C, worst


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", AMP)
def test_lone_example_released_at_most_C(dtype, mode):
    """A lone example with a huge gradient under autocast: its released sum <= C in float64."""
    model, x, y = _data("transformer", 1, seed=5)
    C = 1e-3
    got = _step(model, x, y, mode, C, dtype).norm().item()
    assert 0.95 * C < got <= C, got


# -- the generic rule re-runs its module in the forward's autocast state -------------------------

class TanhLeaf(nn.Module):
    """No native or operation rule (tanh of the weight): the generic rule, which re-runs the
    module at finalize."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(3, 6) * 0.5)

    def forward(self, x):
        return F.linear(x, torch.tanh(self.w))


@pytest.mark.parametrize("mode", ["auto", "nanobatch"])
@pytest.mark.parametrize("dtype", AMP)
def test_generic_rule_reruns_under_the_forwards_autocast(dtype, mode):
    torch.manual_seed(6)
    model = nn.Sequential(nn.Linear(4, 6), TanhLeaf())
    x, y = torch.randn(5, 4), torch.randint(0, 3, (5,))
    ref = amp_grads(model, x, y, dtype, True)
    C = 0.5 * _norms(ref, 5).median().item()
    got = _step(model, x, y, mode, C, dtype)     # backward outside the autocast block
    names = [n for n, _ in model.named_parameters()]
    _close_rel(got, _flat(_clipped(ref, 5, C), names), 1e-2)
    if mode == "auto":
        eng = fastclip.Engine(copy.deepcopy(model), max_grad_norm=1.0)
        with torch.autocast("cpu", dtype=dtype):
            eng.model(x)
        assert dict(eng.covered())["1.w"] == "GenericRule"
        eng.detach()


@pytest.mark.parametrize("unscale_first", [False, True])
@pytest.mark.parametrize("mode", ["auto", "nanobatch"])
def test_grad_scaler_is_refused(mode, unscale_first):
    """torch.amp.GradScaler's loss scale S reaches the per-example gradients before they are
    clipped, so its unscaling would make the bound C / S: scaler.step(optimizer) is refused,
    naming GradScaler and the fix, with nothing released; a disabled scaler passes through."""
    torch.manual_seed(7)
    m = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))
    opt = torch.optim.SGD(m.parameters(), lr=1.0)
    m, opt, _ = fastclip.make_private(m, opt, None, noise_multiplier=0.0, max_grad_norm=0.01,
                                      loss_reduction="sum", mode=mode)
    x, y = torch.randn(6, 5), torch.randint(0, 3, (6,))
    before = [p.detach().clone() for p in m.parameters()]
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    opt.zero_grad()
    scaler.scale(CE(m(x), y).sum()).backward()
    if unscale_first:
        scaler.unscale_(opt)
    with pytest.raises(RuntimeError, match=r"GradScaler.*bfloat16 autocast"):
        scaler.step(opt)
    assert all(torch.equal(b, p) for b, p in zip(before, m.parameters()))   # nothing released
    assert not hasattr(opt, "found_inf") and not hasattr(opt, "grad_scale")
    # Without the scaler the same optimizer steps; a disabled scaler is no scaler.
    off = torch.amp.GradScaler("cpu", enabled=False)
    opt.zero_grad()
    off.scale(CE(m(x), y).sum()).backward()
    off.step(opt)
    off.update()
    assert not all(torch.equal(b, p) for b, p in zip(before, m.parameters()))


@pytest.mark.parametrize("prec", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("T,d,p", [(1, 7, 5), (1, 5, 7), (4, 6, 3), (3, 3, 6)])
@pytest.mark.parametrize("bias", [True, False])
def test_linear_clipped_sum_widens_its_own_half_captures(prec, T, d, p, bias):
    # The Linear rule takes bf16 / fp16 captures as recorded in its clipped sum (the engine does
    # not copy them to float32 for it): the sum must still be formed in float32, bit for bit what
    # the same kernel gives on the float32 copies (the rescaled factor widened in the rescaling).
    from fastclip.finalize import widened_module
    from fastclip.layers import Pool, Use, rule_for

    torch.manual_seed(0)
    B = 5
    lin = nn.Linear(d, p, bias=bias)
    rule = rule_for(lin)
    assert rule.widens_in_clipped
    shape = (B, d) if T == 1 else (B, T, d)
    u = Use(lin, torch.randn(*shape).to(prec))
    u.grads = (torch.randn(*shape[:-1], p).to(prec),)
    u.batch_size = B
    c = torch.rand(B, dtype=torch.float64)
    got = rule.clipped(lin, [u], c, Pool())
    with widened_module([u], {lin: rule}):
        assert u.inputs.dtype == torch.float32
        want = rule.clipped(lin, [u], c, Pool())
    assert u.inputs.dtype == prec    # the captures are left as recorded
    assert set(got) == set(want) == ({"weight", "bias"} if bias else {"weight"})
    for n in got:
        assert got[n].dtype == torch.float32, n
        assert torch.equal(got[n], want[n]), n
    # and both are the float64 clipped sum of the half-precision per-example gradients
    A, G = u.inputs.double().reshape(B, T, d), u.grads[0].double().reshape(B, T, p)
    ref_w = torch.einsum("b,btp,btd->pd", c, G, A)
    torch.testing.assert_close(got["weight"].double(), ref_w, rtol=1e-5, atol=1e-5)
    if bias:
        torch.testing.assert_close(got["bias"].double(), torch.einsum("b,btp->p", c, G),
                                   rtol=1e-5, atol=1e-5)
