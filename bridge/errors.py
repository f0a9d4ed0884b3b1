"""The project's own error types; library exceptions are translated into these at the edges."""


class BridgeError(Exception):
    """Base class for errors the bridge reports to operators."""


class ConfigError(BridgeError):
    """Settings are invalid or inconsistent; the message says which and how to fix it."""


class BrokerUnavailable(BridgeError):
    """The broker cannot be reached (connection refused, DNS, auth)."""


class StoreError(BridgeError):
    """The state directory or a SQLite file cannot be used (foreign, corrupt, read-only, full)."""


class PublishFailed(BridgeError):
    """A publish was nacked, returned as unroutable, or its channel closed before the confirm."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail
