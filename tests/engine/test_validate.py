"""fastclip.validate: the per-parameter report against an exact per-example computation."""
import torch
from torch import nn

import fastclip
from harness import CE
from models import DecoderLM, GPT2ish, lm_loss


def test_validate_transformer_reports_every_parameter(capsys):
    m = DecoderLM()
    tok = torch.randint(0, 11, (3, 6))
    before = [type(x) for x in m.modules()]
    rep = fastclip.validate(m, lm_loss, tok, tok)
    assert rep.ok, str(rep)
    names = {r["name"]: r for r in rep.rows}
    assert set(names) == {n for n, p in m.named_parameters()}
    assert names["pos"]["rule"] == "DirectRule"
    assert names["blocks.0.self_attn.in_proj_weight"]["rule"] == "AttentionRule"
    assert names["emb.weight"]["rule"] == "EmbeddingRule" or names["emb.weight"]["rule"]
    assert rep.fast_s > 0 and rep.exact_s > 0
    assert "max rel err" in capsys.readouterr().out
    assert [type(x) for x in m.modules()] == before
    assert all(p.grad is None for p in m.parameters())


def test_validate_custom_leaves_and_quiet():
    m = GPT2ish()
    rep = fastclip.validate(m, CE, torch.randint(0, 10, (2, 5)), torch.randint(0, 2, (2,)),
                            verbose=False)
    assert rep.ok
    assert {r["rule"] for r in rep.rows} >= {"OpsRule", "LinearRule"}   # Conv1D, RMSNorm: ops
    assert "parameter" in str(rep)


def test_validate_flags_a_wrong_rule(monkeypatch):
    from fastclip.layers.linear import LinearRule

    orig = LinearRule.sq_norms
    monkeypatch.setattr(LinearRule, "sq_norms", lambda self, mod, uses, method: {
        n: 2 * sq for n, sq in orig(self, mod, uses, method).items()})
    m = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    rep = fastclip.validate(m, CE, torch.randn(3, 3), torch.randint(0, 2, (3,)), verbose=False)
    assert not rep.ok and "MISMATCH" in str(rep)
    assert all(r["max_rel_err"] > 0.5 for r in rep.rows if r["name"].endswith("weight"))
