"""The project's own error types; library exceptions are translated into these at the edges."""

import json


class BridgeError(Exception):
    """Base class for errors the bridge reports to operators."""


class ConfigError(BridgeError):
    """Settings are invalid or inconsistent; the message says which and how to fix it.

    Several problems found at once are kept apart in ``problems``, one line each."""

    def __init__(self, *problems: str) -> None:
        super().__init__("\n".join(problems))
        self.problems = list(problems)


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


class InvalidRequest(BridgeError):
    """A client request the worker would refuse, caught before it is sent."""


class NoAnswer(BridgeError, TimeoutError):
    """No worker answered a control-plane request within the caller's timeout (a
    TimeoutError too, for callers that treat a silent worker like any other timeout)."""

    def __init__(
        self, worker: str, exchange: str, timeout: float, *, returned: bool = False
    ) -> None:
        why = " (the request came back unroutable: no queue is bound for it)" if returned else ""
        super().__init__(
            f"no {worker} worker answered on {exchange} within {timeout:g} s{why}: "
            f'is "rabbitmq-bridge run {worker}" running?'
        )


class NotDeclared(BridgeError):
    """A worker's exchange does not exist: the worker never ran on this broker (and vhost),
    or runs with other names."""

    def __init__(self, worker: str, exchange: str) -> None:
        super().__init__(
            f"exchange {exchange} does not exist: the {worker} worker declares it when it "
            f'starts; has "rabbitmq-bridge run {worker}" run against this broker and vhost, '
            f"with the same BRIDGE_{worker.upper()}__* names?"
        )


class LinkError(BridgeError):
    """The broker refused something the link asked for; ``code`` is AMQP's reply code
    (403 access refused, 404 not found, 405 resource locked, 406 precondition failed, 320
    connection lost)."""

    def __init__(self, code: int, text: str) -> None:
        super().__init__(f"{code} {text}")
        self.code = code
        self.text = text


class Refused(LinkError):
    """The broker refused a channel's setup for a reason the channel waits out (another
    connection owns the queue, see ``bridge.amqp.channel.Channel.refused``): the link retries
    it with backoff and without a log line each time, also at the first start."""


class WireError(Exception):
    """A message a worker refuses, with the ``code`` that goes into its error reply (see
    :func:`encode_error`) or into the ``x-dead-reason`` header, and a sentence for humans.

    Raised by the workers' pure parsers (requests, pulls, control requests) and answered by
    their adapters; one definition for every worker's wire contract."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


def encode_error(code: str, message: str) -> bytes:
    """The error reply of every worker's RPC: ``{"error": {"code": ..., "message": ...}}``."""
    return json.dumps({"error": {"code": code, "message": message}}, separators=(",", ":")).encode()
