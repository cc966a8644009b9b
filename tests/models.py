"""Small test models shared by several test files (one definition each)."""
import torch
import torch.nn.functional as F
from torch import nn


class CalledTwice(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(6, 6)
        self.out = nn.Linear(6, 3)

    def forward(self, x):
        return self.out(self.a(torch.tanh(self.a(x))))


class Doubler(nn.Module):
    """A leaf without a native rule (the generic rule's cached per-example gradients)."""

    def __init__(self, d):
        super().__init__()
        self.w = nn.Parameter(torch.ones(d))

    def forward(self, x):
        return x * self.w


class DecoderLM(nn.Module):
    """Decoder-only LM: tied embeddings, learned positions as a Parameter of the model itself,
    causal mask, pre-LayerNorm blocks; per-example loss = mean token cross-entropy."""

    def __init__(self, vocab=11, d=8, heads=2, T=6, layers=2):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.randn(T, d) * 0.1)
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(d, heads, 16, dropout=0.0, activation="gelu",
                                       batch_first=True, norm_first=True) for _ in range(layers))
        self.norm = nn.LayerNorm(d)
        self.out = nn.Linear(d, vocab, bias=False)
        self.out.weight = self.emb.weight

    def forward(self, tok):
        T = tok.shape[1]
        h = self.emb(tok) + self.pos[:T]
        mask = nn.Transformer.generate_square_subsequent_mask(T, dtype=h.dtype)
        for blk in self.blocks:
            h = blk(h, src_mask=mask, is_causal=True)
        return self.out(self.norm(h))


def lm_loss(logits, tok):
    return F.cross_entropy(logits[:, :-1].transpose(1, 2), tok[:, 1:], reduction="none").mean(1)


class Conv1D(nn.Module):
    """GPT-2's linear layer: weight stored (in, out), y = x W + b."""

    def __init__(self, nf, nx):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.2)
        self.bias = nn.Parameter(torch.zeros(nf))

    def forward(self, x):
        return torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight).view(
            x.shape[:-1] + (self.weight.shape[1],))


class RMSNorm(nn.Module):
    def __init__(self, d, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d) + 0.1 * torch.randn(d))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class Rotary(nn.Module):
    """Rotary position embedding: no parameters, cos/sin tables as buffers."""

    def __init__(self, d, T=16):
        super().__init__()
        inv = 1.0 / (10000 ** (torch.arange(0, d, 2).double() / d))
        ang = torch.arange(T).double()[:, None] * inv[None]
        self.register_buffer("cos", ang.cos(), persistent=False)
        self.register_buffer("sin", ang.sin(), persistent=False)

    def forward(self, x):
        T = x.shape[1]
        x1, x2 = x[..., ::2], x[..., 1::2]
        c, s = self.cos[:T].to(x.dtype), self.sin[:T].to(x.dtype)
        return torch.stack([x1 * c - x2 * s, x1 * s + x2 * c], -1).flatten(-2)


class GPT2ish(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 8)
        self.norm = RMSNorm(8)
        self.rot = Rotary(8)
        self.c_attn = Conv1D(24, 8)
        self.c_proj = Conv1D(8, 8)
        self.head = nn.Linear(8, 2)

    def forward(self, tok):
        h = self.norm(self.emb(tok))
        q, k, v = self.c_attn(h).split(8, -1)
        q, k = self.rot(q), self.rot(k)
        a = F.scaled_dot_product_attention(q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1),
                                           is_causal=True).squeeze(1)
        return self.head(self.c_proj(a).mean(1))


class AddmmConv1D(nn.Module):
    """GPT-2's Conv1D as transformers writes it, arguments (in, out): weight (in, out), a random
    bias, y = addmm(b, x.view(-1, in), W).view(..., out) (the operation rule)."""

    def __init__(self, nx, nf):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.3)
        self.bias = nn.Parameter(torch.randn(nf) * 0.1)

    def forward(self, x):
        size_out = x.size()[:-1] + (self.weight.shape[1],)
        return torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight).view(size_out)


class Attn(nn.Module):
    """MultiheadAttention(8, 2) called twice (self-attention: the fused q/k/v block; or, not
    self-attention, once with kdim / vdim: q, k, v blocks of their own), with a Linear head."""

    def __init__(self, self_attn=True, **opts):
        super().__init__()
        self.self_attn = self_attn
        self.mha = nn.MultiheadAttention(8, 2, batch_first=True, **opts)
        self.kproj = nn.Linear(8, opts.get("kdim", 8))
        self.vproj = nn.Linear(8, opts.get("vdim", 8))
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        if self.self_attn:
            h, _ = self.mha(x, x, x)
            h, _ = self.mha(h, h, h)   # a second call: uses stacked
        else:
            h, _ = self.mha(x, self.kproj(x), self.vproj(x))
        return self.head(torch.tanh(h).mean(1))
