"""One client's compliance units in flight: their statements (normalized) and outcome, remembered as they are
sent and written to the audit log (proxy/audit.py) when their ReadyForQuery arrives."""

from __future__ import annotations

from proxy.audit import AuditLog
from proxy.errors import ProxyError
from proxy.frontend.prepared import Statements
from proxy.frontend.session import PreparedStatement
from proxy.protocol import messages as m

_P, _B, _Q = b"PBQ"


class AuditTrail:
    """See the module docstring."""

    __slots__ = ("outcome", "pending")

    def __init__(self) -> None:
        self.pending: list[str] = []  # normalized statements of compliance units in flight
        self.outcome = "ok"

    def note(
        self,
        audit: AuditLog,
        buf: bytes,
        msgs: list[tuple[int, int, int]],
        named: dict[str, PreparedStatement],
        statements: Statements,
    ) -> None:
        """Remember the statements a batch (``msgs``: type, start, end in ``buf``) runs: its queries and
        Parses, or what its Binds execute (``named``: the client's statements by name)."""
        pending = self.pending
        for mtype, start, end in msgs:
            if mtype == _Q:
                pending.append(audit.normalized(buf[start + 5 : end - 1]))
            elif mtype == _P:
                name_end = buf.index(0, start + 5, end)
                pending.append(audit.normalized(buf[name_end + 1 : buf.index(0, name_end + 1, end)]))
            elif mtype == _B and not any(t == _P for t, _, _ in msgs):
                _, name, _ = m.decode_bind_names(buf[start + 5 : end])
                stmt = named.get(name) if name else None
                if stmt is not None:
                    pending.append(audit.normalized(stmt.sql.encode()))
                elif not name and statements.unnamed_stmt is not None:
                    pending.append(audit.normalized(statements.unnamed_stmt.sql.encode()))
                elif statements.unnamed is not None:
                    raw = statements.unnamed
                    name_end = raw.index(0, 5)
                    pending.append(audit.normalized(raw[name_end + 1 : raw.index(0, name_end + 1)]))

    def error(self, fields_payload: bytes) -> None:
        """An ErrorResponse in a unit in flight: the first one is its outcome (with its SQLSTATE)."""
        if self.pending and self.outcome == "ok":
            try:
                self.outcome = "error " + m.parse_fields(fields_payload).get("C", "")
            except ProxyError:
                self.outcome = "error"

    def write(
        self, audit: AuditLog | None, *, user: str, address: str, application_name: str, role: str
    ) -> None:
        """The units in flight ended: one audit record for them."""
        if audit is not None:
            audit.write(
                user=user,
                address=address,
                application_name=application_name,
                statements=self.pending,
                role=role,
                outcome=self.outcome,
            )
        self.pending = []
        self.outcome = "ok"


__all__ = ["AuditTrail"]
