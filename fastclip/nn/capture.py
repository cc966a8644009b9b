"""Which engine is capturing the current call of a fastclip.nn module.

The module's rule (fastclip.layers.capture.ModuleCaptureRule) pushes (engine, use) around the
call; the module's forward asks for it and, while captured, routes its weighted products through
Functions that record their factors for the engine. A stack per module, for re-entrant calls.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

from torch import nn

_CAPTURED: Dict[nn.Module, List] = {}


def push_capture(module: nn.Module, engine, use) -> None:
    _CAPTURED.setdefault(module, []).append((engine, use))


def pop_capture(module: nn.Module) -> None:
    stack = _CAPTURED.get(module)
    if stack:
        stack.pop()
        if not stack:
            del _CAPTURED[module]


def current_capture(module: nn.Module) -> Optional[Tuple]:
    """(engine, use) of the innermost captured call of ``module``, or None."""
    stack = _CAPTURED.get(module)
    return stack[-1] if stack else None
