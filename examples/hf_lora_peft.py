"""DP-SGD with LoRA adapters (peft) on a (tiny, randomly initialised) Hugging Face GPT-2.

Only the adapters' lora_A / lora_B matrices train; make_private clips and noises exactly those
(frozen parameters get no gradient, so they need no clipping and no noise).

    python examples/hf_lora_peft.py [--steps 8]
"""
import argparse

import torch
from peft import LoraConfig, get_peft_model
from torch.utils.data import DataLoader, TensorDataset
from transformers import GPT2Config, GPT2LMHeadModel

import fastclip

ap = argparse.ArgumentParser()
ap.add_argument("--steps", type=int, default=8)
args = ap.parse_args()
torch.manual_seed(0)

VOCAB, T, N = 256, 32, 256
base = GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=2, n_embd=64, vocab_size=VOCAB, n_positions=T,
                                  bos_token_id=0, eos_token_id=0))
# GPT-2's attention projection c_attn is a Conv1D (weight stored (in, out)): fan_in_fan_out.
model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                        target_modules=["c_attn"], fan_in_fan_out=True))
trainable = [p for p in model.parameters() if p.requires_grad]

ids = torch.randint(1, VOCAB, (N, T))
lengths = torch.randint(8, T + 1, (N,))
mask = (torch.arange(T) < lengths[:, None]).long()
ids = ids * mask                                   # right-padded with id 0
loader = DataLoader(TensorDataset(ids, mask), batch_size=32)

optimizer = torch.optim.AdamW(trainable, lr=1e-3)
model, optimizer, loader = fastclip.make_private(model, optimizer, loader, noise_multiplier=1.0,
                                                 max_grad_norm=1.0)
model.train()
step = 0
while step < args.steps:
    for x, m in loader:
        optimizer.zero_grad()
        # No labels= here: Hugging Face's .loss is the token mean over the whole batch, which
        # ties each example's gradient to the others' lengths; fastclip refuses it.
        logits = model(input_ids=x, attention_mask=m).logits
        loss = fastclip.lm_loss(logits, x.masked_fill(m == 0, -100)).mean()
        loss.backward()
        optimizer.step()
        step += 1
        print(f"step {step}: batch {len(x)}, loss {loss.item():.3f}")
        if step == args.steps:
            break

covered = dict(optimizer.engine.covered())         # parameter name -> the rule that clips it
assert len(covered) == len(trainable) and all("lora_" in k for k in covered), covered
print(f"DP-SGD covers {len(covered)} tensors ({sum(p.numel() for p in trainable)} parameters), "
      f"all lora_A / lora_B, rules {sorted(set(covered.values()))}")
print(f"epsilon = {optimizer.epsilon(1e-5):.2f} at delta = 1e-5 after {step} steps")
