"""The audit log: tamper evidence (the first bad seq is named), fail closed, crash safety,
concurrency."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import resource
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from signer import audit, certs, service
from signer.formats import cms
from tests.signer.conftest import MakeSigner, Signer, config, one_line_error, profiles
from toolkit.local_signer import Lab, sign_over_socket

# --- tamper evidence ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def closed_log(lab: Lab) -> Iterator[tuple[list[bytes], Path]]:
    """A log written by a daemon that stopped cleanly, checkpoints every 4 entries."""
    cfg = config(lab, "tamper", profiles(lab), checkpoint_interval=4)
    s = Signer(lab, cfg)
    s.start()
    for i in range(8):
        assert sign_over_socket(s.socket, "dev", b"artifact %d" % i, fmt="raw",
                                name=f"a{i}.bin")[0] == 0
    s.stop()
    lines = s.audit_log.read_bytes().splitlines(keepends=True)
    yield lines, lab.certs / "audit.pem"


def _audit_pub(lab: Lab) -> bytes:
    return certs.load_public_key(lab.certs / "audit.pem")


def _verify(tmp_path: Path, lines: list[bytes], cert: Path) -> tuple[bool, str]:
    path = tmp_path / "audit.jsonl"
    path.write_bytes(b"".join(lines))
    return audit.verify_file(path, certs.load_public_key(cert), live=False)


def _edit(line: bytes, **changes: Any) -> bytes:
    entry = json.loads(line)
    entry.update(changes)
    return audit.canonical(entry) + b"\n"


def _rehash(line: bytes, prev: str | None = None, **changes: Any) -> bytes:
    entry = json.loads(line)
    entry.update(changes)
    entry.pop("hash")
    if prev is not None:
        entry["prev"] = prev
    return audit.seal(entry)[1]


def _rechain(lines: list[bytes], start: int) -> list[bytes]:
    """What an attacker without the audit key can do: rewrite every hash from `start` on."""
    out = lines[:start]
    prev = json.loads(out[-1])["hash"] if out else audit.GENESIS
    for line in lines[start:]:
        new = _rehash(line, prev=prev)
        out.append(new)
        prev = json.loads(new)["hash"]
    return out


K = 4  # the entry the attacks aim at (a sign entry)


def _first_checkpoint_after(lines: list[bytes], seq: int) -> int:
    return next(i for i, line in enumerate(lines)
                if i >= seq and json.loads(line)["event"] == "checkpoint")


TAMPERS: dict[str, Callable[[list[bytes]], tuple[list[bytes], int]]] = {
    "modified": lambda ls: ([*ls[:K], _edit(ls[K], name="evil.bin"), *ls[K + 1:]], K),
    "modified and rehashed": lambda ls: (
        [*ls[:K], _rehash(ls[K], name="evil.bin"), *ls[K + 1:]], K),
    "deleted": lambda ls: (ls[:K] + ls[K + 1:], K),
    "reordered": lambda ls: ([*ls[:K], ls[K + 1], ls[K], *ls[K + 2:]], K),
    "inserted copy": lambda ls: ([*ls[:K + 1], ls[K], *ls[K + 1:]], K),
    "inserted forgery": lambda ls: (
        [*ls[:K], _rehash(ls[K], name="forged.bin"), *ls[K:]], K),
    "truncated (last entry)": lambda ls: (ls[:-1], len(ls) - 1),
    "truncated (whole entries)": lambda ls: _cut_after_last(ls, "sign"),
    "truncated (mid-entry)": lambda ls: ([*ls[:-1], ls[-1][:40]], len(ls) - 1),
    "first entries removed": lambda ls: (ls[2:], 0),
    "not JSON": lambda ls: ([*ls[:K], b"garbage\n", *ls[K + 1:]], K),
    "rechained without the audit key": lambda ls: (
        _rechain([*ls[:K], _edit(ls[K], name="evil.bin"), *ls[K + 1:]], K),
        _first_checkpoint_after(ls, K)),
    "checkpoint signature swapped": lambda ls: _swap_checkpoint_sig(ls),
}


def _cut_after_last(lines: list[bytes], event: str) -> tuple[list[bytes], int]:
    """Whole entries cut off, so that the log ends on an entry no checkpoint covers."""
    i = max(i for i, line in enumerate(lines) if json.loads(line)["event"] == event)
    return lines[:i + 1], i + 1


def _swap_checkpoint_sig(lines: list[bytes]) -> tuple[list[bytes], int]:
    """A genuine signature from another checkpoint, on a rewritten entry."""
    idx = [i for i, line in enumerate(lines) if json.loads(line)["event"] == "checkpoint"]
    a, b = idx[1], idx[2]
    forged = _rehash(lines[a], sig=json.loads(lines[b])["sig"])
    return _rechain([*lines[:a], forged, *lines[a + 1:]], a + 1), a


def test_a_clean_log_verifies(closed_log: tuple[list[bytes], Path], tmp_path: Path) -> None:
    lines, cert = closed_log
    ok, message = _verify(tmp_path, lines, cert)
    assert ok, message
    assert json.loads(lines[-1])["event"] == "checkpoint"
    assert sum(json.loads(line)["event"] == "checkpoint" for line in lines) >= 3


@pytest.mark.control("SGN-05")
@pytest.mark.parametrize("tamper", list(TAMPERS))
def test_tampering_is_detected_at_the_first_bad_seq(closed_log: tuple[list[bytes], Path],
                                                    tmp_path: Path, tamper: str) -> None:
    lines, cert = closed_log
    changed, first_bad = TAMPERS[tamper](list(lines))
    ok, message = _verify(tmp_path, changed, cert)
    assert not ok
    assert f"first bad seq {first_bad}:" in message, message


@pytest.mark.control("SGN-05")
def test_audit_verify_cli_names_the_seq_and_exits_1(closed_log: tuple[list[bytes], Path],
                                                    tmp_path: Path, lab: Lab) -> None:
    lines, cert = closed_log
    path = tmp_path / "audit.jsonl"
    path.write_bytes(b"".join(lines[:K] + lines[K + 1:]))
    r = lab.signer("audit", "verify", path, "--cert", cert)
    assert r.returncode == 1
    assert f"first bad seq {K}: missing".encode() in r.stdout
    path.write_bytes(b"".join(lines))
    r = lab.signer("audit", "verify", path, "--cert", cert)
    assert r.returncode == 0 and b"checkpoint(s) verified" in r.stdout
    r = lab.signer("audit", "show", path, "--last", "3")
    assert r.returncode == 0 and len(r.stdout.splitlines()) == 3


@pytest.mark.control("SGN-05")
def test_audit_verify_passes_only_what_the_audit_key_vouches_for(
        closed_log: tuple[list[bytes], Path], tmp_path: Path, lab: Lab) -> None:
    """Without a key, or with --live on a log without a checkpoint, the chain alone is all
    that was checked (anyone can recompute it): not a pass, unless asked for (--chain-only)."""
    lines, cert = closed_log
    path = tmp_path / "audit.jsonl"
    path.write_bytes(b"".join(lines))
    r = lab.signer("audit", "verify", path)
    assert r.returncode == 1 and b"NOT verified" in r.stdout, r.stdout
    r = lab.signer("audit", "verify", path, "--live")
    assert r.returncode == 1 and b"NOT verified" in r.stdout, r.stdout
    r = lab.signer("audit", "verify", path, "--chain-only")
    assert r.returncode == 0 and b"signatures NOT checked (--chain-only)" in r.stdout, r.stdout
    first = next(i for i, line in enumerate(lines) if json.loads(line)["event"] == "checkpoint")
    path.write_bytes(b"".join(lines[:first]))  # a live log cut before its first checkpoint
    r = lab.signer("audit", "verify", path, "--live", "--cert", cert)
    assert r.returncode == 1 and b"no checkpoint" in r.stdout, r.stdout
    r = lab.signer("audit", "verify", path, "--live", "--chain-only")
    assert r.returncode == 0, r.stdout
    path.write_bytes(b"")
    assert lab.signer("audit", "verify", path, "--live", "--cert", cert).returncode == 1


@pytest.mark.control("SGN-05")
def test_daemon_refuses_to_start_on_a_broken_log(make_signer: MakeSigner) -> None:
    """What start-up reads (from the last state checkpoint on) must be intact."""
    s: Signer = make_signer()
    for _ in range(2):
        assert s.gw("sign --profile dev --format raw", b"x").returncode == 0
    s.stop(signal.SIGKILL)  # a crash: no state checkpoint at stop
    lines = s.audit_log.read_bytes().splitlines(keepends=True)
    cp = max(i for i, line in enumerate(lines) if b'"state":"' in line)
    assert len(lines) > cp + 3
    s.audit_log.write_bytes(b"".join(lines[:cp + 2] + lines[cp + 3:]))
    r = s.lab.signer("serve", "--config", s.config, timeout=20)
    assert r.returncode == 74
    assert f"broken at seq {cp + 2} (segment audit.jsonl)" in one_line_error(r)


@pytest.mark.control("SGN-05")
def test_a_torn_last_entry_from_a_crash_is_cut_and_noted(make_signer: MakeSigner) -> None:
    s: Signer = make_signer()
    s.stop()
    end = s.audit_log.stat().st_size
    torn = b'{"event":"sign","seq":'
    with s.audit_log.open("ab") as f:
        f.write(torn)
    s.start()
    start = s.events("start")[-1]
    digest = hashlib.sha256(torn).hexdigest()
    assert f"cut a torn last entry: 22 bytes at offset {end}, sha256 {digest}" in start["note"]
    kept = Path(start["note"].rsplit("kept in ", 1)[1])
    assert kept.read_bytes() == torn
    s.stop()
    assert audit.verify_file(s.audit_log, _audit_pub(s.lab), live=False)[0]


def _raw_request(s: Signer, header: dict[str, Any]) -> tuple[int, str, bytes]:
    """A request straight on the socket, as any process of the gateway's group can send it:
    the header as raw UTF-8 JSON (3 bytes on the wire for a character that the log escapes
    into 6), the body inline."""
    from signer import gateway, wire

    line = json.dumps({"v": wire.VERSION, "inline": True, **header},
                      ensure_ascii=False).encode() + b"\n"
    assert len(line) <= wire.MAX_LINE
    with gateway.connect(s.socket) as sock, sock.makefile("rb") as f:
        sock.sendall(line + wire.frame_header(1) + b"x" + wire.frame_header(0))
        return wire.read_reply(f)


@pytest.mark.control("SGN-05")
def test_an_odd_caller_name_cannot_make_the_log_cut_later_entries(make_signer: MakeSigner) -> None:
    """A caller name that escapes to more than a line's worth of JSON used to be logged raw
    (a 64 KiB+ deny line); the restart took it for a torn write and cut it and everything
    after it: here a signature and a custodian's freeze."""
    s: Signer = make_signer()
    odd = "\u00e9" * 30000  # 60 kB of UTF-8 on the wire, 180 kB once escaped
    code, message, _ = _raw_request(s, {"role": "client", "caller": odd, "cmd": "sign",
                                        "profile": "dev", "format": "raw", "name": ""})
    assert code == 64 and len(message) < 200, message
    assert s.gw("sign --profile dev --format raw", b"after the odd name").returncode == 0
    assert s.gw("freeze dev", client=None, custodian="alice").returncode == 0
    s.stop()
    assert max(len(line) for line in s.audit_log.read_bytes().splitlines()) < audit.MAX_LINE
    s.start()
    assert "note" not in s.events("start")[-1]
    assert len(s.events("sign")) == 1 and len(s.events("freeze")) == 1
    r = s.gw("sign --profile dev --format raw", b"still frozen")
    assert r.returncode == 77 and b"frozen" in r.stderr


def test_only_an_incomplete_last_line_counts_as_torn(tmp_path: Path) -> None:
    """A line without its newline that has entries after it is damage, not a torn write."""
    log = tmp_path / "audit.jsonl"
    lines = [audit.seal(audit.body(0, audit.GENESIS, "start", {"pid": 1}, audit.now_utc()))[1]]
    prev = json.loads(lines[0])["hash"]
    lines.append(audit.seal(audit.body(1, prev, "stop", {"pid": 1}, audit.now_utc()))[1])
    log.write_bytes(lines[0] + b"x" * (audit.MAX_LINE + 10) + b"\n" + lines[1])
    with pytest.raises(audit.ChainError, match="seq 1: entry longer than"):
        audit.scan(log, lambda _e, _v: None)
    log.write_bytes(lines[0] + lines[1][:-1])
    scan = audit.scan(log, lambda _e, _v: None)
    assert scan.torn == lines[1][:-1] and scan.end == len(lines[0]) and scan.seq == 0


def test_the_journal_escapes_caller_provided_strings(make_signer: MakeSigner) -> None:
    s: Signer = make_signer()
    _raw_request(s, {"role": "client", "caller": "x\nINFO sign forged-line", "cmd": "sign",
                     "profile": "dev", "format": "raw", "name": ""})
    s.stop()
    journal = s.log
    assert "deny client: bad caller name" in journal
    assert not any(line.startswith("INFO sign forged-line") for line in journal.splitlines())
    fmt = service.EscapingFormatter("%(levelname)s %(message)s")
    rec = logging.LogRecord("signerd", logging.INFO, __file__, 1, "deny %s: %s",
                            ("evil\nINFO forged", "a\u202eb"), None)
    assert fmt.format(rec) == "INFO deny evil\\nINFO forged: a\\u202eb"


# --- state only from what the audit key vouches for ----------------------------------------


def _renumber(lines: list[bytes]) -> list[bytes]:
    """Rewrite a log (entries removed) with fresh seq numbers and a recomputed chain: all an
    attacker without the audit key can do. Checkpoint signatures are kept as they were."""
    out: list[bytes] = []
    prev = audit.GENESIS
    for seq, line in enumerate(lines):
        new = _rehash(line, prev=prev, seq=seq)
        out.append(new)
        prev = json.loads(new)["hash"]
    return out


@pytest.mark.control("SGN-05")
def test_a_rewritten_log_with_an_entry_removed_is_refused_at_start(make_signer: MakeSigner) -> None:
    s: Signer = make_signer()
    assert s.gw("sign --profile dev --format raw", b"before").returncode == 0
    assert s.gw("freeze dev", client=None, custodian="alice").returncode == 0
    s.stop()
    lines = s.audit_log.read_bytes().splitlines(keepends=True)
    (freeze,) = [i for i, line in enumerate(lines) if json.loads(line)["event"] == "freeze"]
    s.audit_log.write_bytes(b"".join(_renumber(lines[:freeze] + lines[freeze + 1:])))
    assert audit.verify_file(s.audit_log, None, live=False, chain_only=True)[0]
    r = s.lab.signer("serve", "--config", s.config, timeout=20)
    assert r.returncode == 74
    err = one_line_error(r)
    assert "checkpoint signature does not verify with the audit key" in err, err


@pytest.mark.control("SGN-05")
def test_what_follows_the_last_checkpoint_is_quarantined(make_signer: MakeSigner) -> None:
    """Entries appended after the last checkpoint with a recomputed chain that can only make
    the signer stricter (a freeze) or change nothing (a denial): the daemon starts, believes
    the freeze, and notes the range as taken on unverified. (A tail with a thaw or a queued
    request stops it: tests/signer/test_integrity.py.)"""
    from tests.signer.test_approvals import _append_forged

    s: Signer = make_signer()
    assert s.gw("freeze dev", client=None, custodian="alice").returncode == 0
    s.stop()
    assert s.entries()[-1]["event"] == "checkpoint"
    seq = s.entries()[-1]["seq"] + 1
    _append_forged(s, {"event": "deny", "client": "build1", "reason": "x"},
                   {"event": "freeze", "profile": "rsa", "custodian": "bob", "reason": "x"})
    s.start()
    note = s.events("start")[-1]["note"]
    assert f"adopted seq {seq}..{seq + 1} after the last checkpoint" in note, note
    r = s.gw("sign --profile dev --format raw", b"x")
    assert r.returncode == 77 and b"frozen" in r.stderr
    assert s.gw("sign --profile rsa --format raw", b"x").returncode == 77


@pytest.mark.control("SGN-05")
def test_every_signature_is_vouched_for_by_a_checkpoint_before_it_is_released(
        signer: Signer) -> None:
    for i in range(3):
        assert signer.gw("sign --profile dev --format raw", b"a%d" % i).returncode == 0
        assert signer.entries()[-1]["event"] == "checkpoint"
    assert audit.verify_file(signer.audit_log, _audit_pub(signer.lab), live=True)[0]


# What a disk flush covers, recorded by the daemon itself: its os.fdatasync, slowed down like a
# busy disk's, writes the audit log's size to a side file once the real call has returned.
_SYNC_PROBE = """
import os, sys, time
real, probe = os.fdatasync, os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
def fdatasync(fd):
    time.sleep(0.02)
    real(fd)
    os.write(probe, b"%d\\n" % os.fstat(fd).st_size)
os.fdatasync = fdatasync
from signer.cli import main
sys.exit(main(["serve", "--config", sys.argv[2]]))
"""


@pytest.mark.control("SGN-05")
def test_no_signature_is_answered_before_its_audit_entry_is_on_disk(make_signer: Any) -> None:
    """Group commit and a token that signs while an entry is flushed must not change the
    order: each signature a client receives has its entry in what an fdatasync covered.
    (It fails when the writer's fdatasync runs behind the answer, e.g. in another thread.)"""
    import sys

    s: Signer = make_signer(start=False)
    synced = s.config.parent / "synced"
    s.lab.daemons[s.config] = subprocess.Popen(
        [sys.executable, "-c", _SYNC_PROBE, str(synced), str(s.config)], env=s.lab.env,
        stderr=(s.config.parent / "daemon.log").open("ab"))
    s.lab.wait_ready(s.config)
    early: list[str] = []
    answered = 0
    lock = threading.Lock()

    def client(k: int) -> None:
        nonlocal answered
        for i in range(12):
            code, message, sig = sign_over_socket(s.socket, "dev" if k % 2 else "rsa",
                                                  b"%d-%d" % (k, i), fmt="raw")
            assert code == 0, message
            digest = hashlib.sha256(sig).hexdigest()
            size = int(synced.read_text().split()[-1])
            with s.audit_log.open("rb") as f:
                on_disk = f.read(size)
            with lock:
                answered += 1
                if f'"sig_sha256":"{digest}"'.encode() not in on_disk:
                    early.append(digest)

    threads = [threading.Thread(target=client, args=(k,)) for k in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert answered == 72
    assert early == [], f"{len(early)} signatures answered before their entry was on disk"
    # and what was signed while a flush ran went out together in the next (group commit)
    flushes = len(synced.read_text().split())
    assert flushes < answered * 3 // 4, f"{flushes} disk flushes for {answered} signatures"


# --- fail closed ---------------------------------------------------------------------------


@pytest.mark.control("SGN-05")
@pytest.mark.parametrize("audit_key", ["no-such-key", "imported"])
def test_nothing_is_signed_without_a_resident_audit_key(make_signer: MakeSigner, audit_key: str
                                                        ) -> None:
    """A missing audit key, or one that is not resident (imported from outside the token):
    no checkpoint could vouch for a signature, so none is made (74, as for an unwritable
    log), and the refusal is logged."""
    s: Signer = make_signer(
        audit_key=f"pkcs11:token=signer;object={audit_key};type=private",
        profile_overrides={"imported": {"key": "pkcs11:token=signer;object=dev;type=private"}})
    for profile in ("dev", "release"):
        r = s.gw(f"sign --profile {profile} --format raw", b"artifact")
        assert r.returncode == 74, r.stderr
        assert "audit key" in one_line_error(r) and "fail closed" in r.stderr.decode()
    assert s.events("sign") == [] and s.events("queue") == []
    assert any(e.get("key", "").endswith(f"object={audit_key};type=private")
               for e in s.events("residency-failure"))


def _sign_until_refused(s: Signer, limit: int = 200) -> tuple[list[bytes],
                                                               subprocess.CompletedProcess[bytes]]:
    received: list[bytes] = []
    for i in range(limit):
        r = s.gw("sign --profile dev --format raw", b"artifact %d" % i) if i % 10 == 9 else None
        if r is None:
            code, message, payload = sign_over_socket(s.socket, "dev", b"artifact %d" % i,
                                                      fmt="raw")
            if code == 0:
                received.append(payload)
                continue
            assert code == 74 and payload == b"", message
            return received, s.gw("sign --profile dev --format raw", b"after")
        if r.returncode == 0:
            received.append(r.stdout)
            continue
        return received, r
    raise AssertionError("the audit log never filled up")


@pytest.mark.control("SGN-05")
def test_signing_fails_closed_when_the_audit_log_cannot_grow(make_signer: MakeSigner) -> None:
    """A file size limit makes every write past 6 kB fail (EFBIG), like a full disk."""
    s: Signer = make_signer(start=False)

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (6000, 6000))

    s.lab.start(s.config, preexec_fn=limit)
    received, refused = _sign_until_refused(s)
    assert received
    assert refused.returncode == 74
    assert "audit log" in one_line_error(refused) and "fail closed" in refused.stderr.decode()
    log = s.audit_log
    ok, message = audit.verify_file(log, _audit_pub(s.lab), live=True)
    assert ok, message
    signed = {e["sig_sha256"] for e in s.events("sign")}
    assert {hashlib.sha256(sig).hexdigest() for sig in received} == signed


@pytest.mark.control("SGN-05")
def test_signing_fails_closed_on_a_full_filesystem(make_signer: MakeSigner, tmp_path: Path) -> None:
    """The audit log on a 16 kB tmpfs (private mount namespace): ENOSPC refuses signatures."""
    if shutil.which("unshare") is None or subprocess.run(
            ["unshare", "-m", "true"], capture_output=True, check=False).returncode != 0:
        pytest.skip("cannot create a mount namespace here")
    logdir = tmp_path / "small-disk"
    logdir.mkdir()
    s: Signer = make_signer(start=False, audit_log=str(logdir / "audit.jsonl"))
    proc = subprocess.Popen(
        ["unshare", "-m", "--propagation", "private", "sh", "-c",
         'mount -t tmpfs -o size=16k tmpfs "$0" && exec "$@"', str(logdir),
         *_serve_argv(s)], env=s.lab.env, stderr=(s.config.parent / "daemon.log").open("ab"))
    s.lab.daemons[s.config] = proc
    try:
        s.lab.wait_ready(s.config)
    except RuntimeError as exc:
        if "mount" in str(exc) or "Operation not permitted" in s.log:
            pytest.skip("cannot mount a tmpfs here")
        raise
    received, refused = _sign_until_refused(s)
    assert received and refused.returncode == 74
    assert "No space left on device" in one_line_error(refused)
    inside = Path(f"/proc/{proc.pid}/root") / str(logdir / "audit.jsonl").lstrip("/")
    ok, message = audit.verify_file(inside, _audit_pub(s.lab), live=True)
    assert ok, message
    entries = [json.loads(line) for line in inside.read_text().splitlines()]
    assert {e["sig_sha256"] for e in entries if e["event"] == "sign"} == \
        {hashlib.sha256(sig).hexdigest() for sig in received}


def _serve_argv(s: Signer) -> list[str]:
    import sys

    return [sys.executable, "-m", "signer", "serve", "--config", str(s.config)]


# --- concurrency and crashes -------------------------------------------------------------


@pytest.mark.control("SGN-05")
def test_parallel_clients_all_get_valid_signatures_and_an_intact_log(signer: Signer) -> None:
    spki = certs.load_public_key(signer.lab.certs / "dev.pem")
    n = 32

    def one(i: int) -> tuple[int, bytes, bytes]:
        data = os.urandom(1000 + i)
        code, message, sig = sign_over_socket(signer.socket, "dev", data, fmt="cms")
        assert code == 0, message
        return code, data, sig

    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(one, range(n)))
    for _code, data, sig in results:
        cms.verify(hashlib.sha256(data).digest(), sig, spki)
    signer.stop()
    ok, message = audit.verify_file(signer.audit_log, certs.load_public_key(
        signer.lab.certs / "audit.pem"), live=False)
    assert ok, message
    seqs = [e["seq"] for e in signer.entries()]
    assert seqs == list(range(len(seqs)))
    assert len(signer.events("sign")) == n


@pytest.mark.control("SGN-05")
def test_kill_9_in_a_stream_of_requests_loses_no_released_signature(signer: Signer) -> None:
    received: list[bytes] = []
    stop = threading.Event()

    def client(k: int) -> None:
        i = 0
        while not stop.is_set():
            i += 1
            try:
                code, _m, sig = sign_over_socket(signer.socket, "dev", b"%d-%d" % (k, i),
                                                 fmt="raw")
            except Exception:
                continue
            if code == 0:
                received.append(sig)

    threads = [threading.Thread(target=client, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    time.sleep(0.8)
    signer.stop(signal.SIGKILL)
    time.sleep(0.1)
    stop.set()
    for t in threads:
        t.join()
    assert len(received) > 10
    signer.start()
    ok, message = audit.verify_file(signer.audit_log, _audit_pub(signer.lab), live=True)
    assert ok, message
    logged = {e["sig_sha256"] for e in signer.events("sign")}
    assert {hashlib.sha256(sig).hexdigest() for sig in received} <= logged
    signer.stop()
    ok, message = audit.verify_file(signer.audit_log, certs.load_public_key(
        signer.lab.certs / "audit.pem"), live=False)
    assert ok, message
