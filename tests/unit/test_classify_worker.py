"""The classification cache's byte bound and the classifier child's protocol (proxy/router/worker.py)."""

from __future__ import annotations

import asyncio
import io
import os
import struct

import pytest

from proxy.router.classify import (
    INLINE_BYTES,
    MAX_CLASSIFY_BYTES,
    UNCLASSIFIABLE,
    UNCLASSIFIED,
    Analysis,
    ClassificationCache,
    analyze,
    decode_analysis,
    encode_analysis,
)
from proxy.router.worker import ClassifierWorker, serve_child

PLUS_30000 = ("SELECT 1" + "+1" * 29_999).encode()
LARGE_READ = ("SELECT a FROM t WHERE b IN (" + ",".join(map(str, range(3000))) + ")").encode()


def _fields(a: Analysis) -> tuple[object, ...]:
    i = a.info
    return (
        i.flags, i.pin_reason, i.write, i.write_reason, i.tables, i.functions, i.tx, i.primary_only,
        i.statements, i.begins, i.plannable, a.changes, a.deallocate, a.override,
    )  # fmt: skip


def test_large_text_is_neither_parsed_nor_kept_inline() -> None:
    cache = ClassificationCache()
    assert len(PLUS_30000) > INLINE_BYTES
    assert cache.classify_bytes(PLUS_30000) is UNCLASSIFIABLE  # would segfault if parsed here
    assert cache.classify(PLUS_30000.decode()) is UNCLASSIFIABLE
    assert cache.key_bytes == 0


def test_cache_keys_stay_within_the_byte_budget() -> None:
    cache = ClassificationCache(max_key_bytes=10_000)
    texts = [f"SELECT {n} AS x{'y' * 3000}".encode() for n in range(8)]
    for sql in texts:
        assert not cache.classify_bytes(sql).parse_error
        assert cache.key_bytes <= 10_000
    tables = (cache._by_bytes, cache._by_text, cache._by_shape)
    assert cache.key_bytes == sum(len(k) for table in tables for k in table)
    assert cache.classify_bytes(texts[-1]) is cache.classify_bytes(texts[-1])  # the newest stays


def test_analysis_round_trips_through_its_encoding() -> None:
    for sql in (
        "SET search_path = a, b; SAVEPOINT s; ROLLBACK TO SAVEPOINT s",
        "/* route: analytics */ SELECT f(x) FROM s.t JOIN u ON true FOR UPDATE",
        "DEALLOCATE stmt_1",
        "BEGIN; INSERT INTO t VALUES (1)",
        "LISTEN x",
        "SELEC broken",
    ):
        original = analyze(sql)
        assert _fields(decode_analysis(encode_analysis(original))) == _fields(original), sql
    assert analyze("DEALLOCATE stmt_1").deallocate == "stmt_1"
    assert analyze("/* route: analytics */ SELECT 1").override == "analytics"
    assert [c.name for c in analyze("SET work_mem = '64MB'").changes] == ["work_mem"]


@pytest.mark.parametrize(
    "data", [b"", b"{}", b"[1, 2]", b"[1, null, 1, null, [], [], 7, 0, 1, null, 0, [], null, null]"]
)
def test_decode_refuses_anything_else(data: bytes) -> None:
    with pytest.raises((ValueError, TypeError)):
        decode_analysis(data)


def test_the_child_answers_length_prefixed_requests_until_end_of_input() -> None:
    requests = b"".join(struct.pack("!I", len(sql)) + sql for sql in (b"SELECT 1", b"SET work_mem = 1"))
    out = io.BytesIO()
    serve_child(io.BytesIO(requests), out)
    data, answers = out.getvalue(), []
    while data:
        (n,) = struct.unpack_from("!I", data)
        answers.append(decode_analysis(data[4 : 4 + n]))
        data = data[4 + n :]
    assert [a.info.statements for a in answers] == [1, 1]
    assert [c.name for c in answers[1].changes] == ["work_mem"]


def test_the_worker_survives_its_child_and_starts_another() -> None:
    async def scenario() -> int | None:
        worker = ClassifierWorker()
        try:
            first = await worker.analyze(LARGE_READ)
            assert first.info.tables == {("", "t")}
            pid = worker.pid
            assert await worker.analyze(PLUS_30000) is UNCLASSIFIED  # pglast segfaults: only the child dies
            for _ in range(100):
                if worker.crashes:
                    break
                await asyncio.sleep(0.05)
            assert worker.crashes == 1
            again = await worker.analyze(LARGE_READ.replace(b"a FROM", b"b FROM"))
            assert again.info.tables == {("", "t")}
            assert worker.pid not in (None, pid)
            assert await worker.analyze(LARGE_READ) is first  # remembered by digest: no round trip
            big_set = f"SET application_name = '{'x' * 10_000}'".encode()
            setting = await worker.analyze(big_set)
            assert [c.name for c in setting.changes] == ["application_name"]
            assert await worker.analyze(big_set) is not setting  # megabytes of SET text are not kept
            assert await worker.analyze(b"x" * (MAX_CLASSIFY_BYTES + 1)) is UNCLASSIFIED  # never sent
        finally:
            last = worker.pid
            await worker.stop()
        return last

    last = asyncio.run(scenario())
    assert last is not None and not os.path.exists(f"/proc/{last}")  # stopped and reaped


def test_a_request_past_its_deadline_is_unclassified_and_the_child_replaced() -> None:
    slow = ("SELECT 1 WHERE 1 IN (" + ",".join(map(str, range(100_000))) + ")").encode()

    async def scenario() -> None:
        worker = ClassifierWorker(timeout=0.05)
        try:
            assert await worker.analyze(slow) is UNCLASSIFIED
            assert worker.timeouts == 1
            worker.timeout = 60
            assert (await worker.analyze(LARGE_READ)).info.tables == {("", "t")}
            assert worker.starts == 2
        finally:
            await worker.stop()

    asyncio.run(scenario())


def test_waiters_get_unclassified_when_the_proxy_stops() -> None:
    slow = ("SELECT 1 WHERE 1 IN (" + ",".join(map(str, range(100_000))) + ")").encode()

    async def scenario() -> None:
        worker = ClassifierWorker()
        first = asyncio.ensure_future(worker.analyze(slow))
        queued = asyncio.ensure_future(worker.analyze(LARGE_READ))
        for _ in range(1000):
            if worker.pid is not None:
                break
            await asyncio.sleep(0.01)
        await worker.stop()
        assert await queued is UNCLASSIFIED
        assert await first is UNCLASSIFIED

    asyncio.run(scenario())
