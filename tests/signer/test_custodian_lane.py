"""Custodians are heard under any flood (issue 24, point 5): `approve` and `thaw` answered while
build client accounts hold everything the clients' lane has.

The flood fills both halves of that lane at once, from four build client accounts of 64
connections each (every connection the daemon lets clients have, MAX_CONNECTIONS):

- connections: most send half a header and never finish it, so the accept loop counts them;
- slots: the first six of each account send a whole `sign` header and then trickle its body,
  one byte every half second, so each holds one of the CLIENT_SLOTS request slots (eight per
  client name, two names), and the rest wait for a slot.

A custodian whose connections went through the clients' lane would be refused at accept ("too
many connections", 69) if they were counted with the clients' connections, or would wait
SLOT_WAIT (60 s) for a slot if their requests took the clients' slots: either way the bound
below fails (both tried: 69 at the first `approve`, and the 10 s bound). The test shows on
the way that the flood is what it claims: a connection from an account outside both the flood
and the custodians' lane is refused at accept before and after the custodians are answered,
every client slot is held throughout (a flooding connection that got "continue" holds one),
and no flooding process let go. (freeze, unlock and `requests` under the connection flood:
test_gateway.py.)
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from signer import daemon, wire
from tests.signer.conftest import MakeSigner, Signer
from tests.signer.test_approvals import ssh_sign, statement
from tests.signer.test_gateway import OUTSIDER_PROBE  # an account that floods nothing

ANSWER_WITHIN = 2.0  # seconds, for each custodian command under the flood (issue 24)
TRICKLING_PER_ACCOUNT = 6  # whole `sign` headers per flooding account, the rest half headers
FLOODERS = ("daemon", "bin", "sys", "sync")  # system accounts, as build client accounts
CALLER_OF = {"daemon": "build1", "bin": "build1", "sys": "build2", "sync": "build2"}

# One flooding account: N connections, the first K with a whole `sign` header whose body it then
# trickles (a frame of one byte every half second) once the daemon says "continue", the others
# with half a header. Prints "held N", then "trickling T" each time one more got a slot; ends
# when its stdin closes. The system's python (the test's virtual environment may not be
# readable by these accounts), the wire bytes handed over in hex.
_FLOOD = r"""
import json, select, socket, sys
path, total, whole = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
header, half, frame = (bytes.fromhex(a) for a in sys.argv[4:7])
held, waiting, going = [], [], []
for i in range(total):
    s = socket.socket(socket.AF_UNIX)
    s.connect(path)
    s.sendall(header if i < whole else half)
    (waiting if i < whole else held).append(s)
print("held", total, flush=True)
while True:
    ready, _, _ = select.select([sys.stdin, *waiting], [], [], 0.5)
    if sys.stdin in ready:
        break
    for s in ready:
        waiting.remove(s)
        held.append(s)
        if json.loads(s.recv(4096).split(b"\n")[0]).get("continue") is True:
            going.append(s)
            print("trickling", len(going), flush=True)
    for s in going:
        s.sendall(frame)
"""


@dataclass
class Flood:
    signer: Signer
    python: str
    holders: list[subprocess.Popen[str]] = field(default_factory=list)
    trickling: dict[int, int] = field(default_factory=dict)  # holder -> slots it holds
    started: float = 0.0

    def probe(self) -> str:
        """A connection from an account outside the flood and the custodians' lane."""
        r = subprocess.run([self.python, "-I", "-c", OUTSIDER_PROBE, str(self.signer.socket)],
                           user=pwd.getpwnam("games").pw_uid, group=0, extra_groups=[],
                           capture_output=True, text=True, timeout=30, cwd="/")
        return r.stdout + r.stderr

    def slots_held(self) -> int:
        return sum(self.trickling.values())

    def intact(self) -> bool:
        """Every flooding account still holds its connections and its slots."""
        return all(h.poll() is None for h in self.holders) \
            and self.slots_held() == daemon.CLIENT_SLOTS


def _read(h: subprocess.Popen[str], i: int, flood: Flood) -> None:
    assert h.stdout is not None
    for line in h.stdout:
        if m := re.fullmatch(r"trickling (\d+)\n", line):
            flood.trickling[i] = int(m.group(1))


@pytest.fixture
def flooded(make_signer: MakeSigner) -> Iterator[Flood]:
    """A daemon whose custodians alice and bob are bound to this test's account (their lane),
    and the flood; the flood ends, and the daemon stops, at the end of the test."""
    python = shutil.which("python3", path="/usr/bin:/bin")
    assert python is not None
    assert len(FLOODERS) * daemon.MAX_PER_UID == daemon.MAX_CONNECTIONS
    per_caller = TRICKLING_PER_ACCOUNT * 2  # two accounts per client name
    assert per_caller > daemon.PER_CLIENT and 2 * daemon.PER_CLIENT == daemon.CLIENT_SLOTS
    # The socket where those accounts can reach it: a directory they may search, the socket's
    # group (0660, root's group) theirs for this test.
    where = Path(tempfile.mkdtemp(prefix="signer-lane-", dir="/tmp"))
    where.chmod(0o755)
    me = pwd.getpwuid(os.getuid()).pw_name
    signer: Signer = make_signer(
        accounts={"alice": me, "bob": me}, socket=str(where / "signer.sock"),
        profile_overrides={"dev": {"clients": ["build1", "build2"]}})
    flood = Flood(signer, python)
    try:
        yield flood
    finally:
        for h in flood.holders:
            h.kill()
            h.wait()
        signer.stop()
        shutil.rmtree(where, ignore_errors=True)


def _start(flood: Flood) -> None:
    half = b'{"v": 1, "role": "client", "caller": "build1"'
    frame = wire.frame_header(1) + b"x"
    for i, account in enumerate(FLOODERS):
        header = wire.line({"v": wire.VERSION, "role": "client", "caller": CALLER_OF[account],
                            "cmd": "sign", "profile": "dev", "format": "raw", "name": "",
                            "size": 1000})
        h = subprocess.Popen(
            [flood.python, "-I", "-c", _FLOOD, str(flood.signer.socket),
             str(daemon.MAX_PER_UID), str(TRICKLING_PER_ACCOUNT), header.hex(), half.hex(),
             frame.hex()],
            user=pwd.getpwnam(account).pw_uid, group=0, extra_groups=[],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            cwd="/")
        flood.holders.append(h)
        assert h.stdout is not None
        assert h.stdout.readline() == f"held {daemon.MAX_PER_UID}\n", h.stderr
        threading.Thread(target=_read, args=(h, i, flood), daemon=True).start()
    flood.started = time.monotonic()
    for _ in range(100):  # a bound, not a timing assert: the slots are taken at once
        if flood.slots_held() >= daemon.CLIENT_SLOTS:
            break
        time.sleep(0.05)
    assert flood.slots_held() == daemon.CLIENT_SLOTS, flood.trickling


def _timed(signer: Signer, command: str, stdin: bytes, custodian: str
           ) -> tuple[subprocess.CompletedProcess[bytes], float]:
    t0 = time.monotonic()
    # A bound past which the flood's half headers are reaped anyway (then nothing is proven).
    r = signer.lab.gateway(signer.config, command, stdin, client=None, custodian=custodian,
                           timeout=daemon.HEADER_TIMEOUT)
    return r, time.monotonic() - t0


@pytest.mark.control("SGN-04", "SGN-07")
def test_custodians_approve_and_thaw_while_build_clients_hold_every_connection_and_slot(
        flooded: Flood) -> None:
    """A release request queued and the `rsa` profile frozen before the flood; under it, two
    custodians approve the request and one thaws the profile, each answered in under 2 s;
    after it, the build client fetches the signature the approvals released."""
    s = flooded.signer
    r = s.gw("sign --profile release --format raw --name release.bin", b"release artifact")
    assert r.returncode == 75, r.stderr
    m = re.search(rb"queued ([0-9a-f]{32})", r.stderr)
    assert m, r.stderr
    rid = m.group(1).decode()
    approvals = {who: ssh_sign(s.lab.custodian_keys[who], statement(s, who, rid))
                 for who in ("alice", "bob")}
    r = s.gw("freeze rsa", client=None, custodian="carol")
    assert r.returncode == 0, r.stderr

    _start(flooded)
    assert "too many connections" in flooded.probe()  # the clients' connections: all held
    took: dict[str, float] = {}
    for who, answer in (("alice", b"1 of 2"), ("bob", b"2 of 2")):
        r, took[f"approve ({who})"] = _timed(s, f"approve {rid}", approvals[who], who)
        assert r.returncode == 0, r.stderr
        assert answer in r.stderr, r.stderr
    r, took["thaw"] = _timed(s, "thaw rsa", b"", "alice")
    assert r.returncode == 0, r.stderr
    assert b"thawed" in r.stderr, r.stderr
    assert "too many connections" in flooded.probe()  # the flood held all along ...
    assert flooded.intact(), (flooded.trickling, [h.poll() for h in flooded.holders])
    # ... and no connection of it was reaped for its unfinished header meanwhile
    assert time.monotonic() - flooded.started < daemon.HEADER_TIMEOUT, "too slow to tell"
    slow = {command: round(t, 2) for command, t in took.items() if t >= ANSWER_WITHIN}
    assert not slow, f"custodian commands slower than {ANSWER_WITHIN} s under the flood: {slow}"

    for h in flooded.holders:  # the flood ends: the approved request is signed for its client
        h.kill()
        h.wait()
    r = s.gw(f"fetch {rid}")
    assert r.returncode == 0 and r.stdout, r.stderr
    assert [(e["event"], e["custodian"]) for e in s.entries()
            if e["event"] in ("approve", "thaw") and e.get("custodian")] == [
        ("approve", "alice"), ("approve", "bob"), ("thaw", "alice")]
    assert [e["request"] for e in s.events("sign")] == [rid]  # no flooding request signed
    answers = ", ".join(f"{c} {t * 1000:.0f} ms" for c, t in took.items())
    print(f"under a flood of {daemon.MAX_CONNECTIONS} connections and {daemon.CLIENT_SLOTS} "
          f"slots: {answers}")
