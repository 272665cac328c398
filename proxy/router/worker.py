"""Classify large SQL in a child process, so that no statement can crash the proxy or stall its event loop.

pglast builds its Python tree recursively: a statement nested deeply enough (``SELECT 1+1+...+1`` with
30,000 terms) overflows the C stack and kills the process, and a megabyte of SQL takes seconds to classify.
SQL above ``INLINE_BYTES`` is therefore sent to one long-lived child (``python -m proxy.router.worker``),
started on first use, over its stdin/stdout: a request is ``Int32 length | SQL bytes``, an answer
``Int32 length | encode_analysis()`` (plain JSON, never pickle). One request is in flight at a time; each has
a deadline. A child that dies (a segfault) or misses the deadline (killed) makes that statement UNCLASSIFIED
and is started again for the next one. The child exits by itself when its stdin closes (the proxy exited).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import signal
import struct
import sys
from collections import OrderedDict, deque
from typing import BinaryIO

from proxy.router import classify

log = logging.getLogger("parafort.classifier")

_LENGTH = struct.Struct("!I")
CLASSIFY_TIMEOUT = 15.0  # seconds one request may take in the child (a 4 MB statement takes a few)
# Answers remembered by the SQL's digest (16 bytes, not the SQL): a repeated large statement skips the child.
RESULT_CACHE_SIZE = 1_000
_MAX_ANSWER = 64 * 1024 * 1024


def _digest(sql: bytes) -> bytes:
    return hashlib.blake2b(sql, digest_size=16).digest()


def _size(a: classify.Analysis) -> int:
    """What an answer holds beyond a few small sets: the text of its session changes (``SET x = '...'``
    can be megabytes, and is not worth remembering)."""
    return sum(len(c.sql or "") for c in a.changes)


class ClassifierWorker:
    """The proxy's side of the classifier child: queue, deadline, restart, result cache."""

    def __init__(self, timeout: float = CLASSIFY_TIMEOUT) -> None:
        self.timeout = timeout
        self._proc: asyncio.subprocess.Process | None = None
        self._queue: deque[tuple[bytes, bytes, asyncio.Future[classify.Analysis]]] = deque()
        self._runner: asyncio.Task[None] | None = None
        self._current: asyncio.Future[classify.Analysis] | None = None  # the request the child is working on
        self._results: OrderedDict[bytes, classify.Analysis] = OrderedDict()
        self._stopped = False
        # Counters (metrics): requests answered by the child, children started, deaths, deadlines missed.
        self.requests = 0
        self.starts = 0
        self.crashes = 0
        self.timeouts = 0

    @property
    def pid(self) -> int | None:
        proc = self._proc
        return proc.pid if proc is not None and proc.returncode is None else None

    def cached(self, sql: bytes) -> tuple[bytes, classify.Analysis | None]:
        """``sql``'s digest, and its answer if there is one without waiting: remembered, or UNCLASSIFIED
        when it is too large."""
        if len(sql) > classify.MAX_CLASSIFY_BYTES or self._stopped:
            return b"", classify.UNCLASSIFIED
        key = _digest(sql)
        found = self._results.get(key)
        if found is not None:
            self._results.move_to_end(key)
        return key, found

    async def analyze(self, sql: bytes, key: bytes | None = None) -> classify.Analysis:
        """The Analysis of ``sql`` (whose digest ``key`` is, when the caller has it) from the child;
        UNCLASSIFIED if the child dies or misses the deadline."""
        if key is None:
            key, found = self.cached(sql)
            if found is not None:
                return found
        future: asyncio.Future[classify.Analysis] = asyncio.get_running_loop().create_future()
        self._queue.append((sql, key, future))
        if self._runner is None or self._runner.done():
            self._runner = asyncio.get_running_loop().create_task(self._run())
        return await future  # cancelled (the client left): _run skips it

    async def _run(self) -> None:
        while self._queue:
            sql, key, future = self._queue.popleft()
            if future.done():
                continue
            self._current = future
            result = await self._one(sql)
            self._current = None
            if result is not classify.UNCLASSIFIED and _size(result) <= classify.INLINE_BYTES:
                self._results[key] = result
                if len(self._results) > RESULT_CACHE_SIZE:
                    self._results.popitem(last=False)
            if not future.done():
                future.set_result(result)

    async def _one(self, sql: bytes) -> classify.Analysis:
        proc = await self._ensure()
        if proc is None:
            return classify.UNCLASSIFIED
        assert proc.stdin is not None and proc.stdout is not None
        try:
            async with asyncio.timeout(self.timeout):
                proc.stdin.write(_LENGTH.pack(len(sql)))
                proc.stdin.write(sql)
                await proc.stdin.drain()
                (length,) = _LENGTH.unpack(await proc.stdout.readexactly(4))
                if length > _MAX_ANSWER:
                    raise ValueError(f"answer of {length} bytes")
                answer = await proc.stdout.readexactly(length)
            result = classify.decode_analysis(answer)
        except TimeoutError:
            self.timeouts += 1
            log.warning(
                "event=classifier_timeout pid=%s bytes=%d seconds=%g: sent to main unclassified",
                proc.pid, len(sql), self.timeout,
            )  # fmt: skip
            await self._end(proc)
            return classify.UNCLASSIFIED
        except (OSError, EOFError, asyncio.IncompleteReadError, ValueError, TypeError) as exc:
            if not self._stopped:
                log.info("event=classifier_failed pid=%d error=%s", proc.pid, type(exc).__name__)
                await self._end(proc)
            return classify.UNCLASSIFIED
        self.requests += 1
        return result

    async def _ensure(self) -> asyncio.subprocess.Process | None:
        proc = self._proc
        if proc is not None:
            if proc.returncode is None:
                return proc
            self._forget(proc, proc.returncode)  # it died between requests (killed, say)
        if self._stopped:
            return None
        try:
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "proxy.router.worker",
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                limit=1 << 20,
            )
        except OSError as exc:
            log.error("event=classifier_start_failed error=%r", str(exc))
            return None
        self._proc = proc
        self.starts += 1
        log.info("event=classifier_started pid=%d", proc.pid)
        return proc

    async def _end(self, proc: asyncio.subprocess.Process) -> None:
        """The child failed a request (died, or missed the deadline): make sure it is gone and reaped."""
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
        self._forget(proc, await proc.wait())

    def _forget(self, proc: asyncio.subprocess.Process, code: int) -> None:
        """Log the child's end once, whatever ended it (a segfault, a kill, a missed deadline)."""
        if self._proc is not proc:
            return
        self._proc = None
        if not self._stopped:
            self.crashes += 1
            log.warning(
                "event=classifier_exited pid=%d returncode=%s: started again on next use", proc.pid, code
            )

    async def stop(self) -> None:
        """Proxy shutdown: every waiter gets UNCLASSIFIED, the child is stopped and reaped."""
        self._stopped = True
        while self._queue:
            _, _, future = self._queue.popleft()
            if not future.done():
                future.set_result(classify.UNCLASSIFIED)
        proc, self._proc = self._proc, None
        if proc is not None and proc.returncode is None:
            if self._current is not None:
                proc.kill()  # busy with a statement nobody will use now
            elif proc.stdin is not None:
                proc.stdin.close()  # the child exits at end of input
            try:
                await asyncio.wait_for(proc.wait(), 2)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
            log.info("event=classifier_stopped pid=%d", proc.pid)
        current, self._current = self._current, None
        if current is not None and not current.done():
            current.set_result(classify.UNCLASSIFIED)
        if self._runner is not None:
            self._runner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._runner


# -- the child --------------------------------------------------------------------------------------------
def _read_exactly(stream: BinaryIO, n: int) -> bytes | None:
    chunks = []
    while n:
        chunk = stream.read(n)
        if not chunk:
            return None
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)


def serve_child(stdin: BinaryIO, stdout: BinaryIO) -> None:
    """Answer requests until end of input."""
    cache = classify.ClassificationCache()
    while True:
        header = _read_exactly(stdin, 4)
        if header is None:
            return
        (length,) = _LENGTH.unpack(header)
        sql = _read_exactly(stdin, length) if length else b""
        if sql is None:
            return
        answer = classify.encode_analysis(classify.analyze(sql.decode("utf-8", errors="replace"), cache))
        stdout.write(_LENGTH.pack(len(answer)) + answer)
        stdout.flush()


def main() -> None:
    # The proxy owns this process's lifetime (it closes our stdin); a Ctrl-C or a SIGTERM sent to the whole
    # process group must not kill it under the proxy.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    with contextlib.suppress(BrokenPipeError):
        serve_child(os.fdopen(0, "rb", buffering=0), os.fdopen(1, "wb"))


if __name__ == "__main__":
    main()
