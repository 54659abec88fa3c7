"""The token process (signer/tokenproc.py): every caller gets its own answer, a checkpoint goes
before the signatures not yet handed to the child, a child that ends fails every call and makes
the daemon stop non-zero, and the PIN reaches the child through the socket only.

The ordering and hand-off tests talk to a scripted peer on a socketpair (it answers when the
test says so, which no real token can be made to do); the others use the real child on the
session's SoftHSM2 token."""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

from signer import tokenproc
from signer.algorithms import ECDSA_P256
from signer.errors import Exit, SignerError
from signer.uri import parse as parse_uri
from tests.signer.conftest import MakeSigner
from tests.signer.conftest import until as _until
from toolkit.local_signer import SOFTHSM_MODULE, Lab

DEV_KEY = parse_uri("pkcs11:token=signer;object=dev;type=private")


class Peer:
    """The child's end of the socket, scripted: records every frame as it arrives (what the
    child's socket holds), answers them in order, one per `answer()`, echoing the payload so
    that each caller can tell its own answer."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.got: list[bytes] = []
        self._go = threading.Semaphore(0)
        self._f = sock.makefile("rb")
        threading.Thread(target=self._read, daemon=True).start()
        threading.Thread(target=self._answer, daemon=True).start()

    def _read(self) -> None:
        while True:
            try:
                got = tokenproc._read_frame(self._f)
            except (OSError, ValueError):
                return
            if got is None:
                return
            self.got.append(got[1])

    def _answer(self) -> None:
        done = 0
        while True:
            self._go.acquire()
            while done >= len(self.got):
                time.sleep(0.001)
            try:
                self.sock.sendall(tokenproc._frame(0, self.got[done]))
            except OSError:
                return
            done += 1

    def answer(self, n: int = 1) -> None:
        for _ in range(n):
            self._go.release()


@pytest.fixture
def channel() -> Iterator[tuple[tokenproc.Channel, Peer, list[str]]]:
    ours, theirs = socket.socketpair()
    lost: list[str] = []
    ch = tokenproc.Channel(ours, on_lost=lost.append)
    peer = Peer(theirs)
    yield ch, peer, lost
    ch.close()
    theirs.close()


def _call_in_thread(ch: tokenproc.Channel, payload: bytes, urgent: bool,
                    answers: dict[bytes, bytes | SignerError]) -> threading.Thread:
    def run() -> None:
        try:
            answers[payload] = ch.call(tokenproc.SIGN, payload, urgent)
        except SignerError as exc:
            answers[payload] = exc

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def test_a_checkpoint_goes_before_the_signatures_not_yet_in_the_child(
        channel: tuple[tokenproc.Channel, Peer, list[str]]) -> None:
    ch, peer, _lost = channel
    answers: dict[bytes, bytes | SignerError] = {}
    threads = [_call_in_thread(ch, f"sig{i}".encode(), False, answers)
               for i in range(tokenproc.DEPTH)]
    _until(lambda: len(peer.got) == tokenproc.DEPTH)  # the child holds DEPTH requests
    threads += [_call_in_thread(ch, f"late{i}".encode(), False, answers) for i in range(3)]
    _until(lambda: len(ch._normal) == 3)
    threads.append(_call_in_thread(ch, b"checkpoint", True, answers))
    _until(lambda: len(ch._urgent) == 1)
    assert len(peer.got) == tokenproc.DEPTH  # nothing more was sent while the child was full
    peer.answer(tokenproc.DEPTH + 4)
    for t in threads:
        t.join(10)
    # the first slot that came free went to the checkpoint, then the others in their order
    assert peer.got[tokenproc.DEPTH:] == [b"checkpoint", b"late0", b"late1", b"late2"]
    assert answers == {p: p for p in peer.got}  # every caller got its own answer


def test_many_callers_each_get_their_own_answer(
        channel: tuple[tokenproc.Channel, Peer, list[str]]) -> None:
    """Callers that wait and callers that read for the others (the leader hands over)."""
    ch, peer, lost = channel
    answers: dict[bytes, bytes | SignerError] = {}
    payloads = [f"request-{i}".encode() for i in range(40)]
    threads = [_call_in_thread(ch, p, i % 7 == 0, answers) for i, p in enumerate(payloads)]
    peer.answer(len(payloads))
    for t in threads:
        t.join(10)
    assert answers == {p: p for p in payloads}
    assert not ch._leader and not ch._sent and not lost


def test_a_child_that_ends_fails_every_call_and_is_reported_once(
        channel: tuple[tokenproc.Channel, Peer, list[str]]) -> None:
    ch, peer, lost = channel
    answers: dict[bytes, bytes | SignerError] = {}
    threads = [_call_in_thread(ch, f"sig{i}".encode(), False, answers) for i in range(6)]
    _until(lambda: len(peer.got) == tokenproc.DEPTH and len(ch._normal) == 6 - tokenproc.DEPTH)
    peer.sock.shutdown(socket.SHUT_RDWR)  # the child dies with requests in it and waiting
    for t in threads:
        t.join(10)
    assert len(answers) == 6
    for a in answers.values():
        assert isinstance(a, SignerError) and a.code == Exit.UNAVAILABLE, a
        assert "token process ended" in a.message
    assert len(lost) == 1 and "token process ended" in lost[0]
    with pytest.raises(SignerError) as later:
        ch.call(tokenproc.SIGN, b"after")
    assert later.value.code == Exit.UNAVAILABLE


def test_closing_the_channel_is_not_a_lost_child(
        channel: tuple[tokenproc.Channel, Peer, list[str]]) -> None:
    ch, peer, lost = channel
    answers: dict[bytes, bytes | SignerError] = {}
    t = _call_in_thread(ch, b"in-flight", False, answers)
    _until(lambda: peer.got == [b"in-flight"])
    ch.close()  # the daemon stopping
    t.join(10)
    assert isinstance(answers[b"in-flight"], SignerError)
    assert lost == []


# --- the real child, on the session's token ------------------------------------------------

@pytest.fixture
def token(lab: Lab, monkeypatch: pytest.MonkeyPatch) -> Iterator[tokenproc.TokenProcess]:
    monkeypatch.setenv("SOFTHSM2_CONF", str(lab.conf))
    lost: list[str] = []
    t = tokenproc.TokenProcess(SOFTHSM_MODULE, "signer", on_lost=lost.append)
    t.login(lab.pin_file.read_text().strip())
    yield t
    t.close()


def test_concurrent_signatures_each_verify_against_their_own_digest(
        lab: Lab, token: tokenproc.TokenProcess) -> None:
    key = token.private_key(DEV_KEY)
    public = x509.load_pem_x509_certificate((lab.certs / "dev.pem").read_bytes()).public_key()
    assert isinstance(public, ec.EllipticCurvePublicKey)
    failures: list[str] = []

    def client(n: int) -> None:
        for i in range(25):
            digest = hashlib.sha256(f"{n}/{i}".encode()).digest()
            sig = token.sign_digest(key, ECDSA_P256, digest, urgent=(i % 5 == 0))
            try:
                public.verify(sig, digest, ec.ECDSA(Prehashed(hashes.SHA256())))
            except Exception as exc:  # the test's point: which one failed
                failures.append(f"client {n} request {i}: {type(exc).__name__}")

    threads = [threading.Thread(target=client, args=(n,)) for n in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert failures == []


def test_the_token_process_refuses_what_the_token_refuses(
        lab: Lab, token: tokenproc.TokenProcess) -> None:
    with pytest.raises(SignerError) as missing:
        token.private_key(parse_uri("pkcs11:token=signer;object=no-such-key;type=private"))
    assert missing.value.code == Exit.NOPERM and "no-such-key" in missing.value.message
    assert token.residency_problems(DEV_KEY, ECDSA_P256) == []
    imported = parse_uri("pkcs11:token=signer;object=imported;type=private")
    assert any("LOCAL" in p for p in token.residency_problems(imported, ECDSA_P256))


def _children(pid: int) -> list[int]:
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        out += [int(c) for c in (task / "children").read_text().split()]
    return out


def test_the_pin_reaches_the_token_process_through_its_socket_only(
        lab: Lab, make_signer: MakeSigner) -> None:
    s = make_signer()
    daemon_pid = lab.daemons[s.config].pid
    (child,) = _children(daemon_pid)
    pin = lab.pin_file.read_text().strip().encode()
    for pid in (daemon_pid, child):
        for what in ("cmdline", "environ"):
            assert pin not in Path(f"/proc/{pid}/{what}").read_bytes(), (pid, what)
    assert b"child_main" in Path(f"/proc/{child}/cmdline").read_bytes()
    assert s.gw("sign --profile dev --format raw", b"payload").returncode == 0


def test_the_daemon_stops_non_zero_when_its_token_process_dies(
        lab: Lab, make_signer: MakeSigner) -> None:
    s = make_signer()
    proc = lab.daemons[s.config]
    (child,) = _children(proc.pid)
    assert s.gw("sign --profile dev --format raw", b"before").returncode == 0
    os.kill(child, signal.SIGKILL)
    r = s.gw("sign --profile dev --format raw", b"after")  # finds the loss, or a stopped daemon
    assert r.returncode != 0 and r.stdout == b""
    assert proc.wait(timeout=30) == Exit.UNAVAILABLE
    assert "token process ended" in s.log and "status -9" in s.log
    signed = [e for e in s.events("sign")]
    assert len(signed) == 1  # the one before; nothing after the child died
