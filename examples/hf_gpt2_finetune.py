"""Full fine-tuning of a (tiny, randomly initialised) Hugging Face GPT-2 with DP-SGD.

Synthetic token sequences of different lengths, right-padded, with an attention mask; Poisson
sampling through the private DataLoader; per-example LM loss with fastclip.lm_loss.

    python examples/hf_gpt2_finetune.py [--steps 8]
"""
import argparse

import torch
from torch.utils.data import DataLoader, TensorDataset
from transformers import GPT2Config, GPT2LMHeadModel

import fastclip

ap = argparse.ArgumentParser()
ap.add_argument("--steps", type=int, default=8)
args = ap.parse_args()
torch.manual_seed(0)

# A tiny config built in code (no download); a real run loads GPT2LMHeadModel.from_pretrained.
VOCAB, T, N = 256, 32, 256
model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=2, n_embd=64, vocab_size=VOCAB, n_positions=T,
                                   bos_token_id=0, eos_token_id=0))

# Sequences of 8..T tokens, right-padded with token 0 and masked out.
ids = torch.randint(1, VOCAB, (N, T))
lengths = torch.randint(8, T + 1, (N,))
mask = (torch.arange(T) < lengths[:, None]).long()
ids = ids * mask
loader = DataLoader(TensorDataset(ids, mask), batch_size=32)   # expected batch 32 after make_private

optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
model, optimizer, loader = fastclip.make_private(model, optimizer, loader, noise_multiplier=1.0,
                                                 max_grad_norm=1.0)   # Poisson sampling: q = 1/8
model.train()
step = 0
while step < args.steps:
    for x, m in loader:
        optimizer.zero_grad()
        # No labels= here: with labels, Hugging Face returns .loss, the token mean over the whole
        # batch, so one example's gradient depends on the others' lengths; fastclip refuses it.
        logits = model(x, attention_mask=m).logits
        labels = x.masked_fill(m == 0, -100)             # padding predicts nothing
        loss = fastclip.lm_loss(logits, labels).mean()   # each example over its own token count
        loss.backward()                                  # clipped per example in this backward
        optimizer.step()                                 # noise, then AdamW
        step += 1
        print(f"step {step}: batch {len(x)}, loss {loss.item():.3f}")
        if step == args.steps:
            break
print(f"epsilon = {optimizer.epsilon(1e-5):.2f} at delta = 1e-5 after {step} steps")
