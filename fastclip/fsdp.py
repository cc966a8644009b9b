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
* Gradients: the engine holds each parameter's full-size clipped sum of this rank's examples
  (``Engine.full_grads``) until ``optimizer.step()``, where :class:`ShardedReducer` sums them over
  the ranks with one reduce-scatter per dtype (FSDP's layout: dim 0 chunked as ``torch.chunk``,
  padded to equal chunks), so each rank receives the sum for its own shard only, set as
  ``p.grad``: a DTensor with the parameter's mesh and placement. Between the backward and the
  step a rank therefore holds one full-size gradient (FSDP holds one block's at a time).
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

from typing import Dict, List, Optional

import torch
from torch import Tensor, nn

from . import distributed as _dist
from .passes import Gate

try:
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor, Shard
except ImportError:     # pragma: no cover - torch without distributed tensors
    dist = DTensor = Shard = None

try:
    from torch.distributed.fsdp import FSDPModule
except ImportError:     # pragma: no cover
    FSDPModule = None

# torch >= 2.13 names it reduce_scatter_single (reduce_scatter_tensor is deprecated there).
_reduce_scatter = (getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
                   if dist is not None else None)

# Each rank's noise streams are numbered from rank << 32 (a model has fewer than 2^32 tensors).
_RANK_STRIDE = 1 << 32


def local(t: Tensor) -> Tensor:
    """The local tensor of a DTensor (this rank's shard, sharing its storage); ``t`` otherwise."""
    return t._local_tensor if DTensor is not None and isinstance(t, DTensor) else t


def is_sharded(model) -> bool:
    """Whether ``model`` (or a submodule) was passed to ``fully_shard`` or holds DTensor
    parameters."""
    if DTensor is None or not isinstance(model, nn.Module):
        return False
    return (any(isinstance(m, FSDPModule) for m in model.modules())
            or any(isinstance(p, DTensor) for p in model.parameters()))


def _managed(model: nn.Module) -> Dict[nn.Parameter, object]:
    """{sharded parameter: its FSDPParam} for every parameter the FSDP modules of ``model``
    manage (torch's FSDP state, read only)."""
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
    pre = "fastclip: make_private on a model sharded with fully_shard (FSDP2): "
    if ranks is None:
        raise ValueError(pre + "needs torch.distributed.init_process_group(...) first and must "
                         "not be called with distributed=False (each rank trains on its own "
                         "examples, the clipped sums are reduce-scattered at the step)")
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
    generic = [engine.name_of(p) for m, rule in engine._rules.items() if rule is GENERIC
               for _, p in engine._params[m]]
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


class ShardedReducer:
    """Sums the full-size clipped sums the engine holds (``engine.full_grads``) over the ranks
    and leaves each rank its own shard of the sum in ``p.grad`` (a DTensor placed as ``p``):
    one reduce-scatter per dtype, in FSDP's layout (dim 0 in ``world_size`` equal padded chunks).

    Used by :class:`fastclip.DPOptimizer` in place of :class:`fastclip.distributed.GradReducer`.
    ``noise_offset`` numbers this rank's noise streams apart from every other rank's.
    """

    sharded = True

    def __init__(self, managed: Dict[nn.Parameter, object]):
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.noise_offset = self.rank * _RANK_STRIDE
        self._managed = managed

    @torch.no_grad()
    def reduce(self, params: List[nn.Parameter], engine) -> None:
        """For every parameter in ``params`` (the same list on every rank): ``p.grad`` += this
        rank's shard of the sum over ranks of the held clipped sums; ``engine.examples`` becomes
        the global count. Refuses (on every rank) a non-finite sum before anything is noised."""
        from .optim import _NOT_FINITE
        held = engine.full_grads
        world = self.world_size
        meta = torch.tensor([p in held for p in params] + [int(engine.examples)],
                            dtype=torch.int64)
        dist.all_reduce(meta)
        present = [bool(v) for v in meta[:-1].tolist()]
        engine.examples = int(meta[-1].item())
        by_dtype: Dict[torch.dtype, List] = {}
        for p, there in zip(params, present):
            if there:
                by_dtype.setdefault(p.dtype, []).append(p)
        out = []
        for dtype, ps in by_dtype.items():
            rows = []      # per parameter: (rows per chunk, elements per row)
            parts = []
            for p in ps:
                full = held.pop(p, None)
                n0 = p.shape[0] if p.dim() > 0 else 1
                per_row = p.numel() // max(n0, 1)
                chunk = -(-n0 // world)
                if full is None:
                    full = torch.zeros(p.shape, dtype=dtype, device=local(p).device)
                full = full.reshape(n0, per_row)
                if chunk * world != n0:
                    full = torch.cat([full, full.new_zeros(chunk * world - n0, per_row)])
                parts.append(full.view(world, chunk * per_row))
                rows.append((chunk, per_row))
            send = torch.cat(parts, 1).reshape(-1)
            del parts
            recv = send.new_empty(send.numel() // world)
            _reduce_scatter(recv, send)
            del send
            off = 0
            for p, (chunk, per_row) in zip(ps, rows):
                mine = recv[off:off + chunk * per_row].view(chunk, per_row)
                off += chunk * per_row
                out.append((p, mine))
        ok = True
        for p, mine in out:
            shard = local(p)
            piece = mine[:shard.shape[0] if shard.dim() > 0 else 1].reshape(shard.shape)
            if p.grad is None:
                p.grad = DTensor.from_local(piece.clone(), p.device_mesh, p.placements,
                                            run_check=False, shape=p.shape, stride=p.stride())
            else:
                local(p.grad).add_(piece)
            ok = ok and bool(torch.isfinite(local(p.grad)).all())
        held.clear()
        if _dist.any_rank(not ok):
            raise RuntimeError(_NOT_FINITE + " (on some rank's shard)")
