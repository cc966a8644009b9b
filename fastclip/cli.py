"""Command line: ``python -m fastclip {demo,bench} [options]``; ``python -m fastclip --version``.

* ``demo``  -- DP-SGD on scikit-learn's bundled handwritten digits: a small CNN trained with
  fastclip (noise calibrated to a target epsilon) beside the same model trained without privacy;
  prints test accuracy, epsilon and time per epoch (see :mod:`fastclip.demo`).
* ``bench`` -- the end-to-end step-time table for every registered workload: non-private torch,
  fastclip, Opacus; ``--plot out.png`` draws the slowdowns (see :mod:`fastclip.benchmark`).
"""
from __future__ import annotations

import argparse
from typing import Optional, Sequence


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m fastclip`` argument parser (subcommands demo and bench)."""
    import fastclip
    from fastclip import benchmark, demo

    parser = argparse.ArgumentParser(prog="python -m fastclip",
                                     description="fastclip: fast, exact per-example gradient clipping for DP-SGD.")
    parser.add_argument("--version", action="version", version=f"fastclip {fastclip.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="{demo,bench}")
    sub.required = True

    d = sub.add_parser("demo", help="DP-SGD CNN on scikit-learn's digits: accuracy, epsilon, time vs non-private",
                       description="Train a small CNN on scikit-learn's handwritten digits with DP-SGD "
                                   "(fastclip, noise calibrated to --target-epsilon, Poisson sampling) and "
                                   "without privacy, from the same initialisation; print test accuracy, "
                                   "epsilon and training time per epoch side by side.")
    demo.add_arguments(d)
    d.set_defaults(func=demo.demo)

    b = sub.add_parser("bench", help="end-to-end step time: non-private vs fastclip vs Opacus",
                       description=benchmark.__doc__.split("\n\n")[0],
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    benchmark.add_arguments(b)
    b.set_defaults(func=benchmark.run)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command line on ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    args = build_parser().parse_args(argv)
    return args.func(args)
