"""systemd's notify protocol (sd_notify): READY=1, STOPPING=1, STATUS= and WATCHDOG=1 datagrams.

A datagram of ``KEY=value`` lines goes to the unix socket named by ``$NOTIFY_SOCKET`` (a leading ``@`` means
the abstract namespace). Without that variable — not started by systemd with ``Type=notify`` — every call is
a no-op, so the daemon runs the same in a terminal, in tests and under systemd. No dependency: one sendto().
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import Mapping

log = logging.getLogger("parafort.sdnotify")


def notify(state: str, env: Mapping[str, str] | None = None) -> bool:
    """Send ``state`` (one or more ``KEY=value`` lines) to systemd; True if the datagram was sent.

    False, silently, without ``NOTIFY_SOCKET``; False with one debug line when the socket is unusable (an
    unsupported address, no listener, a full queue): a notification never blocks or fails the daemon.
    """
    address = _address((os.environ if env is None else env).get("NOTIFY_SOCKET", ""))
    if address is None:
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.setblocking(False)  # a full receive queue must not stall the event loop
            sock.sendto(state.encode(), address)
    except OSError as exc:
        log.debug("event=sd_notify_failed state=%r error=%s", state.split("\n", 1)[0], exc)
        return False
    return True


def _address(name: str) -> str | bytes | None:
    if name.startswith("@"):
        return b"\0" + name[1:].encode()  # abstract namespace: no file behind it
    if name.startswith("/"):
        return name
    return None  # unset, or a transport this client does not speak (e.g. vsock:)


def watchdog_interval(env: Mapping[str, str] | None = None) -> float | None:
    """Seconds between WATCHDOG=1 pings: half of ``$WATCHDOG_USEC``, as sd_watchdog_enabled() advises.

    None when the watchdog is off: WATCHDOG_USEC unset, not a positive integer, or WATCHDOG_PID set to
    another process (the variables were inherited, not meant for this one).
    """
    env = os.environ if env is None else env
    try:
        usec = int(env.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    if usec <= 0:
        return None
    pid = env.get("WATCHDOG_PID", "")
    if pid:
        try:
            if int(pid) != os.getpid():
                return None
        except ValueError:
            return None
    return usec / 2 / 1_000_000


async def watchdog(stop: asyncio.Event, interval: float | None = None) -> None:
    """Ping WATCHDOG=1 every ``interval`` seconds (default: watchdog_interval()) until ``stop`` is set.

    The pings come from the event loop itself, so a loop that stops turning stops them and systemd restarts
    the service after WatchdogSec. Returns at once when the watchdog is off.
    """
    interval = watchdog_interval() if interval is None else interval
    if interval is None:
        return
    while not stop.is_set():
        notify("WATCHDOG=1")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), interval)
