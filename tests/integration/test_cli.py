"""The command line: ``python -m fastclip demo`` and ``python -m fastclip bench`` on tiny settings."""
import importlib.util
import os

import pytest
import torch

from fastclip import benchmark
from fastclip.cli import build_parser, main


def test_demo_tiny_run(capsys):
    pytest.importorskip("sklearn", reason="the demo's data set comes from scikit-learn")
    threads = torch.get_num_threads()
    assert main(["demo", "--epochs", "1", "--max-steps", "2", "--batch-size", "32", "--seed", "1"]) == 0
    out = capsys.readouterr().out
    assert "handwritten digits" in out and "noise multiplier" in out
    assert "100%" in out                      # the progress bar reached the end
    for needle in ("non-private", "DP-SGD (fastclip)", "test accuracy", "epsilon", "s/epoch"):
        assert needle in out
    assert torch.get_num_threads() == threads  # --threads is restored afterwards


def test_demo_results_are_sane():
    pytest.importorskip("sklearn", reason="the demo's data set comes from scikit-learn")
    from fastclip.demo import load_digits_split, run_demo

    x_tr, y_tr, x_te, y_te = load_digits_split(0)
    assert x_tr.shape[1:] == (1, 8, 8) and len(x_tr) + len(x_te) == 1797
    assert set(y_te.tolist()) == set(range(10))  # stratified: every class is tested
    args = build_parser().parse_args(["demo", "--epochs", "1", "--max-steps", "3", "--target-epsilon", "2"])
    res = run_demo(args, out=open(os.devnull, "w"))
    assert 0 < res["epsilon"] <= 2.0 + 1e-6   # 3 steps of a run calibrated for 2 over one epoch
    assert 0 <= res["dp_accuracy"] <= 1 and 0 <= res["nonprivate_accuracy"] <= 1
    assert res["dp_epoch_s"] > 0 and res["nonprivate_epoch_s"] > 0


@pytest.mark.parametrize("argv", [["--epochs", "0"], ["--batch-size", "0"], ["--target-epsilon", "0"],
                                  ["--threads", "0"], ["--max-steps", "0"]])
def test_demo_bad_options(argv, capsys):
    assert main(["demo", *argv]) == 2
    assert "must be" in capsys.readouterr().err


def test_demo_nanobatch_mode_runs(capsys):
    pytest.importorskip("sklearn", reason="the demo's data set comes from scikit-learn")
    assert main(["demo", "--epochs", "1", "--max-steps", "1", "--mode", "nanobatch"]) == 0
    assert "epsilon" in capsys.readouterr().out.lower()


def _bench_args(tmp_path, *extra):
    return ["bench", "--workloads", "mlp", "--steps", "1", "--warmup", "0", "--batch-size", "8",
            "--no-memory", "--json", str(tmp_path / "out.json"), *extra]


def _hide_opacus(monkeypatch):
    # Opacus is optional: the run must pass without it, its columns reading "not installed".
    def no_opacus(*a, **k):
        raise benchmark.NotInstalled("hidden by the test")
    monkeypatch.setattr(benchmark, "_opacus_setup", no_opacus)


def test_bench_tiny_run(tmp_path, capsys, monkeypatch):
    _hide_opacus(monkeypatch)
    assert main(_bench_args(tmp_path)) == 0
    out = capsys.readouterr().out
    assert "| mlp" in out and "non-private ms" in out and "fastclip ms (ratio)" in out
    assert "not installed" in out
    assert "nanobatch" not in out  # nanobatch has its own benchmark (bench/nanobatch.py)
    assert (tmp_path / "out.json").exists()


def test_bench_plot_writes_png(tmp_path, capsys, monkeypatch):
    if importlib.util.find_spec("matplotlib") is None:
        pytest.skip("matplotlib is not installed (the optional 'plot' extra)")
    _hide_opacus(monkeypatch)
    png = tmp_path / "slowdown.png"
    assert main(_bench_args(tmp_path, "--plot", str(png))) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"wrote {png}" in capsys.readouterr().out


def test_bench_plot_without_matplotlib_is_a_clear_error(tmp_path, capsys, monkeypatch):
    def missing():
        raise ImportError("--plot needs matplotlib, which is optional: pip install torch==2.13.0 \".[plot]\"")
    monkeypatch.setattr(benchmark, "_import_pyplot", missing)
    assert main(_bench_args(tmp_path, "--plot", str(tmp_path / "x.png"))) == 2
    assert "matplotlib" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


def test_bench_methods_runs_only_those_beside_the_baseline(tmp_path, capsys, monkeypatch):
    def no_opacus(*a, **k):
        raise AssertionError("opacus was set up although --methods left it out")
    monkeypatch.setattr(benchmark, "_opacus_setup", no_opacus)
    assert main(_bench_args(tmp_path, "--methods", "fastclip")) == 0
    out = capsys.readouterr().out
    assert "fastclip ms (ratio)" in out and "non-private ms" in out and "opacus hooks" not in out
    assert main(["bench", "--workloads", "mlp", "--methods", "fastclip,nope", "--steps", "1"]) == 2
    assert "unknown method" in capsys.readouterr().err


def test_bench_unknown_workload(capsys):
    assert main(["bench", "--workloads", "nope", "--steps", "1"]) == 2
    assert "unknown workload" in capsys.readouterr().err


def test_version_and_bench_help_shows_defaults(capsys):
    import fastclip
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"fastclip {fastclip.__version__}"
    with pytest.raises(SystemExit):
        main(["bench", "--help"])
    out = capsys.readouterr().out
    assert "(default: 20)" in out and "(default: cpu)" in out
