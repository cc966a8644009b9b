"""One forked random state for a dry run (the first-step audit's forwards, the ops rule's probe):
what the run draws leaves every stream as it was."""
from __future__ import annotations

import contextlib
from typing import Dict, Iterable, Iterator, Set

import torch
from torch import Tensor


@contextlib.contextmanager
def forked_rng(tensors: Iterable[Tensor]) -> Iterator[None]:
    """Fork the CPU generator and the generator of every accelerator device among ``tensors``
    (``torch.random.fork_rng`` once per device type): restored on leaving, also on an error."""
    by_type: Dict[str, Set[int]] = {}
    for t in tensors:
        d = t.device
        if d.type not in ("cpu", "meta"):       # meta tensors have no generator
            by_type.setdefault(d.type, set()).add(d.index or 0)
    with contextlib.ExitStack() as stack:
        # devices=[]: the CPU generator alone (torch.cuda is not touched)
        stack.enter_context(torch.random.fork_rng(devices=[], device_type="cuda"))
        for kind, idx in by_type.items():
            stack.enter_context(torch.random.fork_rng(devices=sorted(idx), device_type=kind))
        yield
