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

:func:`split_batch` cuts a collated batch into physical batches; the optimizer's
:class:`fastclip.optim.BatchMemoryManager` hands logical batches out that way (it lives with the
optimizer whose logical-batch protocol it drives, so this module does not import the optimizer).
"""
from __future__ import annotations

import os
from collections import deque
from typing import Iterator, List, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import (BatchSampler, DataLoader, IterableDataset, RandomSampler, Sampler,
                              SequentialSampler, SubsetRandomSampler)
from torch.utils.data.distributed import DistributedSampler
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
        num_samples: N, the dataset size (the size of ``indices`` when given).
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
        indices: the index set to sample from (a loader's ``SubsetRandomSampler``): batch
            positions ``p`` of ``range(num_samples)`` are drawn as above (sharded by position in
            a distributed run) and ``indices[p]`` is yielded. None: ``range(num_samples)``.

    An epoch is batches ``[k * num_batches, (k + 1) * num_batches)`` of the run: after a resume
    (or a ``break``) in the middle of an epoch, the next iteration yields the rest of that epoch.
    """

    def __init__(self, num_samples: int, sample_rate: float, num_batches: Optional[int] = None,
                 generator: Optional[torch.Generator] = None, secure: bool = False, *,
                 rank: int = 0, world_size: int = 1, indices: Optional[Sequence[int]] = None):
        if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size <= 0:
            raise ValueError(f"world_size must be an integer > 0, got {world_size}")
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
            raise ValueError(f"rank must be an integer in [0, {world_size}), got {rank}")
        self.rank, self.world_size = rank, world_size
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples <= 0:
            raise ValueError(f"num_samples must be an integer > 0, got {num_samples}")
        if indices is not None:
            indices = torch.as_tensor(indices, dtype=torch.long).flatten()
            if len(indices) != num_samples:
                raise ValueError(f"indices has {len(indices)} entries, num_samples is {num_samples}")
        self.indices = indices
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
        # (generator state before it or None in secure mode, its size) of each drawn batch not
        # yet handed out: the states make checkpoints exact under prefetching; the sizes are
        # what the optimizer checks a step's examples against.
        self._pending = deque()
        self._tracked = False      # a PoissonDataLoader reports consumption; else drawn = consumed
        # Sizes of the batches handed to the loop since the optimizer's last step (tracked only).
        self._handed: List[int] = []
        self._iteration = 0        # bumped by each new iteration and each load_state_dict

    def __len__(self) -> int:
        return self.num_batches

    @property
    def tracked(self) -> bool:
        """Whether a :class:`PoissonDataLoader` reports which batches the loop received (only
        then are :attr:`handed_sizes` kept)."""
        return self._tracked

    @property
    def handed_sizes(self) -> List[int]:
        """Sizes of the batches handed to the loop since :meth:`clear_handed` (a copy)."""
        return list(self._handed)

    def clear_handed(self) -> None:
        """Forget the batches handed out so far: the optimizer released their step."""
        self._handed.clear()

    def __iter__(self) -> Iterator[List[int]]:
        # Batches drawn ahead (worker prefetch) by an abandoned iteration are drawn again.
        if self._pending:
            if self.generator is not None:
                self.generator.set_state(self._pending[0][0])
            self._pending.clear()
        self._iteration += 1
        start = self.consumed
        return self._batches(self.num_batches - start % self.num_batches)

    def _batches(self, count: int) -> Iterator[List[int]]:
        for _ in range(count):
            r, w = self.rank, self.world_size
            state = None
            if self.secure:
                mask = _urandom_mask(len(range(r, self.num_samples, w)), self.sample_rate)
            else:
                if self._tracked:
                    state = self.generator.get_state()
                mask = (torch.rand(self.num_samples, generator=self.generator) < self.sample_rate)[r::w]
            positions = mask.nonzero().flatten() * w + r
            batch = (positions if self.indices is None else self.indices[positions]).tolist()
            if self._tracked:
                self._pending.append((state, len(batch)))
            else:
                self.consumed += 1
            yield batch

    def _mark_consumed(self) -> None:
        """The loop received the oldest drawn batch: count it, and remember its size for the
        optimizer's check of the next step."""
        if not self._pending:
            raise RuntimeError("fastclip: the private loader handed out a batch its sampler has no "
                               "record of (the sampler's state was changed while an iteration was "
                               "running); start a new iteration over the loader")
        _, size = self._pending.popleft()
        self._handed.append(size)
        self.consumed += 1

    def state_dict(self) -> dict:
        """Sampling position and generator state (before the first batch not yet handed out)."""
        gen = None
        if self.generator is not None:
            gen = (self._pending[0][0] if self._pending else self.generator.get_state()).clone()
        return {"consumed": self.consumed, "generator": gen, "sample_rate": self.sample_rate,
                "num_samples": self.num_samples, "num_batches": self.num_batches}

    def check_state_dict(self, state_dict: dict) -> None:
        """Raise ValueError if :meth:`load_state_dict` would refuse ``state_dict``; changes
        nothing (so a caller can validate every part of a checkpoint before applying any)."""
        if not isinstance(state_dict, dict) or "consumed" not in state_dict:
            raise ValueError(f"not a sampler state dict (no 'consumed' entry): {state_dict!r:.200}")
        for key in ("sample_rate", "num_samples"):
            if key in state_dict and state_dict[key] != getattr(self, key):
                raise ValueError(f"the checkpoint's sampler has {key}={state_dict[key]}, this one "
                                 f"{getattr(self, key)}: resume with the same dataset and batch size")
        consumed = state_dict["consumed"]
        if isinstance(consumed, bool) or not isinstance(consumed, int) or consumed < 0:
            raise ValueError(f"consumed must be an integer >= 0, got {consumed}")
        gen = state_dict.get("generator")
        if self.generator is not None and gen is not None:
            _check_generator_state(gen, "the sampler's")

    def load_state_dict(self, state_dict: dict) -> None:
        self.check_state_dict(state_dict)
        self._pending.clear()
        self._handed.clear()        # a checkpoint is taken between steps
        self._iteration += 1        # a running iteration's prefetched batches are not these
        if self.generator is not None and state_dict.get("generator") is not None:
            self.generator.set_state(state_dict["generator"])
        self.consumed = state_dict["consumed"]


def _check_generator_state(state, what: str) -> None:
    """ValueError unless ``state`` is a state a CPU torch.Generator accepts (tried on a scratch
    generator, so nothing else changes)."""
    try:
        torch.Generator().set_state(state)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"{what} generator state in the checkpoint is not valid: {e}") from None


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
        it = super().__iter__()          # the sampler's __iter__ runs here: a new iteration number
        mine = sampler._iteration
        for batch in it:
            if sampler._iteration != mine:
                # Another iteration (or a load_state_dict) started meanwhile: this iteration's
                # prefetched batches no longer match the sampler's records of drawn batches.
                raise RuntimeError("fastclip: this iteration over the private loader was superseded "
                                   "by a newer one (or by load_state_dict); use one iteration of the "
                                   "loader at a time")
            sampler._mark_consumed()
            yield batch

    def state_dict(self) -> dict:
        return self.batch_sampler.state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        self.batch_sampler.load_state_dict(state_dict)


class _EmptySafeCollate:
    """Wraps a collate function so an empty batch gives batch-size-0 tensors shaped like a real one."""

    def __init__(self, dataset, collate_fn, first: int = 0):
        self.dataset, self.collate_fn, self.first = dataset, collate_fn, first

    def __call__(self, batch):
        if len(batch) > 0:
            return self.collate_fn(batch)
        one = self.collate_fn([self.dataset[self.first]])
        return _take_none(one)


def _take_none(x):
    if isinstance(x, torch.Tensor):
        return x[:0]
    if isinstance(x, (list, tuple)):
        return type(x)(_take_none(v) for v in x)
    if isinstance(x, dict):
        return {k: _take_none(v) for k, v in x.items()}
    return x


_FIX = ("select the examples with torch.utils.data.Subset(dataset, indices) or a "
        "SubsetRandomSampler(indices), or pass poisson_sampling=False and sample and account "
        "yourself (epsilon is then not computed)")


def _source_indices(loader: DataLoader, n: int) -> Optional[torch.Tensor]:
    """The index set the loader's own sampler draws from, which Poisson sampling then samples:
    None for the whole dataset (the default Sequential/RandomSampler, a DistributedSampler, which
    fastclip's per-rank sharding replaces), the indices of a ``SubsetRandomSampler``.

    Raises:
        ValueError: a sampler whose distribution Poisson sampling over an index set cannot
            stand for (weights, replacement, a number of samples other than the dataset's, a
            custom sampler or batch sampler, no batching): replacing it would silently train on
            other examples than the user chose, and account for sampling that did not happen.
    """
    batch_sampler = loader.batch_sampler
    if batch_sampler is None:
        raise ValueError("fastclip: the loader has batch_size=None (no batching); Poisson sampling "
                         "replaces the loader's batches by drawn ones: give the loader a batch_size "
                         "(the expected batch size; the sampling rate is 1/len(loader))")
    if type(batch_sampler) is not BatchSampler:
        raise ValueError(f"fastclip: the loader has its own batch_sampler "
                         f"({type(batch_sampler).__name__}); Poisson sampling (poisson_sampling="
                         "True) would replace it by independent draws over the whole dataset, "
                         "training on examples it may never yield and accounting for sampling it "
                         f"does not do. Use a plain DataLoader(dataset, batch_size=...): {_FIX}")
    sampler = batch_sampler.sampler
    kind = type(sampler)
    if kind is SubsetRandomSampler:
        try:
            idx = torch.as_tensor(list(sampler.indices), dtype=torch.long).flatten()
        except (TypeError, ValueError, RuntimeError) as e:
            raise ValueError(f"fastclip: the SubsetRandomSampler's indices are not integers: {e}") from None
        if len(idx) == 0:
            raise ValueError("fastclip: the loader's SubsetRandomSampler has no indices")
        bad = idx[(idx < 0) | (idx >= n)]
        if len(bad):
            raise ValueError(f"fastclip: the SubsetRandomSampler holds indices outside the dataset "
                             f"of {n} examples: {bad[:5].tolist()}")
        if len(torch.unique(idx)) != len(idx):
            raise ValueError(f"fastclip: the SubsetRandomSampler repeats indices "
                             f"({len(idx) - len(torch.unique(idx))} repeats among {len(idx)}); "
                             "Poisson sampling draws each example at most once per batch, so a "
                             f"repeated example cannot be sampled twice as often: {_FIX}")
        return idx
    if kind in (SequentialSampler, RandomSampler):
        source = sampler.data_source
        size = len(source)
        if size != n:
            raise ValueError(f"fastclip: the loader's {kind.__name__} runs over {size} examples, "
                             f"its dataset has {n}: {_FIX}")
        if kind is RandomSampler and (sampler.replacement or sampler.num_samples != n):
            raise ValueError(f"fastclip: the loader's RandomSampler draws "
                             f"{'with replacement' if sampler.replacement else 'without replacement'}"
                             f" num_samples={sampler.num_samples} of {n} examples; Poisson "
                             "sampling draws each example independently at rate 1/len(loader) and "
                             f"cannot stand for that distribution: {_FIX}")
        return None
    if kind is DistributedSampler:
        # make_private's distributed sharding replaces it (disjoint shards of the whole dataset).
        return None
    what = ("weighted sampling" if kind.__name__ == "WeightedRandomSampler"
            else "its own sampling distribution")
    raise ValueError(f"fastclip: the loader samples with its own {kind.__name__} ({what}); Poisson "
                     "sampling (poisson_sampling=True) draws every example of the index set "
                     "independently at rate 1/len(loader) and would silently replace it (examples "
                     "it never yields trained on, the accountant counting sampling that did not "
                     f"happen): {_FIX}")


def poisson_source(loader: DataLoader):
    """(N, batches per epoch) of a loader Poisson sampling can replace: N is the size of the
    index set sampled (the dataset, or a ``SubsetRandomSampler``'s indices); the sampling rate is
    1 / batches per epoch.

    Raises:
        TypeError: ``loader`` is not a DataLoader.
        ValueError: the dataset is iterable-style or has no length, or is empty; the loader's
            sampler cannot be replaced by Poisson sampling (see :func:`poisson_loader`).
    """
    n, num_batches, _ = _poisson_source(loader)
    return n, num_batches


def _poisson_source(loader: DataLoader):
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
    indices = _source_indices(loader, n)
    return (n if indices is None else len(indices)), num_batches, indices


def poisson_loader(loader: DataLoader, generator: Optional[torch.Generator] = None,
                   secure: bool = False, *, rank: int = 0, world_size: int = 1) -> PoissonDataLoader:
    """A DataLoader over ``loader``'s dataset with Poisson sampling at rate 1/len(loader).

    Poisson sampling draws from the index set the loader's own sampler draws from: the whole
    dataset for the default samplers (``shuffle=False/True``, a ``DistributedSampler``), the
    indices of a ``SubsetRandomSampler`` (N is then their number). Samplers with another
    distribution (``WeightedRandomSampler``, ``RandomSampler`` with replacement or
    ``num_samples``, a custom sampler or ``batch_sampler``) are refused: replacing them would
    train on examples the user left out and account for sampling that did not happen.

    The expected batch size is ``N / len(loader)`` (``loader.batch_size`` up to rounding) and an
    epoch has ``len(loader)`` batches. Workers, collate function and pin_memory are kept.

    Args:
        loader: a DataLoader over a map-style dataset (indexable, with a length).
        generator: torch.Generator for the sampling; see :class:`PoissonBatchSampler`.
        secure: sample from ``os.urandom`` (see :func:`fastclip.make_private`'s ``secure_mode``).
        rank, world_size: this process's shard of a distributed run (see
            :class:`PoissonBatchSampler`; a subset is sharded by position in it); the sample rate
            stays global, ``1/len(loader)``.

    Raises:
        TypeError: ``loader`` is not a DataLoader.
        ValueError: the dataset is iterable-style or has no length, or is empty; the loader's
            sampler is one Poisson sampling cannot stand for (the message names the fix).
    """
    n, num_batches, indices = _poisson_source(loader)
    dataset = loader.dataset
    sampler = PoissonBatchSampler(n, 1.0 / num_batches, num_batches, generator, secure,
                                  rank=rank, world_size=world_size, indices=indices)
    kwargs = {}
    if loader.num_workers > 0:
        kwargs = dict(prefetch_factor=loader.prefetch_factor, persistent_workers=loader.persistent_workers,
                      multiprocessing_context=loader.multiprocessing_context, timeout=loader.timeout)
    first = 0 if indices is None else int(indices[0])     # shapes an empty batch (no data leaves)
    return PoissonDataLoader(dataset, batch_sampler=sampler, num_workers=loader.num_workers,
                             collate_fn=_EmptySafeCollate(dataset, loader.collate_fn or default_collate,
                                                          first),
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
