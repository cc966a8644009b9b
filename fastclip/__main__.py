"""``python -m fastclip {demo,bench}``: see :mod:`fastclip.cli`.

Run from a source checkout (``pip install . && python -m fastclip demo`` in the repository root),
Python imports ``./fastclip``, which has no compiled core, instead of the installed package; every
op would then silently run in plain torch. In that case we re-run the command with ``python -P``
(no current directory on sys.path, Python >= 3.11) so that the installed package is used.
"""
import glob
import os
import sys


def _has_core(pkg_dir: str) -> bool:
    return bool(glob.glob(os.path.join(pkg_dir, "_C.*")))


def _installed_elsewhere(here: str):
    """Directory of another fastclip on sys.path that has the compiled core, or None."""
    cwd = os.path.realpath(os.getcwd())
    for entry in sys.path:
        root = os.path.realpath(entry or cwd)
        if root == cwd:
            continue
        cand = os.path.join(root, "fastclip")
        if os.path.realpath(cand) != here and _has_core(cand):
            return cand
    return None


def _reexec_if_shadowed() -> None:
    here = os.path.realpath(os.path.dirname(os.path.abspath(__file__)))
    if _has_core(here) or os.environ.get("FASTCLIP_NO_REEXEC") or sys.version_info < (3, 11):
        return
    if os.path.realpath(os.path.dirname(here)) != os.path.realpath(os.getcwd()):
        return
    other = _installed_elsewhere(here)
    if other is None:
        return
    print(f"fastclip: ./fastclip (a source checkout without the compiled core) shadows the "
          f"installed package; running {other} instead", file=sys.stderr)
    os.environ["FASTCLIP_NO_REEXEC"] = "1"
    sys.stderr.flush()
    sys.stdout.flush()
    os.execv(sys.executable, [sys.executable, "-P", "-m", "fastclip", *sys.argv[1:]])


if __name__ == "__main__":
    _reexec_if_shadowed()
    from fastclip.cli import main

    sys.exit(main())
