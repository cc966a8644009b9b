"""DP-SGD fine-tuning of a (tiny, randomly initialised) Hugging Face BERT sequence classifier.

Synthetic padded token sequences with an attention mask; the label is whether token 1 occurs
in the sequence, so the loss can fall. Per-example cross-entropy on the model's logits.

    python examples/hf_bert_classifier.py [--steps 8]
"""
import argparse

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from transformers import BertConfig, BertForSequenceClassification

import fastclip

ap = argparse.ArgumentParser()
ap.add_argument("--steps", type=int, default=8)
args = ap.parse_args()
torch.manual_seed(0)

# A tiny config built in code (no download); a real run loads a pretrained checkpoint.
VOCAB, T, N = 256, 32, 256
model = BertForSequenceClassification(BertConfig(
    num_hidden_layers=2, num_attention_heads=2, hidden_size=64, intermediate_size=128,
    vocab_size=VOCAB, max_position_embeddings=T, num_labels=2))

ids = torch.randint(2, VOCAB, (N, T))
lengths = torch.randint(8, T + 1, (N,))
mask = (torch.arange(T) < lengths[:, None]).long()
y = torch.randint(0, 2, (N,))
ids[y == 1, 3] = 1                    # class 1: token 1 appears
ids = ids * mask                      # padding id 0
loader = DataLoader(TensorDataset(ids, mask, y), batch_size=32)

loss_fn = nn.CrossEntropyLoss(reduction="none")   # one loss per example, shape (B,)
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
model, optimizer, loader = fastclip.make_private(model, optimizer, loader, noise_multiplier=1.0,
                                                 max_grad_norm=1.0)   # Poisson sampling: q = 1/8
model.train()
step = 0
while step < args.steps:
    for x, m, target in loader:
        optimizer.zero_grad()
        # No labels= here: Hugging Face's .loss is already averaged over the batch, and
        # fastclip refuses a loss it cannot split into one term per example.
        loss = loss_fn(model(x, attention_mask=m).logits, target).mean()
        loss.backward()          # clipped per example in this backward
        optimizer.step()         # noise, then AdamW
        step += 1
        print(f"step {step}: batch {len(x)}, loss {loss.item():.3f}")
        if step == args.steps:
            break
print(f"epsilon = {optimizer.epsilon(1e-5):.2f} at delta = 1e-5 after {step} steps")
