"""``python -m bench hotpath``: the proxy's own Python cost per transaction, without sockets or PostgreSQL.

A ClientConnection and a ServerConnection are driven in-process through in-memory transports: the client
sends one pgbench select-only transaction (or, in the last case, a tpcb-like one: seven units, with
read-your-writes' capture at its COMMIT), the upstream answers it, and only the ``data_received`` calls
are timed. What this leaves out (syscalls, the event loop, the kernel's loopback) is what the pgbench
comparison adds; what it measures is what a change to the data path's Python makes cheaper or dearer.

    python -m bench hotpath                 # simple, extended, extended with statements.cache_unnamed
    python -m bench hotpath --profile       # the same under cProfile, top functions by own time
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import functools
import pstats
import statistics
import struct
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from proxy.backend.connection import ServerConnection
from proxy.config import load_config
from proxy.dev.testing import MemoryTransport
from proxy.frontend.client import READY, ClientConnection
from proxy.protocol import messages as m
from proxy.protocol.framing import startup_message
from proxy.server import ProxyApp

SQL = "SELECT abalance FROM pgbench_accounts WHERE aid = $1"
ROW = struct.pack("!hi", 1, 1) + b"0"  # DataRow: one column, "0"


def _replies(sent: bytes) -> bytes:
    """What PostgreSQL answers to the frontend messages in ``sent`` (one row per query)."""
    out = bytearray()
    pos = 0
    row_description = m.row_description([("abalance", 23)])
    while pos < len(sent):
        mtype = sent[pos]
        (length,) = struct.unpack_from("!I", sent, pos + 1)
        if mtype == ord("P"):
            out += m.parse_complete()
        elif mtype == ord("B"):
            out += m.bind_complete()
        elif mtype == ord("C"):
            out += m.close_complete()
        elif mtype == ord("D"):
            out += row_description
        elif mtype == ord("E"):
            out += _message(b"D", ROW) + m.command_complete("SELECT 1")
        elif mtype == ord("S"):
            out += m.ready_for_query(b"I")
        elif mtype == ord("Q"):
            out += row_description + _message(b"D", ROW) + m.command_complete("SELECT 1")
            out += m.ready_for_query(b"I")
        pos += 1 + length
    return bytes(out)


def _reply(upstream: MemoryTransport, replies: dict[bytes, bytes]) -> bytes:
    """PostgreSQL's answer to what the proxy wrote upstream since the last call (made once per text)."""
    sent = b"".join(upstream.writes)
    upstream.writes.clear()
    reply = replies.get(sent)
    if reply is None:
        reply = replies.setdefault(sent, _replies(sent))
    return reply


def _message(mtype: bytes, payload: bytes) -> bytes:
    return mtype + struct.pack("!I", len(payload) + 4) + payload


def _transaction(mode: str, aid: int) -> bytes:
    if mode == "simple":
        return m.query(f"SELECT abalance FROM pgbench_accounts WHERE aid = {aid};")
    value = str(aid).encode()
    bind_tail = struct.pack("!hhI", 0, 1, len(value)) + value + struct.pack("!h", 0)
    return (
        m.parse("", SQL, ())
        + m.bind_raw("", "", bind_tail)
        + m.describe(b"P", "")
        + _message(b"E", b"\0" + struct.pack("!I", 0))
        + m.sync()
    )


async def _pair(
    cache_unnamed: bool, clients: int = 1, replica: bool = False
) -> tuple[list[ClientConnection], ServerConnection, MemoryTransport]:
    """Logged-in clients of one app whose main pool is one connection (``server``, writing to
    ``upstream``); ``replica``: a read replica configured too (read-your-writes on, its default)."""
    env = {"DATABASE_URL": "postgresql://bench@127.0.0.1:1/bench"}
    if replica:
        env["READ_REPLICA_DATABASE_URL"] = "postgresql://bench@127.0.0.1:2/bench"
    with tempfile.TemporaryDirectory(prefix="parafort-hotpath-") as tmp:
        path = Path(tmp) / "proxy.yaml"
        path.write_text(
            f"auth:\n  method: trust\nstatements:\n  cache_unnamed: {str(cache_unnamed).lower()}\n"
        )
        config = load_config(path, env)
    app = ProxyApp(config)
    app._parameters = {"server_version": "15.0", "client_encoding": "UTF8"}
    server = ServerConnection("main", app.upstreams["main"], "main")
    upstream = MemoryTransport()
    server.connection_made(upstream)  # type: ignore[arg-type]
    pool = app.pools["main"]
    pool.size = pool._total = 1
    pool._idle.append(server)
    logged_in = []
    for _ in range(clients):
        client = ClientConnection(app)
        client.connection_made(MemoryTransport())  # type: ignore[arg-type]
        client.data_received(startup_message({"user": "bench", "database": "bench"}))
        for _ in range(100):
            if client.phase == READY:
                break
            await asyncio.sleep(0)
        if client.phase != READY:
            raise RuntimeError("the in-process client did not log in")
        logged_in.append(client)
    return logged_in, server, upstream


async def measure(mode: str, cache_unnamed: bool, transactions: int, handover: bool = False) -> list[float]:
    """Microseconds of proxy Python per transaction, per block of 1,000: the client's ``data_received``
    and the upstream's. ``handover``: two clients take turns on one connection, so each transaction waits
    for it and the other client's reply hands it over (the path of every transaction when clients
    outnumber connections); the event-loop step that may run the hand-over is timed too, less an empty
    step's cost."""
    clients, server, upstream = await _pair(cache_unnamed, clients=2 if handover else 1)
    replies: dict[bytes, bytes] = {}
    per_block: list[float] = []
    spent = 0
    clock = time.perf_counter_ns
    if handover:
        clients[0].data_received(_transaction(mode, 1))  # takes the connection
    for i in range(transactions):
        client = clients[(i + 1) % len(clients)]
        request = _transaction(mode, 2 + i % 100_000)
        t0 = clock()
        client.data_received(request)
        t1 = clock()
        reply = _reply(upstream, replies)
        t2 = clock()
        server.data_received(reply)  # with ``handover``, the holder's reply: it hands the connection over
        t3 = clock()
        if handover:
            await asyncio.sleep(0)
            t3 = clock()
            await asyncio.sleep(0)
            t3 -= clock() - t3  # an empty step's cost
            if server.sink is not client:
                raise RuntimeError("the connection was not handed over")
        spent += (t1 - t0) + (t3 - t2)
        if (i + 1) % 1000 == 0:
            per_block.append(spent / 1000 / 1000)
            spent = 0
    return per_block


# pgbench's tpcb-like transaction, as its -M extended sends it: (SQL, parameter count).
TPCB = (
    ("BEGIN", 0),
    ("UPDATE pgbench_accounts SET abalance = abalance + $1 WHERE aid = $2", 2),
    ("SELECT abalance FROM pgbench_accounts WHERE aid = $1", 1),
    ("UPDATE pgbench_tellers SET tbalance = tbalance + $1 WHERE tid = $2", 2),
    ("UPDATE pgbench_branches SET bbalance = bbalance + $1 WHERE bid = $2", 2),
    ("INSERT INTO pgbench_history (tid, bid, aid, delta, mtime) VALUES ($1, $2, $3, $4, now())", 4),
    ("END", 0),
)
_TAGS = {b"BEGIN": b"BEGIN", b"END": b"COMMIT", b"UPDATE": b"UPDATE 1", b"INSERT": b"INSERT 0 1"}


def _tpcb_unit(sql: str, params: int) -> bytes:
    tail = struct.pack("!hh", 0, params) + b"".join(struct.pack("!I", 1) + b"7" for _ in range(params))
    return (
        m.parse("", sql, ())
        + m.bind_raw("", "", tail + struct.pack("!h", 0))
        + m.describe(b"P", "")
        + _message(b"E", b"\0" + struct.pack("!I", 0))
        + m.sync()
    )


def _tpcb_replies(sent: bytes) -> bytes:
    """PostgreSQL's answer to what the proxy sends for one tpcb-like unit: the deferred BEGIN and the
    read-your-writes capture (Query messages) included, with the transaction status each ends in."""
    out = bytearray()
    pos = 0
    status = b"T"
    verb = b""
    while pos < len(sent):
        mtype = sent[pos]
        (length,) = struct.unpack_from("!I", sent, pos + 1)
        body = sent[pos + 5 : pos + 1 + length]
        if mtype == ord("P"):
            out += m.parse_complete()
            verb = body[1:].split(None, 1)[0].rstrip(b"\0")
        elif mtype == ord("B"):
            out += m.bind_complete()
        elif mtype == ord("D"):
            out += m.row_description([("abalance", 23)]) if verb == b"SELECT" else m.no_data()
        elif mtype == ord("E"):
            tag = _TAGS.get(verb)
            out += _message(b"D", ROW) + m.command_complete("SELECT 1") if tag is None else _tag(tag)
            status = b"I" if verb == b"END" else b"T"
        elif mtype == ord("S"):
            out += m.ready_for_query(status)
        elif mtype == ord("Q") and body.startswith(b"BEGIN"):
            out += _tag(b"BEGIN") + m.ready_for_query(b"T")
        elif mtype == ord("Q"):  # the capture: main's position (the first reads its identity too)
            values = [b"0/3000060"] + ([b"1"] * 3 if b"system_identifier" in body else [])
            row = struct.pack("!h", len(values)) + b"".join(struct.pack("!I", len(v)) + v for v in values)
            out += m.row_description([(f"c{n}", 25) for n in range(len(values))])  # as PostgreSQL: T D C Z
            out += _message(b"D", row) + m.command_complete("SELECT 1") + m.ready_for_query(b"I")
        pos += 1 + length
    return bytes(out)


def _tag(tag: bytes) -> bytes:
    return _message(b"C", tag + b"\0")


async def measure_tpcb(transactions: int) -> list[float]:
    """Microseconds of proxy Python per pgbench tpcb-like transaction (extended protocol, a read replica
    configured so read-your-writes captures main's position at COMMIT), per block of 200: every unit's
    ``data_received`` calls, client's and upstream's, the capture's reply included."""
    clients, server, upstream = await _pair(False, replica=True)
    client = clients[0]
    units = [_tpcb_unit(sql, params) for sql, params in TPCB]
    replies: dict[bytes, bytes] = {}
    per_block: list[float] = []
    spent = 0
    clock = time.perf_counter_ns
    for i in range(transactions):
        for unit in units:
            t0 = clock()
            client.data_received(unit)
            t1 = clock()
            spent += t1 - t0
            while upstream.writes:  # the unit, then what its reply makes the proxy send (a capture)
                sent = b"".join(upstream.writes)
                upstream.writes.clear()
                reply = replies.get(sent)
                if reply is None:
                    reply = replies.setdefault(sent, _tpcb_replies(sent))
                t2 = clock()
                server.data_received(reply)
                spent += clock() - t2
        if server.expect or client.server is not server:
            raise RuntimeError("the tpcb-like transaction did not end as PostgreSQL's would")
        if (i + 1) % 200 == 0:
            per_block.append(spent / 200 / 1000)
            spent = 0
    if client.app.consistency.writes.captures != transactions:
        raise RuntimeError("read-your-writes did not capture main's position once per transaction")
    return per_block


CASES: Sequence[tuple[str, str, bool, bool]] = (
    ("simple", "simple", False, False),
    ("extended", "extended", False, False),
    ("extended, statements.cache_unnamed", "extended", True, False),
    ("simple, a hand-over per transaction", "simple", False, True),
    ("extended, a hand-over per transaction", "extended", False, True),
    ("extended, cache_unnamed, a hand-over each", "extended", True, True),
    ("tpcb-like, extended, read-your-writes", "tpcb", False, False),  # seven units and a capture
)


def _run_case(mode: str, cache_unnamed: bool, handover: bool, transactions: int) -> list[float]:
    if mode == "tpcb":
        return asyncio.run(measure_tpcb(max(transactions // 10, 1000)))
    return asyncio.run(measure(mode, cache_unnamed, transactions, handover))


def run(transactions: int, profile: bool) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for label, mode, cache, handover in CASES:
        work: Callable[[], list[float]] = functools.partial(_run_case, mode, cache, handover, transactions)
        if profile:
            prof = cProfile.Profile()
            blocks = prof.runcall(work)
            print(f"== {label} (cProfile, top 15 by own time) ==")
            pstats.Stats(prof).sort_stats("tottime").print_stats(15)
        else:
            blocks = work()
        median = statistics.median(blocks[len(blocks) // 5 :])  # the first fifth warms the caches
        rows.append({"case": label, "microseconds_per_transaction": round(median, 2)})
        print(f"{label:40} {median:6.2f} µs of proxy Python per transaction", flush=True)
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench hotpath", description=__doc__.split("\n\n")[0])
    p.add_argument("--transactions", type=int, default=50_000, help="per case (default 50,000)")
    p.add_argument("--profile", action="store_true", help="run under cProfile and print the top functions")
    args = p.parse_args(argv)
    run(args.transactions, args.profile)
    return 0
