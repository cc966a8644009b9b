"""The Hugging Face benchmark workloads (gpt2, bert) run one step of non-private and fastclip."""
import pytest
import torch

pytest.importorskip("transformers")

from fastclip import benchmark  # noqa: E402


@pytest.mark.parametrize("name", ["gpt2", "bert"])
def test_hf_workload_runs(name):
    assert name in benchmark.WORKLOADS
    results = benchmark.run_workload(name, batch_size=2, warmup=1, steps=1,
                                     device=torch.device("cpu"), memory=False)
    by = {r.method: r for r in results}
    for method in ("non-private", "fastclip"):
        assert by[method].status == "ok", by[method].error
        assert by[method].median_ms > 0
