"""End-to-end DP-SGD step benchmark: non-private torch vs fastclip vs Opacus.

Same as ``python -m fastclip bench``; the logic lives in the package (fastclip/benchmark.py)
because bench/ is not installed. Example:

    python bench/e2e.py --workloads mlp --steps 30 --warmup 5 --json out.json
"""
import sys

from fastclip.benchmark import main

if __name__ == "__main__":
    sys.exit(main())
