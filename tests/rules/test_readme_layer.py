"""The README's "your own layer" example runs as written: a rule registered with one
``per_example`` kernel (its norms and clipped sums the defaults) passes ``fastclip.validate``."""
import os
import re

import pytest
import torch

import fastclip
from fastclip.layers import _RULES

README = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "README.md")


def _snippet() -> str:
    text = open(README, encoding="utf-8").read()
    start = text.index("A fast rule for your own layer")
    code = re.search(r"```python\n(.*?)```", text[start:], re.S)
    assert code, "the README's own-layer example lost its code block"
    return code.group(1)


def test_readme_own_layer_example_runs_and_is_exact():
    ns = {"__name__": "readme_own_layer"}
    try:
        exec(compile(_snippet(), "README.md (own layer)", "exec"), ns)
        model, loss, x, y = ns["model"], ns["loss"], ns["x"], ns["y"]
        report = fastclip.validate(model, loss, x, y)
        assert report.ok, str(report)
        assert {r["rule"] for r in report.rows} == {"Conv1DRule"}
        # The clipped sum too, against the float64 per-example reference.
        import reference as R
        m = model.double()
        xd = x.double()
        fastclip.clipped_grad(m, loss, xd, y, max_grad_norm=0.05)
        got = {n: p.grad.clone() for n, p in m.named_parameters()}
        ref = R.clipped_sum(m, loss, xd, y, 0.05)
        for n, g in got.items():
            torch.testing.assert_close(g, ref[n], rtol=1e-9, atol=1e-11)
    finally:
        _RULES.pop(ns.get("Conv1D"), None)   # the example's class, registered by the snippet


class _Twice(torch.nn.Module):
    """The example's layer called twice (one layer, two uses), beside a native Linear."""

    def __init__(self, Conv1D):
        super().__init__()
        self.a = Conv1D(6, 6)
        self.out = torch.nn.Linear(6, 3)

    def forward(self, x):
        return self.out(self.a(torch.tanh(self.a(x))).mean(1))


@pytest.mark.parametrize("clipping", ["flat", "per_layer"])
def test_output_tap_rule_layer_called_twice(clipping, monkeypatch):
    """OutputTapRule (the README's rule): a layer called twice is one per-example gradient, the
    sum over both calls (the kernel sees both uses at once), exact against the float64
    reference in every mode, with per-layer clipping (the uses made by engine.new_use: the layer
    clipped in the backward once its last use is recorded) as with flat clipping."""
    from harness import CE, MODES, check
    ns = {"__name__": "readme_own_layer"}
    try:
        exec(compile(_snippet(), "README.md (own layer)", "exec"), ns)
        rule = _RULES[ns["Conv1D"]]
        seen = []
        kernel = type(rule).per_example
        monkeypatch.setattr(type(rule), "per_example",
                            lambda self, m, uses: seen.append(len(uses)) or kernel(self, m, uses))
        torch.manual_seed(0)
        m = _Twice(ns["Conv1D"]).double()
        x, y = torch.randn(5, 4, 6, dtype=torch.float64), torch.randint(0, 3, (5,))
        C = 0.05 if clipping == "flat" else [0.03, 1e6]
        check(m, x, y, loss=CE, modes=MODES, clipping=clipping, C=C)
        assert seen and set(seen) == {2}
    finally:
        _RULES.pop(ns.get("Conv1D"), None)
