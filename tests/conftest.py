import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))  # tests/reference.py

DTYPES = [torch.float32, torch.float64]


def tol(dtype):
    """(rtol, atol) for comparing against the float64 reference."""
    return (1e-4, 1e-6) if dtype == torch.float32 else (1e-10, 1e-12)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
