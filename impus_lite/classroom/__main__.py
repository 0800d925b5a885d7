"""``python -m impus_lite.classroom``: see :mod:`impus_lite.classroom.cli`."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
