"""DP-SGD on a model sharded with FSDP2 (``torch.distributed.fsdp.fully_shard``).

In every process, after ``init_process_group`` and ``fully_shard`` on each block and on the root::

    for block in model.blocks:
        fully_shard(block)
    fully_shard(model)
    optimizer = torch.optim.Adam(model.parameters())     # over the sharded parameters
    model, optimizer, loader = fastclip.make_private(model, optimizer, loader, audit=False,
                                                     noise_multiplier=1.1, max_grad_norm=1.0)

What happens (the data-parallel path of :mod:`fastclip.distributed`, with sharded parameters):

* Sampling and accounting: as data parallelism. Rank r's Poisson loader yields the sampled
  indices ``i % world_size == r`` of one global mask (rank 0's seed), the sample rate is global,
  ``loss_reduction="mean"`` divides by the global expected batch size, and epsilon is the same
  on every rank.
* Norms: each rank holds the full activations of its own examples, and FSDP all-gathers every
  block's parameters for its forward and its backward, so fastclip's capture records each
  layer's input and output gradient exactly as in one process: each example's norm (over all
  layers for flat clipping, per layer for per-layer clipping) is computed on the rank that holds
  the example, with no exchange. The capture gives autograd no weight gradient, so FSDP's own
  reduce-scatter at the end of each block's backward finds ``grad is None`` and sends nothing:
  no unclipped gradient is ever reduced.
* Gradients: the engine hands each module's full-size clipped sums (this rank's examples) to
  :class:`ShardedReducer` (``engine.grad_sink``) as soon as it forms them: at the end of each
  backward for flat clipping, during the backward as each layer is clipped for per-layer
  clipping. The reducer copies them into a bucket laid out in FSDP's chunks (dim 0 in
  ``world_size`` chunks as ``torch.chunk``, padded to equal chunks) and reduce-scatters each
  full bucket (25 MiB of full-size sums per dtype, ``bucket_cap_mb``; a larger parameter alone),
  so each rank keeps the sum for its own shard only, accumulated over the backward passes of a
  step, and ``optimizer.step()`` sends the last bucket and sets ``p.grad``: a DTensor with the
  parameter's mesh and placement. A rank holds at most one bucket of full-size sums and the
  sums of the module being clipped (FSDP itself holds one block's gradients at a time).
* Noise: each rank adds noise to its own shard only, from the step's seed (rank 0's) and a
  stream numbered per (rank, parameter) that no other rank or parameter uses: every coordinate
  of the whole update carries one independent N(0, sigma^2 C^2) draw, as in one process (the
  draws differ from one process's, which uses other streams).
* Checkpoints: per rank, see :func:`fastclip.save_checkpoint` (``{rank}`` in the path).

Not supported (refused by :func:`fastclip.make_private` with the reason): a model whose blocks
were sharded but not its root (``fully_shard(model)`` last), a DistributedDataParallel wrapper,
HSDP / 2-D meshes and tensor parallelism (DTensors FSDP does not manage), ``mode="nanobatch"``
and modules only the generic rule covers (they re-run the module after the backward, when
FSDP has resharded its parameters), and ``audit=True``: the audit re-runs the model on single
examples, which under FSDP are collectives the ranks would run a different number of times.
Audit the unsharded model once instead (``fastclip.per_sample_grad_norms(model, loss_fn, x, y)``
on a small batch before ``fully_shard`` raises if it mixes examples) and pass ``audit=False``.
"""
from __future__ import annotations

import sys
from typing import Dict, List, Optional

import torch
from torch import Tensor, nn

from . import distributed as _dist
from .passes import Gate

try:
    import torch.distributed as dist
except ImportError:     # pragma: no cover - torch without distributed
    dist = None

# Each rank's noise streams are numbered from rank << 32 (a model has fewer than 2^32 tensors).
_RANK_STRIDE = 1 << 32


def _loaded(module: str, name: str):
    """``module.name`` if the user's program imported ``module`` already, else None: a DTensor
    or an FSDP module exists only once torch.distributed.tensor / .fsdp are imported, and
    importing them (about a second) is left to the programs that shard."""
    return getattr(sys.modules.get(module), name, None)


def local(t: Tensor) -> Tensor:
    """The local tensor of a DTensor (this rank's shard, sharing its storage); ``t`` otherwise."""
    dtensor = _loaded("torch.distributed.tensor", "DTensor")
    return t._local_tensor if dtensor is not None and isinstance(t, dtensor) else t


def is_sharded(model) -> bool:
    """Whether ``model`` (or a submodule) was passed to ``fully_shard`` or holds DTensor
    parameters."""
    dtensor = _loaded("torch.distributed.tensor", "DTensor")
    fsdp_module = _loaded("torch.distributed.fsdp", "FSDPModule")
    if not isinstance(model, nn.Module) or (dtensor is None and fsdp_module is None):
        return False
    return ((fsdp_module is not None and any(isinstance(m, fsdp_module) for m in model.modules()))
            or (dtensor is not None and any(isinstance(p, dtensor) for p in model.parameters())))


def _managed(model: nn.Module) -> Dict[nn.Parameter, object]:
    """{sharded parameter: its FSDPParam} for every parameter the FSDP modules of ``model``
    manage (torch's FSDP state, read only)."""
    from torch.distributed.fsdp import FSDPModule
    out = {}
    for m in model.modules():
        if not isinstance(m, FSDPModule):
            continue
        group = m._get_fsdp_state()._fsdp_param_group
        if group is None:
            continue
        for fp in group.fsdp_params:
            out[fp.sharded_param] = fp
    return out


def check_model(model: nn.Module, *, mode: str, audit: bool, ranks) -> Dict[nn.Parameter, object]:
    """Refuse what the sharded path does not support (module docstring), before anything is
    attached; returns {sharded parameter: FSDPParam}."""
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import Shard
    pre = "fastclip: make_private on a model sharded with fully_shard (FSDP2): "
    if ranks is None:
        raise ValueError(pre + "needs torch.distributed.init_process_group(...) first and must "
                         "not be called with distributed=False (each rank trains on its own "
                         "examples, the clipped sums are reduce-scattered as they are formed)")
    ddp = [n or "<root>" for n, m in model.named_modules()
           if isinstance(m, nn.parallel.DistributedDataParallel)]
    if ddp:
        raise TypeError(pre + f"module(s) {ddp[:3]} are DistributedDataParallel wrappers; DDP "
                        "would all-reduce unclipped gradients. Fix: do not wrap in DDP: fastclip "
                        "reduces the clipped sums itself")
    if not isinstance(model, FSDPModule):
        sharded = [n for n, m in model.named_modules() if isinstance(m, FSDPModule)]
        raise ValueError(pre + f"only some modules were sharded ({sharded[:3]}"
                         f"{', ...' if len(sharded) > 3 else ''}) but not the root, so the "
                         "parameters outside them are neither sharded nor reduced. Fix: call "
                         "fully_shard(model) on the root last, after its blocks")
    managed = _managed(model)
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p not in managed:
            raise ValueError(pre + f"parameter '{name}' is not managed by FSDP ("
                             f"{type(p).__name__}: a DTensor of tensor parallelism, or a "
                             "parameter added after fully_shard); only FSDP-sharded parameters "
                             "are supported. Fix: fully_shard the module that holds it")
        if p.device_mesh.ndim != 1 or tuple(p.placements) != (Shard(0),):
            raise ValueError(pre + f"parameter '{name}' is placed {tuple(p.placements)} on a "
                             f"{p.device_mesh.ndim}-D mesh; only FSDP's 1-D Shard(0) (no HSDP, no "
                             "tensor parallelism) is supported")
        if p.device_mesh.size() != ranks[1]:
            raise ValueError(pre + f"parameter '{name}' is sharded over {p.device_mesh.size()} "
                             f"processes, the default group has {ranks[1]}; shard over every "
                             "process of the default group")
    if mode == "nanobatch":
        raise ValueError(pre + "mode='nanobatch' differentiates whole-model copies after the "
                         "backward, when FSDP has resharded the parameters; use mode='auto'")
    if audit:
        raise ValueError(pre + "the first-step audit re-runs the model on single examples, "
                         "which under FSDP are all-gathers the ranks would run a different "
                         "number of times. Fix: audit the unsharded model once, e.g. "
                         "fastclip.per_sample_grad_norms(model, loss_fn, x, y) on a small batch "
                         "before fully_shard (it raises if the model mixes examples), then pass "
                         "make_private(..., audit=False)")
    return managed


def check_rules(engine) -> None:
    """Refuse modules covered by the generic rule: it re-runs the module after the backward,
    when FSDP has resharded its parameters."""
    from .layers.generic import GENERIC
    generic = [engine.name_of(p) for m, rule in engine.rules.items() if rule is GENERIC
               for _, p in engine.params_of(m)]
    if generic:
        raise ValueError(f"fastclip: under FSDP2 the parameters {generic[:3]} are covered by the "
                         "generic rule, which re-runs their module after the backward, when FSDP "
                         "has resharded it; use modules with a native rule (nn.Linear, "
                         "nn.Embedding, nn.LayerNorm, convolutions, ...) or fastclip.nn's drop-ins")


class ShardedGate(Gate):
    """The engine's backward classification (:class:`fastclip.passes.Gate`) for sharded
    parameters: the autograd graph holds FSDP's unsharded parameter of each shard, so that is the
    one whose AccumulateGrad node is asked about."""

    def __init__(self, managed: Dict[nn.Parameter, object]):
        super().__init__()
        self._managed = managed

    def _node(self, p):
        fp = self._managed.get(p)
        u = getattr(fp, "_unsharded_param", None) if fp is not None else None
        if u is None:
            return super()._node(p)
        with torch.enable_grad():
            return u.view_as(u).grad_fn.next_functions[0][0]


class _Bucket:
    """One dtype's bucket: ``buf`` is ``world_size`` regions of ``size`` elements; a parameter's
    full-size sum goes in as FSDP's chunks, chunk r (dim-0 rows ``r*chunk ...``, zero-padded)
    at the same offset of region r, so the filled prefix of the regions is one reduce-scatter's
    input list and rank r receives its chunk of every parameter in the bucket."""

    def __init__(self, world: int, size: int, dtype: torch.dtype, device):
        self.buf = torch.empty(world, size, dtype=dtype, device=device)
        self.size = size
        self.off = 0
        self.slots: List = []       # (parameter, offset, elements, elements per row)


class ShardedReducer:
    """Reduces the full-size clipped sums the engine forms (it hands each module's sums to
    :meth:`add` as soon as they exist, ``engine.grad_sink``) over the ranks, in buckets, and
    keeps this rank's shard of each sum; :meth:`reduce` (the optimizer's step) sets them as
    ``p.grad`` (a DTensor placed as ``p``).

    Buckets: one per dtype, ``bucket_cap_mb`` MiB of full-size sums (default 25, as
    :class:`fastclip.distributed.GradReducer`), laid out in FSDP's dim-0 chunks so a full
    bucket is one reduce-scatter; a sum is copied in and not kept, and a parameter whose sum is
    larger than a bucket is reduce-scattered on its own. So at any time a
    rank holds at most one bucket per dtype, the sums of the one module being clipped, one
    bucket's share of received sums, and its shards of the sums received so far
    (``peak_bytes`` records the most, for the tests). Logical batches (several backward passes
    before a step) add into the shards.

    The reductions run where the engine clips: at the end of each backward (flat clipping) or
    during it, as each layer's clipped sum is formed (per-layer clipping); every rank runs the
    same modules in the same order (as FSDP's own collectives require), so the buckets fill and
    are sent alike on every rank. Only clipped sums are ever reduced.

    Used by :class:`fastclip.DPOptimizer` in place of :class:`fastclip.distributed.GradReducer`.
    ``noise_offset`` numbers this rank's noise streams apart from every other rank's.
    """

    sharded = True

    def __init__(self, managed: Dict[nn.Parameter, object],
                 bucket_cap_mb: float = _dist.DEFAULT_BUCKET_CAP_MB):
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.noise_offset = self.rank * _RANK_STRIDE
        self._managed = managed
        bucket_cap_mb = float(bucket_cap_mb)
        if not bucket_cap_mb > 0:
            raise ValueError(f"bucket_cap_mb must be > 0, got {bucket_cap_mb}")
        self.bucket_cap_mb = bucket_cap_mb
        self._buckets: Dict[torch.dtype, _Bucket] = {}
        self._slot_cache: Dict[torch.dtype, Dict[nn.Parameter, int]] = {}
        self._acc: Dict[nn.Parameter, Tensor] = {}    # p -> this rank's shard of the reduced sum
        self._acc_bytes = 0
        self.peak_bytes = 0      # most bytes held at once: shards + buckets + sums being added
        self.reductions = 0      # reduce-scatters run (tests)

    # -- accounting -----------------------------------------------------------------------
    def _note(self, extra: int = 0) -> None:
        held = self._acc_bytes + extra + sum(b.buf.numel() * b.buf.element_size()
                                             for b in self._buckets.values())
        self.peak_bytes = max(self.peak_bytes, held)

    def reset_peak(self) -> None:
        self.peak_bytes = 0
        self._note()

    @staticmethod
    def _nbytes(t: Tensor) -> int:
        return t.numel() * t.element_size()

    # -- layout ---------------------------------------------------------------------------
    def _layout(self, p: nn.Parameter):
        """(rows per chunk, elements per row, rows) of p in FSDP's layout: dim 0 in
        ``world_size`` chunks of ``ceil(rows / world_size)``, the last ones padded."""
        n0 = p.shape[0] if p.dim() > 0 else 1
        per_row = p.numel() // max(n0, 1)
        chunk = -(-n0 // self.world_size)
        return chunk, per_row, n0

    def _accumulate(self, p: nn.Parameter, piece: Tensor, per_row: int,
                    owned: bool = False) -> None:
        """Add this rank's received chunk of p's sum (flat, padded to the chunk) to its shard;
        ``owned``: ``piece`` is a buffer of its own, kept as the shard when it fits."""
        shard = local(p)
        mine = shard.shape[0] if shard.dim() > 0 else 1
        part = piece[:mine * per_row].view(shard.shape)
        acc = self._acc.get(p)
        if acc is None:
            self._acc[p] = part if owned and part.numel() == piece.numel() else part.clone()
            self._acc_bytes += self._nbytes(self._acc[p])
        else:
            acc.add_(part)

    def _slots(self, dtype: torch.dtype) -> Dict[nn.Parameter, int]:
        """{parameter of ``dtype``: its chunk's elements}, for the bucket's size."""
        if dtype not in self._slot_cache:
            self._slot_cache[dtype] = {}
            for p in self._managed:
                if p.dtype is dtype:
                    chunk, per_row, _ = self._layout(p)
                    self._slot_cache[dtype][p] = chunk * per_row
        return self._slot_cache[dtype]

    # -- the engine's sink ------------------------------------------------------------------
    @torch.no_grad()
    def add(self, pairs) -> None:
        """One module's clipped sums, [(sharded parameter, full-size sum)], this rank's
        examples: copied into the bucket (reduce-scattered when it is full) or, larger than a
        bucket's region, reduce-scattered now."""
        incoming = sum(self._nbytes(g) for _, g in pairs)
        self._note(incoming)
        world = self.world_size
        for p, g in pairs:
            chunk, per_row, n0 = self._layout(p)
            slot = chunk * per_row
            dtype = p.dtype
            g = g.reshape(n0, per_row)
            size = max(int(self.bucket_cap_mb * (1 << 20)) // (p.element_size() * world), 1)
            b = self._buckets.get(dtype)
            if slot > size or (b is not None and slot > b.size):
                self._direct(p, g, chunk, per_row, incoming)
                continue
            if b is not None and b.off + slot > b.size:
                self._flush(dtype)
            if b is None:
                # no larger than all of this dtype's parameters that fit a bucket need
                need = sum(s for s in self._slots(dtype).values() if s <= size)
                b = self._buckets[dtype] = _Bucket(world, min(size, max(need, slot)), dtype,
                                                   g.device)
                self._note(incoming)
            for r in range(world):
                lo, hi = min(r * chunk, n0), min((r + 1) * chunk, n0)
                dst = b.buf[r, b.off:b.off + slot].view(chunk, per_row)
                dst[:hi - lo].copy_(g[lo:hi])
                dst[hi - lo:].zero_()
            b.slots.append((p, b.off, slot, per_row))
            b.off += slot

    def _direct(self, p, g: Tensor, chunk: int, per_row: int, incoming: int) -> None:
        """Reduce-scatter one parameter's full-size sum on its own (FSDP's padded chunks)."""
        n0 = g.shape[0]
        inputs, copied = [], 0
        for r in range(self.world_size):
            lo, hi = min(r * chunk, n0), min((r + 1) * chunk, n0)
            part = g[lo:hi]
            if hi - lo < chunk or part.dtype != p.dtype or not part.is_contiguous():
                # padded (or cast) chunk: a copy of one chunk
                part = torch.cat([part.to(p.dtype),
                                  part.new_zeros((chunk - (hi - lo), per_row), dtype=p.dtype)])
                copied += self._nbytes(part)
            inputs.append(part.reshape(-1))
        recv = inputs[0].new_empty(chunk * per_row)
        self._note(incoming + copied + self._nbytes(recv))
        dist.reduce_scatter(recv, inputs)
        self.reductions += 1
        del inputs
        self._accumulate(p, recv, per_row, owned=True)

    def _flush(self, dtype: torch.dtype) -> None:
        b = self._buckets[dtype]
        if b.off == 0:
            return
        recv = b.buf.new_empty(b.off)
        self._note(self._nbytes(recv))
        dist.reduce_scatter(recv, [b.buf[r, :b.off] for r in range(self.world_size)])
        self.reductions += 1
        for p, off, slot, per_row in b.slots:
            self._accumulate(p, recv[off:off + slot], per_row)
        b.off, b.slots = 0, []

    def clear(self) -> None:
        """Forget everything added since the last step (zero_grad): nothing of it is released."""
        self._buckets.clear()
        self._acc.clear()
        self._acc_bytes = 0

    @torch.no_grad()
    def reduce(self, params: List[nn.Parameter], engine) -> None:
        """The step: send what the buckets still hold, then for every parameter in ``params``
        (the same list on every rank) ``p.grad`` += this rank's shard of the sum over ranks of
        the clipped sums; ``engine.examples`` becomes the global count. Refuses (on every rank) a
        non-finite sum before anything is noised."""
        from torch.distributed.tensor import DTensor
        from .optim import _NOT_FINITE
        for dtype in list(self._buckets):
            self._flush(dtype)
        self._buckets.clear()
        meta = torch.tensor([int(engine.examples)], dtype=torch.int64)
        dist.all_reduce(meta)
        engine.examples = int(meta[0].item())
        ok = True
        for p in params:
            acc = self._acc.pop(p, None)
            if acc is None:
                continue
            if p.grad is None:
                p.grad = DTensor.from_local(acc, p.device_mesh, p.placements,
                                            run_check=False, shape=p.shape, stride=p.stride())
            else:
                local(p.grad).add_(acc)
            ok = ok and bool(torch.isfinite(local(p.grad)).all())
        self.clear()
        if _dist.any_rank(not ok):
            raise RuntimeError(_NOT_FINITE + " (on some rank's shard)")
