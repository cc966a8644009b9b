"""Atomic checkpoints: a process killed while saving keeps the previous checkpoint.

``torch.save(obj, path)`` truncates ``path`` first and then writes it: a run killed (preempted,
out of memory, SIGKILL) in the middle leaves neither the old checkpoint nor the new one, and for
DP training the lost checkpoint holds the privacy accounting of every step taken. Here the new
checkpoint is written to a temporary file in the same directory, flushed and fsynced, and only
then renamed over ``path`` (``os.replace``, atomic on POSIX and Windows within one file system);
the directory is fsynced too, so the rename itself survives a power loss.

Sharded state (a model sharded with FSDP2 ``fully_shard`` and its optimizer: their state dicts
hold DTensors, each rank its own shard): every rank saves and loads its own file, named by
``{rank}`` in the path (``save_checkpoint("ckpt.rank{rank}.pt", model=model, optimizer=opt)`` on
every rank, ``load_checkpoint("ckpt.rank{rank}.pt")`` likewise), and resumes exactly on the same
number of processes (checked). A sharded save without ``{rank}`` in the path is refused: the
ranks would overwrite each other's shards.
"""
from __future__ import annotations

import os
import sys
import tempfile
from typing import Any, Dict, Union

import torch

PathLike = Union[str, "os.PathLike[str]"]
_SHARDS = "__fastclip_shards__"     # {"world_size": n} in a per-rank checkpoint


def _holds_shards(payload: Any) -> bool:
    # A DTensor exists only once torch.distributed.tensor is imported (importing it costs ~1 s).
    DTensor = getattr(sys.modules.get("torch.distributed.tensor"), "DTensor", None)
    if DTensor is None:
        return False
    from torch.utils._pytree import tree_flatten
    return any(isinstance(t, DTensor) for t in tree_flatten(payload)[0])


def _rank_path(path: PathLike, shards: bool) -> str:
    """``path`` with ``{rank}`` replaced by this process's rank; sharded state needs it."""
    path = os.fspath(path)
    import torch.distributed as dist
    on = dist.is_available() and dist.is_initialized()
    if "{rank}" in path:
        if not on:
            raise ValueError(f"fastclip: the checkpoint path {path!r} holds {{rank}} but no "
                             "torch.distributed process group is initialised")
        return path.replace("{rank}", str(dist.get_rank()))
    if shards and on and dist.get_world_size() > 1:
        raise ValueError(f"fastclip: the state to save is sharded (DTensors: a model sharded with "
                         f"fully_shard, or its optimizer), each rank holding its own shard, but "
                         f"every rank would write {path!r}. Fix: put {{rank}} in the path, e.g. "
                         "save_checkpoint('ckpt.rank{rank}.pt', model=model, optimizer=optimizer) "
                         "on every rank, and load it the same way")
    return path


def _state(value: Any) -> Any:
    """``value.state_dict()`` for anything that has one (model, optimizer, loader, scheduler),
    else the value itself."""
    state_dict = getattr(value, "state_dict", None)
    return state_dict() if callable(state_dict) else value


def save_checkpoint(path: PathLike, **objects: Any) -> None:
    """Save ``{name: state}`` to ``path`` atomically.

    Each keyword's value is stored as ``value.state_dict()`` when it has one (a model, a
    :class:`fastclip.DPOptimizer` with its accountant, noise and sampler state, an LR scheduler,
    the private loader), else as it is (an epoch number, a dict). The file is written to a
    temporary file beside ``path``, flushed and fsynced, then renamed over ``path``: at every
    moment ``path`` is either the previous complete checkpoint or the new one. A temporary file a
    killed save leaves behind (``.<name>.*.tmp``) is never read; it can be deleted.

    Example::

        fastclip.save_checkpoint("ckpt.pt", model=model, optimizer=optimizer, epoch=epoch)
        ckpt = fastclip.load_checkpoint("ckpt.pt")
        model.load_state_dict(ckpt["model"]); optimizer.load_state_dict(ckpt["optimizer"])

    Args:
        path: the checkpoint file; ``{rank}`` in it is replaced by the process's rank (required
            for sharded state, see the module docstring).
        **objects: what to save, by name.

    Raises:
        ValueError: nothing to save.
        OSError: the directory cannot be written (``path`` is then unchanged).
    """
    if not objects:
        raise ValueError("fastclip: save_checkpoint got nothing to save; pass the objects by name, "
                         "e.g. save_checkpoint(path, model=model, optimizer=optimizer)")
    payload: Dict[str, Any] = {name: _state(value) for name, value in objects.items()}
    shards = _holds_shards(payload)
    path = _rank_path(path, shards)
    if shards:
        import torch.distributed as dist
        payload[_SHARDS] = {"world_size": dist.get_world_size() if dist.is_initialized() else 1}
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _fsync_dir(directory)


def _fsync_dir(directory: str) -> None:
    # The rename is durable only once the directory entry is on disk (POSIX); where directories
    # cannot be opened (Windows) os.replace is already durable.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def load_checkpoint(path: PathLike, map_location: Any = None,
                    weights_only: bool = True) -> Dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint`: ``{name: state}``.

    Load each state into its object yourself (model first, then the optimizer):
    ``optimizer.load_state_dict(ckpt["optimizer"])`` validates the whole privacy state before it
    changes anything.

    Args:
        path: the checkpoint file; ``{rank}`` in it is replaced by the process's rank (a
            per-rank checkpoint of sharded state, which must be loaded on as many processes as
            saved it).
        map_location: as :func:`torch.load`.
        weights_only: as :func:`torch.load`; the state dicts of fastclip's objects load with the
            safe default True. Pass False only for a checkpoint you trust that holds other
            Python objects.

    Returns:
        the dict of saved states, by name.
    """
    ckpt = torch.load(_rank_path(path, False), map_location=map_location, weights_only=weights_only)
    meta = ckpt.pop(_SHARDS, None) if isinstance(ckpt, dict) else None
    if meta is not None:
        import torch.distributed as dist
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        if meta.get("world_size") != world:
            raise ValueError(f"fastclip: {os.fspath(path)!r} holds one rank's shards of a run on "
                             f"{meta.get('world_size')} processes; this run has {world}. Resume "
                             "on the same number of processes (the shards are laid out for it)")
    return ckpt
