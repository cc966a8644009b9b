"""``fastclip.fix``: make a model trainable with per-example clipping by replacing the modules
that mix the examples of a batch (Opacus users know it as ``ModuleValidator.fix``)."""
from __future__ import annotations

import math
from typing import List, Tuple

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

# GroupNorm's usual group count (Wu & He); fewer where the channels do not divide by it.
_GROUPS = 32


def fix(model: nn.Module) -> List[Tuple[str, nn.Module, nn.Module]]:
    """Replace every BatchNorm of ``model`` (in place) by a GroupNorm over the same channels.

    BatchNorm normalises with the statistics of the batch, so in training mode no per-example
    gradient exists; GroupNorm normalises each example on its own. Each BatchNorm over C
    channels becomes ``nn.GroupNorm(gcd(32, C), C, eps=bn.eps, affine=bn.affine)`` holding the
    BatchNorm's own weight and bias Parameter objects (an optimizer over them keeps working; their
    ``requires_grad`` is kept). The running statistics are dropped. Call it before
    ``make_private`` and before creating the optimizer if the model is new. A BatchNorm you would
    rather keep frozen in eval mode (fine-tuning a pretrained CNN) needs no fix: fastclip accepts
    BatchNorm in eval mode as it is.

    Args:
        model: the model, changed in place.

    Returns:
        [(qualified name, the BatchNorm removed, the GroupNorm put in its place)], in module order;
        empty if the model had no BatchNorm.

    Raises:
        TypeError: ``model`` is not an nn.Module, or is itself a BatchNorm (it cannot replace
            itself in place: build ``nn.GroupNorm`` instead).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"fix() takes an nn.Module, got {type(model).__name__}")
    if isinstance(model, _BatchNorm):
        raise TypeError(f"fix() replaces BatchNorm modules inside a model; the model itself is a "
                        f"{type(model).__name__}: use nn.GroupNorm({math.gcd(_GROUPS, model.num_features)}, "
                        f"{model.num_features}) instead")
    changes = []
    for path, parent in list(model.named_modules()):
        for name, child in list(parent._modules.items()):
            if not isinstance(child, _BatchNorm):
                continue
            C = child.num_features
            gn = nn.GroupNorm(math.gcd(_GROUPS, C), C, eps=child.eps, affine=child.affine)
            if child.affine:
                gn.weight, gn.bias = child.weight, child.bias   # the same Parameters, not copies
            gn.train(child.training)
            parent._modules[name] = gn
            changes.append((f"{path}.{name}" if path else name, child, gn))
    return changes
