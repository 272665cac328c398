"""Socket options the proxy sets on its connections, in one place."""

from __future__ import annotations

import asyncio
import socket


def set_nodelay(transport: asyncio.BaseTransport) -> None:
    """Turn Nagle's algorithm off on a TCP transport, so a reply or a batch goes out in the write that
    completes it instead of waiting for the peer's ACK. A Unix-domain socket has no such option."""
    sock = transport.get_extra_info("socket")
    if sock is not None and sock.family != socket.AF_UNIX:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
