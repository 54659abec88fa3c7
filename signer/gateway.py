"""signer-gateway: the SSH forced command. It parses `SSH_ORIGINAL_COMMAND` (never a shell),
streams stdin to the daemon and the answer to stdout. It has no key, no PIN and no policy: the
daemon re-checks everything the gateway sends.

Output discipline: on success the payload goes to stdout in one piece, after the daemon's
complete reply was read; on any failure stdout stays empty and stderr gets exactly one line.

Start-up is the latency every SSH request pays, so the path from the forced command
(`python -I -c FORCED_COMMAND_CODE`, see roles/signer) to the daemon imports only this module,
`signer.request`, `signer.wire` and `signer.errors`, and of the standard library only what
the interpreter has loaded anyway plus `_socket`, `_json`, `struct` and `unicodedata`: no
`re`, `json`, `socket`, `enum`, `shlex` or `tomllib` (tests/signer/test_gateway.py checks
the list). The role passes `--socket`, so the forced command reads no configuration file.
"""

from __future__ import annotations

import _socket
import io
import os
import sys

from signer import request, wire
from signer.errors import Exit, SignerError

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (start-up)
if TYPE_CHECKING:
    import socket
    from pathlib import Path
    from typing import BinaryIO

DEFAULT_SOCKET = "/run/signer/signer.sock"
CHUNK = 1 << 20
# Commands whose body is small and read whole (approval signature, PIN), with their limit.
_SMALL_BODY = {request.Approve: 64 * 1024, request.Unlock: 1024}


def socket_path(config: Path | str | None, explicit: Path | str | None) -> str:
    """--socket, else [daemon].socket from the config, else the default. Only that key is read:
    the gateway runs as another user and needs nothing else from the file."""
    if explicit is not None:
        return os.fspath(explicit)
    if config is None:
        return DEFAULT_SOCKET
    try:
        with open(config, encoding="utf-8") as fh:
            text = fh.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise SignerError(Exit.CONFIG, f"{config}: cannot read daemon.socket "
                          f"({type(exc).__name__})") from None
    simple = _simple_socket(text)
    if simple is not None:
        return simple
    # anything but the plain form: the real parser (16 ms of imports)
    import tomllib

    try:
        data = tomllib.loads(text)
        value = data["daemon"]["socket"]
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError, KeyError, TypeError) as exc:
        raise SignerError(Exit.CONFIG, f"{config}: cannot read daemon.socket "
                          f"({type(exc).__name__})") from None
    if not isinstance(value, str):
        raise SignerError(Exit.CONFIG, f"{config}: daemon.socket: must be a string")
    return value


def _simple_socket(text: str) -> str | None:
    """daemon.socket when the file has it in the plain form that the signer role renders
    (`socket = "..."`, no escapes, once, under `[daemon]`, no multi-line strings anywhere);
    None for anything else, which then goes to tomllib. Importing tomllib costs the gateway
    more than the rest of its start-up. (Only `--config` without `--socket` comes here.)"""
    import re

    socket_line = re.compile(r'[ \t]*socket[ \t]*=[ \t]*"([^"\\\x00-\x1f\x7f]*)"[ \t]*(#.*)?')
    socket_key = re.compile(r"[ \t]*(socket|\"socket\"|'socket')[ \t]*=")
    table_line = re.compile(r"[ \t]*\[[ \t]*([A-Za-z0-9_.\- \t\"']*)[ \t]*\][ \t]*(#.*)?")
    if '"""' in text or "'''" in text:
        return None
    table = None
    found: list[str] = []
    for line in text.splitlines():
        head = table_line.fullmatch(line)
        if head is not None:
            table = head.group(1).strip()
            continue
        if table == "daemon":
            m = socket_line.fullmatch(line)
            if m is not None:
                found.append(m.group(1))
            elif socket_key.match(line):  # socket = '...', an escape: not the plain form
                return None
    return found[0] if len(found) == 1 and found[0].startswith("/") else None


def _connect(path: Path | str) -> _socket.socket:
    """A connected socket from the C module (`socket` would import `enum`, `selectors`...)."""
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM | _socket.SOCK_CLOEXEC)
    try:
        sock.connect(os.fspath(path))
    except OSError:
        sock.close()
        raise SignerError(Exit.UNAVAILABLE, "the signer daemon is not running (no answer on "
                          f"{path}): try again later or tell the operators") from None
    return sock


def connect(path: Path | str) -> socket.socket:
    """The same connection as a `socket.socket` (for tools and tests)."""
    import socket

    return socket.socket(fileno=_connect(path).detach())


def _read_upto(stdin: BinaryIO, n: int) -> bytes:
    """Up to n bytes of stdin (fewer only at end of input)."""
    parts: list[bytes] = []
    got = 0
    while got < n:
        chunk = stdin.read(n - got)
        if not chunk:
            break
        parts.append(chunk)
        got += len(chunk)
    return b"".join(parts)


def _frames(data: bytes) -> bytes:
    """A small body (<= INLINE_MAX < MAX_FRAME) as one frame and the end frame."""
    return (wire.frame_header(len(data)) + data if data else b"") + wire.frame_header(0)


def _check_declared(total: int, declared: int | None, done: bool) -> None:
    """A stream that ends before (or runs past) its declared size is not sent to be signed:
    an SSH session killed mid-upload must not get its prefix signed."""
    if declared is None:
        return
    if total > declared or (done and total != declared):
        raise SignerError(Exit.DATA, f"input is {'at least ' if not done else ''}{total} bytes, "
                          f"declared {declared} (--size): nothing was signed")


def _stream(sock: _socket.socket, head: bytes, stdin: BinaryIO, limit: int | None,
            declared: int | None = None) -> None:
    """Send what was already read, then the rest of stdin, as frames; then the end frame
    (only when the stream has its declared size: without the end frame the daemon signs
    nothing)."""
    if head:
        wire.send_frame(sock, head)
    total = len(head)
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    while True:
        n = stdin.readinto(view)  # type: ignore[attr-defined]
        if not n:
            break
        total += n
        if limit is not None and total > limit:
            raise SignerError(Exit.DATA, f"input larger than {limit} bytes")
        _check_declared(total, declared, done=False)
        wire.send_frame(sock, view[:n])
    _check_declared(total, declared, done=True)
    wire.send_frame(sock, b"")


def exchange(sock: _socket.socket, header: dict[str, object],
             stdin: BinaryIO | None, limit: int | None,
             declared: int | None = None) -> tuple[int, str, bytes]:
    """Send a request (with stdin as its body unless stdin is None), return the final reply.
    A body that ends within INLINE_MAX bytes goes with the header in one write; a longer one
    waits for the daemon's go-ahead, so a refused request does not upload a gigabyte."""
    # A buffered reader on the socket's descriptor: what socket.makefile("rb") gives, minus
    # the `socket` module.
    with open(sock.fileno(), "rb", closefd=False) as f:
        try:
            head = b""
            if stdin is not None:
                head = _read_upto(stdin, wire.INLINE_MAX + 1)
                if limit is not None and len(head) > limit:
                    raise SignerError(Exit.DATA, f"input larger than {limit} bytes")
                if len(head) <= wire.INLINE_MAX:
                    _check_declared(len(head), declared, done=True)
                    sock.sendall(wire.line({**header, "inline": True}) + _frames(head))
                    return wire.read_reply(f)
            sock.sendall(wire.line(header))
            first = wire.read_line(f)
            if first.get("continue") is not True:
                return wire.finish_reply(first, f)
            try:
                _check_declared(len(head), declared, done=False)
                _stream(sock, head, stdin or io.BytesIO(), limit, declared)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the daemon stopped reading (too large?): its reply says why
            return wire.read_reply(f)
        except (wire.ProtocolError, OSError) as exc:
            raise SignerError(Exit.UNAVAILABLE, f"lost the connection to the signer daemon "
                              f"({exc}): nothing was signed; try again") from None


def run(role: str, name: str, config: Path | str | None, sock_path: Path | str | None,
        raw_command: bytes | None, stdin: BinaryIO, stdout: BinaryIO) -> tuple[int, str]:
    """Returns (exit code, message for stderr)."""
    if not request.is_name(name):  # names share the profiles' rule
        return Exit.CONFIG, (f"bad {role} name in the forced command (want "
                             f"{request.PROFILE_PATTERN})")
    try:
        cmd = request.parse(raw_command)
    except request.ParseError as exc:
        return exc.code, str(exc)
    header: dict[str, object] = {"v": wire.VERSION, "role": role, "caller": name}
    header.update(request.to_wire(cmd))
    with_body = isinstance(cmd, request.Sign | request.Approve | request.Unlock)
    sock = _connect(socket_path(config, sock_path))
    try:
        code, message, payload = exchange(sock, header, stdin if with_body else None,
                                          _SMALL_BODY.get(type(cmd)),
                                          cmd.size if isinstance(cmd, request.Sign) else None)
    finally:
        sock.close()
    if code == Exit.OK and payload:
        stdout.write(payload)
        stdout.flush()
    return code, message


_USAGE = ("signer gateway: usage: signer gateway (--client NAME | --custodian NAME) "
          "[--config FILE] [--socket PATH]")


def main_argv(argv: list[str]) -> int:
    """`signer gateway ...`, parsed here rather than by argparse: the forced command runs once
    per SSH request, so its start-up is the latency every request pays."""
    opts: dict[str, str] = {}
    i = 0
    while i < len(argv):
        opt = argv[i]
        if opt not in ("--client", "--custodian", "--config", "--socket") or opt in opts \
                or i + 1 >= len(argv):
            sys.stderr.write(f"signer: {_USAGE}\n")
            return Exit.USAGE
        opts[opt] = argv[i + 1]
        i += 2
    if ("--client" in opts) == ("--custodian" in opts):
        sys.stderr.write(f"signer: {_USAGE}\n")
        return Exit.USAGE
    role = "client" if "--client" in opts else "custodian"
    return main(role, opts[f"--{role}"], opts.get("--config"), opts.get("--socket"))


def main(role: str, name: str, config: Path | str | None, sock_path: Path | str | None) -> int:
    raw = os.environb.get(b"SSH_ORIGINAL_COMMAND")
    try:
        code, message = run(role, name, config, sock_path, raw, sys.stdin.buffer,
                            sys.stdout.buffer)
    except SignerError as exc:
        code, message = exc.code, exc.message
    except BrokenPipeError:
        code, message = Exit.UNAVAILABLE, "the SSH connection closed before the answer was sent"
    except Exception as exc:  # one line, never a traceback on the wire
        code, message = Exit.SOFTWARE, f"internal error in the gateway ({type(exc).__name__})"
    if message:
        sys.stderr.write(f"signer: {' '.join(message.splitlines())}\n")
    return code


# What the forced command runs: `python -I -c FORCED_COMMAND_CODE --client NAME --socket PATH`
# (-c rather than -m or a console script: runpy, and the `re` that pip's scripts import, would
# add a third to the start-up).
FORCED_COMMAND_CODE = "from signer.gateway import cli; cli()"


def cli() -> None:
    sys.exit(main_argv(sys.argv[1:]))
