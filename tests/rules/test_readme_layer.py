"""The README's "your own layer" example runs as written: a rule registered with one
``per_example`` kernel (its norms and clipped sums the defaults) passes ``fastclip.validate``."""
import os
import re

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
