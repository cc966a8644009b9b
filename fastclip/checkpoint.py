"""Atomic checkpoints: a process killed while saving keeps the previous checkpoint.

``torch.save(obj, path)`` truncates ``path`` first and then writes it: a run killed (preempted,
out of memory, SIGKILL) in the middle leaves neither the old checkpoint nor the new one, and for
DP training the lost checkpoint holds the privacy accounting of every step taken. Here the new
checkpoint is written to a temporary file in the same directory, flushed and fsynced, and only
then renamed over ``path`` (``os.replace``, atomic on POSIX and Windows within one file system);
the directory is fsynced too, so the rename itself survives a power loss.
"""
from __future__ import annotations

import os
import tempfile
from typing import Any, Dict, Union

import torch

PathLike = Union[str, "os.PathLike[str]"]


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
        path: the checkpoint file.
        **objects: what to save, by name.

    Raises:
        ValueError: nothing to save.
        OSError: the directory cannot be written (``path`` is then unchanged).
    """
    if not objects:
        raise ValueError("fastclip: save_checkpoint got nothing to save; pass the objects by name, "
                         "e.g. save_checkpoint(path, model=model, optimizer=optimizer)")
    payload: Dict[str, Any] = {name: _state(value) for name, value in objects.items()}
    path = os.fspath(path)
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
        path: the checkpoint file.
        map_location: as :func:`torch.load`.
        weights_only: as :func:`torch.load`; the state dicts of fastclip's objects load with the
            safe default True. Pass False only for a checkpoint you trust that holds other
            Python objects.

    Returns:
        the dict of saved states, by name.
    """
    return torch.load(os.fspath(path), map_location=map_location, weights_only=weights_only)
