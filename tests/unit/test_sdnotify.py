"""proxy.sdnotify: the exact datagrams sent to $NOTIFY_SOCKET, abstract names, no-ops, watchdog parsing."""

from __future__ import annotations

import asyncio
import os
import secrets
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from proxy import sdnotify


@pytest.fixture
def listener(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    """A unix datagram socket bound in tmp_path, named by NOTIFY_SOCKET (as systemd does)."""
    path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        sock.settimeout(5)
        monkeypatch.setenv("NOTIFY_SOCKET", str(path))
        yield sock


def test_notify_sends_the_exact_datagram(listener: socket.socket) -> None:
    assert sdnotify.notify("READY=1")
    assert listener.recv(4096) == b"READY=1"
    assert sdnotify.notify("STOPPING=1\nSTATUS=stopping")
    assert listener.recv(4096) == b"STOPPING=1\nSTATUS=stopping"


def test_notify_to_an_abstract_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"parafort-test-{secrets.token_hex(8)}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(b"\0" + name.encode())
        sock.settimeout(5)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert sdnotify.notify("WATCHDOG=1")
        assert sock.recv(4096) == b"WATCHDOG=1"


def test_notify_with_an_explicit_env(listener: socket.socket, tmp_path: Path) -> None:
    assert sdnotify.notify("STATUS=x", {"NOTIFY_SOCKET": str(tmp_path / "notify.sock")})
    assert listener.recv(4096) == b"STATUS=x"
    assert not sdnotify.notify("STATUS=x", {})


def test_notify_is_a_noop_without_notify_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert sdnotify.notify("READY=1") is False
    monkeypatch.setenv("NOTIFY_SOCKET", "")
    assert sdnotify.notify("READY=1") is False


@pytest.mark.parametrize("value", ["vsock:2:1234", "relative/notify.sock"])
def test_notify_ignores_addresses_it_does_not_speak(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", value)
    assert sdnotify.notify("READY=1") is False


def test_notify_without_a_listener_returns_false(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "nobody-here.sock"))
    assert sdnotify.notify("READY=1") is False


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"WATCHDOG_USEC": "1000000"}, 0.5),
        ({"WATCHDOG_USEC": "30000000"}, 15.0),
        ({"WATCHDOG_USEC": "1000000", "WATCHDOG_PID": str(os.getpid())}, 0.5),
        ({"WATCHDOG_USEC": "1000000", "WATCHDOG_PID": ""}, 0.5),
        ({"WATCHDOG_USEC": "1000000", "WATCHDOG_PID": str(os.getpid() + 1)}, None),
        ({"WATCHDOG_USEC": "1000000", "WATCHDOG_PID": "me"}, None),
        ({}, None),
        ({"WATCHDOG_USEC": ""}, None),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "-5"}, None),
        ({"WATCHDOG_USEC": "30s"}, None),
    ],
)
def test_watchdog_interval(env: dict[str, str], expected: float | None) -> None:
    assert sdnotify.watchdog_interval(env) == expected


def test_watchdog_interval_reads_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "2000000")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    assert sdnotify.watchdog_interval() == 1.0


def test_watchdog_pings_until_stopped(listener: socket.socket) -> None:
    async def scenario() -> None:
        listener.setblocking(False)
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        task = loop.create_task(sdnotify.watchdog(stop, interval=0.01))
        for _ in range(3):
            assert await asyncio.wait_for(loop.sock_recv(listener, 4096), 5) == b"WATCHDOG=1"
        stop.set()
        await asyncio.wait_for(task, 1)

    asyncio.run(scenario())


def test_watchdog_returns_at_once_when_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)

    async def scenario() -> None:
        await asyncio.wait_for(sdnotify.watchdog(asyncio.Event()), 1)

    asyncio.run(scenario())
