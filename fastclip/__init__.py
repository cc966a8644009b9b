"""fastclip: fast, exact per-example gradient clipping for differentially private training.

Public API (see docs/design.md): :func:`per_sample_grad_norms`, :func:`clipped_grad`,
:func:`make_private`; :class:`PrivacyEngine` for code written for Opacus.
"""
import logging as _logging

from .engine import Engine
from .functional import clipped_grad, per_sample_grad_norms
from .audit import MixingError
from .losses import lm_loss
from .layers import Rule, register
from .accounting import PrivacyAccountant
from .checkpoint import load_checkpoint, save_checkpoint
from .fix import fix
from .optim import BatchMemoryManager, DPOptimizer, make_private, make_private_with_epsilon
from .privacy_engine import PrivacyEngine
from .validate import validate

__version__ = "0.1.0"

# Library logging: fastclip logs to "fastclip" (and "fastclip.accounting", ...) and configures
# no handler itself; the application decides what is shown.
_logging.getLogger("fastclip").addHandler(_logging.NullHandler())

__all__ = ["BatchMemoryManager", "Engine", "DPOptimizer", "MixingError", "PrivacyAccountant",
           "PrivacyEngine", "Rule",
           "clipped_grad", "lm_loss",
           "fix", "load_checkpoint", "make_private", "make_private_with_epsilon",
           "per_sample_grad_norms", "register", "save_checkpoint", "validate", "__version__"]
