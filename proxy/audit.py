"""The compliance audit log (BRIEF §9): statements routed to the compliance role, one JSON line each.

Each line: time, user, client address, application_name, the statement normalized by PostgreSQL's own
normalizer (pglast: every literal becomes ``$n``), the role, and the outcome (``ok`` or the SQLSTATE).
Statements are normalized once per distinct text (cached). The file is reopened on SIGHUP (logrotate).
"""

from __future__ import annotations

import json
import logging
import time
from collections import OrderedDict
from pathlib import Path
from typing import TextIO

import pglast

from proxy.router.classify import INLINE_BYTES

log = logging.getLogger("parafort.audit")
CACHE_SIZE = 5_000


def normalize(sql: str) -> str:
    """``sql`` with every literal replaced by a placeholder; text that cannot be parsed is not logged."""
    try:
        return str(pglast.parser.normalize(sql))
    except pglast.parser.ParseError:
        return "(statement not parsable: not logged)"


class AuditLog:
    """Appends JSON lines to ``path``; ``reopen()`` after the file was rotated."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file: TextIO | None = None
        self._normalized: OrderedDict[bytes, str] = OrderedDict()
        self.reopen()

    def reopen(self) -> None:
        old = self._file
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = self.path.open("a", encoding="utf-8", buffering=1)
        except OSError as exc:
            log.error("event=audit_open_failed path=%s error=%r", self.path, exc.strerror)
            self._file = None
        if old is not None:
            old.close()

    def normalized(self, sql: bytes) -> str:
        found = self._normalized.get(sql)
        if found is None:
            found = normalize(sql.decode("utf-8", errors="replace"))
            if len(sql) > INLINE_BYTES:
                return found  # large texts are not kept: the cache stays small in bytes
            self._normalized[sql] = found
            if len(self._normalized) > CACHE_SIZE:
                self._normalized.popitem(last=False)
        return found

    def write(
        self,
        *,
        user: str,
        address: str,
        application_name: str,
        statements: list[str],
        role: str,
        outcome: str,
    ) -> None:
        if self._file is None:
            return
        record = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime())
            + f".{int(time.time() * 1000) % 1000:03d}Z",
            "user": user,
            "client_address": address,
            "application_name": application_name,
            "role": role,
            "statement": "; ".join(statements),
            "outcome": outcome,
        }
        try:
            self._file.write(json.dumps(record) + "\n")
        except OSError as exc:
            log.error("event=audit_write_failed path=%s error=%r", self.path, exc.strerror)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
