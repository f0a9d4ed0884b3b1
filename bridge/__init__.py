"""RabbitMQ bridge workers: a small host that runs plugin-style workers beside RabbitMQ."""

from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as _installed

DISTRIBUTION = "rabbitmq-bridge-workers"

try:
    __version__ = _installed(DISTRIBUTION)
except PackageNotFoundError:  # run from a source tree that was never installed
    __version__ = "unknown (not installed)"
