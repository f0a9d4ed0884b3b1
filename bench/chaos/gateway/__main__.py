"""``python -m bench.chaos.gateway``: the gateway fault suite (see :mod:`bench.chaos.gateway.suite`)."""

import sys

from bench.chaos.gateway.suite import run

if __name__ == "__main__":
    sys.exit(0 if run()["ok"] else 1)
