"""Poisson-sampled data loading: every example joins each batch independently with probability q.

Batch sizes vary and may be 0; an empty batch still yields tensors of the right trailing shapes
(batch dimension 0), so the training loop runs unchanged (Poisson sampling is what the privacy
analysis of DP-SGD assumes).
"""
from __future__ import annotations

from typing import Iterator, List, Optional

import torch
from torch.utils.data import DataLoader, Sampler
from torch.utils.data.dataloader import default_collate


class PoissonBatchSampler(Sampler[List[int]]):
    """Yields ``num_batches`` batches; each index is in a batch with probability ``sample_rate``.

    Args:
        num_samples: N, the dataset size.
        sample_rate: q in (0, 1].
        num_batches: batches per epoch (default 1/q rounded, one epoch in expectation).
        generator: torch.Generator for reproducible sampling.
    """

    def __init__(self, num_samples: int, sample_rate: float, num_batches: Optional[int] = None,
                 generator: Optional[torch.Generator] = None):
        if num_samples <= 0:
            raise ValueError(f"num_samples must be > 0, got {num_samples}")
        if not (0 < sample_rate <= 1):
            raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
        self.num_samples = num_samples
        self.sample_rate = float(sample_rate)
        self.num_batches = num_batches if num_batches is not None else max(1, round(1 / sample_rate))
        self.generator = generator

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[List[int]]:
        for _ in range(self.num_batches):
            mask = torch.rand(self.num_samples, generator=self.generator) < self.sample_rate
            yield mask.nonzero().flatten().tolist()


class _EmptySafeCollate:
    """Wraps a collate function so an empty batch gives batch-size-0 tensors shaped like a real one."""

    def __init__(self, dataset, collate_fn):
        self.dataset, self.collate_fn = dataset, collate_fn

    def __call__(self, batch):
        if len(batch) > 0:
            return self.collate_fn(batch)
        one = self.collate_fn([self.dataset[0]])
        return _take_none(one)


def _take_none(x):
    if isinstance(x, torch.Tensor):
        return x[:0]
    if isinstance(x, (list, tuple)):
        return type(x)(_take_none(v) for v in x)
    if isinstance(x, dict):
        return {k: _take_none(v) for k, v in x.items()}
    return x


def poisson_loader(loader: DataLoader, generator: Optional[torch.Generator] = None) -> DataLoader:
    """A DataLoader over ``loader``'s dataset with Poisson sampling at rate 1/len(loader).

    The expected batch size equals ``loader.batch_size`` (up to rounding) and an epoch has
    ``len(loader)`` batches. Workers, collate function and pin_memory are kept.
    """
    if not isinstance(loader, DataLoader):
        raise TypeError(f"loader must be a torch DataLoader, got {type(loader).__name__}")
    try:
        n, num_batches = len(loader.dataset), len(loader)
    except TypeError:
        raise ValueError("Poisson sampling needs a dataset with a length (a map-style dataset)") from None
    if n == 0:
        raise ValueError("the loader's dataset is empty")
    sampler = PoissonBatchSampler(n, 1.0 / num_batches, num_batches, generator)
    return DataLoader(loader.dataset, batch_sampler=sampler, num_workers=loader.num_workers,
                      collate_fn=_EmptySafeCollate(loader.dataset, loader.collate_fn or default_collate),
                      pin_memory=loader.pin_memory, worker_init_fn=loader.worker_init_fn,
                      persistent_workers=loader.persistent_workers if loader.num_workers > 0 else False)
