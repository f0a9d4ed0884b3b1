"""A TCP proxy for fault injection between a worker and the broker: cut, stall, slow.

- :meth:`TcpProxy.cut` drops every open connection (a partition, a broker node loss);
  ``accepting = False`` refuses new ones meanwhile.
- :meth:`TcpProxy.stall` stops forwarding in both directions without closing anything (a
  black hole: heartbeats stop, sockets stay open) until :meth:`TcpProxy.resume`.
- ``latency`` (seconds) delays every chunk in each direction, without lowering throughput
  (like ``tc netem delay``): chunks are queued with their due time, not slept on one by one.
"""

from __future__ import annotations

import asyncio
import contextlib


class TcpProxy:
    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.server: asyncio.Server | None = None
        self.port = 0
        self._pairs: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = set()
        self.accepting = True
        self.connections = 0
        self.latency = 0.0
        self._flowing = asyncio.Event()
        self._flowing.set()

    async def start(self) -> TcpProxy:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    def url(self, user: str = "guest", password: str = "guest") -> str:
        return f"amqp://{user}:{password}@127.0.0.1:{self.port}/"

    @property
    def stalled(self) -> bool:
        return not self._flowing.is_set()

    def stall(self) -> None:
        """Stop forwarding bytes (connections stay open) until :meth:`resume`."""
        self._flowing.clear()

    def resume(self) -> None:
        self._flowing.set()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not self.accepting:
            writer.close()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.close()
            return
        self.connections += 1
        pair = (writer, up_writer)
        self._pairs.add(pair)
        await asyncio.gather(self._pump(reader, up_writer), self._pump(up_reader, writer))
        self._pairs.discard(pair)

    async def _pump(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        loop = asyncio.get_running_loop()
        chunks: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def send() -> None:
            while True:
                due, data = await chunks.get()
                if not data:
                    return
                await self._flowing.wait()
                if due > loop.time():
                    await asyncio.sleep(due - loop.time())
                await self._flowing.wait()
                dst.write(data)
                await dst.drain()

        sender = asyncio.create_task(send())
        with contextlib.suppress(Exception):
            while data := await src.read(65536):
                chunks.put_nowait((loop.time() + self.latency, data))
                # While stalled, stop reading too, so the kernel buffers fill as they would.
                await self._flowing.wait()
                if sender.done():
                    break
        chunks.put_nowait((0.0, b""))
        with contextlib.suppress(Exception):
            await sender
        with contextlib.suppress(Exception):
            dst.close()

    def cut(self) -> None:
        """Drop every open connection (like a network partition or a broker node loss)."""
        for a, b in list(self._pairs):
            for w in (a, b):
                with contextlib.suppress(Exception):
                    w.transport.abort()
        self._pairs.clear()

    async def stop(self) -> None:
        self.resume()
        self.cut()
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()
