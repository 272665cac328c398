"""``python -m bench.ceiling --listen PORT --upstream HOST:PORT``: the bench's ``ceiling`` target.

A bare byte forwarder: what one asyncio hop costs when nothing is parsed. uvloop, one asyncio Protocol per
socket, one upstream connection per client, every byte forwarded untouched both ways, the client's startup
and authentication included (the upstream PostgreSQL authenticates the client itself). No pooling, no
routing, no protocol. The proxy's throughput against this one is the price of our own Python per
transaction; this one against PgBouncer is the price of the event loop. SIGTERM or SIGINT stops it.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import socket
import sys
from collections.abc import Sequence
from typing import cast

import uvloop


class Pipe(asyncio.Protocol):
    """One socket: what arrives on it is written to the peer; a full write buffer pauses the peer's reads."""

    transport: asyncio.Transport

    def __init__(self, peer: Pipe | None = None) -> None:
        self.peer = peer
        self.early: list[bytes] = []  # what arrived before there was a peer (a client's first bytes)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports are not subclasses
        # As the proxy does on both sides: no Nagle delay on small messages.
        transport.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        client = self.peer
        if client is not None:  # the upstream side: introduce itself, pass on what the client has sent
            client.peer = self
            if client.early:
                self.transport.write(b"".join(client.early))
                client.early.clear()

    def data_received(self, data: bytes) -> None:
        if self.peer is None:
            self.early.append(data)
        else:
            self.peer.transport.write(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.peer is not None:
            self.peer.transport.close()  # after what it still has to write

    def pause_writing(self) -> None:
        if self.peer is not None:
            self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.peer is not None and not self.peer.transport.is_closing():
            self.peer.transport.resume_reading()


class Client(Pipe):
    """A client's socket: opens its own upstream connection as it arrives."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        super().__init__()
        self.upstream = upstream
        self.connecting: asyncio.Task[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.connecting = asyncio.get_running_loop().create_task(self._connect())

    async def _connect(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            await loop.create_connection(lambda: Pipe(self), *self.upstream)
        except OSError:
            self.transport.close()
            return
        if self.transport.is_closing() and self.peer is not None:  # the client left while we connected
            self.peer.transport.close()


def host_port(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:5432`` for IPv6) -> (host, port); ValueError when it is not one."""
    host, sep, port = text.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"expected HOST:PORT, got {text!r}")
    return host, int(port)


async def serve(host: str, port: int, upstream: tuple[str, int]) -> None:
    """Forward connections to ``host:port`` until SIGTERM or SIGINT."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    server = await loop.create_server(lambda: Client(upstream), host, port)
    print(f"ceiling: forwarding {host}:{port} to {upstream[0]}:{upstream[1]}", flush=True)
    await stop.wait()
    server.close()


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.ceiling", description=__doc__.split("\n")[0])
    p.add_argument("--listen", type=int, required=True, metavar="PORT", help="port to listen on")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--upstream", required=True, metavar="HOST:PORT", help="the PostgreSQL server")
    args = p.parse_args(argv)
    try:
        upstream = host_port(args.upstream)
    except ValueError as exc:
        p.error(f"--upstream: {exc}")
    if not 0 < args.listen < 65536:
        p.error("--listen takes a port number (1-65535)")
    try:
        uvloop.run(serve(args.host, args.listen, upstream))
    except OSError as exc:  # the port is taken, the address is not ours
        print(f"ceiling: cannot listen on {args.host}:{args.listen}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
