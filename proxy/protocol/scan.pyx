# cython: language_level=3, boundscheck=False, wraparound=False, initializedcheck=False
"""The fast path's scanners, compiled (Cython): message headers only, no copy.

Each of ``whole_reply``, ``begun_reply``, ``capture_row``, ``captured_reply`` and ``extended_unit``
answers one question about a whole buffer of protocol messages in C, allocating nothing but its answer;
the fast path (``fast_unit`` in proxy/frontend/fast.py, ``ReplyQueue.whole_unit`` in
proxy/backend/expect.py) acts on the answer, and anything they do not recognise goes to the Python slow
path, which reads every message itself. ``scan_messages`` lists a buffer's complete messages (exported
by proxy/protocol/framing.py): a waiting unit of the fast path's (``_fast_lease``) and the upstream's
handshake are cut with it. ``literal_shape`` is the classification cache's key for SQL text whose
literals change (proxy/router/classify.py). Built by ``pip install .`` (setup.py); there is no Python
twin.
"""

from cpython.bytearray cimport PyByteArray_AS_STRING, PyByteArray_GET_SIZE
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from libc.stdint cimport int32_t, uint32_t
from libc.stdlib cimport free, malloc

from proxy.errors import PROTOCOL_VIOLATION, ProxyError

# Backend messages ``whole_reply`` lets through unread: what a statement answers that asks nothing of the
# proxy (ParseComplete, BindComplete, CloseComplete, RowDescription, DataRow, CommandComplete, NoData,
# PortalSuspended, EmptyQueryResponse, ParameterDescription, FunctionCallResponse, NoticeResponse,
# NotificationResponse, CopyOutResponse, CopyData, CopyDone). Not: ErrorResponse, ParameterStatus, the
# start of a COPY FROM STDIN, or a ReadyForQuery before the end.
cdef bint _PLAIN[256]
cdef const unsigned char* _plain_kinds = b"123TDCnstIVNAHdc"
cdef int _i
for _i in range(16):
    _PLAIN[_plain_kinds[_i]] = True


cdef inline Py_ssize_t _length(const unsigned char* p) noexcept nogil:
    """The big-endian int32 length field at ``p``."""
    return (<Py_ssize_t>p[0] << 24) | (<Py_ssize_t>p[1] << 16) | (<Py_ssize_t>p[2] << 8) | p[3]


def scan_messages(object buf not None, Py_ssize_t start, Py_ssize_t max_length):
    """Find the complete typed messages in ``buf[start:]`` (bytes or bytearray; another buffer is copied).

    Returns ``(messages, offset)``: one ``(type_byte, msg_start, msg_end)`` per complete message, where
    ``buf[msg_start:msg_end]`` is the whole message (header included; the payload starts at
    ``msg_start + 5``), and the offset where the first incomplete message starts (``len(buf)`` when the
    buffer ends exactly on a message boundary).

    A length field (a signed Int32) below 4 or above ``max_length`` raises ProxyError 08P01 FATAL as soon
    as the 5-byte header is available, before waiting for the body.
    """
    cdef const unsigned char* p
    cdef Py_ssize_t n, length, end
    cdef Py_ssize_t pos = start
    cdef list out = []
    if start < 0:
        raise ValueError(f"scan_messages: start {start} is negative")
    if type(buf) is bytes:
        p = <const unsigned char*>PyBytes_AS_STRING(buf)
        n = PyBytes_GET_SIZE(buf)
    elif isinstance(buf, bytearray):  # nothing below runs Python code that could resize it
        p = <const unsigned char*>PyByteArray_AS_STRING(buf)
        n = PyByteArray_GET_SIZE(buf)
    else:
        buf = bytes(buf)
        p = <const unsigned char*>PyBytes_AS_STRING(buf)
        n = PyBytes_GET_SIZE(buf)
    while pos + 5 <= n:
        length = <int32_t><uint32_t>_length(p + pos + 1)
        if length < 4 or length > max_length:
            raise ProxyError(
                PROTOCOL_VIOLATION,
                "invalid message length",
                detail=f"message type 0x{p[pos]:02x} declares length {length} (allowed 4..{max_length})",
                severity="FATAL",
            )
        end = pos + 1 + length
        if end > n:
            break
        out.append((p[pos], pos, end))
        pos = end
    return out, pos


cdef inline bint _ready_at(const unsigned char* p, Py_ssize_t pos, Py_ssize_t n) noexcept nogil:
    """Whether a whole ReadyForQuery (length 5) starts at ``pos``, within ``p[:n]``."""
    return pos >= 0 and pos + 6 <= n and p[pos] == b"Z" and _length(p + pos + 1) == 5


cdef bint _whole(const unsigned char* p, Py_ssize_t pos, Py_ssize_t n) noexcept nogil:
    """``whole_reply`` of ``p[pos:n]``."""
    cdef Py_ssize_t last = n - 6
    cdef Py_ssize_t length
    if last < pos or not _ready_at(p, last, n):
        return False
    while pos < last:
        if pos + 5 > last:
            return False
        length = _length(p + pos + 1)
        if length < 4 or not _PLAIN[p[pos]]:
            return False
        pos += 1 + length
    return pos == last


def whole_reply(bytes buf not None) -> bool:
    """Whether ``buf`` is exactly backend messages of the plain kinds above, then one ReadyForQuery that
    ends it (its status byte is ``buf[-1]``); every length is checked (at least 4, in bounds)."""
    return _whole(<const unsigned char*>PyBytes_AS_STRING(buf), 0, PyBytes_GET_SIZE(buf))


cdef Py_ssize_t _next(
    const unsigned char* p, Py_ssize_t pos, Py_ssize_t n, unsigned char kind
) noexcept nogil:
    """The end of the message of type ``kind`` at ``pos`` (length at least 4, in bounds); -1 otherwise."""
    cdef Py_ssize_t length
    if pos + 5 > n or p[pos] != kind:
        return -1
    length = _length(p + pos + 1)
    if length < 4 or pos + 1 + length > n:
        return -1
    return pos + 1 + length


def begun_reply(bytes buf not None) -> int:
    """Where the rest starts when ``buf`` opens with exactly the reply to a BEGIN the proxy sent in front
    of a unit — one CommandComplete, then a ReadyForQuery — and the rest is a whole reply as
    ``whole_reply`` takes it; -1 for anything else (a notice, an error, a message more)."""
    cdef const unsigned char* p = <const unsigned char*>PyBytes_AS_STRING(buf)
    cdef Py_ssize_t n = PyBytes_GET_SIZE(buf)
    cdef Py_ssize_t pos = _next(p, 0, n, b"C")
    if not _ready_at(p, pos, n):
        return -1
    pos += 6
    return pos if _whole(p, pos, n) else -1


cdef Py_ssize_t _ready_after_plain(const unsigned char* p, Py_ssize_t n) noexcept nogil:
    """Where the first ReadyForQuery starts when ``p[:n]`` opens with plain messages (as ``_whole``
    takes them) then one; -1 for anything else."""
    cdef Py_ssize_t pos = 0
    cdef Py_ssize_t length
    while pos + 5 <= n:
        length = _length(p + pos + 1)
        if p[pos] == b"Z":
            return pos if _ready_at(p, pos, n) else -1
        if length < 4 or not _PLAIN[p[pos]]:
            return -1
        pos += 1 + length
    return -1


cdef object _capture_row(const unsigned char* p, Py_ssize_t pos, Py_ssize_t n):
    """The DataRow's payload when ``p[pos:n]`` is exactly the reply to read-your-writes' capture query:
    RowDescription, one DataRow, CommandComplete, ReadyForQuery; None otherwise."""
    cdef Py_ssize_t row = _next(p, pos, n, b"T")
    pos = _next(p, row, n, b"D") if row >= 0 else -1
    pos = _next(p, pos, n, b"C") if pos >= 0 else -1
    if pos + 6 != n or not _ready_at(p, pos, n):
        return None
    return PyBytes_FromStringAndSize(<const char*>p + row + 5, _length(p + row + 1) - 4)


def capture_row(bytes buf not None):
    """The DataRow's payload when ``buf`` is exactly the reply to read-your-writes' capture query —
    RowDescription, one DataRow, CommandComplete, ReadyForQuery — and nothing more; None for anything
    else (an error, a notice or a setting in it, a message more or less)."""
    return _capture_row(<const unsigned char*>PyBytes_AS_STRING(buf), 0, PyBytes_GET_SIZE(buf))


def captured_reply(bytes buf not None):
    """``(ready, row)`` when ``buf`` is exactly a whole reply as ``whole_reply`` takes it, whose
    ReadyForQuery starts at ``ready``, then the capture's reply behind it as ``capture_row`` takes it
    (``row``: its DataRow's payload); None for anything else."""
    cdef const unsigned char* p = <const unsigned char*>PyBytes_AS_STRING(buf)
    cdef Py_ssize_t n = PyBytes_GET_SIZE(buf)
    cdef Py_ssize_t ready = _ready_after_plain(p, n)
    if ready < 0:
        return None
    row = _capture_row(p, ready + 6, n)
    return None if row is None else (ready, row)


def extended_unit(bytes data not None) -> int:
    """Where the Bind starts when ``data`` is exactly [Parse] Bind [Describe portal] Execute Sync of the
    unnamed statement and portal (every length at least 4 and in bounds, a Sync of length 4 last);
    -1 for anything else."""
    cdef const unsigned char* p = <const unsigned char*>PyBytes_AS_STRING(data)
    cdef Py_ssize_t n = PyBytes_GET_SIZE(data)
    cdef Py_ssize_t pos = 0
    cdef Py_ssize_t bind, length
    if n < 6:
        return -1
    if p[0] == b"P":
        length = _length(p + 1)
        if p[5] != 0 or length < 4:
            return -1
        pos = 1 + length
    bind = pos
    if pos + 7 > n:
        return -1
    length = _length(p + pos + 1)
    if p[pos] != b"B" or p[pos + 5] != 0 or p[pos + 6] != 0 or length < 4:
        return -1
    pos += 1 + length
    if pos + 6 > n:
        return -1
    if p[pos] == b"D":
        length = _length(p + pos + 1)
        if p[pos + 5] != b"P" or length < 4:
            return -1
        pos += 1 + length
        if pos + 5 > n:
            return -1
    length = _length(p + pos + 1)
    if p[pos] != b"E" or length < 4:
        return -1
    pos += 1 + length
    if pos + 5 != n or p[pos] != b"S" or _length(p + pos + 1) != 4:
        return -1
    return bind


cdef inline bint _digit(unsigned char c) noexcept nogil:
    return b"0" <= c <= b"9"


cdef inline bint _ident_start(unsigned char c) noexcept nogil:
    return b"a" <= c <= b"z" or b"A" <= c <= b"Z" or c == b"_" or c >= 0x80  # scan.l: [A-Za-z\200-\377_]


cdef inline bint _ident(unsigned char c) noexcept nogil:
    return _ident_start(c) or _digit(c) or c == b"$"


cdef bint _continued(const unsigned char* p, Py_ssize_t j, Py_ssize_t n) noexcept nogil:
    """Whether a string literal that ends before ``p[j]`` is followed, past spaces and ``--`` comments, by
    another quote: PostgreSQL joins 'a' and 'b' on the next line into one constant (or refuses them)."""
    while j < n:
        if p[j] in b" \t\n\r\f\v":
            j += 1
        elif p[j] == b"-" and j + 1 < n and p[j + 1] == b"-":
            while j < n and p[j] != b"\n" and p[j] != b"\r":
                j += 1
        else:
            return p[j] == b"'"
    return False


cdef Py_ssize_t _quoted_end(
    const unsigned char* p, Py_ssize_t j, Py_ssize_t n, unsigned char quote
) noexcept nogil:
    """Past the ``quote`` that closes a quoted token whose body starts at ``p[j]`` (doubled quotes are part
    of it); -1 if none does."""
    while j < n:
        if p[j] == quote:
            if j + 1 < n and p[j + 1] == quote:
                j += 2
                continue
            return j + 1
        j += 1
    return -1


cdef Py_ssize_t _comment_end(const unsigned char* p, Py_ssize_t j, Py_ssize_t n) noexcept nogil:
    """Past the ``*/`` that closes a (nested) /* comment whose body starts at ``p[j]``; -1 if none does."""
    cdef Py_ssize_t depth = 1
    while j + 1 < n:
        if p[j] == b"/" and p[j + 1] == b"*":
            depth += 1
            j += 2
        elif p[j] == b"*" and p[j + 1] == b"/":
            depth -= 1
            j += 2
            if not depth:
                return j
        else:
            j += 1
    return -1


cdef Py_ssize_t _digits_end(const unsigned char* p, Py_ssize_t j, Py_ssize_t n) noexcept nogil:
    while j < n and _digit(p[j]):
        j += 1
    return j


cdef Py_ssize_t _number_end(
    const unsigned char* p, Py_ssize_t i, Py_ssize_t n, unsigned char* kind
) noexcept nogil:
    """Past the numeric literal at ``p[i]`` (scan.l's integer, decimal and real), its kind in ``kind``; -1
    for one scan.l would not end there (1..2, 1e+, 1x, 1.5.) or an integer that may not be an int4."""
    cdef Py_ssize_t j = _digits_end(p, i, n)
    kind[0] = b"i"
    if j < n and p[j] == b".":
        if j + 1 < n and p[j + 1] == b".":
            return -1
        kind[0] = b"f"
        j = _digits_end(p, j + 1, n)
    if j < n and (p[j] == b"e" or p[j] == b"E"):
        kind[0] = b"f"
        j += 1
        if j < n and (p[j] == b"+" or p[j] == b"-"):
            j += 1
        if j >= n or not _digit(p[j]):
            return -1
        j = _digits_end(p, j, n)
    if (j < n and (_ident(p[j]) or p[j] == b".")) or (kind[0] == b"i" and j - i > 9):
        return -1
    return j


cdef Py_ssize_t _token_end(
    const unsigned char* p, Py_ssize_t i, Py_ssize_t n, unsigned char* kind
) noexcept nogil:
    """Past the token at ``p[i]`` (for an operator or punctuation, its first byte), with ``kind`` set for a
    string or number literal; -1 for what ``_shape`` gives up on."""
    cdef unsigned char c = p[i]
    cdef Py_ssize_t j = i + 1
    if _ident_start(c):
        while j < n and _ident(p[j]):
            j += 1
        return j
    if c == b'"':
        return -1 if j < n and p[j] == b'"' else _quoted_end(p, j, n, c)  # "" is no identifier
    if c == b"'":
        if i and (_ident(p[i - 1]) or p[i - 1] == b"&"):
            return -1  # E'...', B'...', X'...', N'...', U&'...': not a plain string
        j = _quoted_end(p, j, n, c)
        if j < 0 or _continued(p, j, n):
            return -1
        kind[0] = b"s"
        return j
    if c == b"-" and j < n and p[j] == b"-":
        while j < n and p[j] != b"\n" and p[j] != b"\r":
            j += 1
        return j
    if c == b"/" and j < n and p[j] == b"*":
        return _comment_end(p, j + 1, n)
    if c == b"." and j < n and p[j] == b".":
        return j + 1  # scan.l's DOT_DOT, so that ..2 is an integer after it
    if c == b"$":
        if j >= n or not _digit(p[j]):
            return -1  # dollar quoting
        j = _digits_end(p, j, n)
        return -1 if (j < n and _ident(p[j])) or j - i > 10 else j  # $1x; a parameter number beyond int4
    if _digit(c) or (c == b"." and j < n and _digit(p[j])):
        return _number_end(p, i, n, kind)
    return j


cdef Py_ssize_t _shape(const unsigned char* p, Py_ssize_t n, unsigned char* out, list offsets) except -2:
    """Writes the shape of the SQL ``p[:n]`` to ``out`` (room for 2n bytes) and answers its length, or -1.

    A lexer of PostgreSQL's own token rules (scan.l) for what it needs: identifiers, quoted identifiers,
    comments and ``$n`` are copied as they are, and each string literal ('...') and numeric literal becomes
    NUL and its kind (s, i for an integer of at most 9 digits, f for a decimal or real), its offset appended
    to ``offsets`` when that is a list. -1 (no shape) for what it does not lex exactly as PostgreSQL does:
    NUL bytes, a backslash, a string with a prefix (E'...', U&'...') or continued on the next
    line, dollar quoting, a number with anything glued to its end (PostgreSQL 15's junk, 16's 0x1F and
    1_000), an integer of 10 digits or more (maybe a bigint or numeric constant), an unterminated quote or
    comment; and for text with no literal at all."""
    cdef Py_ssize_t i = 0, j, o = 0
    cdef int literals = 0
    cdef unsigned char kind = 0
    for j in range(n):
        if p[j] == 0 or p[j] == b"\\":
            return -1
    while i < n:
        j = _token_end(p, i, n, &kind)
        if j < 0:
            return -1
        if kind:
            out[o] = 0
            out[o + 1] = kind
            o += 2
            literals += 1
            kind = 0
            if offsets is not None:
                offsets.append(i)
            i = j
        else:
            while i < j:
                out[o] = p[i]
                o += 1
                i += 1
    return o if literals else -1


def literal_shape(bytes sql not None, list offsets=None):
    """``sql`` with each string and numeric literal replaced by a marker of its kind (see ``_shape``), or
    None. With ``offsets``, the byte offset of each literal is appended to it."""
    cdef Py_ssize_t n = PyBytes_GET_SIZE(sql)
    cdef unsigned char* out = <unsigned char*>malloc(2 * n + 1)
    cdef Py_ssize_t length
    if out == NULL:
        raise MemoryError()
    try:
        length = _shape(<const unsigned char*>PyBytes_AS_STRING(sql), n, out, offsets)
        if length < 0:
            return None
        return PyBytes_FromStringAndSize(<char*>out, length)
    finally:
        free(out)
