"""Failed-login flood: a bystander's ``SELECT 1`` latency while wrong passwords arrive, and CPU per failure.

    .venv/bin/python -m bench.login_flood [--rate 330] [--seconds 15] [--bystanders 4] [--burst 2000]

One throwaway primary and one proxy whose users file holds a plain-text password (the case that cost a PBKDF2
per attempt). Phases, each reported on its own line:

* ``idle``: bystanders only (psycopg 3, one connection per thread, ``SELECT 1`` in a loop): latency p50/p99.
* ``wrong_password`` / ``unknown_user``: the same bystanders while a separate process sends failed SCRAM
  logins at ``--rate`` per second (raw sockets; the client proof is random bytes, so the flood itself
  computes no PBKDF2: an attacker does not need to either).
* ``burst``: ``--burst`` failed logins as fast as 8 concurrent raw clients go, no bystanders; the proxy's
  CPU (utime+stime from /proc) divided by the number of failures = CPU per failed login (the proxy is one
  event loop, so this is event-loop time).

Not a test: numbers depend on the machine. Used for issue 13 finding 7's before/after figures.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import multiprocessing
import os
import secrets
import statistics
import struct
import sys
import threading
import time
from pathlib import Path

import psycopg

from bench.memory import _message, startup_message
from proxy.dev.cluster import DevClusters
from proxy.dev.testing import APP_PASSWORD, APP_USER, ProxyProcess

HOST = "127.0.0.1"


async def failed_login(port: int, user: str) -> bool:
    """One SCRAM login with a random proof; True when the proxy answered with an ErrorResponse."""
    reader, writer = await asyncio.open_connection(HOST, port)
    try:
        writer.write(startup_message(user, "app"))
        bare = f"n=,r={secrets.token_urlsafe(18)}"
        while True:
            head = await reader.readexactly(5)
            kind, length = head[:1], struct.unpack("!i", head[1:])[0]
            payload = await reader.readexactly(length - 4)
            if kind == b"E":
                return True
            if kind != b"R":
                return False
            code = struct.unpack("!i", payload[:4])[0]
            if code == 10:
                first = f"n,,{bare}".encode()
                writer.write(_message(b"p", b"SCRAM-SHA-256\0" + struct.pack("!i", len(first)) + first))
            elif code == 11:
                attrs = dict(part.split("=", 1) for part in payload[4:].decode().split(","))
                proof = base64.b64encode(secrets.token_bytes(32)).decode()
                writer.write(_message(b"p", f"c=biws,r={attrs['r']},p={proof}".encode()))
            else:
                return False
    finally:
        writer.close()


async def _flood(port: int, user: str, rate: float, seconds: float, concurrency: int) -> int:
    gate = asyncio.Semaphore(concurrency)
    done = 0

    async def one() -> None:
        nonlocal done
        async with gate:
            try:
                if await failed_login(port, user):
                    done += 1
            except (OSError, asyncio.IncompleteReadError):
                pass

    tasks = []
    start = time.monotonic()
    n = 0
    while (now := time.monotonic()) - start < seconds:
        if rate <= 0 or n < (now - start) * rate:
            tasks.append(asyncio.ensure_future(one()))
            n += 1
            if rate <= 0 and n >= seconds:  # burst mode: ``seconds`` is the number of logins
                break
            continue
        await asyncio.sleep(0.001)
    await asyncio.gather(*tasks)
    return done


def flood_process(
    port: int, user: str, rate: float, amount: float, *, concurrency: int, out: multiprocessing.Queue[int]
) -> None:
    out.put(asyncio.run(_flood(port, user, rate, amount, concurrency)))


def bystanders(dsn: str, threads: int, stop: threading.Event, lat: list[float]) -> list[threading.Thread]:
    def run() -> None:
        with psycopg.connect(dsn, autocommit=True) as conn:
            while not stop.is_set():
                t0 = time.perf_counter()
                conn.execute("SELECT 1").fetchone()
                lat.append(time.perf_counter() - t0)

    workers = [threading.Thread(target=run, daemon=True) for _ in range(threads)]
    for w in workers:
        w.start()
    return workers


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _pct(values: list[float], q: float) -> float:
    return sorted(values)[min(len(values) - 1, int(q * len(values)))] * 1000


def phase(proxy: ProxyProcess, name: str, user: str | None, args: argparse.Namespace) -> None:
    lat: list[float] = []
    stop = threading.Event()
    workers = bystanders(proxy.dsn(APP_USER, APP_PASSWORD), args.bystanders, stop, lat)
    time.sleep(1)  # connections open
    lat.clear()
    cpu0, t0 = cpu_seconds(proxy.proc.pid), time.monotonic()
    failed = 0
    if user is None:
        time.sleep(args.seconds)
    else:
        q: multiprocessing.Queue[int] = multiprocessing.Queue()
        p = multiprocessing.Process(
            target=flood_process,
            args=(proxy.port, user, args.rate, args.seconds),
            kwargs={"concurrency": 64, "out": q},
        )
        p.start()
        failed = q.get()
        p.join()
    cpu1, t1 = cpu_seconds(proxy.proc.pid), time.monotonic()
    stop.set()
    for w in workers:
        w.join()
    print(
        f"{name:15s} seconds={t1 - t0:5.1f} failed_logins/s={failed / (t1 - t0):6.1f} "
        f"bystander_queries={len(lat)} p50_ms={statistics.median(lat) * 1000:.2f} "
        f"p99_ms={_pct(lat, 0.99):.2f} proxy_cpu_pct={100 * (cpu1 - cpu0) / (t1 - t0):.0f}",
        flush=True,
    )


def burst(proxy: ProxyProcess, user: str, n: int) -> None:
    cpu0, t0 = cpu_seconds(proxy.proc.pid), time.monotonic()
    q: multiprocessing.Queue[int] = multiprocessing.Queue()
    p = multiprocessing.Process(
        target=flood_process, args=(proxy.port, user, 0, n), kwargs={"concurrency": 8, "out": q}
    )
    p.start()
    failed = q.get()
    p.join()
    cpu1, t1 = cpu_seconds(proxy.proc.pid), time.monotonic()
    print(
        f"burst {user:12s} failed_logins={failed} seconds={t1 - t0:.1f} "
        f"proxy_cpu_ms_per_failed_login={1000 * (cpu1 - cpu0) / max(failed, 1):.3f}",
        flush=True,
    )


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rate", type=float, default=330.0)
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--bystanders", type=int, default=4)
    parser.add_argument("--burst", type=int, default=2000)
    args = parser.parse_args(argv)
    with DevClusters.start(("main",)) as pg:
        proxy = ProxyProcess(pg.env(), {}, {APP_USER: APP_PASSWORD})
        try:
            phase(proxy, "idle", None, args)
            phase(proxy, "wrong_password", APP_USER, args)
            phase(proxy, "unknown_user", "nobody_here", args)
            burst(proxy, APP_USER, args.burst)
            burst(proxy, "nobody_here", args.burst)
            lines = proxy.log().count("\n")
            print(f"proxy log lines: {lines}")
        finally:
            proxy.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
