"""Multi-process DP-SGD on ``torch.distributed`` (one process per device or CPU socket, torchrun).

In every process, after ``torch.distributed.init_process_group``, the usual call works::

    model, optimizer, loader = fastclip.make_private(model, optimizer, loader,
                                                     noise_multiplier=1.1, max_grad_norm=1.0)
    for x, y in loader:                       # this rank's share of one global Poisson batch
        optimizer.zero_grad()
        loss_fn(model(x), y).mean().backward()   # this rank's clipped sum, in the backward
        optimizer.step()                      # all-reduce, noise once, identical step everywhere

``make_private(..., distributed=None)`` turns this on when a process group is initialised with
more than one process (``True`` forces it, also for one process; ``False`` keeps every process
on its own). What changes:

* Sampling: the Poisson loader of rank r yields the sampled indices ``i`` with
  ``i % world_size == r``. Every example is in the global batch with probability
  ``q = 1 / len(loader)`` (the sample rate stays global, so the accountant is the single-process
  one and epsilon is the same on every rank). With the same sampling seed on every rank (agreed
  by :func:`make_private`), the union of the ranks' batches is exactly the batch one process would
  draw. Give each rank either the loader one process would use, or one with a
  ``DistributedSampler`` as for DDP: ``len(loader)`` (batches per epoch) fixes q, and the global
  expected batch size is ``len(dataset) * q``.
* Gradients: each rank's engine writes the clipped sum of its own examples into ``p.grad``
  during the backward (unchanged); :meth:`DPOptimizer.step` all-reduces (SUM) these sums in a few
  flat buckets (one per ``bucket_cap_mb`` of parameters of one dtype and device, launched
  asynchronously together), then checks them, adds the noise and scales. The reduction runs in
  ``step`` rather than during the backward: the engine writes every clipped sum in one callback
  at the very end of the backward, so there is almost nothing left to overlap with, and reducing
  at the step keeps gradient accumulation over several backward calls correct.
* Noise: added once, after the all-reduce, on every rank, from the same seed: each step's seed
  is drawn on every rank as in one process and rank 0's is broadcast. Why after and not on
  rank 0 before: the reduced clipped sum is bitwise identical on every rank, so the finiteness
  check (which refuses a NaN example before any noise is drawn) decides the same way everywhere
  without another collective; the noise is a counter-based stream that depends only on the seed
  and the position, so every rank adds the same bits and the parameters stay identical; and the
  noise never enters the reduction, whose rounding then matches one process on the union batch.
* Scaling (``loss_reduction="mean"``): by the global expected batch size, ``len(dataset) * q``
  (= world_size * per-rank expected size); without a sample rate, by the global number of
  examples seen (all-reduced with the gradients).

DistributedDataParallel: do NOT wrap the model in DDP; :func:`make_private` refuses a DDP model.
DDP all-reduces the per-process sums of *unclipped* gradients from its own autograd hooks; here
the optimizer all-reduces the *clipped* sums instead, which is all DDP would do besides
(parameters start identical when every rank builds the model from the same seed, or broadcast
them with :func:`broadcast_parameters`; they then stay identical, every rank taking the same
step).
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

try:
    import torch.distributed as dist
except ImportError:      # pragma: no cover - torch built without distributed
    dist = None

DEFAULT_BUCKET_CAP_MB = 25.0


def is_initialized() -> bool:
    """True when a default process group is initialised in this process."""
    return dist is not None and dist.is_available() and dist.is_initialized()


def resolve(distributed: Optional[bool]) -> Optional[Tuple[int, int]]:
    """(rank, world_size) when the run is distributed, else None.

    Args:
        distributed: None: distributed when a process group is initialised with more than one
            process. True: distributed (a process group must be initialised). False: not.

    Raises:
        ValueError: ``distributed=True`` without an initialised process group, or not a bool.
    """
    if distributed is not None and not isinstance(distributed, bool):
        raise ValueError(f"distributed must be True, False or None (auto), got {distributed!r}")
    if distributed is False:
        return None
    if not is_initialized():
        if distributed:
            raise ValueError("distributed=True needs torch.distributed.init_process_group(...) to "
                             "have been called in this process first")
        return None
    rank, world = dist.get_rank(), dist.get_world_size()
    if distributed is None and world == 1:
        return None
    return rank, world


def agree_seed(seed: int, src: int = 0) -> int:
    """Rank ``src``'s value of ``seed`` (an integer in [0, 2^64)) on every rank."""
    seed = int(seed) % (1 << 64)
    signed = seed - (1 << 64) if seed >= 1 << 63 else seed     # int64 two's complement
    t = torch.tensor([signed], dtype=torch.int64, device=_comm_device())
    dist.broadcast(t, src)
    return int(t.item()) % (1 << 64)


def any_rank(flag: bool) -> bool:
    """True on every rank if ``flag`` is True on any rank (one small all-reduce): a check that
    refuses on one rank must refuse on all, or the others would wait in the next collective."""
    t = torch.tensor([int(bool(flag))], dtype=torch.int64, device=_comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def broadcast_parameters(model: nn.Module, src: int = 0) -> None:
    """Copy rank ``src``'s parameters and buffers to every rank (what DDP does at construction)."""
    with torch.no_grad():
        for t in list(model.parameters()) + list(model.buffers()):
            dist.broadcast(t.data, src)


def _comm_device() -> torch.device:
    # NCCL only moves CUDA tensors; gloo and the others take CPU ones.
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


class GradReducer:
    """All-reduces (SUM) the clipped gradient sums of a :class:`fastclip.DPOptimizer`'s
    parameters across the processes of the default group, in flat buckets.

    Args:
        bucket_cap_mb: the most megabytes (2^20 bytes) of gradients in one bucket; a parameter
            larger than that gets a bucket of its own.

    After :meth:`reduce`, on every rank: ``p.grad`` is the sum over ranks of the clipped sums
    (bitwise identical everywhere), or None for a parameter no rank has a gradient for (as one
    process would leave it); ``engine.examples`` is the global number of examples.
    """

    def __init__(self, bucket_cap_mb: float = DEFAULT_BUCKET_CAP_MB):
        bucket_cap_mb = float(bucket_cap_mb)
        if not bucket_cap_mb > 0:
            raise ValueError(f"bucket_cap_mb must be > 0, got {bucket_cap_mb}")
        self.bucket_cap_mb = bucket_cap_mb
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()

    def buckets(self, params: List[nn.Parameter]) -> List[List[nn.Parameter]]:
        """Parameters grouped by (dtype, device), in order, cut at ``bucket_cap_mb``."""
        cap = self.bucket_cap_mb * (1 << 20)
        open_: Dict[Tuple, List] = {}
        out: List[List[nn.Parameter]] = []
        for p in params:
            key = (p.dtype, p.device)
            b = open_.get(key)
            if b is None or (b[1] > 0 and b[1] + p.numel() * p.element_size() > cap):
                b = open_[key] = [[], 0]
                out.append(b[0])
            b[0].append(p)
            b[1] += p.numel() * p.element_size()
        return out

    @torch.no_grad()
    def reduce(self, params: List[nn.Parameter], engine) -> None:
        """Sum ``p.grad`` over ranks for every parameter in ``params`` (the same list, in the same
        order, on every rank), and ``engine.examples`` with them."""
        if not params:
            return
        meta_device = _comm_device()
        # Which parameters have a gradient on this rank, and the examples seen: one int64 sum.
        meta = torch.tensor([p.grad is not None for p in params] + [int(engine.examples)],
                            dtype=torch.int64, device=meta_device)
        work = [dist.all_reduce(meta, async_op=True)]
        flats = []
        for bucket in self.buckets(params):
            flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1)
                              for p in bucket])
            flats.append((bucket, flat))
            work.append(dist.all_reduce(flat, async_op=True))
        for w in work:
            w.wait()
        present = meta[:-1].tolist()
        engine.examples = int(meta[-1].item())
        k = 0
        for bucket, flat in flats:
            off = 0
            for p in bucket:
                n = p.numel()
                if not present[k]:
                    p.grad = None
                elif p.grad is not None and not p.is_contiguous():
                    p.grad.copy_(flat[off:off + n].view(p.shape))
                else:
                    p.grad = flat[off:off + n].view(p.shape)    # a view, as DDP's bucket views
                off += n
                k += 1
