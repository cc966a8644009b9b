"""fastclip's own AVX-512 kernels (csrc/gemm_avx512.h, csrc/conv_direct.h) and the paths that
run where they do not: the same float32 ops in a child process with ``FASTCLIP_ISA=avx2`` (BLAS
and torch instead) against the kernels' results here. Each path is also tested against the
float64 reference on its own (tests/rules, tests/ops/test_ops_linear.py)."""
import subprocess
import sys

import numpy as np
import pytest
import torch

from fastclip import _C, ops
from harness import child_env

# The ops a child runs and saves: a recurrent layer's forward outputs and input gradients, a
# linear map's clipped sum (the Linear rule's clipped_product), a conv's direct norms with its
# kept per-example gradients, and a ghost norm of a long linear layer (the A^T B / A B^T tiles).
_CHILD = r"""
import sys
import numpy as np
import torch
from fastclip import _C, ops
from fastclip.layers.linear import clipped_product
assert _C.isa() == sys.argv[1], (_C.isa(), sys.argv[1])
g = torch.Generator().manual_seed(0)
r = lambda *s: torch.randn(*s, generator=g) * 0.3
x, w_ih, w_hh, b = r(16, 7, 23), r(4 * 37, 23), r(4 * 37, 37), r(4 * 37)
fwd = ops.rnn_forward("lstm", x, w_ih, w_hh, b, b)
bwd = ops.rnn_backward("lstm", r(16, 7, 37), None, None, w_ih, w_hh, *fwd[3:7])
A, G, c = r(9, 5, 70), r(9, 5, 13), torch.rand(9, generator=g, dtype=torch.float64)
clipped = clipped_product(A, G, c, None)
xc, gc = r(4, 5, 12, 10), r(4, 40, 12, 10)
keep = torch.empty(4, 1, 45, 40)
conv, _ = ops.conv_sq_norms(xc, gc, (40, 5, 3, 3), 1, 1, 1, 1, "direct", per_example=keep)
ghost, _ = ops.linear_sq_norms(r(3, 100, 40), r(3, 100, 50), "ghost")
out = [fwd[0], fwd[1], bwd[0], clipped, conv, keep, ghost]
np.savez(sys.argv[2], *[t.numpy() for t in out])
"""


def _run(tmp_path, isa):
    out = tmp_path / f"{isa}.npz"
    # FASTCLIP_GEMM_KERNELS=1: the AVX-512 process runs the kernels even on a CPU where BLAS is
    # preferred (AMD Zen 4), so that they are what the AVX2 process's BLAS / torch paths meet.
    subprocess.run([sys.executable, "-c", _CHILD, isa, str(out)],
                   env=child_env(FASTCLIP_ISA=isa, FASTCLIP_GEMM_KERNELS="1"), check=True,
                   timeout=300)
    data = np.load(out)
    return [torch.from_numpy(data[f"arr_{i}"]) for i in range(len(data.files))]


def test_availability_follows_the_isa_level():
    avx512 = _C.isa() == "avx512"
    assert _C.small_gemm_available() == avx512
    old = _C.set_conv_direct_fused(True)
    try:
        assert _C.conv_direct_fused_available() == avx512
        _C.set_conv_direct_fused(False)
        assert not _C.conv_direct_fused_available()
    finally:
        _C.set_conv_direct_fused(old)
    # The preference for the GEMM kernels switches only where they run.
    old = _C.set_gemm_kernels(True)
    try:
        assert _C.gemm_kernels_enabled() == avx512
        assert _C.set_gemm_kernels(False) is True
        assert not _C.gemm_kernels_enabled()
    finally:
        _C.set_gemm_kernels(old)
    if not avx512:
        with pytest.raises(ValueError, match="needs an x86-64 CPU with AVX-512"):
            _C.clipped_gemm(np.ones((2, 3), np.float32), np.ones((2, 4), np.float32),
                            np.ones(2, np.float32), 1)


def test_without_avx512_the_same_ops_agree(tmp_path):
    # Every float32 op the kernels serve gives, on the BLAS / torch paths of an AVX2 process,
    # what it gives here within float32 rounding (and the child asserts it runs avx2 kernels).
    if _C.isa() == "portable":
        pytest.skip("this CPU runs portable kernels only: there is no lower level to compare")
    here = _run(tmp_path, _C.isa())
    low = _run(tmp_path, "avx2")
    names = ["rnn out", "rnn h_n", "rnn dx", "clipped sum", "conv norms", "conv kept", "ghost"]
    for name, a, b in zip(names, here, low):
        assert a.dtype == b.dtype == torch.float32, name
        scale = max(float(b.abs().max()), 1.0)
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * scale, msg=name)


def _gemm_state_in_child(**env):
    """(gemm_kernels_enabled(), small_gemm_available()) in a fresh process: the default is read
    once, when the core first asks. ``env``: variables to set, None to remove."""
    e = child_env()
    for k, v in env.items():
        if v is None:
            e.pop(k, None)
        else:
            e[k] = v
    code = "from fastclip import _C; print(_C.gemm_kernels_enabled(), _C.small_gemm_available())"
    out = subprocess.run([sys.executable, "-c", code], env=e, check=True, timeout=300,
                         capture_output=True, text=True).stdout.split()
    return out[0] == "True", out[1] == "True"


def test_the_gemm_kernel_default_follows_the_environment():
    # FASTCLIP_GEMM_KERNELS=0|1 sets the default, never more than the ISA allows.
    for value, want in (("0", False), ("1", True)):
        enabled, available = _gemm_state_in_child(FASTCLIP_GEMM_KERNELS=value)
        assert enabled == (want and available), (value, enabled, available)


def _cpu_vendor_family():
    """(vendor_id, cpu family) from /proc/cpuinfo, or None where it cannot be read."""
    try:
        with open("/proc/cpuinfo") as f:
            first = f.read().split("\n\n")[0].splitlines()
        info = {k.strip(): v.strip() for k, v in (line.split(":", 1) for line in first if ":" in line)}
        return info["vendor_id"], int(info["cpu family"])
    except (OSError, KeyError, ValueError):
        return None


def test_the_gemm_kernel_default_follows_the_core():
    # Without FASTCLIP_GEMM_KERNELS: on where the core issues 512-bit FMAs at full width (Intel,
    # AMD family 26 = Zen 5 and later), off on AMD Zen 4 (family 25), never without AVX-512.
    cpu = _cpu_vendor_family()
    if cpu is None:
        pytest.skip("/proc/cpuinfo does not name this CPU's vendor and family")
    vendor, family = cpu
    enabled, available = _gemm_state_in_child(FASTCLIP_GEMM_KERNELS=None, FASTCLIP_ISA=None)
    full_width = vendor != "AuthenticAMD" or family >= 26
    assert enabled == (available and full_width), (vendor, family, enabled, available)


@pytest.mark.parametrize("kernels", [True, False])
def test_both_gemm_paths_match_the_reference(kernels):
    # The linear norms (ghost Gram tiles by A B^T, direct tiles by A^T B), a conv's ghost norms and
    # a linear clipped sum, with the AVX-512 kernels preferred and bypassed, against float64.
    from fastclip.layers.linear import clipped_product

    if kernels and not _C.small_gemm_available():
        pytest.skip("the AVX-512 GEMM kernels do not run on this CPU")
    g = torch.Generator().manual_seed(3)
    r = lambda *s: torch.randn(*s, generator=g)
    old = _C.set_gemm_kernels(kernels)
    try:
        assert _C.gemm_kernels_enabled() == kernels
        A, G = r(3, 70, 40), r(3, 70, 50)
        want = torch.einsum("btp,btd->bpd", G.double(), A.double()).pow(2).sum((1, 2))
        for method in ("ghost", "direct"):
            w, _ = ops.linear_sq_norms(A, G, method)
            torch.testing.assert_close(w.double(), want, rtol=1e-5, atol=0, msg=method)
        c = torch.rand(3, generator=g, dtype=torch.float64)
        got = clipped_product(A, G, c, None)
        ref = torch.einsum("b,btp,btd->pd", c, G.double(), A.double())
        torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-4)
        x, gy = r(2, 3, 9, 9), r(2, 40, 9, 9)
        w, _ = ops.conv_sq_norms(x, gy, (40, 3, 3, 3), 1, 1, 1, 1, "ghost")
        per = torch.stack([torch.nn.grad.conv2d_weight(x[i:i + 1].double(), (40, 3, 3, 3),
                                                       gy[i:i + 1].double(), padding=1)
                           for i in range(2)])
        torch.testing.assert_close(w.double(), per.pow(2).sum((1, 2, 3, 4)), rtol=1e-5, atol=0)
    finally:
        _C.set_gemm_kernels(old)
