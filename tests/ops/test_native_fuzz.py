"""Extreme sizes at every native binding (fastclip._C, fastclip._nanobatch): 0, 1, 2^31, 2^62,
-1, huge kernel / stride / padding / dilation / groups, mismatched shapes. Each call must return a
correct result or raise ValueError/TypeError: never a signal, a hang or a failed allocation.

The calls run in child interpreters (many cases per child, under an address-space limit so a
runaway allocation is a MemoryError, not the machine's OOM killer); a child that dies names the
case it was running, and the rest of the cases run in a fresh child.
"""
from __future__ import annotations

import glob
import itertools
import json
import os
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/<group>/ -> repo
BIG = [2**31, 2**62, 2**63 - 1]
EXTREME = [0, 1, -1, 2, *BIG]

# The child: loads the two extension modules from their files (not through the fastclip package,
# so torch is not imported and the address-space limit stays meaningful), points the core at the
# OpenBLAS wheel when there is one (BLAS takes int sizes: its guards are under test too), then runs
# cases read from stdin, printing START/END lines around each.
CHILD = textwrap.dedent(r"""
    import importlib.util, json, resource, sys, glob, os
    limit = 6 << 30
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    import numpy as np

    def load(name):
        path = glob.glob(os.path.join(sys.argv[1], "fastclip", name + ".*.so"))[0]
        spec = importlib.util.spec_from_file_location(name, path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod

    _C, _nanobatch = load("_C"), load("_nanobatch")
    try:
        import scipy_openblas32
        for p in sorted(glob.glob(os.path.join(scipy_openblas32.get_lib_dir(),
                                               "lib" + scipy_openblas32.get_library() + ".*"))):
            if _C.set_blas_library(p):
                break
    except ImportError:
        pass
    f32, f64 = np.float32, np.float64
    def z(*shape, dtype=f32):
        return np.zeros(shape, dtype)
    def bc(*shape, dtype=f32):
        # a zero-stride view: any declared shape, one element of memory
        return np.broadcast_to(np.ones((1,) * len(shape), dtype), shape)
    def r(*shape, dtype=f32):
        return np.random.default_rng(0).standard_normal(shape).astype(dtype)
    cases = json.loads(sys.stdin.read())
    for i, code in cases:
        print("START", i, flush=True)
        try:
            eval(code)
            res = "ok"
        except (ValueError, TypeError) as e:
            res = "refused " + type(e).__name__ + ": " + str(e)[:200]
        except BaseException as e:
            res = "WRONG " + type(e).__name__ + ": " + str(e)[:200]
        print("END", i, json.dumps(res), flush=True)
""")


def run_cases(cases, timeout=120):
    """{index: outcome} for [(code, must_raise)]: "ok", "refused ...", "WRONG ...", "CRASH ..."
    (a signal or an exit), "HANG" (no END within the timeout)."""
    results = {}
    todo = list(enumerate(cases))
    while todo:
        proc = subprocess.run([sys.executable, "-c", CHILD, ROOT], input=json.dumps(
            [(i, c) for i, (c, _) in todo]), capture_output=True, text=True, timeout=None
            if timeout is None else timeout * 4)
        started = None
        for line in proc.stdout.splitlines():
            kind, _, rest = line.partition(" ")
            if kind == "START":
                started = int(rest)
            elif kind == "END":
                idx, _, res = rest.partition(" ")
                results[int(idx)] = json.loads(res)
                started = None
        if proc.returncode != 0:
            if started is None:  # died before the first case: the harness itself is broken
                raise RuntimeError(f"fuzz child failed to start: {proc.stderr[-2000:]}")
            sig = -proc.returncode if proc.returncode < 0 else None
            results[started] = (f"CRASH signal {sig}" if sig else
                                f"CRASH exit {proc.returncode}: {proc.stderr[-300:]}")
        todo = [(i, c) for i, c in todo if i not in results]
    return results


def check(cases):
    """Each case is (code, expectation): True = must raise ValueError/TypeError, False = may also
    return, "big" = valid but may need more memory than the child has (MemoryError allowed)."""
    res = run_cases(cases)
    bad = []
    for i, (code, must_raise) in enumerate(cases):
        out = res[i]
        if must_raise == "big" and out.startswith("WRONG MemoryError"):
            continue  # valid input larger than the child's memory: a clean MemoryError is right
        if out.startswith(("WRONG", "CRASH")) or (must_raise is True and out == "ok"):
            bad.append(f"{code}\n    -> {out}")
    assert not bad, f"{len(bad)} of {len(cases)} cases misbehaved:\n" + "\n".join(bad)
    return res


def _conv_out(n, k, s, p, d):
    span = n + 2 * p - d * (k - 1) - 1
    return 0 if span < 0 else span // s + 1


def _conv_valid(k, s, p, d, groups, C=4, O=4, n=5):
    if min(k, s, d, groups) < 1 or p < 0 or max(k, s, p, d, groups) >= 2**63:
        return False, 0
    if C % groups or O % groups:
        return False, 0
    return True, _conv_out(n, k, s, p, d)


def conv_cases():
    """kernel / stride / padding / dilation / groups at every extreme, on each dim; G shaped for
    the output the arguments imply when that is small, else a small (wrong) one."""
    cases = []
    base = dict(k=3, s=1, p=1, d=1, g=1)
    for field, v in itertools.product(base, EXTREME + [2**64]):
        for dim in (0, 1):
            a = dict(base)
            vals = {f: [a[f], a[f]] for f in a if f != "g"}
            if field == "g":
                a["g"] = v
            else:
                vals[field][dim] = v
            ok0, o0 = _conv_valid(vals["k"][0], vals["s"][0], vals["p"][0], vals["d"][0], a["g"])
            ok1, o1 = _conv_valid(vals["k"][1], vals["s"][1], vals["p"][1], vals["d"][1], a["g"])
            valid = ok0 and ok1 and o0 < 64 and o1 < 64
            go = (o0, o1) if valid else (5, 5)
            code = (f"_C.conv_sq_norms(r(2, 4, 5, 5), r(2, 4, {go[0]}, {go[1]}), {vals['k']}, "
                    f"{vals['s']}, {vals['p']}, {vals['d']}, {a['g']}, 'auto', True, 2)")
            cases.append((code, not valid))
    # The report: a kernel near 2^62 whose product with another size wraps.
    for k, dil in [(2**62, 4), (2**62, 1), (2**61 + 1, 8), (2**31, 2**31 + 2), (2**62, 2)]:
        for method in ("auto", "ghost", "direct"):
            cases.append((f"_C.conv_sq_norms(r(2, 4, 5, 5), r(2, 4, 5, 5), [{k}, 1], [1, 1], "
                          f"[0, 0], [{dil}, 1], 1, '{method}', True, 2)", True))
            cases.append((f"_C.conv_sq_norms(r(2, 4, 5, 5), r(2, 4, 5, 5), [{k}, {k}], [1, 1], "
                          f"[0, 0], [{dil}, {dil}], 1, '{method}', True, 2)", True))
    # Kernel, padding and dilation that do match a 1-position output, but whose unfold is huge.
    for k in (2**31, 2**40, 2**62):
        cases.append((f"_C.conv_sq_norms(r(1, 4, 5), r(1, 4, 1), [{k}], [1], [{k}], [1], 1)", True))
        cases.append((f"_C.conv_sq_norms(r(1, 4, 5), r(1, 4, 1), [{k}], [1], [0, {k}], [1], 1)",
                      True))
    # Huge padding with a huge stride (one output position reading only zeros is valid; the sum
    # in + pads overflows for the biggest).
    for p in (2**31, 2**61, 2**62):
        cases.append((f"_C.conv_sq_norms(r(1, 2, 5), r(1, 2, 1), [1], [{2**63 - 1}], [{p}], [1], 1)",
                      p >= 2**62))
    # groups with no channels, and padding lists of the wrong length / sign / size.
    cases += [
        ("_C.conv_sq_norms(z(2, 0, 5), z(2, 0, 5), [1], [1], [0], [1], 2**62)", True),
        ("_C.conv_sq_norms(z(2, 0, 5), z(2, 0, 5), [1], [1], [0], [1], 1)", False),
        ("_C.conv_sq_norms(r(2, 4, 5), r(2, 4, 5), [1], [1], [0, 0, 0], [1], 1)", True),
        ("_C.conv_sq_norms(r(2, 4, 5), r(2, 4, 5), [1], [1], [-1, 1], [1], 1)", True),
        ("_C.conv_sq_norms(r(2, 4, 5), r(2, 4, 5), [1], [1], [2**64], [1], 1)", True),
        ("_C.conv_sq_norms(r(2, 4, 5), r(2, 4, 5), [1], [1], [0], [1], 2**64)", True),
        ("_C.conv_sq_norms(r(2, 4, 5), r(3, 4, 5), [1], [1], [0], [1], 1)", True),
        ("_C.conv_sq_norms(r(2, 4, 5), r(2, 4, 5, 1), [1], [1], [0], [1], 1)", True),
        ("_C.conv_sq_norms(r(2, 4, 5, dtype=f64), r(2, 4, 5), [1], [1], [0], [1], 1)", True),
        ("_C.conv_sq_norms(bc(2, 4, 2**31), r(2, 4, 5), [1], [1], [0], [1], 1)", True),
        ("_C.conv_sq_norms(bc(2, 4, 2**62), r(2, 4, 5), [1], [1], [0], [1], 1)", True),
        ("_C.conv_sq_norms(bc(2**31, 4, 5), bc(2**31, 4, 5), [1], [1], [0], [1], 1)", True),
        ("_C.conv_sq_norms(bc(2, 2**31, 4), r(2, 4, 4), [1], [1], [0], [1], 1)", True),
    ]
    for P, K, Og in itertools.product([0, 1, -1, 2**31, 2**62], repeat=3):
        cases.append((f"_C.choose_conv_method({P}, {K}, {Og})", -1 in (P, K, Og) or K * Og >= 2**63))
    return cases


def linear_cases():
    cases = []
    for m in ("auto", "product", "ghost", "direct"):
        for shp_a, shp_g, must in [
            ("bc(2, 2**62, 4)", "bc(2, 2**62, 4)", True),       # declares 2^65 elements
            ("bc(1, 2**62, 1)", "bc(1, 2**62, 1)", True),
            ("bc(2**62, 1)", "bc(2**62, 1)", True),
            ("bc(2, 2**31, 4)", "bc(2, 2**31 - 1, 4)", True),   # T mismatch
            ("bc(2**31, 4)", "r(3, 4)", True),                  # B mismatch
            ("bc(1, 2**31, 1)", "bc(1, 2**31, 1)", m in ("ghost", "product")),  # 2^62 flops / T
            ("z(0, 2**31, 4)", "z(0, 2**31, 4)", m == "product"),
            ("r(2, 3, 0)", "r(2, 3, 5)", m == "product"),
            ("r(2, 1, 4)", "r(2, 1, 5)", False),
        ]:
            cases.append((f"_C.linear_sq_norms({shp_a}, {shp_g}, '{m}', True, 2)", must))
    for T, d, p in itertools.product([0, 1, -1, 2**31, 2**62, 2**63 - 1], repeat=3):
        cases.append((f"_C.choose_linear_method({T}, {d}, {p})", -1 in (T, d, p)))
    cases += [("_C.linear_sq_norms(r(2, 3), r(2, 4), 'auto', False, 2**40)", True),
              ("_C.linear_sq_norms(r(2, 3), r(2, 4), 'auto', False, -1)", True)]
    return cases


def embedding_cases():
    ids = "np.zeros((2, 3), np.int64)"
    cases = []
    for V in (0, 1, -1, 2**31, 2**62, 2**63 - 1, 2**64):
        for pad in ("None", "0", "-1", str(2**62), str(2**64)):
            valid = 1 <= V < 2**63 and (pad == "None" or 0 <= int(pad) < V)
            cases.append((f"_C.embedding_sq_norms({ids}, r(2, 3, 4), {V}, {pad}, 2)", not valid))
    cases += [
        ("_C.embedding_sq_norms(np.full((2, 3), 2**62, np.int64), r(2, 3, 4), 10, None, 1)", True),
        ("_C.embedding_sq_norms(np.full((2, 3), -1, np.int64), r(2, 3, 4), 10, None, 1)", True),
        ("_C.embedding_sq_norms(np.broadcast_to(np.zeros((1, 1), np.int64), (2, 2**62)), "
         "bc(2, 2**62, 4), 10, None, 1)", True),
        ("_C.embedding_sq_norms(np.broadcast_to(np.zeros((1, 1), np.int64), (1, 2**33)), "
         "bc(1, 2**33, 1), 10, None, 1)", True),
        (f"_C.embedding_sq_norms({ids}, r(3, 3, 4), 10, None, 1)", True),
        (f"_C.embedding_sq_norms({ids}, bc(2, 2**31, 4), 10, None, 1)", True),
        (f"_C.embedding_linear_cross({ids}, r(2, 3, 4), r(2, 5, 4), r(2, 5, 10), None, 1)", False),
        (f"_C.embedding_linear_cross({ids}, r(2, 3, 4), bc(2, 2**62, 4), bc(2, 2**62, 10), None, 1)",
         True),
        (f"_C.embedding_linear_cross({ids}, r(2, 3, 4), bc(2, 2**31, 4), bc(2, 2**31, 2**31), None, 1)",
         True),
        (f"_C.embedding_linear_cross({ids}, r(2, 3, 4), r(2, 5, 4), r(2, 5, 10), {2**62}, 1)", True),
        (f"_C.embedding_linear_cross({ids}, r(2, 3, 4), r(2, 5, 5), r(2, 5, 10), None, 1)", True),
        ("_C.embedding_linear_cross(np.broadcast_to(np.zeros((1, 1), np.int64), (2, 2**31)), "
         "bc(2, 2**31, 2**2), bc(2, 2**31, 4), bc(2, 2**31, 10), None, 1)", True),
    ]
    return cases


def norm_cases():
    cases = []
    for shape, must in [("2, 2**62, 4", True), ("2**31, 2**31, 2", True), ("2, 3, 4", False),
                        ("0, 2**31, 4", False)]:
        cases.append((f"_C.last_dims_affine_grads(bc({shape}), bc({shape}), 1e-5, False, True, 2)",
                      must))
    for groups in EXTREME:
        valid = 1 <= groups <= 4 and 4 % groups == 0
        cases.append((f"_C.channel_affine_grads(r(2, 4, 5), r(2, 4, 5), {groups}, 1e-5)", not valid))
        cases.append((f"_C.channel_affine_grads(z(2, 0, 5), z(2, 0, 5), {groups}, 1e-5)",
                      not 1 <= groups < 2**63))
    cases += [
        ("_C.channel_affine_grads(r(2, 4, 5), r(2, 4, 6), 2, 1e-5)", True),
        ("_C.channel_affine_grads(r(2, 4, 5), r(2, 4, 5), 4, 1e-5, np.zeros(5), np.ones(5))", True),
        ("_C.channel_affine_grads(r(2, 4, 5), r(2, 4, 5), 4, float('nan'))", True),
        ("_C.last_dims_affine_grads(r(2, 3, 4), r(2, 3, 4), -1.0)", True),
    ]
    return cases


def rnn_cases():
    w_ih, w_hh = "r(16, 3)", "r(16, 4)"  # LSTM: 4 gates x hidden 4, input 3
    cases = []
    for x, must in [("r(2, 5, 3)", False), ("bc(2**31, 2**31, 3)", True), ("bc(2, 2**62, 3)", True),
                    ("bc(2**20, 2**20, 3)", True), ("z(0, 5, 3)", False), ("r(2, 5, 4)", True),
                    ("r(2, 5)", True)]:
        cases.append((f"_C.rnn_forward('lstm', {x}, {w_ih}, {w_hh})", must))
    cases += [
        (f"_C.rnn_forward('lstm', r(2, 5, 3), {w_ih}, {w_hh}, lengths=np.array([0, 5]))", True),
        (f"_C.rnn_forward('lstm', r(2, 5, 3), {w_ih}, {w_hh}, lengths=np.array([2**62, 5]))", True),
        (f"_C.rnn_forward('lstm', r(2, 5, 3), {w_ih}, {w_hh}, lengths=np.array([-1, 5]))", True),
        (f"_C.rnn_forward('lstm', r(2, 5, 3), {w_ih}, r(16))", True),
        (f"_C.rnn_forward('gru', r(2, 5, 3), {w_ih}, {w_hh})", True),
        (f"_C.rnn_forward('lstm', r(2, 5, 3), {w_ih}, {w_hh}, h0=r(3, 4))", True),
        (f"_C.rnn_backward('lstm', r(2, 5, 4), None, None, {w_ih}, r(16))", True),
        (f"_C.rnn_backward('lstm', r(2, 5, 4), None, None, {w_ih}, r(16, 4), r(2, 5, 3), r(2, 5, 4))",
         True),
        (f"_C.rnn_backward('lstm', bc(2, 2**62, 4), None, None, {w_ih}, {w_hh}, r(2, 5, 3), r(2, 5, 4))",
         True),
        ("_C.rnn_ghost_sq_norms(bc(1, 2**32, 3), bc(1, 2**32, 4), bc(1, 2**32, 16))", True),
        ("_C.rnn_ghost_sq_norms(bc(1, 2**31, 1), bc(1, 2**31, 1), bc(1, 2**31, 1))", True),
        ("_C.rnn_ghost_sq_norms(bc(2, 2**62, 3), bc(2, 2**62, 4), bc(2, 2**62, 16))", True),
        ("_C.rnn_ghost_sq_norms(r(2, 5, 3), r(2, 5, 4), r(2, 5, 16))", False),
        ("_C.rnn_ghost_sq_norms(r(2, 5, 3), r(2, 6, 4), r(2, 5, 16))", True),
        ("_C.rnn_ghost_sq_norms(r(2, 5, 3), r(2, 5, 4), r(2, 5, 16), r(2, 5, 12))", True),
    ]
    return cases


def noise_cases():
    cases = []
    for n in EXTREME + [2**64]:
        cases.append((f"_C.gaussian({n})", "big" if n == 2**31 else not 0 <= n <= 2**20))
    cases += [("_C.add_gaussian_noise(bc(2**62), 1.0)", True),
              ("_C.add_gaussian_noise(z(4), -1.0)", True),
              ("_C.add_gaussian_noise(z(4), float('inf'))", True),
              ("_C.add_gaussian_noise(z(4), 1.0, num_threads=0)", True)]
    return cases


def nanobatch_cases():
    nb = "_nanobatch.clip_accumulate_nanobatch"
    cases = []
    for grp in EXTREME + [2**64, "True", "1.5"]:
        for bounds in ("None", "[1.0]"):
            accs = "None" if bounds == "None" else "[z(4)]"
            valid = grp == 0
            cases.append((f"{nb}([r(2, 4)], {accs}, [{grp}], {bounds}, 1.0, 1)", not valid))
    cases += [
        (f"{nb}([bc(2**31, 4)], None, [0], None, 1.0, 1)", True),       # not C-contiguous
        (f"{nb}([r(2, 4), r(3, 4)], None, [0, 0], None, 1.0, 1)", True),
        (f"{nb}([r(2, 4)], [z(5)], [0], [1.0], 1.0, 1)", True),
        (f"{nb}([r(2, 4)], [z(4, dtype=f64)], [0], [1.0], 1.0, 1)", True),
        (f"{nb}([r(2, 4)], [z(4)], [0], [float('nan')], 1.0, 1)", True),
        (f"{nb}([r(2, 4)], [z(4)], [0], [1.0] * 3, 1.0, 1)", False),
        (f"{nb}([r(2, 4)], [z(4)], [0], [1.0], float('inf'), 1)", True),
        (f"{nb}([r(2, 4)], [z(4)], [0], [1.0], 1.0, 0)", True),
        (f"{nb}([r(2, 4)], [z(4)], [0], [1.0], 1.0, 2**40)", False),  # capped, as in _C
        (f"{nb}([r(2, 4).astype(np.float16)], None, [0], None, 1.0, 1)", True),
        (f"{nb}([r(2, 4)], None, [0, 1], None, 1.0, 1)", True),
    ]
    return cases


FAMILIES = {"conv": conv_cases, "linear": linear_cases, "embedding": embedding_cases,
            "norm": norm_cases, "rnn": rnn_cases, "noise": noise_cases,
            "nanobatch": nanobatch_cases}


@pytest.fixture(scope="module", autouse=True)
def _built():
    if not glob.glob(os.path.join(ROOT, "fastclip", "_C.*.so")) or not glob.glob(
            os.path.join(ROOT, "fastclip", "_nanobatch.*.so")):
        pytest.skip("native modules not built")


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_extreme_sizes_never_crash(family):
    check(FAMILIES[family]())


def test_the_reported_kernel_is_refused_with_its_values():
    res = run_cases([("_C.conv_sq_norms(r(2, 4, 5, 5), r(2, 4, 5, 5), [2**62, 1], [1, 1], [0, 0], "
                      "[4, 1], 1)", True)])
    assert res[0].startswith("refused ValueError") and str(2**62 - 1) in res[0] and "overflows int64" in res[0]


def test_harness_reports_a_crash_and_goes_on():
    """The harness itself: a case that kills its child is named, and later cases still run."""
    res = run_cases([("1", False), ("os.kill(os.getpid(), 11)", False), ("int('x')", True)])
    assert res[0] == "ok" and res[1] == "CRASH signal 11" and res[2].startswith("refused ValueError")
