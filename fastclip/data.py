"""Poisson-sampled data loading: every example joins each batch independently with probability q.

Batch sizes vary and may be 0; an empty batch still yields tensors of the right trailing shapes
(batch dimension 0), so the training loop runs unchanged (Poisson sampling is what the privacy
analysis of DP-SGD assumes).

Sampling is reproducible from a seeded ``torch.Generator`` and checkpointable: the sampler knows
how many batches the training loop has received (batches prefetched by workers but never handed
out do not count) and the generator state before the first batch not yet received, so a run
resumed from :meth:`PoissonBatchSampler.state_dict` draws exactly the batches the uninterrupted
run would have drawn. With ``secure=True`` the draws come from ``os.urandom`` instead (not
reproducible, not predictable).
"""
from __future__ import annotations

import os
from collections import deque
from typing import Iterator, List, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, Sampler
from torch.utils.data.dataloader import default_collate

from .accounting import check_sample_rate


def _urandom_mask(n: int, q: float) -> torch.Tensor:
    """(n,) bool, each True with probability q, from the OS's cryptographic random source.

    53-bit uniforms compared with q: the probability is q rounded to 2^-53, exactly.
    """
    if n == 0:
        return torch.zeros(0, dtype=torch.bool)
    u = np.frombuffer(os.urandom(8 * n), dtype=np.uint64) >> np.uint64(11)
    threshold = np.uint64(min(round(q * (1 << 53)), 1 << 53))
    return torch.from_numpy(u < threshold)


class PoissonBatchSampler(Sampler[List[int]]):
    """Yields ``num_batches`` batches per epoch; each index is in a batch with probability
    ``sample_rate``, independently of every other index and batch.

    Args:
        num_samples: N, the dataset size.
        sample_rate: q in (0, 1].
        num_batches: batches per epoch (default 1/q rounded, one epoch in expectation).
        generator: torch.Generator for reproducible sampling; None seeds a private one from
            torch's default generator (so ``torch.manual_seed`` makes runs reproducible).
        secure: draw from ``os.urandom`` instead of a generator (``generator`` must be None).
        rank, world_size: distributed sampling (:mod:`fastclip.distributed`): this process yields
            only the sampled indices ``i`` with ``i % world_size == rank`` (disjoint shards whose
            union is the whole dataset), each still with probability ``sample_rate``, so the
            union of the ranks' batches is one Poisson batch of the whole dataset. With the same
            generator state on every rank it is exactly the batch a single process would draw
            (each rank draws the full mask, N uniforms, and keeps its shard); in secure mode
            each rank draws ``os.urandom`` for its own shard only.

    An epoch is batches ``[k * num_batches, (k + 1) * num_batches)`` of the run: after a resume
    (or a ``break``) in the middle of an epoch, the next iteration yields the rest of that epoch.
    """

    def __init__(self, num_samples: int, sample_rate: float, num_batches: Optional[int] = None,
                 generator: Optional[torch.Generator] = None, secure: bool = False, *,
                 rank: int = 0, world_size: int = 1):
        if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size <= 0:
            raise ValueError(f"world_size must be an integer > 0, got {world_size}")
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
            raise ValueError(f"rank must be an integer in [0, {world_size}), got {rank}")
        self.rank, self.world_size = rank, world_size
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples <= 0:
            raise ValueError(f"num_samples must be an integer > 0, got {num_samples}")
        self.sample_rate = check_sample_rate(sample_rate)
        if num_batches is None:
            num_batches = max(1, round(1 / self.sample_rate))
        if isinstance(num_batches, bool) or not isinstance(num_batches, int) or num_batches <= 0:
            raise ValueError(f"num_batches must be an integer > 0, got {num_batches}")
        if secure and generator is not None:
            raise ValueError("secure sampling draws from os.urandom; do not pass a generator")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
        self.num_samples = num_samples
        self.num_batches = num_batches
        self.secure = bool(secure)
        if generator is None and not secure:
            seed = int(torch.randint(0, 2**62, (1,)).item())
            generator = torch.Generator().manual_seed(seed)
        self.generator = generator
        self.consumed = 0          # batches handed to the training loop so far (whole run)
        self._pending = deque()    # generator state before each drawn, not yet handed-out batch
        self._tracked = False      # a PoissonDataLoader reports consumption; else drawn = consumed

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[List[int]]:
        # Batches drawn ahead (worker prefetch) by an abandoned iteration are drawn again.
        if self._pending:
            if self.generator is not None:
                self.generator.set_state(self._pending[0])
            self._pending.clear()
        start = self.consumed
        return self._batches(self.num_batches - start % self.num_batches)

    def _batches(self, count: int) -> Iterator[List[int]]:
        for _ in range(count):
            r, w = self.rank, self.world_size
            if self.secure:
                mask = _urandom_mask(len(range(r, self.num_samples, w)), self.sample_rate)
            else:
                if self._tracked:
                    self._pending.append(self.generator.get_state())
                mask = (torch.rand(self.num_samples, generator=self.generator) < self.sample_rate)[r::w]
            if not self._tracked:
                self.consumed += 1
            yield (mask.nonzero().flatten() * w + r).tolist()

    def _mark_consumed(self) -> None:
        if self._pending:
            self._pending.popleft()
        self.consumed += 1

    def state_dict(self) -> dict:
        """Sampling position and generator state (before the first batch not yet handed out)."""
        gen = None
        if self.generator is not None:
            gen = (self._pending[0] if self._pending else self.generator.get_state()).clone()
        return {"consumed": self.consumed, "generator": gen, "sample_rate": self.sample_rate,
                "num_samples": self.num_samples, "num_batches": self.num_batches}

    def load_state_dict(self, state_dict: dict) -> None:
        for key in ("sample_rate", "num_samples"):
            if key in state_dict and state_dict[key] != getattr(self, key):
                raise ValueError(f"the checkpoint's sampler has {key}={state_dict[key]}, this one "
                                 f"{getattr(self, key)}: resume with the same dataset and batch size")
        consumed = state_dict["consumed"]
        if isinstance(consumed, bool) or not isinstance(consumed, int) or consumed < 0:
            raise ValueError(f"consumed must be an integer >= 0, got {consumed}")
        self._pending.clear()
        if self.generator is not None and state_dict.get("generator") is not None:
            self.generator.set_state(state_dict["generator"])
        self.consumed = consumed


class PoissonDataLoader(DataLoader):
    """A DataLoader over a :class:`PoissonBatchSampler` that tells the sampler which batches the
    training loop actually received, so checkpoints are exact even with prefetching workers."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if not isinstance(self.batch_sampler, PoissonBatchSampler):
            raise TypeError("PoissonDataLoader needs batch_sampler=PoissonBatchSampler(...)")
        self.batch_sampler._tracked = True
        self.batch_sampler._pending.clear()

    def __iter__(self):
        sampler = self.batch_sampler
        for batch in super().__iter__():
            sampler._mark_consumed()
            yield batch

    def state_dict(self) -> dict:
        return self.batch_sampler.state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        self.batch_sampler.load_state_dict(state_dict)


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


def poisson_source(loader: DataLoader):
    """(dataset size N, batches per epoch) of a loader Poisson sampling can replace; the
    sampling rate is 1 / batches per epoch.

    Raises:
        TypeError: ``loader`` is not a DataLoader.
        ValueError: the dataset is iterable-style or has no length, or is empty.
    """
    if not isinstance(loader, DataLoader):
        raise TypeError(f"loader must be a torch DataLoader, got {type(loader).__name__}")
    dataset = loader.dataset
    if isinstance(dataset, IterableDataset):
        raise ValueError(f"Poisson sampling needs a map-style dataset (indexable, with a length), got "
                         f"the IterableDataset {type(dataset).__name__}; pass poisson_sampling=False "
                         "and sample yourself (epsilon is then not computed)")
    try:
        n, num_batches = len(dataset), len(loader)
    except TypeError:
        raise ValueError(f"Poisson sampling needs a dataset with a length (a map-style dataset); "
                         f"{type(dataset).__name__} has none") from None
    if n == 0:
        raise ValueError("the loader's dataset is empty")
    return n, num_batches


def poisson_loader(loader: DataLoader, generator: Optional[torch.Generator] = None,
                   secure: bool = False, *, rank: int = 0, world_size: int = 1) -> PoissonDataLoader:
    """A DataLoader over ``loader``'s dataset with Poisson sampling at rate 1/len(loader).

    The expected batch size is ``len(dataset) / len(loader)`` (``loader.batch_size`` up to
    rounding) and an epoch has ``len(loader)`` batches. Workers, collate function and pin_memory
    are kept.

    Args:
        loader: a DataLoader over a map-style dataset (indexable, with a length).
        generator: torch.Generator for the sampling; see :class:`PoissonBatchSampler`.
        secure: sample from ``os.urandom`` (see :func:`fastclip.make_private`'s ``secure_mode``).
        rank, world_size: this process's shard of a distributed run (see
            :class:`PoissonBatchSampler`); the sample rate stays global, ``1/len(loader)``.

    Raises:
        TypeError: ``loader`` is not a DataLoader.
        ValueError: the dataset is iterable-style or has no length, or is empty.
    """
    n, num_batches = poisson_source(loader)
    dataset = loader.dataset
    sampler = PoissonBatchSampler(n, 1.0 / num_batches, num_batches, generator, secure,
                                  rank=rank, world_size=world_size)
    kwargs = {}
    if loader.num_workers > 0:
        kwargs = dict(prefetch_factor=loader.prefetch_factor, persistent_workers=loader.persistent_workers,
                      multiprocessing_context=loader.multiprocessing_context, timeout=loader.timeout)
    return PoissonDataLoader(dataset, batch_sampler=sampler, num_workers=loader.num_workers,
                             collate_fn=_EmptySafeCollate(dataset, loader.collate_fn or default_collate),
                             pin_memory=loader.pin_memory, worker_init_fn=loader.worker_init_fn,
                             generator=loader.generator, **kwargs)
