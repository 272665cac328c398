"""Authentication, sans-IO: the proxy as server (:class:`ServerAuth`) and as client (:class:`ClientAuth`).

Also the PgBouncer-style userlist loader (:func:`load_userlist`) and password-hash helpers.

SCRAM-SHA-256 is done by ``scramp``. Two of its behaviours need handling here:

* PostgreSQL clients (libpq, JDBC, psycopg...) send an *empty* user name in the SCRAM client-first
  message (``n,,n=,r=<nonce>``) because the user comes from the startup packet. scramp rejects an empty
  attribute value while parsing, before any ``auth_fn`` is called, so the server side hands scramp a copy
  of the message with a placeholder user name and then restores the original client-first-bare (which
  is part of the signed AuthMessage) on the ScramServer before the proof is checked. If a scramp
  release ever stops reading that attribute, proofs stop verifying: logins fail closed, never open.
* scramp only accepts iteration counts 4096..10_000_000 and salts of at least 12 bytes; PostgreSQL 15
  always writes 4096 iterations and 16-byte salts, but PostgreSQL 16's ``scram_iterations`` can go
  lower, so :func:`load_userlist` rejects such verifiers up front with a clear message.

PBKDF2 (4096 rounds of HMAC-SHA-256, about 2 ms) is paid at most once per user and users-file load: a SCRAM
verifier entry needs none, a plain-text entry's StoredKey/ServerKey are derived on its first SCRAM login and
kept in :class:`ScramKeys` until the next load, and an unknown user gets mock keys from one HMAC (as
PostgreSQL's ``scram_mock_salt``), so a flood of failed logins costs no key derivation at all.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final, TypeVar

import scramp

from proxy.errors import (
    INVALID_PASSWORD,
    PROTOCOL_VIOLATION,
    SQLCLIENT_UNABLE_TO_ESTABLISH,
    ProxyError,
)
from proxy.protocol import messages as m
from proxy.protocol.messages import AuthCode

__all__ = [
    "LOGIN_FAILURE_REASONS",
    "SCRAM_SHA_256",
    "ClientAuth",
    "ScramKeys",
    "ScramVerifier",
    "ServerAuth",
    "UserlistError",
    "is_md5_hash",
    "load_userlist",
    "make_scram_verifier",
    "md5_password",
    "parse_scram_verifier",
]

SCRAM_SHA_256: Final = "SCRAM-SHA-256"
T = TypeVar("T")
SCRAM_ITERATIONS: Final = 4096  # PostgreSQL 15's fixed count, and scramp's minimum
_SCRAM_MAX_ITERATIONS: Final = 10_000_000  # scramp's DoS guard
_SCRAM_MIN_SALT: Final = 12  # scramp's minimum salt length
_SALT_LEN: Final = 16  # PostgreSQL's SCRAM_DEFAULT_SALT_LEN
_SCRAM_PREFIX: Final = "SCRAM-SHA-256$"
_HEX: Final = frozenset("0123456789abcdef")

_MECHANISM = scramp.ScramMechanism(SCRAM_SHA_256)
# Key for the deterministic salt (and mock keys) of unknown users: a probe sees the same salt every time, like
# a real user's, for the lifetime of the process.
_MOCK_SALT_KEY: Final = secrets.token_bytes(32)

# Why ServerAuth refused a client (ServerAuth.failure), for logs and metrics; never sent to the client, which
# gets the same 28P01 message for the first four.
UNKNOWN_USER: Final = "unknown_user"
WRONG_PASSWORD: Final = "wrong_password"
EMPTY_PASSWORD: Final = "empty_password"
# The stored secret cannot serve the exchange: an md5 hash for SCRAM, or a password SASLprep refuses.
METHOD_MISMATCH: Final = "method_mismatch"
UNSUPPORTED_MECHANISM: Final = "unsupported_mechanism"  # a SASL mechanism other than SCRAM-SHA-256
MALFORMED_AUTH_MESSAGE: Final = "malformed_auth_message"
LOGIN_FAILURE_REASONS: Final = (
    UNKNOWN_USER,
    WRONG_PASSWORD,
    EMPTY_PASSWORD,
    METHOD_MISMATCH,
    UNSUPPORTED_MECHANISM,
    MALFORMED_AUTH_MESSAGE,
)


# --- password hashes and verifiers --------------------------------------------------------------------


def md5_password(user: str, password: str, salt: bytes) -> str:
    """The md5 PasswordMessage content: ``"md5" + md5(md5(password + user) + salt)`` in hex."""
    inner = hashlib.md5((password + user).encode()).hexdigest()
    return _md5_salted(inner, salt)


def _md5_salted(inner_hex: str, salt: bytes) -> str:
    return "md5" + hashlib.md5(inner_hex.encode("ascii") + salt).hexdigest()


def is_md5_hash(secret: str) -> bool:
    """Whether ``secret`` is a stored md5 hash (``md5`` + 32 lowercase hex digits), as PostgreSQL decides."""
    return len(secret) == 35 and secret.startswith("md5") and _HEX.issuperset(secret[3:])


@dataclass(frozen=True, slots=True)
class ScramVerifier:
    """A parsed ``SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>`` secret."""

    iterations: int
    salt: bytes
    stored_key: bytes
    server_key: bytes

    def __str__(self) -> str:
        b64 = base64.b64encode
        return (
            f"{_SCRAM_PREFIX}{self.iterations}:{b64(self.salt).decode()}"
            f"${b64(self.stored_key).decode()}:{b64(self.server_key).decode()}"
        )


def parse_scram_verifier(secret: str) -> ScramVerifier | None:
    """The verifier in ``secret``, or None if it is not a well-formed SCRAM-SHA-256 verifier."""
    if not secret.startswith(_SCRAM_PREFIX):
        return None
    try:
        iter_salt, keys = secret[len(_SCRAM_PREFIX) :].split("$")
        iter_text, salt_b64 = iter_salt.split(":")
        stored_b64, server_b64 = keys.split(":")
        if not iter_text.isascii() or not iter_text.isdigit():
            return None
        salt = base64.b64decode(salt_b64, validate=True)
        stored_key = base64.b64decode(stored_b64, validate=True)
        server_key = base64.b64decode(server_b64, validate=True)
    except (ValueError, binascii.Error):
        return None
    iterations = int(iter_text)
    if iterations < 1 or not salt or len(stored_key) != 32 or len(server_key) != 32:
        return None
    return ScramVerifier(iterations, salt, stored_key, server_key)


def _scramp_usable(verifier: ScramVerifier) -> bool:
    return (
        SCRAM_ITERATIONS <= verifier.iterations <= _SCRAM_MAX_ITERATIONS
        and len(verifier.salt) >= _SCRAM_MIN_SALT
    )


def make_scram_verifier(password: str, iterations: int = SCRAM_ITERATIONS) -> str:
    """A new SCRAM-SHA-256 verifier for ``password`` in PostgreSQL's ``pg_authid.rolpassword`` format.

    Like PostgreSQL, the salt is 16 random bytes (scramp's own default would be 32).
    """
    return str(_scram_verifier(password, secrets.token_bytes(_SALT_LEN), iterations))


def _scram_verifier(password: str, salt: bytes, iterations: int = SCRAM_ITERATIONS) -> ScramVerifier:
    salt_out, stored_key, server_key, count = _MECHANISM.make_auth_info(
        password, iteration_count=iterations, salt=salt
    )
    return ScramVerifier(int(count), bytes(salt_out), bytes(stored_key), bytes(server_key))


class ScramKeys:
    """SCRAM keys of plain-text userlist passwords, derived once each: one instance per users-file load.

    Keyed by (user, password), so a stale entry can never serve a changed password; a reload makes a new
    instance and the old keys go with the old userlist. Only userlist entries reach it (unknown users get
    mock keys without it), so it holds at most one entry per user in the file. ``derivations`` counts the
    PBKDF2 runs (a metric: once per plain-text user per load, whatever the number of failed logins).
    """

    def __init__(self) -> None:
        self._keys: dict[tuple[str, str], ScramVerifier | None] = {}
        self.derivations = 0

    def for_password(self, user: str, password: str) -> ScramVerifier | None:
        """The verifier of ``password`` (salt derived from ``user``), or None if SASLprep refuses it."""
        key = (user, password)
        try:
            return self._keys[key]
        except KeyError:
            pass
        self.derivations += 1
        try:
            verifier: ScramVerifier | None = _scram_verifier(password, _mock_salt(user))
        except scramp.ScramException:  # e.g. a password SASLprep refuses: cannot log in with SCRAM
            verifier = None
        self._keys[key] = verifier
        return verifier


def _mock_salt(user: str) -> bytes:
    """A per-user salt, stable for the process: what a plain-text entry and an unknown user both show."""
    return hmac.digest(_MOCK_SALT_KEY, user.encode("utf-8", "surrogateescape"), "sha256")[:_SALT_LEN]


def _mock_verifier(user: str) -> ScramVerifier:
    """Keys no proof can match, for a user who cannot log in: two HMACs, no PBKDF2.

    Same salt length and iteration count as a plain-text entry's, so the server-first-message does not tell
    a probe whether the user exists. The exchange runs to the proof check and fails there.
    """
    name = user.encode("utf-8", "surrogateescape")
    stored_key = hmac.digest(_MOCK_SALT_KEY, b"stored-key\0" + name, "sha256")
    server_key = hmac.digest(_MOCK_SALT_KEY, b"server-key\0" + name, "sha256")
    return ScramVerifier(SCRAM_ITERATIONS, _mock_salt(user), stored_key, server_key)


# --- userlist.txt -------------------------------------------------------------------------------------


class UserlistError(ValueError):
    """A userlist file that cannot be read or parsed; the message is ``"{path}:{lineno}: problem"``."""


def load_userlist(path: str) -> dict[str, str]:
    """Load a PgBouncer-format userlist: ``"user" "password"`` per line.

    Both fields are double-quoted, ``""`` inside quotes is a literal quote, lines starting with ``;`` or
    ``#`` and blank lines are ignored, and (like PgBouncer) anything after the password, separated by
    white space, is ignored. The password is plain text, ``md5<32 hex>`` or a SCRAM-SHA-256 verifier.
    A UTF-8 byte-order mark is allowed. Error messages name the file and line (and the user once the
    line has parsed), never the password.
    """
    try:
        with open(path, "rb") as f:
            raw_lines = f.read().splitlines()
    except OSError as exc:
        raise UserlistError(f"{path}: cannot read userlist: {exc.strerror or exc}") from None
    users: dict[str, str] = {}
    for lineno, raw in enumerate(raw_lines, start=1):
        try:
            line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
        except UnicodeDecodeError:
            raise UserlistError(f"{path}:{lineno}: line is not valid UTF-8") from None
        stripped = line.strip()
        if not stripped or stripped[0] in ";#":
            continue
        try:
            user, password = _parse_userlist_line(stripped)
        except ValueError as exc:
            raise UserlistError(f"{path}:{lineno}: {exc}") from None
        if user in users:
            raise UserlistError(f'{path}:{lineno}: duplicate entry for user "{user}"')
        users[user] = password
    return users


def _parse_userlist_line(line: str) -> tuple[str, str]:
    # The ValueErrors raised here never quote the password, nor a user name before the line has parsed:
    # a misplaced quote can make the user name field swallow the password ('"alice""secret"').
    user, pos = _quoted(line, 0, "user name")
    if not user:
        raise ValueError("empty user name")
    if pos >= len(line) or not line[pos].isspace():
        raise ValueError("expected white space after the quoted user name")
    pos = len(line) - len(line[pos:].lstrip())
    password, pos = _quoted(line, pos, "password")
    if pos < len(line) and not line[pos].isspace():
        raise ValueError("unexpected character after the closing quote of the password")
    if password.startswith(_SCRAM_PREFIX):
        verifier = parse_scram_verifier(password)
        if verifier is None:
            raise ValueError(f'malformed SCRAM-SHA-256 verifier for user "{user}"')
        if not _scramp_usable(verifier):
            raise ValueError(
                f'SCRAM-SHA-256 verifier for user "{user}" has {verifier.iterations} iterations and a '
                f"{len(verifier.salt)}-byte salt; at least {SCRAM_ITERATIONS} iterations (at most "
                f"{_SCRAM_MAX_ITERATIONS}) and a {_SCRAM_MIN_SALT}-byte salt are required"
            )
    return user, password


def _quoted(line: str, pos: int, what: str) -> tuple[str, int]:
    """The double-quoted field starting at ``pos`` and the offset after its closing quote."""
    if pos >= len(line) or line[pos] != '"':
        raise ValueError(f"expected a double-quoted {what}")
    out: list[str] = []
    i = pos + 1
    while True:
        close = line.find('"', i)
        if close < 0:
            raise ValueError(f"unterminated quoted {what}")
        out.append(line[i:close])
        if line.startswith('""', close):
            out.append('"')
            i = close + 2
        else:
            return "".join(out), close + 1


# --- the proxy as server ------------------------------------------------------------------------------

_METHODS: Final = frozenset({"scram-sha-256", "md5", "trust"})

_INVALID_PROOF: Final = scramp.core.ServerError.INVALID_PROOF

_START, _MD5, _SASL_INITIAL, _SASL_FINAL, _DONE, _FAILED = range(6)


class ServerAuth:
    """Authenticates one client against its userlist entry.

    ``secret`` is the userlist password (plain, ``md5...`` or a SCRAM verifier) or None for an unknown
    user. Flow: send :meth:`start`; then, for every client message, send what :meth:`feed` returns until
    it reports done (the last bytes include AuthenticationOk). Failures raise ProxyError 28P01 FATAL with
    the same message whether the user is unknown or the password wrong; an unknown user (or a secret the
    method cannot use) still goes through a full exchange, with a fake verifier, before failing.

    Method "md5" uses SCRAM when the stored secret is a SCRAM verifier (as PostgreSQL does); a SCRAM
    exchange with an md5-stored secret always fails (the verifier cannot be derived from the hash).

    ``keys`` is the users-file load's cache of derived SCRAM keys (a fresh one when omitted): with it, a
    plain-text password costs one PBKDF2 per load, not one per login. After a failure, ``failure`` says why
    (one of :data:`LOGIN_FAILURE_REASONS`) for the log; the client is never told more than 28P01.
    """

    def __init__(self, method: str, user: str, secret: str | None, keys: ScramKeys | None = None) -> None:
        if method not in _METHODS:
            raise ValueError(f"unknown authentication method {method!r}")
        self.method = method
        self.user = user
        self._secret = secret
        self._keys = keys if keys is not None else ScramKeys()
        self._state = _START
        self._doomed: str | None = None  # the failure reason, when the exchange can only fail
        self._md5_salt = b""
        self._scram: scramp.ScramServer | None = None
        self.failure: str | None = None

    @property
    def done(self) -> bool:
        """Whether the client has been authenticated."""
        return self._state == _DONE

    def _fail(self, reason: str | None = None) -> ProxyError:
        self._state = _FAILED
        self.failure = reason or self._doomed or WRONG_PASSWORD
        return ProxyError(
            INVALID_PASSWORD, f'password authentication failed for user "{self.user}"', severity="FATAL"
        )

    def _violation(self, message: str, reason: str = MALFORMED_AUTH_MESSAGE) -> ProxyError:
        self._state = _FAILED
        self.failure = reason
        return ProxyError(PROTOCOL_VIOLATION, message, severity="FATAL")

    def _doom_reason(self) -> str:
        """Why a secret cannot authenticate this exchange (md5 exchanges: no secret or an empty one)."""
        secret = self._secret
        if secret is None:
            return UNKNOWN_USER
        return EMPTY_PASSWORD if not secret else METHOD_MISMATCH

    def start(self) -> bytes:
        """The first Authentication message to send (AuthenticationOk for trust: then already done)."""
        if self._state != _START:
            raise RuntimeError("ServerAuth.start() called twice")
        secret = self._secret
        if self.method == "trust":
            self._state = _DONE
            return m.authentication_ok()
        use_scram = self.method == "scram-sha-256" or (
            secret is not None and secret.startswith(_SCRAM_PREFIX)
        )
        if not use_scram:
            self._state = _MD5
            self._md5_salt = secrets.token_bytes(4)
            return m.authentication_md5(self._md5_salt)
        self._state = _SASL_INITIAL
        return m.authentication_sasl([SCRAM_SHA_256])

    def feed(self, msg_type: int, payload: bytes) -> tuple[bytes, bool]:
        """Consume one client message (type and payload); return (bytes to send, authenticated)."""
        if msg_type != m.F.PASSWORD:
            raise self._violation(f"expected password response, got message type {chr(msg_type)!r}")
        if self._state == _MD5:
            return self._feed_md5(payload)
        if self._state == _SASL_INITIAL:
            return self._feed_sasl_initial(payload)
        if self._state == _SASL_FINAL:
            return self._feed_sasl_final(payload)
        raise self._violation("unexpected password message")

    # md5

    def _feed_md5(self, payload: bytes) -> tuple[bytes, bool]:
        try:
            answer = m.decode_password(payload)
        except ProxyError as exc:
            raise self._violation("invalid password packet") from exc
        secret = self._secret
        if secret and is_md5_hash(secret):
            inner = secret[3:]
        elif secret and not secret.startswith(_SCRAM_PREFIX):
            inner = hashlib.md5((secret + self.user).encode()).hexdigest()
        else:  # unknown user or empty password: compare against something random, then fail
            inner = secrets.token_hex(16)
            self._doomed = self._doom_reason()
        expected = _md5_salted(inner, self._md5_salt).encode("ascii")
        if hmac.compare_digest(answer, expected) and not self._doomed:
            self._state = _DONE
            return m.authentication_ok(), True
        raise self._fail()

    # SCRAM-SHA-256

    def _auth_info(self) -> ScramVerifier:
        # A plain-text secret and an unknown user both get the same per-user salt, stable for the life of
        # the process, and the same iteration count: a probing client cannot tell them apart by the salt
        # (its value, length or stability across attempts). Neither costs a key derivation per attempt: a
        # plain-text password's keys are derived once per users-file load (ScramKeys), mock keys are HMACs.
        secret = self._secret
        if secret:
            verifier = parse_scram_verifier(secret)
            if verifier is not None:
                if _scramp_usable(verifier):
                    return verifier
            elif not secret.startswith(_SCRAM_PREFIX) and not is_md5_hash(secret):
                verifier = self._keys.for_password(self.user, secret)
                if verifier is not None:
                    return verifier
        # Unknown user, empty password, md5-stored or unusable secret: mock keys; fails at the proof check.
        self._doomed = self._doom_reason()
        return _mock_verifier(self.user)

    def _feed_sasl_initial(self, payload: bytes) -> tuple[bytes, bool]:
        try:
            mechanism, data = m.decode_sasl_initial_response(payload)
        except ProxyError as exc:
            raise self._violation("invalid SASL initial response") from exc
        if mechanism != SCRAM_SHA_256:
            raise self._violation(
                "client selected an invalid SASL authentication mechanism", UNSUPPORTED_MECHANISM
            )
        if data is None:
            raise self._violation("malformed SCRAM message: missing client-first-message")
        try:
            client_first = data.decode("utf-8")
        except UnicodeDecodeError:
            raise self._violation("malformed SCRAM message: not valid UTF-8") from None
        v = self._auth_info()
        info = (v.salt, v.stored_key, v.server_key, v.iterations)
        server = _MECHANISM.make_server(lambda _username: info)  # the SCRAM user name is ignored
        gs2_end = client_first.find(",", client_first.find(",") + 1) + 1
        bare = client_first[gs2_end:] if gs2_end > 0 else client_first
        try:
            server.set_client_first(client_first[:gs2_end] + _with_placeholder_user(bare))
            if gs2_end > 0:
                server.client_first_bare = bare  # the real one is what the client signed
            server_first = str(server.get_server_first())
        except scramp.ScramException as exc:
            raise self._violation(f"malformed SCRAM message: {exc}") from exc
        self._scram = server
        self._state = _SASL_FINAL
        return m.authentication_sasl_continue(server_first.encode()), False

    def _feed_sasl_final(self, payload: bytes) -> tuple[bytes, bool]:
        server = self._scram
        assert server is not None
        self._scram = None
        try:
            client_final = bytes(payload).decode("utf-8")
        except UnicodeDecodeError:
            raise self._violation("malformed SCRAM message: not valid UTF-8") from None
        try:
            server.set_client_final(client_final)
            server_final = str(server.get_server_final())
        except scramp.ScramException as exc:
            # Still 28P01 to the client, as before; the log tells a bad proof from a message that does not
            # belong to this exchange (nonce or channel binding not matching, unparsable attributes).
            proof = exc.server_error == _INVALID_PROOF
            raise self._fail(None if proof else MALFORMED_AUTH_MESSAGE) from None
        if self._doomed:
            raise self._fail()
        self._state = _DONE
        return m.authentication_sasl_final(server_final.encode()) + m.authentication_ok(), True


def _with_placeholder_user(bare: str) -> str:
    """client-first-bare with its ``n=`` user name (empty from libpq; ignored anyway) replaced by ``*``."""
    if not bare.startswith("n="):
        return bare
    comma = bare.find(",")
    return "n=*" + (bare[comma:] if comma >= 0 else "")


# --- the proxy as client ------------------------------------------------------------------------------

_UNSUPPORTED: Final = {
    AuthCode.KERBEROS_V5: "Kerberos V5",
    AuthCode.SCM_CREDENTIAL: "SCM credential",
    AuthCode.GSS: "GSSAPI",
    AuthCode.GSS_CONTINUE: "GSSAPI",
    AuthCode.SSPI: "SSPI",
}


class ClientAuth:
    """Authenticates the proxy to an upstream server as ``user`` with ``password``.

    Feed every Authentication message's code and data (from :func:`messages.decode_auth`); send what
    :meth:`feed` returns. ``password`` may also be a stored md5 hash (``md5...``), usable for md5
    authentication only. Failures raise ProxyError 08001 naming the method, never the password.
    """

    def __init__(self, user: str, password: str | None) -> None:
        self.user = user
        self._password = password
        self._scram: scramp.ScramClient | None = None
        self._scram_verified = False
        self.done = False

    def _error(self, message: str) -> ProxyError:
        return ProxyError(SQLCLIENT_UNABLE_TO_ESTABLISH, message)

    def _need_password(self, method: str, *, hashed_ok: bool = False) -> str:
        password = self._password
        what = f'upstream server requested {method} authentication but the password for user "{self.user}"'
        if password is None:
            raise self._error(f"{what} is not configured")
        if not hashed_ok and is_md5_hash(password):
            raise self._error(f"{what} is an md5 hash, usable for md5 authentication only")
        if password.startswith(_SCRAM_PREFIX):
            raise self._error(f"{what} is a SCRAM verifier; the plain-text password is needed")
        return password

    def feed(self, auth_code: int, data: bytes) -> bytes | None:
        """The frontend message answering an Authentication message, or None when there is none to send."""
        if auth_code == AuthCode.OK:
            if self._scram is not None and not self._scram_verified:
                raise self._error("upstream server ended SCRAM authentication without proving its identity")
            self.done = True
            return None
        if auth_code == AuthCode.CLEARTEXT_PASSWORD:
            password = self._need_password("password")
            return m.password_message(password.encode())
        if auth_code == AuthCode.MD5_PASSWORD:
            password = self._need_password("md5", hashed_ok=True)
            if len(data) != 4:
                raise ProxyError(PROTOCOL_VIOLATION, "invalid AuthenticationMD5Password message")
            if is_md5_hash(password):  # a stored hash: md5(password + user) already
                answer = _md5_salted(password[3:], data)
            else:
                answer = md5_password(self.user, password, data)
            return m.password_message(answer.encode("ascii"))
        if auth_code == AuthCode.SASL:
            return self._sasl_start(data)
        if auth_code == AuthCode.SASL_CONTINUE:
            return self._sasl_continue(data)
        if auth_code == AuthCode.SASL_FINAL:
            self._sasl_final(data)
            return None
        method = _UNSUPPORTED.get(auth_code, f"unknown ({auth_code})")
        raise self._error(f"upstream server requested unsupported authentication method {method}")

    def _sasl_start(self, data: bytes) -> bytes:
        mechanisms = m.decode_sasl_mechanisms(data)
        if SCRAM_SHA_256 not in mechanisms:
            raise self._error(
                "upstream server requested SASL authentication with unsupported mechanisms "
                f"{', '.join(mechanisms) or '(none)'}; only {SCRAM_SHA_256} is supported"
            )
        if self._scram is not None:
            raise ProxyError(PROTOCOL_VIOLATION, "upstream server restarted SASL authentication")
        password = self._need_password(SCRAM_SHA_256)
        try:
            client = self._scram_client(password)
            client_first = str(client.get_client_first())
        except scramp.ScramException:
            raise self._error(
                f'the password configured for user "{self.user}" cannot be used for {SCRAM_SHA_256} '
                "(SASLprep rejects it)"
            ) from None
        self._scram = client
        return m.sasl_initial_response(SCRAM_SHA_256, client_first.encode())

    def _scram_client(self, password: str) -> scramp.ScramClient:
        # The server ignores the SCRAM user name (it uses the startup packet's); scramp refuses an empty
        # one and SASLpreps it, so fall back to a placeholder if the real name does not pass.
        try:
            return scramp.ScramClient([SCRAM_SHA_256], self.user, password)
        except scramp.ScramException:
            return scramp.ScramClient([SCRAM_SHA_256], "*", password)

    def _sasl_continue(self, data: bytes) -> bytes:
        def step(client: scramp.ScramClient, server_first: str) -> str:
            client.set_server_first(server_first)
            return str(client.get_client_final())

        return m.sasl_response(self._scram_step("SASLContinue", data, step).encode())

    def _sasl_final(self, data: bytes) -> None:
        self._scram_step("SASLFinal", data, scramp.ScramClient.set_server_final)
        self._scram_verified = True

    def _scram_step(self, message: str, data: bytes, step: Callable[[scramp.ScramClient, str], T]) -> T:
        """One SCRAM step on the server's ``message``: ``step(client, text)``; a malformed or failing one
        ends the login with the upstream's authentication error."""
        client = self._scram
        if client is None:
            raise ProxyError(PROTOCOL_VIOLATION, f"upstream server sent {message} without SASL")
        try:
            return step(client, data.decode("utf-8"))
        except (scramp.ScramException, UnicodeDecodeError) as exc:
            raise self._error(
                f"{SCRAM_SHA_256} authentication with the upstream server failed: {exc}"
            ) from None
