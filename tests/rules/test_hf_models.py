"""Tiny Hugging Face models (built from configs, no weights) against tests/reference.py: every
parameter on a native rule (GPT-2's Conv1D and Llama/T5's RMSNorm through the operation rule), the
norms and clipped sums exact in every mode."""
from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from torch import nn

transformers = pytest.importorskip("transformers")

import fastclip  # noqa: E402
import reference as R  # noqa: E402
from conftest import DTYPES  # noqa: E402
from harness import check  # noqa: E402

V = 64


def lm_loss(out, tok):
    """Per-example summed next-token loss, (B,)."""
    logits = out.logits[:, :-1]
    return F.cross_entropy(logits.reshape(-1, V), tok[:, 1:].reshape(-1),
                           reduction="none").view(tok.shape[0], -1).sum(1)


def cls_loss(out, y):
    return F.cross_entropy(out.logits, y, reduction="none")


class Seq2Seq(nn.Module):
    """T5 called positionally: (source ids, decoder ids)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, src, tgt):
        return self.model(input_ids=src, decoder_input_ids=tgt)


def seq2seq_loss(out, tgt):
    return F.cross_entropy(out.logits.reshape(-1, V), tgt.reshape(-1),
                           reduction="none").view(tgt.shape[0], -1).sum(1)


def gpt2():
    cfg = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=V, n_positions=32,
                                  attn_implementation="eager")
    return transformers.GPT2LMHeadModel(cfg)


def bert():
    cfg = transformers.BertConfig(num_hidden_layers=2, num_attention_heads=2, hidden_size=32,
                                  intermediate_size=64, vocab_size=V, max_position_embeddings=32,
                                  num_labels=3, attn_implementation="eager")
    return transformers.BertForSequenceClassification(cfg)


def llama():
    cfg = transformers.LlamaConfig(num_hidden_layers=2, num_attention_heads=2,
                                   num_key_value_heads=1, hidden_size=32, intermediate_size=64,
                                   vocab_size=V, max_position_embeddings=32,
                                   attn_implementation="eager")
    return transformers.LlamaForCausalLM(cfg)


def t5(freeze_bias=True):
    cfg = transformers.T5Config(num_layers=2, num_decoder_layers=2, num_heads=2, d_model=32,
                                d_kv=16, d_ff=64, vocab_size=V, relative_attention_num_buckets=8,
                                attn_implementation="eager")
    m = Seq2Seq(transformers.T5ForConditionalGeneration(cfg))
    if freeze_bias:
        for n, p in m.named_parameters():
            if "relative_attention_bias" in n:
                p.requires_grad_(False)
    return m


def data(kind, B):
    tok = torch.randint(0, V, (B, 7))
    if kind == "cls":
        return (tok,), torch.randint(0, 3, (B,)), cls_loss
    if kind == "t5":
        tgt = torch.randint(0, V, (B, 4))
        return (tok, tgt), tgt, seq2seq_loss
    return (tok,), tok, lm_loss


MODELS = {"gpt2": (gpt2, "lm"), "bert": (bert, "cls"), "llama": (llama, "lm"), "t5": (t5, "t5")}


def rules(model, inputs):
    e = fastclip.Engine(model)
    try:
        model(*inputs)
        return dict(e.covered())
    finally:
        e.detach()


@pytest.mark.parametrize("name", list(MODELS))
def test_no_parameter_on_the_generic_rule(name):
    make, kind = MODELS[name]
    model = make().double().eval()
    inputs, _, _ = data(kind, 2)
    got = rules(model, inputs)
    trainable = {k for k, p in model.named_parameters() if p.requires_grad}
    assert set(got) == trainable
    assert not {k for k, r in got.items() if r in ("GenericRule", "DirectRule")}, Counter(got.values())
    if name in ("gpt2", "llama", "t5"):
        assert "OpsRule" in got.values()     # Conv1D / RMSNorm / T5LayerNorm
    if name == "gpt2":
        assert got["transformer.h.0.attn.c_attn.weight"] == "OpsRule"
        assert got["transformer.h.0.mlp.c_fc.bias"] == "OpsRule"


@pytest.mark.parametrize("name", list(MODELS))
def test_exact_in_every_mode_float64(name):
    make, kind = MODELS[name]
    inputs, y, loss = data(kind, 3)
    check(make().eval(), inputs, y, loss=loss, dtype=torch.float64, cast=True)


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("B", [0, 1, 3])
@pytest.mark.parametrize("dtype", DTYPES)
def test_exact_batch_sizes_and_dtypes(name, B, dtype):
    make, kind = MODELS[name]
    inputs, y, loss = data(kind, B)
    model = make()
    if B == 0:
        try:
            model.eval()(*inputs)
        except RuntimeError as e:    # GPT-2's attention reshapes with -1: ambiguous at B = 0
            pytest.skip(f"{name} itself cannot run an empty batch: {str(e)[:80]}")
    check(model.eval(), inputs, y, loss=loss, modes=("auto", "nanobatch"), dtype=dtype, cast=True)


def test_t5_relative_attention_bias_is_refused_by_name_and_exact_in_nanobatch():
    """The bias table is looked up on (query, key) position buckets, without the batch, and its
    output broadcast over the batch later: no per-example gradient at the leaf."""
    model = t5(freeze_bias=False).double().eval()
    inputs, y, loss = data("t5", 3)
    # Refused by the first-step audit (the ids keep their leading size for one example alone),
    # so also when that size happens to equal B; the rule's own check is the fallback.
    with pytest.raises(ValueError, match=r"relative_attention_bias' \(leading size 7\).*"
                                         r"requires_grad_\(False\).*nanobatch"):
        fastclip.per_sample_grad_norms(model, loss, inputs, y)
    with pytest.raises(ValueError, match=r"relative_attention_bias' \(Embedding\) got ids of "
                                         r"shape \(7, 7\).*not the batch size 3.*nanobatch"):
        fastclip.per_sample_grad_norms(model, loss, inputs, y, audit=False)
    n = fastclip.per_sample_grad_norms(model, loss, inputs, y, mode="nanobatch")
    torch.testing.assert_close(n, R.norms(model, loss, inputs, y), rtol=1e-10, atol=1e-12)


def test_make_private_gpt2_step_is_the_clipped_mean():
    import copy
    model = gpt2().double().eval()
    ref_model = copy.deepcopy(model)
    (tok,), y, loss = data("lm", 3)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    pm, popt, _ = fastclip.make_private(model, opt, None, noise_multiplier=0.0, max_grad_norm=0.5,
                                        poisson_sampling=False)
    before = {k: p.detach().clone() for k, p in pm.named_parameters()}
    popt.zero_grad()
    loss(pm(tok), y).mean().backward()
    popt.step()
    ref = R.clipped_sum(ref_model, loss, (tok,), y, 0.5)
    for k, p in pm.named_parameters():
        torch.testing.assert_close(before[k] - p.detach(), ref[k] / 3, rtol=1e-10, atol=1e-12)


def test_peft_lora_llama():
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(llama(), peft.LoraConfig(r=2, lora_alpha=4, lora_dropout=0.0,
                                                         target_modules=["q_proj", "v_proj"]))
    inputs, y, loss = data("lm", 3)
    got = rules(model.double().eval(), inputs)
    assert got and set(got.values()) == {"LinearRule"}      # only lora_A / lora_B train
    check(model.eval(), inputs, y, loss=loss, dtype=torch.float64, cast=True)
