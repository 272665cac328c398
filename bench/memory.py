"""Memory of idle clients: the proxy's RSS with 10,000 logged-in, idle client connections.

    .venv/bin/python -m bench memory [--clients 10000] [--concurrency 64] [--auth scram-sha-256]

One throwaway primary, one proxy (limits.max_client_connections raised above the client count, its open-files
limit raised to the hard limit), then this process opens the clients over raw asyncio sockets: StartupMessage,
authentication (SCRAM-SHA-256 by default, md5 or trust), ReadyForQuery — each a complete login, then idle.
A bounded number of logins run at once. The proxy's VmRSS (``/proc/<pid>/status``) is read before and with
every client connected; the target is 200 MB for 10,000 clients.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import functools
import hashlib
import hmac
import os
import resource
import secrets
import struct
import sys
import tempfile
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench import report
from bench.pgbench_compare import (
    BenchError,
    add_output_arguments,
    guarded,
    have_pgbench,
    machine_facts,
    publish,
)
from bench.targets import HOST, Credentials, ProxyTarget, Tools, make_site
from proxy.dev.cluster import DevClusters, find_bindir
from proxy.protocol.auth import make_scram_verifier

TARGET_MB = 200.0
PROTOCOL_3 = 196608


# -- a minimal PostgreSQL client: login only ------------------------------------------------------------


class LoginError(Exception):
    pass


@functools.lru_cache(maxsize=8)
def _salted(password: str, salt: bytes, iterations: int) -> bytes:
    """SCRAM's SaltedPassword, once per (salt, iterations): the proxy's verifier is the same every login."""
    return hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iterations)


def _message(kind: bytes, payload: bytes) -> bytes:
    return kind + struct.pack("!i", len(payload) + 4) + payload


def startup_message(user: str, database: str) -> bytes:
    params = b"".join(
        k.encode() + b"\0" + v.encode() + b"\0"
        for k, v in (("user", user), ("database", database), ("application_name", "bench-idle"))
    )
    body = struct.pack("!i", PROTOCOL_3) + params + b"\0"
    return struct.pack("!i", len(body) + 4) + body


def md5_response(user: str, password: str, salt: bytes) -> bytes:
    inner = hashlib.md5((password + user).encode()).hexdigest()
    return b"md5" + hashlib.md5(inner.encode() + salt).hexdigest().encode() + b"\0"


def scram_client_final(password: str, client_first_bare: str, server_first: str) -> str:
    """The client-final-message for SCRAM-SHA-256 without channel binding (as libpq with sslmode=disable)."""
    attrs = dict(part.split("=", 1) for part in server_first.split(","))
    salted = _salted(password, base64.b64decode(attrs["s"]), int(attrs["i"]))
    client_key = hmac.digest(salted, b"Client Key", "sha256")
    stored_key = hashlib.sha256(client_key).digest()
    without_proof = f"c=biws,r={attrs['r']}"
    auth_message = f"{client_first_bare},{server_first},{without_proof}".encode()
    signature = hmac.digest(stored_key, auth_message, "sha256")
    proof = bytes(a ^ b for a, b in zip(client_key, signature, strict=True))
    return f"{without_proof},p={base64.b64encode(proof).decode()}"


async def login(
    port: int, user: str, password: str, database: str
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Connect and log in; returns the open connection once ReadyForQuery arrives."""
    reader, writer = await asyncio.open_connection(HOST, port)
    try:
        writer.write(startup_message(user, database))
        client_first_bare = ""
        while True:
            head = await reader.readexactly(5)
            kind, length = head[:1], struct.unpack("!i", head[1:])[0]
            payload = await reader.readexactly(length - 4)
            if kind == b"R":
                code = struct.unpack("!i", payload[:4])[0]
                if code == 5:  # md5
                    writer.write(_message(b"p", md5_response(user, password, payload[4:8])))
                elif code == 10:  # SASL: mechanisms
                    client_first_bare = f"n=,r={secrets.token_urlsafe(18)}"
                    first = f"n,,{client_first_bare}".encode()
                    body = b"SCRAM-SHA-256\0" + struct.pack("!i", len(first)) + first
                    writer.write(_message(b"p", body))
                elif code == 11:  # SASL continue: server-first
                    final = scram_client_final(password, client_first_bare, payload[4:].decode())
                    writer.write(_message(b"p", final.encode()))
                elif code not in (0, 12):  # 0: AuthenticationOk, 12: SASL final
                    raise LoginError(f"unsupported authentication request {code}")
            elif kind == b"E":
                fields = dict((f[:1], f[1:]) for f in payload.split(b"\0") if f)
                raise LoginError(fields.get(b"M", b"error").decode(errors="replace"))
            elif kind == b"Z":
                return reader, writer
    except BaseException:
        writer.close()
        raise


async def open_clients(
    port: int, creds: Credentials, n: int, concurrency: int, login_timeout: float
) -> tuple[list[asyncio.StreamWriter], list[str]]:
    """Open ``n`` logged-in connections, ``concurrency`` logins at a time; (writers, error messages)."""
    gate = asyncio.Semaphore(concurrency)
    writers: list[asyncio.StreamWriter] = []
    errors: list[str] = []
    keep: list[asyncio.StreamReader] = []

    async def one() -> None:
        async with gate:
            try:
                reader, writer = await asyncio.wait_for(
                    login(port, creds.user, creds.password, creds.database), login_timeout
                )
            except (OSError, LoginError, asyncio.IncompleteReadError, TimeoutError) as exc:
                errors.append(creds.redact(f"{type(exc).__name__}: {exc}"))
                return
            keep.append(reader)
            writers.append(writer)

    await asyncio.gather(*(one() for _ in range(n)))
    return writers, errors


async def close_clients(writers: Sequence[asyncio.StreamWriter]) -> None:
    for writer in writers:
        with contextlib.suppress(OSError):
            writer.write(_message(b"X", b""))
            writer.close()
    await asyncio.sleep(0)


# -- the proxy's memory ----------------------------------------------------------------------------------


def proc_status(pid: int) -> dict[str, int]:
    """The kB fields of /proc/<pid>/status (VmRSS, VmHWM, ...)."""
    out: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        parts = value.split()
        if len(parts) == 2 and parts[1] == "kB":
            out[key] = int(parts[0])
    return out


def open_files_limit(pid: int) -> int | None:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            value = line.split()[3]
            return None if value == "unlimited" else int(value)
    return None


def raise_own_nofile(needed: int) -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < needed:
        soft = hard if hard == resource.RLIM_INFINITY else min(hard, max(needed, soft))
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    return soft


def measure_memory(clients: int, concurrency: int, auth: str, settle: float = 2.0) -> dict[str, Any]:
    """Start a primary and the proxy, open ``clients`` idle clients, and read the proxy's RSS."""
    needed = clients + 200
    own = raise_own_nofile(needed)
    if own != resource.RLIM_INFINITY and own < needed:
        raise BenchError(f"open-files limit of this process is {own}; {needed} needed (ulimit -n)")
    tools = Tools.find(find_bindir())
    print(f"bench memory: starting a PostgreSQL primary and the proxy ({auth} logins)", flush=True)
    with (
        DevClusters.start(("main",)) as pg,
        tempfile.TemporaryDirectory(prefix="parafort-bench-mem-") as tmp,
    ):
        creds = Credentials(pg.main.user, pg.main.password, pg.main.database)
        extra: dict[str, Any] = {
            "auth": {"method": auth},
            "limits": {"max_client_connections": max(10_000, clients + 100)},
            "log": {"level": "warning"},
        }
        # For SCRAM a stored verifier, as in production: no key derivation in the proxy per login.
        secret = make_scram_verifier(creds.password) if auth == "scram-sha-256" else None
        site = make_site(Path(tmp), "proxy", creds, tools)
        proxy = ProxyTarget(
            site, main_dsn=pg.main.dsn, extra_config=extra, nofile=True, userlist_secret=secret
        )
        try:
            proxy.start()
            pid = proxy.pid
            assert pid is not None
            nofile = open_files_limit(pid)
            if nofile is not None and nofile < needed:
                raise BenchError(f"the proxy's open-files limit is {nofile}; {needed} needed")
            time.sleep(settle)
            before = proc_status(pid)
            print(
                f"bench memory: proxy pid {pid}, baseline VmRSS {before['VmRSS'] / 1024:.1f} MB", flush=True
            )
            print(
                f"bench memory: opening {clients:,} clients, {concurrency} logins at a time ...", flush=True
            )

            async def scenario() -> tuple[int, list[str], float, dict[str, int]]:
                start = time.monotonic()
                writers, errors = await open_clients(proxy.port, creds, clients, concurrency, 60.0)
                took = time.monotonic() - start
                await asyncio.sleep(settle)
                with_clients = proc_status(pid)
                await close_clients(writers)
                return len(writers), errors, took, with_clients

            connected, errors, took, during = asyncio.run(scenario())
            alive = proxy.proc is not None and proxy.proc.poll() is None
        finally:
            proxy.stop()
    rss_mb = during["VmRSS"] / 1024
    base_mb = before["VmRSS"] / 1024
    result = {
        "clients": clients,
        "connected": connected,
        "failed_logins": len(errors),
        "errors_sample": sorted(set(errors))[:5],
        "auth": auth,
        "concurrency": concurrency,
        "login_seconds": round(took, 2),
        "baseline_rss_mb": round(base_mb, 1),
        "rss_mb": round(rss_mb, 1),
        "hwm_mb": round(during.get("VmHWM", 0) / 1024, 1),
        "per_client_kib": round((during["VmRSS"] - before["VmRSS"]) / max(connected, 1), 2),
        "target_mb": TARGET_MB,
        "within_target": rss_mb <= TARGET_MB and not errors,
        "proxy_nofile": nofile,
        "proxy_alive_after": alive,
    }
    print(
        f"bench memory: {connected:,}/{clients:,} idle clients logged in in {took:.1f}s; proxy VmRSS "
        f"{base_mb:.1f} MB before, {rss_mb:.1f} MB with them ({result['per_client_kib']:.1f} KiB per "
        f"client), peak {result['hwm_mb']:.1f} MB; target <= {TARGET_MB:.0f} MB: "
        f"{'ok' if result['within_target'] else 'MISSED'}",
        flush=True,
    )
    if errors:
        print(f"bench memory: {len(errors)} logins failed, e.g. {errors[0]}", file=sys.stderr)
    return result


def memory_doc(args: argparse.Namespace) -> dict[str, Any]:
    started_at = datetime.now(UTC).isoformat(timespec="seconds")
    machine = machine_facts()
    result = measure_memory(args.memory_clients, args.memory_concurrency, args.memory_auth)
    machine["loadavg_at_end"] = list(os.getloadavg())
    command = (
        f"python -m bench memory --clients {args.memory_clients} --concurrency "
        f"{args.memory_concurrency} --auth {args.memory_auth}"
    )
    return {
        "benchmark": "idle clients: proxy RSS",
        "started_at": started_at,
        "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine,
        "command": command,
        "result": result,
    }


def add_memory_arguments(p: argparse.ArgumentParser, prefix: str = "") -> None:
    add = p.add_argument
    add(f"--{prefix}clients", dest="memory_clients", type=int, default=10_000, metavar="N",
        help="idle clients to open (default 10000)")  # fmt: skip
    add(f"--{prefix}concurrency", dest="memory_concurrency", type=int, default=64, metavar="N",
        help="logins in flight at once (default 64)")  # fmt: skip
    add(f"--{prefix}auth", dest="memory_auth", default="scram-sha-256",
        choices=("scram-sha-256", "md5", "trust"),
        help="auth.method of the proxy (default scram-sha-256)")  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench memory", description=__doc__.split("\n")[0])
    add_memory_arguments(p)
    add_output_arguments(p)
    args = p.parse_args(argv)
    if args.memory_clients < 1 or args.memory_concurrency < 1:
        p.error("--clients and --concurrency must be at least 1")
    if not have_pgbench():
        return 2

    def run() -> int:
        doc = memory_doc(args)
        publish(doc, args, "memory", report.memory_markdown(doc))
        return 0 if doc["result"]["within_target"] else 1

    return guarded(run)


if __name__ == "__main__":
    sys.exit(main())
