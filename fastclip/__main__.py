"""``python -m fastclip {demo,bench}``: see :mod:`fastclip.cli`."""
import sys

from fastclip.cli import main

if __name__ == "__main__":
    sys.exit(main())
