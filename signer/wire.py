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
"""

from __future__ import annotations

import json
import socket
import struct

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (start-up)
if TYPE_CHECKING:  # the gateway starts once per SSH request: no import it does not use
    from collections.abc import Iterator
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


def line(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, ensure_ascii=True, separators=(",", ":")).encode() + b"\n"


def send_line(sock: socket.socket, obj: dict[str, Any]) -> None:
    sock.sendall(line(obj))


def read_line(f: BufferedIOBase) -> dict[str, Any]:
    line = f.readline(MAX_LINE + 1)
    if not line:
        raise ProtocolError("connection closed")
    if not line.endswith(b"\n"):
        raise ProtocolError("line too long or cut")
    try:
        obj = json.loads(line)
    except ValueError:
        raise ProtocolError("not JSON") from None
    if not isinstance(obj, dict):
        raise ProtocolError("not a JSON object")
    return obj


def frame_header(length: int) -> bytes:
    return _LEN.pack(length)


def send_frame(sock: socket.socket, data: bytes | memoryview) -> None:
    sock.sendall(_LEN.pack(len(data)))
    if data:
        sock.sendall(data)


def iter_body(f: BufferedIOBase, limit: int) -> Iterator[memoryview]:
    """Yield the body's chunks (views into one reused buffer); ProtocolError when the body goes
    past `limit` bytes or ends without the end frame. The caller sees at most limit + 1 bytes
    before the error, so it can tell 'too large' from a broken stream by the running count."""
    buf = bytearray(MAX_FRAME)
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

    def __init__(self, sock: socket.socket, f: BufferedIOBase, inline: bool, uid: int) -> None:
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


def reply(sock: socket.socket, code: int, message: str = "", payload: bytes = b"") -> None:
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
