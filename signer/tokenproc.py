"""The daemon's token in a process of its own: the token is never idle for want of the GIL.

Why a process. In the daemon, the thread that returns from `C_Sign` (python-pkcs11 releases
the GIL while the token works) has to win the GIL back from the connection threads before the
next signature can start, and so does the next signing thread; with 8 clients the token sat
idle for a quarter of the time (RSA-3072 at 0.70 of what one process signing in a loop gets,
issue 12, point 7). A shorter switch interval did not help. Here one single-threaded child,
started by the daemon when it starts, holds the PKCS#11 library and the logged-in session and
does nothing but token operations, one at a time, in the order it receives them; the daemon
keeps up to DEPTH requests in its socket, so the next signature is already waiting when one
ends. A checkpoint signature (`urgent`) goes before every profile signature that is not yet
in the child, so it waits for at most DEPTH signatures.

What it does not change: the daemon still decides everything (policy, budget, audit entry
before the answer); the child signs what the daemon hands it, as the session in the daemon did.
It runs under the same unit, user and sandbox; it is not dumpable (no ptrace, no core), it
reads the PIN from the socket (never argv or the environment), and it ends when the daemon's
end of the socket closes, whatever the daemon died of. If the child ends, every call fails
UNAVAILABLE and the daemon is told (`on_lost`): it stops, and systemd starts it again (the
daemon exits non-zero). A token that goes away is not a child that ends: its errors come back
as answers, as they did in-process.

With k-of-n custodian shares (signer/shares.py) the shares come here one by one (SHARE) and
stay in this process's memory alone: when k custodians' shares are in, it combines them,
opens the sealed PIN (a forged share fails there, before the token is asked) and logs in.
The daemon learns only who has sent one and whether the token is unlocked.

The wire between the two, one socketpair: a frame is a 4-byte length, a 1-byte operation (or,
in an answer, an exit code, 0 = ok) and the payload. Answers come in the order of the
requests, so no request needs an id.

Reading the answers: no reader thread (a hand-off between two threads costs a wake-up per
signature, which one client pays in full). The caller whose answer is due reads it itself;
while several wait, one of them (the leader) reads for all, hands each answer to its owner and
sends the next queued request as a slot frees, and on leaving passes the role to the oldest
caller still waiting.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import subprocess
import sys
import threading
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

from asn1crypto import keys as asn1keys

from signer.algorithms import BY_NAME, Algorithm
from signer.errors import Exit, SignerError
from signer.uri import PKCS11URI
from signer.uri import parse as parse_uri

# In the answer to the share whose combination fails: the round is empty again (and nothing
# reached the token). signer/unlocking.py tells it from a lone share refused.
ROUND_RESET = "nothing was tried on the token"
DEPTH = 4  # requests in the child's socket at once: one being signed, the next ones ready

_HEAD = struct.Struct("!IB")
_SIGN_HEAD = struct.Struct("!IB")  # key handle, length of the algorithm's name
MAX_FRAME = 1 << 16
(OPEN, LOGIN, CLOSE, KEY, RESIDENCY, PUBKEY, PUBKEY_UNLOCKED, SIGN, SHARE) = range(1, 10)


class KeyHandle:
    """A private key found in the child: what `TokenProcess.private_key` returns."""

    __slots__ = ("index", "uri")

    def __init__(self, index: int, uri: PKCS11URI) -> None:
        self.index = index
        self.uri = uri

    def __repr__(self) -> str:
        return f"KeyHandle({self.index}, {self.uri})"


class _Ticket:
    __slots__ = ("body", "done", "frame", "status", "wake")

    def __init__(self, frame: bytes) -> None:
        self.frame = frame
        self.wake = threading.Lock()
        self.wake.acquire()  # released once: answered by another caller, or made leader
        self.done = False
        self.status = 0
        self.body = b""


def _frame(op: int, payload: bytes = b"") -> bytes:
    return _HEAD.pack(len(payload), op) + payload


def _read_frame(f: Any) -> tuple[int, bytes] | None:
    head = f.read(_HEAD.size)
    if len(head) < _HEAD.size:
        return None
    size, op = _HEAD.unpack(head)
    if size > MAX_FRAME:
        raise OSError(f"token process frame of {size} bytes")
    body = f.read(size)
    if len(body) < size:
        return None
    return op, body


class Channel:
    """Calls over the socket to the token process: up to DEPTH in the child at once, urgent
    calls before the others waiting, answers read by the callers themselves (see above)."""

    def __init__(self, sock: socket.socket, on_lost: Callable[[str], None] | None = None,
                 status: Callable[[], int | None] | None = None) -> None:
        self.on_lost = on_lost
        self._status = status
        self._sock = sock
        self._rf = sock.makefile("rb")
        self._mu = threading.Lock()
        self._sent: deque[_Ticket] = deque()
        self._urgent: deque[_Ticket] = deque()
        self._normal: deque[_Ticket] = deque()
        self._leader = False
        self._closing = False
        self.lost: str | None = None

    def call(self, op: int, payload: bytes = b"", urgent: bool = False) -> bytes:
        t = _Ticket(_frame(op, payload))
        with self._mu:
            if self.lost is not None:
                raise SignerError(Exit.UNAVAILABLE, self.lost)
            if len(self._sent) < DEPTH and not self._urgent and (urgent or not self._normal):
                self._send(t)
            else:
                (self._urgent if urgent else self._normal).append(t)
            lead = not self._leader
            self._leader = True
        while True:
            if lead:
                self._lead(t)
                break
            t.wake.acquire()
            if t.done:
                break
            lead = True  # made leader by the one before
        if t.status:
            raise SignerError(t.status, t.body.decode("utf-8", "replace"))
        return t.body

    def _send(self, t: _Ticket) -> None:
        """Caller holds _mu. A failed send shows up as the child's end, on the read side."""
        self._sent.append(t)
        try:
            self._sock.sendall(t.frame)
        except OSError:
            pass

    def _lead(self, mine: _Ticket) -> None:
        """Read answers, in order, until ours is in; then pass the role on."""
        lost, failed = None, False
        while not mine.done:
            try:
                got = _read_frame(self._rf)
            except (OSError, ValueError) as exc:  # ValueError: closed under us by close()
                got, lost = None, str(exc)
            with self._mu:
                if got is None or not self._sent:
                    self._fail_all(lost)
                    failed = True
                    break
                t = self._sent.popleft()
                t.status, t.body = got
                t.done = True
                if t is not mine:
                    t.wake.release()
                waiting = self._urgent or self._normal
                if waiting:
                    self._send(waiting.popleft())
        with self._mu:
            self._leader = False
            if self._sent:  # someone still waits for an answer: they read from now on
                self._leader = True
                self._sent[0].wake.release()
        if failed and not self._closing and self.on_lost is not None and self.lost is not None:
            self.on_lost(self.lost)

    def _fail_all(self, why: str | None) -> None:
        """The child is gone. Caller holds _mu and is the leader."""
        if self.lost is None:
            status = self._status() if self._status is not None else None
            self.lost = ("the token process ended" + (f" ({why})" if why else "")
                          + (f" with status {status}" if status is not None else "")
                          + ": the daemon stops; restart it")
        msg = self.lost.encode()
        for q in (self._sent, self._urgent, self._normal):
            while q:
                t = q.popleft()
                t.status, t.body, t.done = Exit.UNAVAILABLE, msg, True
                t.wake.release()
        # the leader's own ticket may be in none of the queues any more (answered already)

    def close(self) -> None:
        """End the calls: those still waiting fail UNAVAILABLE, and nobody is told the
        child was lost (it was not: it was let go)."""
        with self._mu:
            self._closing = True
            if self.lost is None:
                self.lost = "the token process was closed: the daemon is stopping"
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._rf.close()
        self._sock.close()


class TokenProcess:
    """What the daemon uses of `signer.token.Token`, served by a child process."""

    def __init__(self, module: Path, label: str, serial: str | None = None,
                 on_lost: Callable[[str], None] | None = None) -> None:
        self.label = label
        self._logged_in = False
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        root = str(Path(__file__).resolve().parent.parent)
        code = (f"import sys; sys.path.insert(0, {root!r}); "
                "from signer.tokenproc import child_main; child_main(int(sys.argv[1]))")
        try:
            # -I: no PYTHON* variables, no user site, no script directory on the path
            self._proc = subprocess.Popen(
                [sys.executable, "-I", "-B", "-c", code, str(theirs.fileno())],
                pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL, close_fds=True)
        except OSError as exc:
            ours.close()
            raise SignerError(Exit.UNAVAILABLE, f"cannot start the token process: {exc}") \
                from None
        finally:
            theirs.close()
        self._channel = Channel(ours, on_lost, self._proc.poll)
        self._call = self._channel.call
        try:
            self._call(OPEN, json.dumps({"module": str(module), "label": label,
                                         "serial": serial}).encode())
        except SignerError:
            self._end()
            raise

    # --- the interface of Token ------------------------------------------------------------

    @property
    def logged_in(self) -> bool:
        return self._logged_in and self._channel.lost is None

    @property
    def pid(self) -> int:
        return self._proc.pid

    def login(self, pin: str, rw: bool = False) -> str | None:
        """Log in with a whole PIN; returns the token's warning about its PIN tries, if any."""
        if self._logged_in:
            return None
        warning = self._call(LOGIN, pin.encode("utf-8"))
        self._logged_in = True
        return warning.decode("utf-8", "replace") or None

    def send_share(self, custodian: str, share: bytes, k: int, window: float,
                   token: str = "") -> dict[str, Any]:
        """Hand a custodian's share to the token process (signer/shares.py, `Round`), for
        `token` (the [tokens.*] name of a card; "": the daemon's own token). The
        answer: `state` "added", "again" (this custodian's share counts already) or
        "unlocked" (the k-th share: logged in), `have` (custodians whose shares count),
        `warning` (the token's PIN flags). SignerError: the share cannot count (DATA), the
        shares do not combine (DATA, all forgotten), the token refused (NOPERM)."""
        head = json.dumps({"custodian": custodian, "k": k, "window": window,
                           "token": token}).encode()
        body = self._call(SHARE, struct.pack("!H", len(head)) + head + share)
        answer = json.loads(body)
        assert isinstance(answer, dict)
        if answer.get("state") == "unlocked":
            self._logged_in = True
        return answer

    def close(self) -> None:
        """Log out and end the child (the daemon calls this once, when it stops)."""
        if self._channel.lost is None:
            try:
                self._call(CLOSE)
            except SignerError:
                pass
        self._logged_in = False
        self._end()

    def private_key(self, uri: PKCS11URI) -> KeyHandle:
        body = self._call(KEY, str(uri).encode())
        return KeyHandle(int.from_bytes(body, "big"), uri)

    def residency_problems(self, uri: PKCS11URI, alg: Algorithm) -> list[str]:
        body = self._call(RESIDENCY, json.dumps({"uri": str(uri), "alg": alg.name}).encode())
        problems = json.loads(body)
        assert isinstance(problems, list)
        return [str(p) for p in problems]

    def public_key_info(self, uri: PKCS11URI) -> asn1keys.PublicKeyInfo:
        return asn1keys.PublicKeyInfo.load(self._call(PUBKEY, str(uri).encode()))

    def public_key_info_unlocked(self, uri: PKCS11URI) -> asn1keys.PublicKeyInfo | None:
        body = self._call(PUBKEY_UNLOCKED, str(uri).encode())
        return asn1keys.PublicKeyInfo.load(body) if body else None

    def sign_digest(self, key: KeyHandle, alg: Algorithm, digest: bytes, urgent: bool = False
                    ) -> bytes:
        """As Token.sign_digest: the digest's signature, in the encoding openssl expects."""
        name = alg.name.encode()
        raw = self._call(SIGN, _SIGN_HEAD.pack(key.index, len(name)) + name
                         + alg.token_input(digest), urgent)
        return alg.encode(raw)

    def _end(self) -> None:
        self._channel.close()
        try:
            self._proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()


# --- the child ------------------------------------------------------------------------------

def child_main(fd: int) -> None:
    """The token process: one request at a time, until the daemon closes its end."""
    import time

    from signer import pin, shares
    from signer.token import Token

    for missed in pin.harden_process():
        sys.stderr.write(f"token process: core dump protection: {missed}\n")
    sock = socket.socket(fileno=fd)
    rf = sock.makefile("rb")
    token: Token | None = None
    keys: list[Any] = []
    algs: dict[bytes, Algorithm] = {}
    round_ = shares.Round()  # custodians' shares: only ever in this process's memory

    def serve(op: int, body: bytes) -> bytes:
        nonlocal token
        if op == OPEN:
            a = json.loads(body)
            token = Token(Path(a["module"]), a["label"], a["serial"])
            return b""
        if token is None:
            raise SignerError(Exit.SOFTWARE, "token process: no token opened")
        if op == SIGN:
            index, n = _SIGN_HEAD.unpack_from(body)
            name = body[_SIGN_HEAD.size:_SIGN_HEAD.size + n]
            alg = algs.get(name)
            if alg is None:
                alg = algs[name] = BY_NAME[name.decode()]
            return token.sign_input(keys[index], alg, body[_SIGN_HEAD.size + n:])
        if op == LOGIN:
            return (token.login(body.decode("utf-8")) or "").encode()
        if op == SHARE:
            (n,) = struct.unpack_from("!H", body)
            a = json.loads(body[2:2 + n])
            k, window, now = int(a["k"]), float(a["window"]), time.monotonic()
            if token.logged_in:
                round_.clear()
                return json.dumps({"state": "unlocked", "have": [], "warning": None}).encode()
            try:
                state = round_.add(a["custodian"], body[2 + n:], k, now, window,
                                   str(a.get("token", "")))
            except shares.ShareError as exc:
                raise SignerError(Exit.DATA, str(exc)) from None
            have = round_.custodians(now, window)
            warning = None
            if round_.ready(k):
                try:
                    secret = round_.take()
                except shares.ShareError as exc:
                    raise SignerError(Exit.DATA, f"{exc}: {ROUND_RESET}; each custodian "
                                      "must send their share again") from None
                warning = token.login(secret.decode("utf-8"))
                state = "unlocked"
            return json.dumps({"state": state, "have": have, "warning": warning}).encode()
        if op == CLOSE:
            token.close()
            return b""
        if op == KEY:
            keys.append(token.private_key(parse_uri(body.decode())))
            return (len(keys) - 1).to_bytes(4, "big")
        if op == RESIDENCY:
            a = json.loads(body)
            return json.dumps(token.residency_problems(parse_uri(a["uri"]),
                                                       BY_NAME[a["alg"]])).encode()
        if op == PUBKEY:
            return bytes(token.public_key_info(parse_uri(body.decode())).dump())
        if op == PUBKEY_UNLOCKED:
            info = token.public_key_info_unlocked(parse_uri(body.decode()))
            return bytes(info.dump()) if info is not None else b""
        raise SignerError(Exit.SOFTWARE, f"token process: unknown operation {op}")

    while True:
        try:
            got = _read_frame(rf)
        except OSError:
            got = None
        if got is None:
            break
        op, body = got
        try:
            status, out = 0, serve(op, body)
        except SignerError as exc:
            status, out = exc.code, exc.message.encode("utf-8", "replace")
        except Exception as exc:  # a bug here must answer, not hang the daemon's caller
            status, out = Exit.SOFTWARE, f"token process: {type(exc).__name__}".encode()
        try:
            sock.sendall(_frame(status, out))
        except OSError:
            break
    if token is not None:
        token.close()
    os._exit(0)
