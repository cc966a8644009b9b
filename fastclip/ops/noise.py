"""Gaussian noise: the fused in-place ``x = (x + std * z) * scale`` of every noised step.

Mirrors csrc/noise.h and src/bind_noise.cpp (a counter-based Philox stream: the values depend on
the seed and the position only); other tensors draw from a seeded torch generator.
Used by fastclip/optim.py.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from ._common import _C, _native


def add_gaussian_noise_(x: Tensor, std: float, scale: float = 1.0, seed: int = 0) -> Tensor:
    """In place: ``x = (x + std * z) * scale`` with ``z ~ N(0, I)``, one fused pass.

    CPU float32/float64 contiguous tensors use the core's counter-based (Philox4x32-10) stream:
    the values depend only on ``seed`` and the position, not on the thread count. Other tensors
    draw from a torch generator seeded with ``seed``.

    Args:
        x: the tensor to perturb (e.g. a clipped gradient sum), any shape.
        std: noise standard deviation >= 0.
        scale: multiplier applied after the noise (e.g. 1 / batch size).
        seed: 64-bit seed of the noise stream.

    Returns:
        x
    """
    seed = int(seed) % (1 << 64)
    if _native(x) and x.is_contiguous() and not x.requires_grad:
        # The binding checks std and scale (and the array: C-contiguous, writeable, aligned).
        _C.add_gaussian_noise(x.numpy(), float(std), float(scale), seed, torch.get_num_threads())
        return x
    if not isinstance(x, Tensor) or not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got "
                        f"{x.dtype if isinstance(x, Tensor) else type(x).__name__}")
    std, scale = float(std), float(scale)
    if not (std >= 0 and math.isfinite(std)) or not math.isfinite(scale):
        raise ValueError(f"std must be finite and >= 0 and scale finite, got std={std}, scale={scale}")
    with torch.no_grad():
        if std > 0:
            gen = torch.Generator(device=x.device).manual_seed(seed % (1 << 63))
            x.add_(torch.randn(x.shape, generator=gen, device=x.device, dtype=x.dtype), alpha=std)
        if scale != 1.0:
            x.mul_(scale)
    return x

