# cython: language_level=3, boundscheck=False, wraparound=False, initializedcheck=False
"""The fast path's scanners, compiled (Cython): message headers only, no allocation, no copy.

Each answers one question about a whole buffer of protocol messages in C; the fast path
(``ClientConnection``'s ``_fast_unit`` in proxy/frontend/client.py, ``ReplyQueue.whole_unit`` in
proxy/backend/expect.py) acts on the answer, and anything they do not recognise goes to the Python slow path,
which reads every message itself. Built by ``pip install .`` (setup.py); there is no Python twin.
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_GET_SIZE

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


def whole_reply(bytes buf not None) -> bool:
    """Whether ``buf`` is exactly backend messages of the plain kinds above, then one ReadyForQuery that
    ends it (its status byte is ``buf[-1]``); every length is checked (at least 4, in bounds)."""
    cdef const unsigned char* p = <const unsigned char*>PyBytes_AS_STRING(buf)
    cdef Py_ssize_t last = PyBytes_GET_SIZE(buf) - 6
    cdef Py_ssize_t pos = 0
    cdef Py_ssize_t length
    if last < 0 or p[last] != b"Z" or _length(p + last + 1) != 5:
        return False
    while pos < last:
        if pos + 5 > last:
            return False
        length = _length(p + pos + 1)
        if length < 4 or not _PLAIN[p[pos]]:
            return False
        pos += 1 + length
    return pos == last


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
