"""``python -m impus_lite``: see :mod:`impus_lite.cli`."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
