"""Per-example losses for models whose usual loss mixes examples.

A language model's usual loss (Hugging Face's ``model(..., labels=...).loss``,
``F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)``) is the mean over
every non-padding token of the batch: each example's gradient is divided by the batch's token
count, which depends on the other examples' lengths, so clipping cannot bound one example's
influence. :func:`lm_loss` normalises each example by its own token count instead.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["lm_loss"]


def lm_loss(logits: Tensor, labels: Tensor, ignore_index: int = -100, shift: bool = True) -> Tensor:
    """Per-example language-model loss: each example's token cross-entropies summed and divided
    by that example's own number of tokens (never by the batch's).

    Args:
        logits: (B, T, V) scores.
        labels: (B, T) integer token ids; positions equal to ``ignore_index`` (padding, prompt)
            count for nothing.
        ignore_index: the label of positions without a loss.
        shift: predict the next token like Hugging Face causal LMs: position t's logits are
            scored against label t + 1 (pass the input ids as labels). False: label t.

    Returns:
        (B,) per-example losses, float32 for float16/bfloat16 logits (else the logits' dtype).
        An example with no token to predict has loss 0 (and gradient 0), not NaN. Reduce with
        ``.mean()`` or ``.sum()`` as make_private's ``loss_reduction`` says.

    Example:
        >>> logits = model(input_ids, attention_mask=mask).logits      # no labels= argument
        >>> labels = input_ids.masked_fill(mask == 0, -100)
        >>> fastclip.lm_loss(logits, labels).mean().backward()
    """
    if not isinstance(logits, Tensor) or logits.dim() != 3:
        raise ValueError(f"logits must be a (B, T, V) tensor, got "
                         f"{tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__}")
    if not isinstance(labels, Tensor) or labels.shape != logits.shape[:2]:
        raise ValueError(f"labels must be (B, T) = {tuple(logits.shape[:2])} to match the logits, got "
                         f"{tuple(labels.shape) if isinstance(labels, Tensor) else type(labels).__name__}")
    if labels.is_floating_point() or labels.is_complex():
        raise TypeError(f"labels must hold integer token ids, got {labels.dtype}")
    if shift:
        logits, labels = logits[:, :-1], labels[:, 1:]
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()   # the log-softmax over a large vocabulary in float32
    B, T, V = logits.shape
    tokens = F.cross_entropy(logits.reshape(B * T, V), labels.reshape(B * T),
                             ignore_index=ignore_index, reduction="none").view(B, T)
    counts = (labels != ignore_index).sum(1)
    # An ignored position's loss is 0 already; an example without tokens divides 0 by 1.
    return tokens.sum(1) / counts.clamp_min(1).to(tokens.dtype)
