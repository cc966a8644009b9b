"""The non-CPU path (the same algorithms in torch ops, fastclip/ops.py's ``*_torch``) on a CUDA
device, against tests/reference.py on the CPU. Skipped where no CUDA device exists (CI); run on
a GPU machine with ``pytest tests/ops/test_cuda.py``."""
import copy

import pytest
import torch
from torch import nn

import fastclip
import reference as R
from conftest import tol
from harness import CE, MODES

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


class LM(nn.Module):
    """Tied embedding, LSTM, attention, LayerNorm: most rules in one model."""

    def __init__(self, V=17, d=8):
        super().__init__()
        self.emb = nn.Embedding(V, d)
        self.rnn = nn.LSTM(d, d, batch_first=True)
        self.attn = nn.MultiheadAttention(d, 2, batch_first=True)
        self.norm = nn.LayerNorm(d)
        self.out = nn.Linear(d, V)
        self.out.weight = self.emb.weight

    def forward(self, tok):
        h, _ = self.rnn(self.emb(tok))
        a, _ = self.attn(h, h, h, need_weights=False)
        return self.out(self.norm(h + a)).mean(1)


def models():
    return {
        "mlp": (lambda: nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 5)),
                lambda B: torch.randn(B, 6)),
        "cnn": (lambda: nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.GroupNorm(2, 4), nn.ReLU(),
                                      nn.Flatten(), nn.Linear(4 * 5 * 5, 5)),
                lambda B: torch.randn(B, 3, 5, 5)),
        "lm": (lambda: LM(), lambda B: torch.randint(0, 17, (B, 7))),
    }


@pytest.mark.parametrize("name", ["mlp", "cnn", "lm"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_norms_and_clipped_sums_on_cuda(name, mode, dtype):
    build, inputs = models()[name]
    torch.manual_seed(0)
    model = build().double()
    B = 5
    x, y = inputs(B), torch.randint(0, 5, (B,))
    if x.is_floating_point():
        x = x.double()
    ref_n, ref = R.norms(model, CE, x, y), R.clipped_sum(model, CE, x, y, 0.5)
    gpu = copy.deepcopy(model).to("cuda", dtype)
    xg = x.to("cuda", dtype) if x.is_floating_point() else x.cuda()
    n = fastclip.per_sample_grad_norms(gpu, CE, xg, y.cuda(), mode=mode)
    assert n.device.type == "cuda"
    rtol, atol = tol(dtype)
    torch.testing.assert_close(n.double().cpu(), ref_n, rtol=rtol * 10, atol=atol * 10)
    fastclip.clipped_grad(gpu, CE, xg, y.cuda(), 0.5, mode=mode)
    for k, p in gpu.named_parameters():
        torch.testing.assert_close(p.grad.double().cpu(), ref[k], rtol=rtol * 10, atol=atol * 10)


@pytest.mark.parametrize("mode", MODES)
def test_make_private_step_on_cuda(mode):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 5)).double()
    before = copy.deepcopy(model)
    x, y = torch.randn(4, 6, dtype=torch.float64), torch.randint(0, 5, (4,))
    ref = R.clipped_sum(before, CE, x, y, 0.3)
    gpu = model.cuda()
    opt = torch.optim.SGD(gpu.parameters(), lr=1.0)
    gpu, opt, _ = fastclip.make_private(gpu, opt, None, noise_multiplier=0.0, max_grad_norm=0.3,
                                        mode=mode)
    opt.zero_grad()
    CE(gpu(x.cuda()), y.cuda()).mean().backward()
    opt.step()
    for (k, p), q in zip(gpu.named_parameters(), before.parameters()):
        torch.testing.assert_close((p.detach().cpu() - q.detach()), -ref[k] / 4)
    # noise lands on the device too
    opt.noise_multiplier = 1.0
    opt.zero_grad()
    CE(gpu(x.cuda()), y.cuda()).mean().backward()
    opt.step()
    assert all(p.device.type == "cuda" and torch.isfinite(p).all() for p in gpu.parameters())


@pytest.mark.parametrize("name", ["mlp", "cnn", "lm"])
@pytest.mark.parametrize("mode", MODES)
def test_per_layer_on_cuda_equals_cpu(name, mode):
    """Per-layer clipping on the device equals the CPU's (tested against the reference in
    tests/engine/test_per_layer.py)."""
    build, inputs = models()[name]
    torch.manual_seed(0)
    cpu = build().double()
    x, y = inputs(6), torch.randint(0, 5, (6,))
    if x.is_floating_point():
        x = x.double()
    gpu = copy.deepcopy(cpu).cuda()
    fastclip.clipped_grad(cpu, CE, x, y, 0.4, mode="auto", clipping="per_layer")
    fastclip.clipped_grad(gpu, CE, x.cuda(), y.cuda(), 0.4, mode=mode, clipping="per_layer")
    for (k, p), q in zip(gpu.named_parameters(), cpu.parameters()):
        torch.testing.assert_close(p.grad.cpu(), q.grad, rtol=1e-9, atol=1e-11, msg=k)
