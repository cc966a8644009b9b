"""Hostile input to every binding of fastclip._C (and to ops.py): always a clean TypeError or
ValueError naming the actual values, never a crash, a hang or a silent copy."""
import os
import signal
import threading
import time

import numpy as np
import pytest
import torch

from fastclip import _C, ops

f32, f64 = np.float32, np.float64


def arr(*shape, dtype=f32):
    return np.random.default_rng(0).standard_normal(shape).astype(dtype)


def call(A, G, method="auto", bias=False, num_threads=2):
    return _C.linear_sq_norms(A, G, method, bias, num_threads)


@pytest.mark.parametrize("obj,name", [([[1.0]], "list"), (None, "NoneType"),
                                      (torch.zeros(2, 3), "Tensor"), (3.0, "float")])
def test_not_an_array(obj, name):
    with pytest.raises(TypeError, match=f"activations must be a numpy.ndarray, got {name}"):
        call(obj, arr(2, 3))
    with pytest.raises(TypeError, match=f"gradients must be a numpy.ndarray, got {name}"):
        call(arr(2, 3), obj)


@pytest.mark.parametrize("shape,rank", [((3,), 1), ((2, 3, 4, 5), 4), ((), 0)])
def test_wrong_rank(shape, rank):
    with pytest.raises(ValueError, match=f"activations must be 2-D or 3-D, got {rank}-D"):
        call(np.zeros(shape, f32), arr(2, 3))


def test_rank_mismatch():
    with pytest.raises(ValueError, match="ranks differ: 3-D vs 2-D"):
        call(arr(2, 4, 3), arr(2, 5))


def test_batch_mismatch():
    with pytest.raises(ValueError, match="batch sizes differ: 32 vs 31"):
        call(arr(32, 2, 3), arr(31, 2, 4))


def test_positions_mismatch():
    with pytest.raises(ValueError, match=r"positions \(T\) differ: 5 vs 4"):
        call(arr(3, 5, 2), arr(3, 4, 2))


def test_huge_declared_sizes_that_do_not_match():
    # Zero-stride views declare enormous shapes without memory; the mismatch is caught before
    # anything is read or allocated.
    huge_b = np.broadcast_to(np.zeros((1, 2, 4), f32), (10**9, 2, 4))
    with pytest.raises(ValueError, match=f"batch sizes differ: {10**9} vs 3"):
        call(huge_b, arr(3, 2, 4))
    huge_t = np.broadcast_to(np.zeros((2, 1, 4), f32), (2, 10**9, 4))
    with pytest.raises(ValueError, match=f"positions \\(T\\) differ: {10**9} vs 5"):
        call(huge_t, arr(2, 5, 4))


def test_dtype_mismatch():
    with pytest.raises(TypeError, match="dtypes differ: float32 vs float64"):
        call(arr(2, 3), arr(2, 3, dtype=f64))


@pytest.mark.parametrize("dtype", [np.int32, np.int64, np.bool_, np.float16, np.complex64,
                                   np.dtype(">f4"), object])
def test_non_float_dtypes(dtype):
    bad = np.zeros((2, 3), dtype=dtype)
    with pytest.raises(TypeError, match="activations must be float32 or float64"):
        call(bad, arr(2, 3))
    with pytest.raises(TypeError, match="gradients must be float32 or float64"):
        call(arr(2, 3), bad)


def test_negative_strides():
    with pytest.raises(ValueError, match="activations has a negative stride on dim 0"):
        call(arr(4, 3, 2)[::-1], arr(4, 3, 2))
    with pytest.raises(ValueError, match="gradients has a negative stride on dim 1"):
        call(arr(4, 3, 2), arr(4, 3, 2)[:, ::-1])


def test_last_dim_stride_not_one():
    t = arr(4, 5, 6).transpose(0, 2, 1)  # (4, 6, 5), last stride 6 elements
    with pytest.raises(ValueError, match="activations must have unit stride on its last dim, got 6"):
        call(t, arr(4, 6, 2))
    with pytest.raises(ValueError, match="gradients must have unit stride on its last dim, got 2"):
        call(arr(4, 3), arr(4, 6)[:, ::2])


def test_misaligned_or_odd_strides():
    rec = np.zeros((4, 3), dtype=[("a", f32), ("b", np.uint8)])["a"]  # 7-byte row stride
    with pytest.raises(ValueError, match="activations"):
        call(rec, arr(4, 3))


@pytest.mark.parametrize("n", [0, -1, -(2**31)])
def test_bad_num_threads(n):
    with pytest.raises(ValueError, match=f"num_threads must be >= 1, got {n}"):
        call(arr(2, 3), arr(2, 4), num_threads=n)


def test_num_threads_overflow_and_type():
    with pytest.raises(TypeError):
        call(arr(2, 3), arr(2, 4), num_threads=2**70)
    with pytest.raises(TypeError):
        call(arr(2, 3), arr(2, 4), num_threads="2")


@pytest.mark.parametrize("method", ["fast", "", "GHOST", "ghost "])
def test_unknown_method(method):
    with pytest.raises(ValueError, match=f"method must be 'auto', 'product', 'ghost' or 'direct', got '{method}'"):
        call(arr(2, 3), arr(2, 4), method=method)


def test_method_and_bias_types():
    with pytest.raises(TypeError):
        call(arr(2, 3), arr(2, 4), method=None)
    with pytest.raises(TypeError):
        call(arr(2, 3), arr(2, 4), bias="yes")


def test_product_needs_one_position():
    with pytest.raises(ValueError, match="method 'product' needs T == 1, got T = 3"):
        call(arr(2, 3, 4), arr(2, 3, 5), method="product")


@pytest.mark.parametrize("shape_a,shape_g", [((0, 3, 4), (0, 3, 5)), ((2, 0, 4), (2, 0, 5)),
                                             ((2, 3, 0), (2, 3, 5)), ((2, 3, 4), (2, 3, 0)),
                                             ((0, 4), (0, 5))])
def test_zero_size_dims(shape_a, shape_g):
    for method in ("auto", "ghost", "direct"):
        w, b = call(np.zeros(shape_a, f32), np.ones(shape_g, f32), method=method, bias=True)
        assert w.shape == (shape_a[0],) and w.dtype == f32 and not w.any()
        assert b.shape == (shape_a[0],)


def test_choose_linear_method_hostile():
    with pytest.raises(ValueError, match="sizes must be >= 0, got T=-1, d=2, p=3"):
        _C.choose_linear_method(-1, 2, 3)
    with pytest.raises(TypeError):
        _C.choose_linear_method("4", 2, 3)
    with pytest.raises(TypeError):
        _C.choose_linear_method(2**70, 2, 3)
    assert _C.choose_linear_method(0, 0, 0) == "product"


def test_set_blas_library_bad_paths_keep_working():
    before = _C.blas_info()
    assert _C.set_blas_library("/nonexistent/libnothing.so") is False
    assert _C.set_blas_library("libc.so.6") is False  # loads, but has no scipy_cblas_* symbols
    with pytest.raises(TypeError):
        _C.set_blas_library(None)
    assert _C.blas_info() == before
    A, G = arr(3, 4, 5), arr(3, 4, 2)
    w, _ = call(A, G)
    want = np.einsum("btp,btd->bpd", G.astype(f64), A.astype(f64)) ** 2
    np.testing.assert_allclose(w, want.sum((1, 2)), rtol=1e-4)


@pytest.mark.parametrize("bad,exc,msg", [
    ((torch.zeros(2, 3, dtype=torch.int64), torch.zeros(2, 3)), TypeError, "floating dtype, got torch.int64"),
    ((torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.float64)), TypeError, "dtypes differ: torch.float32 vs torch.float64"),
    ((torch.zeros(3), torch.zeros(3)), ValueError, "got 1-D"),
    ((torch.zeros(32, 3), torch.zeros(31, 3)), ValueError, "batch sizes differ: 32 vs 31"),
    ((torch.zeros(2, 4, 3), torch.zeros(2, 5, 3)), ValueError, "positions differ"),
    (([[1.0]], torch.zeros(1, 1)), TypeError, "must be a torch.Tensor, got list"),
])
def test_ops_hostile(bad, exc, msg):
    for fn in (ops.linear_sq_norms, ops.linear_sq_norms_torch):
        with pytest.raises(exc, match=msg):
            fn(*bad)
    with pytest.raises(ValueError, match="got 'fast'"):
        ops.linear_sq_norms(torch.zeros(2, 3), torch.zeros(2, 3), method="fast")


def test_concurrent_python_threads():
    A, G = arr(64, 32, 48), arr(64, 32, 40)
    want, _ = call(A, G, num_threads=2)
    results, errors = [], []

    def work():
        try:
            for _ in range(20):
                results.append(call(A, G, num_threads=2)[0])
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors and len(results) == 60
    for r in results:
        np.testing.assert_array_equal(r, want)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_fork_after_pool_started_does_not_hang():
    A, G = arr(64, 32, 48), arr(64, 32, 40)
    want, _ = call(A, G, num_threads=2)  # starts the pool's worker threads in this process
    pid = os.fork()
    if pid == 0:  # child: the parent's workers do not exist here
        code = 1
        try:
            got, _ = call(A, G, num_threads=2)
            code = 0 if np.array_equal(got, want) else 2
        finally:
            os._exit(code)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, status
            return
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    pytest.fail("forked child hung in the native op")


def test_parallel_loops_run_on_torchs_openmp_team():
    # torch (imported by fastclip) has loaded libgomp, so the core's loops share its team rather
    # than starting a second pool that competes with torch's spinning workers for the cores
    # (FASTCLIP_OWN_POOL=1 forces the core's own pool: the whole suite can run on it).
    assert _C.parallel_backend() == ("own" if os.environ.get("FASTCLIP_OWN_POOL") else "openmp")


_OWN_POOL_CHILD = """
import sys
import numpy as np
import fastclip
from fastclip import _C
assert _C.parallel_backend() == "own", _C.parallel_backend()
A, G = np.load(sys.argv[1]), np.load(sys.argv[2])
np.save(sys.argv[3], _C.linear_sq_norms(A, G, "auto", False, 2)[0])
"""


def test_own_pool_gives_the_same_results_as_the_openmp_team(tmp_path):
    # FASTCLIP_OWN_POOL=1 forces the core's own pool (what a process without libgomp gets); both
    # split the examples into the same chunks, so the norms are bitwise equal.
    import subprocess
    import sys

    A, G = arr(64, 32, 48), arr(64, 32, 40)
    want, _ = call(A, G, num_threads=2)
    np.save(tmp_path / "A.npy", A)
    np.save(tmp_path / "G.npy", G)
    out = tmp_path / "own.npy"
    from harness import child_env

    subprocess.run([sys.executable, "-c", _OWN_POOL_CHILD, str(tmp_path / "A.npy"),
                    str(tmp_path / "G.npy"), str(out)], env=child_env(FASTCLIP_OWN_POOL="1"),
                   check=True, timeout=120)
    np.testing.assert_array_equal(np.load(out), want)


@pytest.mark.parametrize("method", ["ghost", "direct"])
@pytest.mark.parametrize("dtype", [f32, f64])
def test_tiny_gradients_give_tiny_norms_and_leave_the_callers_float_mode(method, dtype):
    # The kernels flush subnormal results to zero while they run (a subnormal Gram costs a
    # microcode assist per product): a norm then differs from the float64 reference by less than
    # sqrt(terms * 2^-126), i.e. it stays below C for any C clipping can act on, and the caller's
    # own float mode (torch keeps subnormals) is restored afterwards.
    tiny = np.finfo(np.float32).tiny
    A = arr(8, 64, 48, dtype=dtype)
    G = (arr(8, 64, 40, dtype=dtype) * 1e-20).astype(dtype)
    got, _ = _C.linear_sq_norms(A, G, method, False, 2)
    ref = np.einsum("btp,btd->bpd", G.astype(np.float64), A.astype(np.float64))
    ref = (ref ** 2).sum((1, 2))
    terms = 64 * 64 * (48 + 40) + 48 * 40
    assert np.all(np.abs(got - ref) <= terms * tiny + 1e-6 * ref)
    assert np.sqrt(got.max()) < 1e-15
    sub = torch.full((4,), 1e-39)
    assert (sub * 1.0)[0].item() != 0.0   # this thread still computes with subnormals
