"""SCRAM key derivation at login: PBKDF2 at most once per user per users-file load, and failure reasons.

The derivation is counted by wrapping ``hashlib.pbkdf2_hmac`` (what scramp's key derivation calls); the
client side of these exchanges sends a random proof, so it computes no PBKDF2 of its own.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from proxy.errors import INVALID_PASSWORD, PROTOCOL_VIOLATION, ProxyError
from proxy.protocol import (
    F,
    ScramKeys,
    ServerAuth,
    decode_auth,
    make_scram_verifier,
    sasl_initial_response,
    sasl_response,
    scan_messages,
)
from proxy.protocol.auth import (
    EMPTY_PASSWORD,
    MALFORMED_AUTH_MESSAGE,
    METHOD_MISMATCH,
    UNKNOWN_USER,
    UNSUPPORTED_MECHANISM,
    WRONG_PASSWORD,
)


@pytest.fixture
def pbkdf2_calls(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """Every hashlib.pbkdf2_hmac call in this test, as its iteration count."""
    calls: list[int] = []
    real: Callable[..., bytes] = hashlib.pbkdf2_hmac

    def counted(*args: Any, **kwargs: Any) -> bytes:
        calls.append(int(args[3]))
        return real(*args, **kwargs)

    monkeypatch.setattr(hashlib, "pbkdf2_hmac", counted)
    yield calls


def _payload(msg: bytes) -> bytes:
    found, rest = scan_messages(msg, 0, 1 << 20)
    assert rest == len(msg) and len(found) == 1
    return msg[5:]


def _server_first(server: ServerAuth) -> tuple[str, str]:
    """Start ``server`` and send a libpq-style client-first; returns (client-first-bare, server-first)."""
    server.start()
    bare = f"n=,r={base64.b64encode(secrets.token_bytes(18)).decode()}"
    first = sasl_initial_response("SCRAM-SHA-256", f"n,,{bare}".encode())
    out, done = server.feed(F.PASSWORD, _payload(first))
    assert not done
    return bare, decode_auth(_payload(out))[1].decode()


def logged_in(user: str, secret: str, keys: ScramKeys, password: str) -> ServerAuth:
    """A SCRAM login with the right password computed by hand (one PBKDF2, the client's), which succeeds."""
    server = ServerAuth("scram-sha-256", user, secret, keys)
    bare, server_first = _server_first(server)
    attrs = dict(kv.split("=", 1) for kv in server_first.split(","))
    without_proof = f"c=biws,r={attrs['r']}"
    salted = hashlib.pbkdf2_hmac("sha256", password.encode(), base64.b64decode(attrs["s"]), int(attrs["i"]))
    client_key = hmac.digest(salted, b"Client Key", "sha256")
    auth_message = f"{bare},{server_first},{without_proof}".encode()
    signature = hmac.digest(hashlib.sha256(client_key).digest(), auth_message, "sha256")
    proof = bytes(a ^ b for a, b in zip(client_key, signature, strict=True))
    final = f"{without_proof},p={base64.b64encode(proof).decode()}"
    _out, done = server.feed(F.PASSWORD, _payload(sasl_response(final.encode())))
    assert done and server.done
    return server


def failed(user: str, secret: str | None, keys: ScramKeys) -> tuple[ServerAuth, dict[str, str]]:
    """A SCRAM login with a random proof, which must fail with 28P01."""
    server = ServerAuth("scram-sha-256", user, secret, keys)
    _bare, server_first = _server_first(server)
    attrs = dict(kv.split("=", 1) for kv in server_first.split(","))
    proof = base64.b64encode(secrets.token_bytes(32)).decode()
    with pytest.raises(ProxyError) as info:
        server.feed(F.PASSWORD, _payload(sasl_response(f"c=biws,r={attrs['r']},p={proof}".encode())))
    assert (info.value.sqlstate, info.value.message) == (
        INVALID_PASSWORD,
        f'password authentication failed for user "{user}"',
    )
    return server, attrs


def test_plain_text_password_derived_once_per_load(pbkdf2_calls: list[int]) -> None:
    keys = ScramKeys()
    for _ in range(50):
        server, _ = failed("alice", "right-password", keys)
        assert server.failure == WRONG_PASSWORD
    assert len(pbkdf2_calls) == 1 and keys.derivations == 1
    # The cached keys still let the right password in (the client's own PBKDF2 is the second call).
    logged_in("alice", "right-password", keys, "right-password")
    assert len(pbkdf2_calls) == 2 and keys.derivations == 1
    # A second user: one more; a changed password (a reload would bring a new ScramKeys anyway): one more.
    failed("bob", "bobs-password", keys)
    failed("bob", "bobs-password", keys)
    failed("alice", "changed", keys)
    assert keys.derivations == 3 and len(pbkdf2_calls) == 4
    # A new load (ServerApp.reload makes a new ScramKeys): derived again, once.
    reloaded = ScramKeys()
    for _ in range(5):
        failed("alice", "right-password", reloaded)
    assert reloaded.derivations == 1 and len(pbkdf2_calls) == 5


def test_unknown_user_and_verifier_need_no_pbkdf2(pbkdf2_calls: list[int]) -> None:
    verifier = make_scram_verifier("pw")
    pbkdf2_calls.clear()
    keys = ScramKeys()
    salts = set()
    for _ in range(20):
        unknown, attrs = failed("nobody", None, keys)
        assert unknown.failure == UNKNOWN_USER
        assert attrs["i"] == "4096"
        salts.add(attrs["s"])
        known, attrs = failed("carol", verifier, keys)
        assert known.failure == WRONG_PASSWORD
    assert pbkdf2_calls == [] and keys.derivations == 0
    assert len(salts) == 1 and len(base64.b64decode(salts.pop())) == 16


def test_unknown_user_looks_like_plain_text_user() -> None:
    """Same salt length and iteration count as a plain-text entry; each user's salt is stable."""
    keys = ScramKeys()
    _, unknown = failed("mallory", None, keys)
    _, again = failed("mallory", None, keys)
    _, plain = failed("mallory", "the-real-one", keys)
    assert unknown["s"] == again["s"] == plain["s"] and unknown["i"] == plain["i"] == "4096"
    _, other = failed("mallory2", None, keys)
    assert other["s"] != unknown["s"]


@pytest.mark.parametrize(
    ("secret", "reason"),
    [
        (None, UNKNOWN_USER),
        ("", EMPTY_PASSWORD),
        ("md5" + "0" * 32, METHOD_MISMATCH),
        ("wrong-but-known", WRONG_PASSWORD),
    ],
)
def test_failure_reasons_scram(secret: str | None, reason: str) -> None:
    server, _ = failed("dave", secret, ScramKeys())
    assert server.failure == reason


@pytest.mark.parametrize(
    ("secret", "reason"), [(None, UNKNOWN_USER), ("", EMPTY_PASSWORD), ("right", WRONG_PASSWORD)]
)
def test_failure_reasons_md5(secret: str | None, reason: str) -> None:
    server = ServerAuth("md5", "erin", secret, ScramKeys())
    server.start()
    with pytest.raises(ProxyError) as info:
        server.feed(F.PASSWORD, b"md5" + b"0" * 32 + b"\0")
    assert info.value.sqlstate == INVALID_PASSWORD
    assert server.failure == reason


def test_failure_reasons_protocol() -> None:
    server = ServerAuth("scram-sha-256", "frank", "pw")
    server.start()
    with pytest.raises(ProxyError) as info:
        server.feed(F.PASSWORD, _payload(sasl_initial_response("SCRAM-SHA-256-PLUS", b"p=x,,n=,r=abc")))
    assert info.value.sqlstate == PROTOCOL_VIOLATION and server.failure == UNSUPPORTED_MECHANISM
    server = ServerAuth("scram-sha-256", "frank", "pw")
    server.start()
    with pytest.raises(ProxyError):
        server.feed(F.PASSWORD, b"\xff")
    assert server.failure == MALFORMED_AUTH_MESSAGE
    # A client-final for another exchange (wrong nonce): 28P01 to the client, malformed in the log.
    server = ServerAuth("scram-sha-256", "frank", "pw")
    _server_first(server)
    with pytest.raises(ProxyError) as info:
        server.feed(F.PASSWORD, _payload(sasl_response(b"c=biws,r=not-the-nonce,p=AAAA")))
    assert info.value.sqlstate == INVALID_PASSWORD and server.failure == MALFORMED_AUTH_MESSAGE
