"""The project's one AMQP data path, and the topology helpers beside it.

- :mod:`bridge.amqp.frames`: sans-I/O AMQP 0-9-1 encoding and decoding (own error types,
  no recursion beyond 64 levels of nested tables);
- :mod:`bridge.amqp.confirms`: sans-I/O publisher-confirm tracking, the one mapping of
  broker outcomes to :class:`~bridge.errors.PublishFailed` reasons;
- :mod:`bridge.amqp.link`: one asyncio connection engine (handshake, heartbeats,
  reconnect, channel reopen, connection.blocked, readiness);
- :mod:`bridge.amqp.publisher` and :mod:`bridge.amqp.consumer`: windowed confirmed
  publishing, prefetch and batched acknowledgements, consumer restore;
- :mod:`bridge.amqp.messages`: replies and dead-letter properties, as every worker needs;
- :mod:`bridge.amqp.topology`: declarations and the host's control-plane connection
  (aio-pika: start-up and requests, not per message).

Nothing outside this package imports aiormq or pamqp.
"""

from bridge.amqp.topology import (
    DELAYED_MESSAGE_TYPE,
    QUORUM,
    Broker,
    check_exchanges,
    close_channels,
    connect_once,
    declare_dead_letter,
    declare_exchange,
    declare_quorum_queue,
    header_str,
)

__all__ = [
    "DELAYED_MESSAGE_TYPE",
    "QUORUM",
    "Broker",
    "check_exchanges",
    "close_channels",
    "connect_once",
    "declare_dead_letter",
    "declare_exchange",
    "declare_quorum_queue",
    "header_str",
]
