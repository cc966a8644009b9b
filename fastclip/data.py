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

:class:`BatchMemoryManager` hands each batch (a logical batch) out as physical batches of a
bounded size, with one optimizer step per logical batch, for logical batches larger than memory.
"""
from __future__ import annotations

import os
import weakref
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


def _batch_size(batch) -> int:
    """Dim-0 size shared by every tensor of a collated batch (nested tuples, lists, dicts)."""
    sizes = []

    def visit(x):
        if isinstance(x, torch.Tensor):
            if x.dim() == 0:
                raise ValueError("a batch tensor has no batch dimension (a 0-d tensor); every "
                                 "tensor of a batch must be batch-first to be split")
            sizes.append(x.shape[0])
        elif isinstance(x, (list, tuple)):
            for v in x:
                visit(v)
        elif isinstance(x, dict):
            for v in x.values():
                visit(v)

    visit(batch)
    if not sizes:
        raise ValueError(f"a batch of {type(batch).__name__} holds no tensor to split into "
                         "physical batches")
    if len(set(sizes)) != 1:
        raise ValueError(f"the tensors of a batch have different batch sizes {sorted(set(sizes))}; "
                         "every tensor must be batch-first with the same batch size to be split")
    return sizes[0]


def _narrow(x, start: int, length: int):
    """``x`` with every tensor narrowed to rows [start, start + length) along dim 0 (views)."""
    if isinstance(x, torch.Tensor):
        return x.narrow(0, start, length)
    if isinstance(x, tuple) and hasattr(x, "_fields"):          # namedtuple
        return type(x)(*(_narrow(v, start, length) for v in x))
    if isinstance(x, (list, tuple)):
        return type(x)(_narrow(v, start, length) for v in x)
    if isinstance(x, dict):
        return type(x)((k, _narrow(v, start, length)) for k, v in x.items())
    return x


def split_batch(batch, max_physical_batch_size: int) -> List:
    """Split a collated batch into physical batches of at most ``max_physical_batch_size``
    examples: every tensor (in nested tuples, lists, dicts) is cut along dim 0 into consecutive
    views; anything else (strings, numbers, None) goes to every physical batch unchanged.

    An empty batch (batch size 0, as Poisson sampling draws) gives ``[batch]``: one empty
    physical batch, so the training loop still takes its (noise-only) step. Otherwise no
    physical batch is empty.

    Raises:
        ValueError: no tensor in the batch, a 0-d tensor, or tensors with different sizes on dim 0.
    """
    B = _batch_size(batch)
    if B == 0:
        return [batch]
    M = max_physical_batch_size
    return [_narrow(batch, s, min(M, B - s)) for s in range(0, B, M)]


class BatchMemoryManager:
    """Logical batches larger than memory: each batch of ``data_loader`` (one *logical* batch,
    e.g. a Poisson batch of :func:`fastclip.make_private`'s loader) is handed out as
    *physical* batches of at most ``max_physical_batch_size`` examples, with one optimizer step
    per logical batch::

        model, optimizer, loader = fastclip.make_private(model, optimizer, loader, ...)
        with BatchMemoryManager(loader, max_physical_batch_size=64, optimizer=optimizer) as batches:
            for x, y in batches:
                optimizer.zero_grad()
                loss_fn(model(x), y).mean().backward()
                optimizer.step()

    Before each physical batch the manager tells the :class:`fastclip.DPOptimizer` whether it
    is the last of its logical batch. On every other one, ``optimizer.step()`` does nothing but
    run its closure, and ``optimizer.zero_grad()`` does nothing once the logical batch has begun,
    so the engine's clipped sums add up in ``p.grad`` over the physical batches. At the last one,
    ``step()`` is a full DP-SGD step on the whole logical batch: the clipped sums all-reduced
    across ranks (distributed runs), noise of std ``noise_multiplier * sensitivity`` added once,
    "mean" divided by the optimizer's ``expected_batch_size`` (the expected *logical* batch
    size), one step accounted. The update equals the unsplit batch's up to floating-point
    rounding, and epsilon is unchanged. Each physical backward's "mean" is over the physical
    batch (the engine rescales by the examples of each backward).

    An empty logical batch (Poisson sampling draws 0 examples with probability (1-q)^N) is
    handed out as one empty physical batch, so the loop still calls ``step()`` and releases the
    noise-only step the privacy analysis assumes. No other physical batch is empty.

    Normal behaviour (one step per ``step()`` call) comes back when the iteration ends: at the
    end of the loader, on ``break`` or an exception out of the loop (the iteration is closed), or
    on leaving the ``with`` block. A logical batch left unfinished then is discarded: its partial
    clipped sums are zeroed, never released. Checkpoints (``optimizer.state_dict()``, the
    sampler's state) count logical batches; save them after the step that ends a logical batch
    (``optimizer.skips_step`` is False) and a resumed run continues exactly.

    Args:
        data_loader: any iterable of collated batches (tensors batch-first, possibly nested in
            tuples, lists and dicts), typically the loader :func:`fastclip.make_private` returns.
        max_physical_batch_size: the most examples in one physical batch, an integer >= 1.
        optimizer: the :class:`fastclip.DPOptimizer` stepped once per logical batch.

    Raises:
        TypeError: ``optimizer`` is not a DPOptimizer, or ``data_loader`` is not iterable.
        ValueError: ``max_physical_batch_size`` is not an integer >= 1.
    """

    def __init__(self, data_loader, max_physical_batch_size: int, optimizer):
        from .optim import DPOptimizer      # optim imports this module
        if not isinstance(optimizer, DPOptimizer):
            raise TypeError(f"optimizer must be the fastclip.DPOptimizer that make_private returns, "
                            f"got {type(optimizer).__name__}")
        if (isinstance(max_physical_batch_size, bool) or not isinstance(max_physical_batch_size, int)
                or max_physical_batch_size < 1):
            raise ValueError(f"max_physical_batch_size must be an integer >= 1, "
                             f"got {max_physical_batch_size!r}")
        if not hasattr(data_loader, "__iter__"):
            raise TypeError(f"data_loader must be an iterable of batches (a DataLoader), "
                            f"got {type(data_loader).__name__}")
        self.data_loader = data_loader
        self.max_physical_batch_size = max_physical_batch_size
        self.optimizer = optimizer
        self._iteration = None

    def __enter__(self) -> "BatchMemoryManager":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """End the current iteration (if any): the optimizer steps on every call again."""
        ref, self._iteration = self._iteration, None
        it = ref() if ref is not None else None
        if it is not None:
            it.close()

    def __iter__(self):
        self.close()
        it = self._physical_batches()
        # A weak reference: a loop left by ``break`` drops the last reference to its iteration,
        # which closes it (and restores the optimizer) at once.
        self._iteration = weakref.ref(it)
        return it

    def _physical_batches(self):
        opt, token = self.optimizer, object()
        try:
            for batch in self.data_loader:
                parts = split_batch(batch, self.max_physical_batch_size)
                for i, part in enumerate(parts):
                    opt._set_physical_batch(token, last=i == len(parts) - 1)
                    yield part
        finally:
            opt._end_logical_batches(token)
