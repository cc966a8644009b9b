"""Prints, after a benchmark run, the torch/native ratio of every (group, method) pair measured in
that run (ratio > 1: native is faster)."""


def pytest_terminal_summary(terminalreporter, config):
    session = getattr(config, "_benchmarksession", None)
    rows = {}
    for bench in getattr(session, "benchmarks", None) or []:
        info = bench.extra_info
        if "impl" not in info or not bench.stats:
            continue
        rows.setdefault((bench.group, info["method"]), {})[info["impl"]] = bench.stats
    lines = []
    for (group, method), impls in sorted(rows.items()):
        if {"native", "torch"} <= impls.keys():
            n, t = impls["native"], impls["torch"]
            lines.append(f"{group:34s} {method:7s} native {n.min * 1e3:10.3f} ms  "
                         f"torch {t.min * 1e3:10.3f} ms  ratio(min) {t.min / n.min:7.2f}  "
                         f"ratio(median) {t.median / n.median:7.2f}")
    if lines:
        terminalreporter.write_sep("-", "torch / native time ratios (> 1: native faster)")
        for line in lines:
            terminalreporter.write_line(line)
