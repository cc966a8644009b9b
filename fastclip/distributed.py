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

Pipeline stages (``make_private(stage_module, ..., pipeline=True)``, one stage per rank of a
``torch.distributed.pipelining`` schedule built with ``scale_grads=False``): see
:class:`PipelineExchange`. FSDP2 (``fully_shard`` on the blocks and the root): this data-parallel
path with sharded parameters, the clipped sums reduce-scattered at the step and noise added per
shard; see :mod:`fastclip.fsdp`.

DistributedDataParallel: do NOT wrap the model in DDP; :func:`make_private` refuses a DDP model.
DDP all-reduces the per-process sums of *unclipped* gradients from its own autograd hooks; here
the optimizer all-reduces the *clipped* sums instead, which is all DDP would do besides
(parameters start identical when every rank builds the model from the same seed, or broadcast
them with :func:`broadcast_parameters`; they then stay identical, every rank taking the same
step).
"""
from __future__ import annotations

import math
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


def _extremes(values: List, dtype: torch.dtype = torch.int64) -> Tuple[List, List]:
    """The elementwise (min, max) over the ranks of ``values`` (a list of numbers of the same
    length on every rank, as ``dtype``): one all-reduce MAX of ``(v, -v)``. Collective: every
    rank must call it."""
    t = torch.tensor(list(values) + [-v for v in values], dtype=dtype, device=_comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    n = len(values)
    return (-t[n:]).tolist(), t[:n].tolist()


def _agree(values: List, dtype: torch.dtype = torch.int64) -> bool:
    """True on every rank if every rank holds the same ``values`` (:func:`_extremes`)."""
    lo, hi = _extremes(values, dtype)
    return lo == hi


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
        self._checked = False

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

    def _check_replicas(self, params: List[nn.Parameter]) -> None:
        """At the first step: every rank must hold the same parameters (count, sizes, values),
        else the bucketed all-reduce would sum different tensors (pipeline stages whose shapes
        happen to agree) or deadlock. One all-reduce of 6 numbers."""
        with torch.no_grad():
            sig = [float(len(params)), float(sum(p.numel() for p in params)),
                   float(sum(p.detach().double().sum().item() * (i + 1)
                             for i, p in enumerate(params)))]
        lo, hi = _extremes(sig, torch.float64)
        if hi != lo:
            raise RuntimeError(
                f"fastclip: the ranks hold different parameters (counts {lo[0]:g}..{hi[0]:g}, "
                f"elements {lo[1]:g}..{hi[1]:g}, or values); data-parallel training all-reduces "
                "the clipped sums of one model replicated on every rank, so the step is refused: "
                "nothing was released. Fix: build the model from the same seed on every rank or "
                "call fastclip.distributed.broadcast_parameters(model) before training; for "
                "pipeline stages (a different module per rank) pass make_private(..., "
                "pipeline=True)")

    @torch.no_grad()
    def reduce(self, params: List[nn.Parameter], engine) -> None:
        """Sum ``p.grad`` over ranks for every parameter in ``params`` (the same list, in the same
        order, on every rank), and ``engine.examples`` with them."""
        if not self._checked:
            self._check_replicas(params)
            self._checked = True
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


# ---- pipeline parallelism (torch.distributed.pipelining) -------------------------------------

PIPELINE_GRADS = ("fastclip: the gradient of {name} was changed in place after fastclip wrote its "
                  "clipped sum (torch.distributed.pipelining's schedules divide every gradient by "
                  "the number of micro-batches unless they are built with scale_grads=False; "
                  "clip_grad_norm_ or another in-place edit does the same); the noise is scaled "
                  "to the clipped sums as fastclip wrote them, so the step is refused: nothing was "
                  "released (no noise added, parameters unchanged). Fix: build the schedule with "
                  "scale_grads=False (e.g. ScheduleGPipe(stage, n_microbatches, loss_fn, "
                  "scale_grads=False)): fastclip already divides by the batch size for "
                  "loss_reduction='mean' (each micro-batch's loss is its own mean), then "
                  "optimizer.zero_grad() and run the step again")


def pipeline_bounds(clipping: str, max_grad_norm, layers: int):
    """Per-layer bounds of this stage when every rank of the default group is one pipeline stage:
    a float C is split evenly over the layers of ALL stages (C / sqrt(L_total) each, as one
    process splits it over the whole model), so the whole model's sensitivity is C. Returns the
    list of this stage's bounds (float C), or ``max_grad_norm`` unchanged (a list, or flat
    clipping). Collective: every rank must call it."""
    from .clipping import is_per_layer
    t = torch.tensor([float(layers)], dtype=torch.float64, device=_comm_device())
    dist.all_reduce(t)
    if not is_per_layer(clipping) or isinstance(max_grad_norm, (list, tuple)):
        return max_grad_norm
    total = int(t.item())
    return [float(max_grad_norm) / math.sqrt(total)] * layers


class PipelineExchange:
    """What the stages of a pipeline (one :class:`torch.distributed.pipelining.PipelineStage`
    per rank of the default group, each stage module made private on its rank) agree on, and
    the one collective of flat clipping.

    * Sensitivity: the whole model's. Flat clipping: C, the same on every stage (checked).
      Per-layer: ``sqrt(sum over every stage's layers of C_l^2)``; every stage adds noise of std
      ``noise_multiplier * that`` to its own parameters, so each coordinate of the whole update
      carries the noise once, as in one process.
    * Noise streams: the parameters of stage s continue the numbering of stages 0..s-1, and the
      step's seed is rank 0's, so the noise equals one process's on the whole model (the
      optimizers holding the stage parameters in model order) and no two parameters share a
      stream.
    * Flat clipping: a clip factor needs the norm over every stage's parameters. Each stage keeps
      its backward passes' uses (micro-batches, in backward order, the same on every stage for
      GPipe and 1F1B) and their squared norms; at ``optimizer.step`` one all-reduce (SUM) of the
      B squared norms gives the whole model's, and only then are the clipped sums formed.

    Args:
        engine: this stage's engine; ``clipping`` its clipping (the same on every stage).
        params: the optimizer's trainable parameters, in order.

    Collective (every rank constructs one, in the same order).
    """

    def __init__(self, engine, clipping: str, params: List[nn.Parameter]):
        from .clipping import is_per_layer
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.per_layer = is_per_layer(clipping)
        self.local_sensitivity = float(engine.sensitivity)
        mine = [clipping, float(engine.max_grad_norm or 0.0), self.local_sensitivity, len(params)]
        every = [None] * self.world_size
        dist.all_gather_object(every, mine)
        clippings = [e[0] for e in every]
        if len(set(clippings)) != 1:
            raise ValueError(f"fastclip: the pipeline stages clip differently (clipping per rank: "
                             f"{clippings}); every stage must be made private with the same "
                             "clipping")
        if not self.per_layer:
            bounds = [e[1] for e in every]
            if len(set(bounds)) != 1:
                raise ValueError(f"fastclip: flat clipping bounds the whole model's per-example "
                                 f"gradient by one C, but the stages were given max_grad_norm="
                                 f"{bounds} (per rank); pass the same max_grad_norm on every stage")
            self.sensitivity = bounds[0]
        else:
            self.sensitivity = math.sqrt(sum(e[2] ** 2 for e in every))
        self.noise_offset = sum(e[3] for e in every[:self.rank])

    def check_sensitivity(self, engine) -> None:
        if float(engine.sensitivity) != self.local_sensitivity:
            raise RuntimeError(
                f"fastclip: this pipeline stage's clipping changed after make_private (its "
                f"sensitivity went from {self.local_sensitivity} to {engine.sensitivity}: a layer "
                "unfrozen or added), and the other stages' noise was agreed for the old one; the "
                "step is refused: nothing was released. Fix: make every stage private again")

    @torch.no_grad()
    def exchange(self, engine) -> None:
        """Flat clipping: sum the held-back squared norms over the stages (one all-reduce of B
        numbers, after one of the micro-batch sizes), then write this stage's clipped sums.
        Every stage counts the same examples in the same micro-batches, or every stage refuses."""
        sizes = engine.deferred_sizes()
        # the counts first: the sizes' all-reduce needs the same length on every rank
        if not (_agree([len(sizes)]) and _agree(sizes)):
            engine.drop_deferred()
            raise RuntimeError(
                f"fastclip: the pipeline stages backpropagated different micro-batches this step "
                f"(this stage: sizes {sizes}); flat clipping pairs each example's squared norms "
                "across stages by position, so the step is refused on every stage: nothing was "
                "released. Fix: run the schedule's step once per batch on every stage (the same "
                "n_microbatches), with one optimizer.step() after it")
        sq = engine.deferred_sq_norms().to(_comm_device())
        dist.all_reduce(sq)
        engine.write_deferred(sq)
