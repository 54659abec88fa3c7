"""The gateway <-> daemon protocol on the Unix socket.

    gateway: header      one JSON line: {"v": 1, "role": "client"|"custodian", "caller": NAME,
                         "cmd": ..., command fields}
    daemon:  reply       one JSON line: {"continue": true} or a final reply
    gateway: body        (after "continue" only) frames: 4-byte big-endian length + bytes;
                         a zero-length frame ends the body
    daemon:  final       {"code": N, "message": "...", "length": L} then L bytes of payload

The daemon answers the header before any body is sent, so a request that policy refuses is
refused before a gigabyte is streamed. A small body (at most INLINE_MAX bytes, all of stdin)
may instead follow the header at once when the header says `"inline": true`: it fits in the
socket buffer, so a refusal costs nothing, and it saves a round trip per signature.

The explicit end frame tells a complete body from a gateway that died half way (plain EOF
would look the same as a truncated artifact). The payload length comes first, so the gateway
writes a signature to stdout only once it has all of it.

Lines are JSON, read and written with the C half of the `json` package (`_json`: its scanner
and string encoder, the same code `json.loads`/`json.dumps` run) rather than through `json`
itself, whose Python layer imports `re` and cost the gateway, which starts once per SSH
request, a fifth of its start-up. Flat objects of strings, integers, booleans and null (every
line of this protocol) are written here; anything else, and any platform without `_json`, goes
to `json`. tests/signer/test_wire.py holds both to `json`'s results.
"""

from __future__ import annotations

import struct

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (start-up)
if TYPE_CHECKING:  # the gateway starts once per SSH request: no import it does not use
    import _socket
    from collections.abc import Callable, Iterator
    from io import BufferedIOBase
    from typing import Any

VERSION = 1
MAX_LINE = 64 * 1024
MAX_FRAME = 1 << 20
INLINE_MAX = 64 * 1024
_LEN = struct.Struct(">I")


class ProtocolError(Exception):
    pass

class BodyTooLarge(ProtocolError):
    def __init__(self, limit: int) -> None:
        super().__init__(f"body larger than {limit} bytes")
        self.limit = limit


def _no_constant(name: str) -> object:
    raise ValueError(f"{name} is not JSON")


class _Decoding:
    """The settings `_json.make_scanner` reads (json.JSONDecoder's attributes): strict
    strings, plain dicts, and no NaN/Infinity (not JSON, and nothing in this protocol)."""

    strict = True
    object_hook = None
    object_pairs_hook = None
    parse_float = float
    parse_int = int
    parse_constant = staticmethod(_no_constant)


_quote: Callable[[str], str] | None
_scan: Callable[[str, int], tuple[object, int]] | None
try:
    from _json import encode_basestring_ascii as _quote
    from _json import make_scanner as _make_scanner
except ImportError:  # not CPython: the json package does the same, a little later
    _quote = _scan = None
else:
    # typeshed types the context as a scanner; the C code reads only the attributes above
    _scan = _make_scanner(_Decoding())  # type: ignore[arg-type]
_JSON_SPACE = " \t\n\r"


def _dumps(obj: dict[str, Any]) -> str:
    import json

    return json.dumps(obj, ensure_ascii=True, separators=(",", ":"))


def line(obj: dict[str, Any]) -> bytes:
    """`obj` as one JSON line, as json.dumps(obj, ensure_ascii=True, separators=(",", ":"))."""
    if _quote is None:
        return _dumps(obj).encode() + b"\n"
    parts = []
    for k, v in obj.items():
        if type(k) is not str:
            return _dumps(obj).encode() + b"\n"
        if v is True or v is False or v is None:
            text = "true" if v is True else "false" if v is False else "null"
        elif type(v) is int:
            text = int.__repr__(v)
        elif type(v) is str:
            text = _quote(v)
        else:
            return _dumps(obj).encode() + b"\n"
        parts.append(f"{_quote(k)}:{text}")
    return ("{" + ",".join(parts) + "}\n").encode()


def loads(data: bytes) -> object:
    """One JSON value from UTF-8 bytes, as json.loads(data) (NaN and Infinity refused);
    ValueError when it is not exactly one JSON value."""
    if _scan is None:
        import json

        return json.loads(data, parse_constant=_no_constant)
    text = data.decode("utf-8")
    start = len(text) - len(text.lstrip(_JSON_SPACE))
    try:
        obj, end = _scan(text, start)
    except StopIteration:
        raise ValueError("no JSON value") from None
    if text[end:].strip(_JSON_SPACE):
        raise ValueError("extra data after the JSON value")
    return obj


def send_line(sock: _socket.socket, obj: dict[str, Any]) -> None:
    sock.sendall(line(obj))


def read_line(f: BufferedIOBase) -> dict[str, Any]:
    line = f.readline(MAX_LINE + 1)
    if not line:
        raise ProtocolError("connection closed")
    if not line.endswith(b"\n"):
        raise ProtocolError("line too long or cut")
    try:
        obj = loads(line)
    except (ValueError, RecursionError):
        raise ProtocolError("not JSON") from None
    if not isinstance(obj, dict):
        raise ProtocolError("not a JSON object")
    return obj


def frame_header(length: int) -> bytes:
    return _LEN.pack(length)


def send_frame(sock: _socket.socket, data: bytes | memoryview) -> None:
    sock.sendall(_LEN.pack(len(data)))
    if data:
        sock.sendall(data)


def iter_body(f: BufferedIOBase, limit: int) -> Iterator[memoryview]:
    """Yield the body's chunks (views into one reused buffer); ProtocolError when the body goes
    past `limit` bytes or ends without the end frame. The caller sees at most limit + 1 bytes
    before the error, so it can tell 'too large' from a broken stream by the running count."""
    # Sized by the largest frame so far, not MAX_FRAME up front: a signature request is
    # usually one small frame, and a 1 MiB buffer made (zeroed, paged in) and freed for each
    # was a tenth of a P-256 request's time in the daemon.
    buf = bytearray()
    total = 0
    while True:
        head = f.read(_LEN.size)
        if len(head) != _LEN.size:
            raise ProtocolError("body ended without its end frame")
        (n,) = _LEN.unpack(head)
        if n == 0:
            return
        if n > MAX_FRAME:
            raise ProtocolError("frame too large")
        total += n
        if total > limit:
            raise BodyTooLarge(limit)
        if n > len(buf):
            buf = bytearray(n)
        view = memoryview(buf)[:n]
        got = 0
        while got < n:
            r = f.readinto(view[got:])
            if not r:
                raise ProtocolError("body ended in the middle of a frame")
            got += r
        yield view


def read_body(f: BufferedIOBase, limit: int) -> bytes:
    return b"".join(bytes(chunk) for chunk in iter_body(f, limit))


class Peer:
    """The daemon's side of one connection, after the header."""

    def __init__(self, sock: _socket.socket, f: BufferedIOBase, inline: bool, uid: int) -> None:
        self.sock = sock
        self.f = f
        self.inline = inline  # the body follows the header without waiting for "continue"
        self.uid = uid  # of the connecting process (SO_PEERCRED)

    def go_ahead(self) -> None:
        if not self.inline:
            send_line(self.sock, {"continue": True})

    def body(self, limit: int) -> Iterator[memoryview]:
        return iter_body(self.f, limit)

    def read_body(self, limit: int) -> bytes:
        return read_body(self.f, limit)

    def reply(self, code: int, message: str = "", payload: bytes = b"") -> None:
        reply(self.sock, code, message, payload)


def reply(sock: _socket.socket, code: int, message: str = "", payload: bytes = b"") -> None:
    sock.sendall(line({"code": code, "message": message, "length": len(payload)}) + payload)


def read_reply(f: BufferedIOBase) -> tuple[int, str, bytes]:
    return finish_reply(read_line(f), f)


def finish_reply(obj: dict[str, Any], f: BufferedIOBase) -> tuple[int, str, bytes]:
    """A final reply whose line `obj` was already read: check it, read its payload."""
    code, message, length = obj.get("code"), obj.get("message", ""), obj.get("length", 0)
    if (not isinstance(code, int) or not isinstance(message, str) or not isinstance(length, int)
            or not 0 <= length <= 1 << 30):
        raise ProtocolError("malformed reply")
    payload = f.read(length) if length else b""
    if len(payload) != length:
        raise ProtocolError("reply cut short")
    return code, message, payload
