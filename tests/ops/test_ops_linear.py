"""The linear per-example norm op: native core (every method, BLAS on and off) and ops.py against a
float64 reference that forms every per-example gradient explicitly, and against the torch ops."""
import pytest
import torch
from hypothesis import given, settings, strategies as st

from fastclip import _C, ops

METHODS = ("auto", "ghost", "direct")


def reference(A, G):
    """float64 (w_sq, b_sq) from explicit per-example gradients G_i^T A_i (A, G: (B, T, d/p))."""
    A, G = A.detach().double(), G.detach().double()
    per_example = torch.einsum("btp,btd->bpd", G, A)
    return per_example.square().sum((1, 2)), G.sum(1).square().sum(-1)


def assert_close_scaled(got, want, dtype):
    """Like harness.assert_close, but atol relative to the largest reference value, and the
    dtype (the input's) and shape asserted: norms of kernels compared at their own scale."""
    assert got.dtype == dtype
    assert got.shape == want.shape
    scale = float(want.abs().max()) if want.numel() else 0.0
    rtol = 1e-4 if dtype == torch.float32 else 1e-10
    torch.testing.assert_close(got.double(), want, rtol=rtol, atol=rtol * 1e-2 * scale)


@pytest.fixture(params=[True, False], ids=["blas", "loops"])
def blas(request):
    previous = _C.set_blas_enabled(request.param)
    yield request.param
    _C.set_blas_enabled(previous)


def check_all(A, G, bias, A3=None, G3=None):
    """Every method through ops and the torch ops agrees with the reference."""
    A3 = A if A3 is None else A3
    G3 = G if G3 is None else G3
    w_ref, b_ref = reference(A3, G3)
    for method in METHODS:
        for fn in (ops.linear_sq_norms, ops.linear_sq_norms_torch):
            w, b = fn(A, G, method=method, bias=bias)
            assert_close_scaled(w, w_ref, A.dtype)
            if bias:
                assert_close_scaled(b, b_ref, A.dtype)
            else:
                assert b is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("B", [0, 1, 2, 7, 33])
@pytest.mark.parametrize("T", [1, 2, 5, 64])
@pytest.mark.parametrize("d,p", [(3, 4), (17, 9), (64, 130)])
@pytest.mark.parametrize("bias", [False, True])
def test_matches_reference(blas, dtype, B, T, d, p, bias):
    g = torch.Generator().manual_seed(B * 1000 + T * 10 + d)
    A = torch.randn(B, T, d, generator=g, dtype=dtype)
    G = torch.randn(B, T, p, generator=g, dtype=dtype)
    check_all(A, G, bias)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_native_binding_every_method(blas, dtype):
    A = torch.randn(5, 9, 11, dtype=dtype)
    G = torch.randn(5, 9, 6, dtype=dtype)
    w_ref, b_ref = reference(A, G)
    for method in METHODS:
        w, b = _C.linear_sq_norms(A.numpy(), G.numpy(), method, True, 2)
        assert_close_scaled(torch.from_numpy(w), w_ref, dtype)
        assert_close_scaled(torch.from_numpy(b), b_ref, dtype)
    w, b = _C.linear_sq_norms(A[:, 0].numpy(), G[:, 0].numpy(), "product", False, 1)
    assert_close_scaled(torch.from_numpy(w), reference(A[:, :1], G[:, :1])[0], dtype)
    assert b is None


def test_two_dim_inputs():
    A, G = torch.randn(6, 10), torch.randn(6, 3)
    check_all(A, G, True, A.unsqueeze(1), G.unsqueeze(1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_strided_batch_and_positions(blas, dtype):
    # Slices leave strides on the B and T dims; the core reads them in place.
    A = torch.randn(14, 21, 13, dtype=dtype)[::2, 1::3]
    G = torch.randn(14, 21, 8, dtype=dtype)[::2, 1::3]
    assert not A.is_contiguous()
    check_all(A, G, True)
    w, _ = _C.linear_sq_norms(A.numpy(), G.numpy(), "ghost", False, 2)
    assert_close_scaled(torch.from_numpy(w), reference(A, G)[0], dtype)
    w, _ = _C.linear_sq_norms(A.numpy(), G.numpy(), "direct", False, 2)
    assert_close_scaled(torch.from_numpy(w), reference(A, G)[0], dtype)


def test_broadcast_rows_with_zero_strides(blas):
    # Stride 0 along B and T (expand) is legal input; BLAS cannot take it, the loops can.
    A = torch.randn(1, 1, 5).expand(4, 6, 5)
    G = torch.randn(4, 6, 3)
    check_all(A, G, True)


def test_transposed_last_dim_through_ops():
    A = torch.randn(4, 7, 6).transpose(1, 2)  # (4, 6, 7) with last-dim stride 6
    G = torch.randn(4, 6, 5)
    assert A.stride(-1) != 1
    check_all(A, G, True)


def test_four_dim_inputs_are_positions():
    A, G = torch.randn(3, 4, 5, 6), torch.randn(3, 4, 5, 2)
    check_all(A, G, True, A.reshape(3, 20, 6), G.reshape(3, 20, 2))


def test_requires_grad_inputs():
    A = torch.randn(3, 5, 4, requires_grad=True)
    G = torch.randn(3, 5, 2, requires_grad=True)
    w, b = ops.linear_sq_norms(A, G, bias=True)
    assert not w.requires_grad
    assert_close_scaled(w, reference(A, G)[0], torch.float32)


@pytest.mark.parametrize("shape", [(3, 0, 4, 5), (3, 6, 0, 5), (3, 6, 4, 0), (0, 6, 4, 5)])
def test_empty_dims_give_zeros(shape):
    B, T, d, p = shape
    for method in METHODS:
        w, b = ops.linear_sq_norms(torch.randn(B, T, d), torch.randn(B, T, p), method, bias=True)
        assert w.shape == (B,) and b.shape == (B,)
        assert not w.any()
        if p == 0 or T == 0:
            assert not b.any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_long_positions_use_tiled_ghost(blas, dtype):
    # T = 600 spans three 256-row tiles (the last partial), so off-diagonal tiles are exercised.
    A, G = torch.randn(3, 600, 20, dtype=dtype), torch.randn(3, 600, 7, dtype=dtype)
    w, _ = _C.linear_sq_norms(A.numpy(), G.numpy(), "ghost", False, 2)
    assert_close_scaled(torch.from_numpy(w), reference(A, G)[0], dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_wide_layer_uses_blocked_direct(blas, dtype):
    # p = 300 spans three 128-row blocks, d = 2100 two 2048-column blocks.
    A, G = torch.randn(2, 3, 2100, dtype=dtype), torch.randn(2, 3, 300, dtype=dtype)
    w, _ = _C.linear_sq_norms(A.numpy(), G.numpy(), "direct", False, 2)
    assert_close_scaled(torch.from_numpy(w), reference(A, G)[0], dtype)


def test_thread_count_does_not_change_result():
    A, G = torch.randn(33, 64, 64), torch.randn(33, 64, 96)
    previous = torch.get_num_threads()
    try:
        results = {}
        for n in (1, 2):
            torch.set_num_threads(n)
            results[n] = [ops.linear_sq_norms(A, G, m, bias=True) for m in METHODS]
    finally:
        torch.set_num_threads(previous)
    for (w1, b1), (w2, b2) in zip(results[1], results[2]):
        assert torch.equal(w1, w2) and torch.equal(b1, b2)  # one example, one thread, same code


def test_auto_choice():
    assert ops.choose_linear_method(1, 512, 512) == "product"
    # Ghost costs ~T^2 (d + p), direct ~2 T d p: short sequences of wide layers go ghost,
    # long sequences of narrow layers go direct.
    assert ops.choose_linear_method(16, 1024, 1024) == "ghost"
    assert ops.choose_linear_method(1024, 16, 16) == "direct"
    for T, d, p in [(2, 3, 4), (64, 64, 64), (300, 1000, 10), (5, 1, 1000)]:
        assert ops.choose_linear_method(T, d, p) == _C.choose_linear_method(T, d, p)


def test_non_cpu_fallback_dtype():
    # float16 has no native kernel: it runs the torch ops in its own dtype.
    A, G = torch.randn(3, 4, 5), torch.randn(3, 4, 2)
    w, _ = ops.linear_sq_norms(A.to(torch.bfloat16), G.to(torch.bfloat16))
    assert w.dtype == torch.bfloat16
    torch.testing.assert_close(w.double(), reference(A, G)[0], rtol=5e-2, atol=1e-2)


@settings(max_examples=60, deadline=None)
@given(B=st.integers(0, 6), T=st.integers(0, 40), d=st.integers(0, 40), p=st.integers(0, 40),
       double=st.booleans(), bias=st.booleans(), method=st.sampled_from(METHODS),
       step=st.integers(1, 3))
def test_random_shapes(B, T, d, p, double, bias, method, step):
    dtype = torch.float64 if double else torch.float32
    A = torch.randn(B * step, T, d, dtype=dtype)[::step]
    G = torch.randn(B * step, T, p, dtype=dtype)[::step]
    w_ref, b_ref = reference(A, G)
    w, b = ops.linear_sq_norms(A, G, method, bias)
    assert_close_scaled(w, w_ref, dtype)
    if bias:
        assert_close_scaled(b, b_ref, dtype)


@pytest.mark.skipif(not ops.HAS_BLAS, reason="no scipy-openblas32 in this environment")
@pytest.mark.parametrize("pinned", [None, "Haswell"])
def test_blas_info_names_a_pinned_kernel_core(pinned):
    # OPENBLAS_CORETYPE overrides OpenBLAS' own kernel choice (an environment pinning Haswell on
    # an AVX-512 machine halves the GEMM rate): the core's description must say so, and only then.
    import platform
    import subprocess
    import sys

    from harness import child_env

    if pinned and platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("Haswell is an x86-64 OpenBLAS core")
    env = {k: v for k, v in child_env().items() if k != "OPENBLAS_CORETYPE"}
    if pinned:
        env["OPENBLAS_CORETYPE"] = pinned
    out = subprocess.run([sys.executable, "-c", "from fastclip import ops; print(ops.blas_info())"],
                         env=env, capture_output=True, text=True, check=True, timeout=120).stdout
    assert out.startswith("OpenBLAS (")
    if pinned:
        assert f"[kernels pinned by OPENBLAS_CORETYPE={pinned}]" in out
        assert pinned in out.split(")")[0]   # the core OpenBLAS reports is the pinned one
    else:
        assert "pinned" not in out


# -- the clipped sum by the AVX-512 kernel (csrc/gemm_avx512.h) ----------------------------------

needs_avx512 = pytest.mark.skipif(
    _C is None or not _C.small_gemm_available(),
    reason="the AVX-512 GEMM kernels do not run on this CPU (fastclip._C.isa() is not avx512)")


def clipped_reference(A, G, c):
    """float64 sum_i c_i G_i^T A_i from A (B, T, d), G (B, T, p), c (B,)."""
    return torch.einsum("b,btp,btd->pd", c.double(), G.double(), A.double())


@needs_avx512
@pytest.mark.parametrize("B,T,d,p", [
    (0, 1, 5, 3), (1, 1, 1, 1), (7, 1, 17, 5), (256, 1, 784, 512), (3, 5, 64, 6),
    (4, 9, 130, 13), (2, 70, 31, 200), (5, 300, 48, 7),   # 300 rows per example: several depth blocks
])
def test_clipped_gemm_matches_reference(B, T, d, p):
    # Column tails (d not a multiple of 16 or 64), row-block tails (p not a multiple of 6),
    # several 128-row depth blocks, rows read with a stride (A and G sliced from wider tensors).
    gen = torch.Generator().manual_seed(B * 1000 + T)
    A = torch.randn(B, T, d + 3, generator=gen)[..., :d]
    G = torch.randn(B, T, p + 5, generator=gen)[..., 1:p + 1]
    c = torch.rand(B, generator=gen, dtype=torch.float64)
    c[::3] = 0.0
    got = ops.clipped_gemm(A, G, c)
    assert got.dtype == torch.float32 and got.shape == (p, d)
    want = clipped_reference(A, G, c)
    scale = float(want.abs().max()) if want.numel() else 0.0
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5 * max(scale, 1.0))


@needs_avx512
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("B,T,d,p", [(5, 1, 7, 5), (3, 50, 70, 13), (2, 3, 130, 1)])
def test_clipped_gemm_half_inputs_are_their_float32_copies(dtype, B, T, d, p):
    # bf16 / fp16 captures are widened in the kernel: bit for bit the float32 copies' sum, with
    # subnormal, zero and negative-zero values among them (fp16's subnormal widening).
    gen = torch.Generator().manual_seed(T)
    A = (torch.randn(B, T, d, generator=gen) * 3).to(dtype)
    G = (torch.randn(B, T, p + 2, generator=gen)).to(dtype)[..., 2:]
    tiny = torch.finfo(dtype).tiny
    A.view(-1)[:4] = torch.tensor([tiny / 4, -tiny / 8, 0.0, -0.0], dtype=dtype)
    G.reshape(-1)[:2] = torch.tensor([tiny / 2, -tiny / 16], dtype=dtype)
    c = torch.rand(B, generator=gen, dtype=torch.float64)
    got = ops.clipped_gemm(A, G, c)
    assert got.dtype == torch.float32
    assert torch.equal(got, ops.clipped_gemm(A.float(), G.float(), c))
    want = clipped_reference(A, G, c)
    torch.testing.assert_close(got.double(), want, rtol=1e-4,
                               atol=1e-5 * max(float(want.abs().max()), 1.0))


@needs_avx512
def test_clipped_gemm_thread_count_does_not_change_result():
    A, G, c = torch.randn(6, 40, 100), torch.randn(6, 40, 70), torch.rand(6)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = ops.clipped_gemm(A, G, c)
        torch.set_num_threads(2)
        two = ops.clipped_gemm(A, G, c)
    finally:
        torch.set_num_threads(old)
    assert torch.equal(one, two)


@needs_avx512
@pytest.mark.parametrize("args,exc,match", [
    (lambda A, G, c: (A.astype("float64"), G, c, 1), TypeError, "must be float32 for kind"),
    (lambda A, G, c: (A, G, c, 1, "bfloat16"), TypeError, r"must be 16-bit \(the raw bits\)"),
    (lambda A, G, c: (A.view("int16")[:, :5], G.view("int16")[:, :3], c, 1, "half"), ValueError,
     "kind must be"),
    (lambda A, G, c: (A, G, c.astype("float64"), 1), TypeError, "factors must be float32"),
    (lambda A, G, c: (A, G[:3], c, 1), ValueError, "rows differ"),
    (lambda A, G, c: (A, G, c[:2], 1), ValueError, "factors must be 1-D"),
    (lambda A, G, c: (A, G, c, 0), ValueError, "T must be >= 1"),
    (lambda A, G, c: (A[None], G, c, 1), ValueError, "must be 2-D"),
    (lambda A, G, c: (A, G, c[::2].repeat(2), 1), None, None),
    (lambda A, G, c: (A, G, "c", 1), TypeError, "factors must be a numpy.ndarray"),
])
def test_clipped_gemm_binding_hostile(args, exc, match):
    import numpy as np
    A = np.random.rand(4, 5).astype(np.float32)
    G = np.random.rand(4, 3).astype(np.float32)
    c = np.random.rand(4).astype(np.float32)
    call = args(A, G, c)
    if exc is None:
        assert _C.clipped_gemm(*call).shape == (3, 5)
        return
    with pytest.raises(exc, match=match):
        _C.clipped_gemm(*call)
