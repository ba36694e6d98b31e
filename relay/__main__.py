"""``python -m relay``: the same as the ``relay`` console script."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
