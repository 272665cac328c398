"""One client's read-your-writes state (proxy/frontend/reads.py), without sockets."""

from __future__ import annotations

from proxy.frontend.reads import Reads
from proxy.protocol import messages as m


def test_set_and_reset_min_lsn() -> None:
    reads: Reads[object] = Reads(7)
    assert Reads.min_lsn_command(b"SELECT 1") is None
    assert Reads.min_lsn_command(b"SET parafort.min_lsn = '0/3000060'") == ("SET", "0/3000060")
    assert reads.set_min_lsn("SET", "0/3000060") == m.command_complete("SET")
    assert reads.min_lsn == 0x3000060
    reply = reads.set_min_lsn("SET", "not a position")
    assert reply.startswith(b"E") and b"22023" in reply
    assert reads.min_lsn == 0x3000060  # unchanged by a bad value
    assert reads.set_min_lsn("RESET", None) == m.command_complete("RESET")
    assert reads.min_lsn is None


def test_scope_names() -> None:
    reads: Reads[object] = Reads(7)
    assert reads.scope_name() == "connection 7 (parafort.min_lsn)"
    reads.key = ("user", "app")
    assert reads.scope_name() == "user app"
