"""Numerical ops of fastclip: the only importer of the native modules ``fastclip._C`` (pybind11)
and ``fastclip._nanobatch`` (Cython).

One module per layer family, mirroring csrc/ and src/bind_*.cpp, so a family is one vertical slice
(csrc/X.cpp -> src/bind_X.cpp -> fastclip/ops/X.py -> fastclip/layers/X.py -> tests/test_X.py):
``linear``, ``conv``, ``embedding``, ``norm``, ``rnn``, ``noise``, ``clip`` (NanoBatch), and
``_common`` for what they share (the ``_native(...)`` predicate, dtype helpers).

Every op takes and returns torch tensors. CPU float32/float64 tensors go to the C++ core (zero-copy
numpy views of the tensors' memory), which validates them; tensors on any other device, or of
another floating dtype, run the same algorithm in plain torch ops (``*_torch``), which validate
their own arguments, so the package works on a GPU. Callers use ``ops.<name>``: every public name
is re-exported here.
"""
from ._common import HAS_NATIVE, NATIVE_DTYPES, as_computed, cast, cast_margin, widened
from .clip import clip_accumulate, clip_accumulate_torch
from .conv import (_conv_tuple, choose_conv_method, conv_padding, conv_sq_norms, conv_sq_norms_torch,
                   conv_keeps_per_example, conv_native, conv_unfold_torch, pads_to_arg)
from .embedding import (embedding_linear_cross, embedding_linear_cross_torch, embedding_sq_norms,
                        embedding_sq_norms_torch)
from .linear import (HAS_BLAS, blas_info, choose_linear_method, clipped_gemm, clipped_gemm_runs,
                     linear_sq_norms, linear_sq_norms_torch)
from .noise import add_gaussian_noise_, add_gaussian_noise_checked_, all_finite
from .norm import NORM_KINDS, norm_affine_grads, norm_affine_grads_torch
from .rnn import (RNN_CELLS, rnn_backward, rnn_backward_torch, rnn_forward, rnn_forward_torch,
                  rnn_ghost_sq_norms, rnn_ghost_sq_norms_torch)

__all__ = [
    "HAS_NATIVE", "HAS_BLAS", "NATIVE_DTYPES", "as_computed", "cast", "cast_margin", "widened",
    "blas_info",
    "choose_linear_method", "linear_sq_norms", "linear_sq_norms_torch", "clipped_gemm",
    "clipped_gemm_runs",
    "choose_conv_method", "conv_padding", "conv_sq_norms", "conv_sq_norms_torch",
    "conv_keeps_per_example", "conv_native", "conv_unfold_torch", "pads_to_arg",
    "embedding_sq_norms", "embedding_sq_norms_torch", "embedding_linear_cross",
    "embedding_linear_cross_torch",
    "NORM_KINDS", "norm_affine_grads", "norm_affine_grads_torch",
    "RNN_CELLS", "rnn_forward", "rnn_forward_torch", "rnn_backward", "rnn_backward_torch",
    "rnn_ghost_sq_norms", "rnn_ghost_sq_norms_torch",
    "add_gaussian_noise_", "add_gaussian_noise_checked_", "all_finite", "clip_accumulate", "clip_accumulate_torch",
]
