"""``python -m bench.chaos``: the fault suite of every worker (see :mod:`bench.chaos`)."""

import sys

from bench.chaos.suite import main

if __name__ == "__main__":
    sys.exit(main())
