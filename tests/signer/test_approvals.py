"""M-of-N approvals of the exact digest, with OpenSSH signatures (`ssh-keygen -Y`)."""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.signer.conftest import MakeSigner, Signer, one_line_error
from tests.signer.test_sign import openssl_cms_verify


def ssh_sign(key: Path, message: bytes, namespace: str = "signer-approval") -> bytes:
    return subprocess.run(["ssh-keygen", "-Y", "sign", "-f", str(key), "-n", namespace],
                          input=message, capture_output=True, check=True).stdout


def queue(s: Signer, data: bytes, name: str = "app.bin") -> str:
    r = s.gw(f"sign --profile release --name {name}", data)
    assert r.returncode == 75, r.stderr
    assert r.stdout == b""
    match = re.search(rb"queued ([0-9a-f]{32})", r.stderr)
    assert match, r.stderr
    return match.group(1).decode()


def statement(s: Signer, custodian: str, rid: str) -> bytes:
    r = s.gw("requests", custodian=custodian)
    assert r.returncode == 0, r.stderr
    items = [json.loads(line) for line in r.stdout.splitlines()]
    (item,) = [i for i in items if i["id"] == rid]
    return str(item["statement"]).encode()


def approve(s: Signer, custodian: str, rid: str, key_of: str | None = None,
            message: bytes | None = None, namespace: str = "signer-approval"
            ) -> Any:
    key = s.lab.custodian_keys[key_of or custodian]
    sig = ssh_sign(key, message if message is not None else statement(s, custodian, rid),
                   namespace)
    return s.gw(f"approve {rid}", sig, custodian=custodian)


@pytest.mark.control("SGN-04")
def test_release_needs_two_distinct_custodians(signer: Signer, tmp_path: Path) -> None:
    data = os.urandom(4096)
    rid = queue(signer, data)
    st = json.loads(signer.gw(f"status {rid}").stdout)
    assert st["state"] == "pending" and st["required"] == 2
    assert st["sha256"] == hashlib.sha256(data).hexdigest() and st["size"] == len(data)
    text = statement(signer, "alice", rid).decode()
    assert text == (f"signer-approval-v2\nid={rid}\nprofile=release\nclient=build1\n"
                    f"sha256={hashlib.sha256(data).hexdigest()}\nsize={len(data)}\n"
                    f'name="app.bin"\nrequested={st["requested"]}\nexpires={st["expires"]}\n')

    assert approve(signer, "alice", rid).returncode == 0
    r = signer.gw(f"fetch {rid}")
    assert r.returncode == 75 and "1 of 2" in r.stderr.decode() and r.stdout == b""
    # The same custodian again counts once.
    r = approve(signer, "alice", rid)
    assert r.returncode == 0 and b"counts once" in r.stderr
    assert signer.gw(f"fetch {rid}").returncode == 75

    assert approve(signer, "bob", rid).returncode == 0
    r = signer.gw(f"fetch {rid}")
    assert r.returncode == 0, r.stderr
    art, sig = tmp_path / "app.bin", tmp_path / "app.p7s"
    art.write_bytes(data)
    sig.write_bytes(r.stdout)
    assert openssl_cms_verify(art, sig, signer.lab.certs / "release.pem").returncode == 0
    # A lost connection can fetch the same signature again; it is signed (and logged) once.
    assert signer.gw(f"fetch {rid}").stdout == r.stdout
    assert json.loads(signer.gw(f"status {rid}").stdout)["state"] == "signed"
    (entry,) = signer.events("sign")
    assert entry["request"] == rid
    assert entry["sig_sha256"] == hashlib.sha256(r.stdout).hexdigest()
    assert {e["custodian"] for e in signer.events("approve")} == {"alice", "bob"}


@pytest.mark.control("SGN-04")
@pytest.mark.parametrize("forgery", ["other request", "other namespace", "other key",
                                     "not a signature"])
def test_bad_approval_signatures_are_refused(shared: Signer, forgery: str) -> None:
    rid = queue(shared, os.urandom(64))
    other = queue(shared, os.urandom(64))
    if forgery == "other request":
        r = approve(shared, "alice", rid, message=statement(shared, "alice", other))
    elif forgery == "other namespace":
        r = approve(shared, "alice", rid, namespace="git")
    elif forgery == "other key":
        r = approve(shared, "alice", rid, key_of="carol")
    else:
        r = shared.gw(f"approve {rid}", b"-----BEGIN SSH SIGNATURE-----\nAAAA\n"
                      b"-----END SSH SIGNATURE-----\n", custodian="alice")
    assert r.returncode == 65
    assert "does not verify" in one_line_error(r)
    assert json.loads(shared.gw(f"status {rid}").stdout)["approvals"] == []


@pytest.mark.control("SGN-04")
def test_custodian_not_listed_for_the_profile_cannot_approve(shared: Signer) -> None:
    rid = queue(shared, b"data")
    r = approve(shared, "mallory", rid, message=b"anything")
    assert r.returncode == 77
    assert "may not approve" in one_line_error(r)
    assert shared.gw("requests", custodian="mallory").stdout == b""


@pytest.mark.control("SGN-02", "SGN-04")
def test_another_client_cannot_see_or_fetch_a_request(shared: Signer) -> None:
    rid = queue(shared, b"data")
    for cmd in (f"status {rid}", f"fetch {rid}"):
        r = shared.gw(cmd, client="build2")
        assert r.returncode == 64
        assert "no request" in one_line_error(r)


@pytest.mark.control("SGN-04")
def test_approvals_survive_a_restart(signer: Signer) -> None:
    rid = queue(signer, b"data")
    assert approve(signer, "alice", rid).returncode == 0
    signer.stop()
    signer.start()
    assert signer.gw(f"fetch {rid}").returncode == 75
    assert approve(signer, "carol", rid).returncode == 0
    assert signer.gw(f"fetch {rid}").returncode == 0


def _fake_ssh(tmp_path: Path, s: Signer) -> str:
    """An `ssh` for the client wrappers: `fake-ssh USER@HOST COMMAND` runs the gateway as the
    forced command of account USER (custodians are known by name)."""
    script = tmp_path / "fake-ssh"
    custodians = ",".join(s.lab.custodian_keys)
    script.write_text(f"""#!{sys.executable}
import os, sys
user, command = sys.argv[1].split("@")[0], sys.argv[2]
role = "--custodian" if user in "{custodians}".split(",") else "--client"
os.environ["SSH_ORIGINAL_COMMAND"] = command
os.execv(sys.executable, [sys.executable, "-m", "signer", "gateway", role, user,
                          "--config", "{s.config}"])
""")
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return str(script)


@pytest.mark.control("SGN-04")
def test_submit_and_approve_wrappers_over_ssh(signer: Signer, tmp_path: Path) -> None:
    ssh = _fake_ssh(tmp_path, signer)
    art = tmp_path / "release.bin"
    art.write_bytes(os.urandom(2048))
    out = tmp_path / "release.bin.p7s"
    waiting = subprocess.Popen(
        [sys.executable, "-m", "signer", "submit", "--host", "build1@signer", "--profile",
         "release", "--wait", "--poll", "0.2", "--ssh", ssh, str(art)],
        env=signer.lab.env, stderr=subprocess.PIPE)
    try:
        rid = None
        for _ in range(100):
            items = signer.gw("requests", custodian="alice").stdout.splitlines()
            if items:
                rid = json.loads(items[0])["id"]
                break
            time.sleep(0.1)
        assert rid is not None
        wrong = tmp_path / "other.bin"
        wrong.write_bytes(b"not it")
        r = signer.lab.signer("approve", "--host", "alice@signer", "--key",
                              signer.lab.custodian_keys["alice"], "--artifact", wrong, "--yes",
                              "--ssh", ssh, rid)
        assert r.returncode == 65 and b"not the artifact" in r.stderr
        for who in ("alice", "bob"):
            r = signer.lab.signer("approve", "--host", f"{who}@signer", "--key",
                                  signer.lab.custodian_keys[who], "--artifact", art, "--yes",
                                  "--ssh", ssh, rid)
            assert r.returncode == 0, r.stderr
            assert f"id={rid}".encode() in r.stdout
        assert waiting.wait(timeout=30) == 0
    finally:
        waiting.kill()
        waiting.wait()
    v = signer.lab.signer("verify", "--format", "cms", "--cert",
                          signer.lab.certs / "release.pem", art, out)
    assert v.returncode == 0, v.stdout
    r = signer.lab.signer("submit", "--host", "build1@signer", "--profile", "dev", "--format",
                          "raw", "--ssh", ssh, art)
    assert r.returncode == 0, r.stderr
    v = signer.lab.signer("verify", "--format", "raw", "--cert", signer.lab.certs / "dev.pem",
                          art, tmp_path / "release.bin.sig")
    assert v.returncode == 0, v.stdout


def _append_forged(s: Signer, *fields: dict[str, Any]) -> None:
    """What anyone who can write the log at rest can do without a key: append entries with a
    correctly recomputed hash chain."""
    from signer import audit

    last = s.entries()[-1]
    seq, prev = last["seq"], last["hash"]
    with s.audit_log.open("ab") as f:
        for extra in fields:
            seq += 1
            entry, line = audit.seal(audit.body(seq, prev, extra.pop("event"), extra,
                                                audit.now_utc()))
            prev = entry["hash"]
            f.write(line)


@pytest.mark.control("SGN-04", "SGN-05")
def test_a_forged_approve_entry_does_not_release_a_release_signature(signer: Signer) -> None:
    rid = queue(signer, b"release artifact")
    assert approve(signer, "alice", rid).returncode == 0
    genuine = signer.events("approve")[-1]
    signer.stop()
    forged = {k: v for k, v in genuine.items() if k not in ("seq", "time", "prev", "hash")}
    # bob: an approve entry without a signature; carol: alice's genuine signature as hers
    _append_forged(signer, {**forged, "custodian": "bob", "approval": None},
                   {**forged, "custodian": "carol"})
    # approvals that nothing vouches for stop the daemon, until an operator adopts them ...
    r = signer.lab.signer("serve", "--config", signer.config, timeout=30)
    assert r.returncode == 74 and b"approve seq" in r.stderr, r.stderr
    seqs = f"{signer.entries()[-2]['seq']}-{signer.entries()[-1]['seq']}"
    assert signer.lab.signer("audit", "adopt", "--config", signer.config, "--seqs", seqs,
                             "--operator", "ops1").returncode == 0
    # ... and even then an approval counts only with its custodian's signature
    signer.start()
    r = signer.gw(f"fetch {rid}")
    assert r.returncode == 75 and r.stdout == b"", r.stderr
    assert "1 of 2 (alice)" in r.stderr.decode()
    assert signer.events("sign") == []
    assert "carol on " + rid in signer.events("start")[-1]["note"]
    # the genuine approvals still work: a second real custodian releases it
    assert approve(signer, "bob", rid).returncode == 0
    assert signer.gw(f"fetch {rid}").returncode == 0


@pytest.mark.control("SGN-04", "SGN-05")
def test_an_approval_counts_after_a_restart_only_with_its_signature(signer: Signer) -> None:
    """The approve entry keeps the custodian's SSH signature and a restart verifies it again;
    one whose custodian key is no longer configured does not count."""
    rid = queue(signer, b"data")
    assert approve(signer, "alice", rid).returncode == 0
    entry = signer.events("approve")[-1]
    assert entry["approval"].startswith("-----BEGIN SSH SIGNATURE-----")
    signer.stop()
    text = signer.config.read_text()
    alice = signer.lab.custodian_pubs["alice"]
    signer.lab.custodian("alice-new-key")
    signer.config.write_text(text.replace(alice, signer.lab.custodian_pubs["alice-new-key"]))
    signer.start()
    st = json.loads(signer.gw(f"status {rid}").stdout)
    assert st["approvals"] == [], st


@pytest.mark.control("SGN-04")
def test_queued_requests_are_limited_per_client_and_profile(make_signer: MakeSigner) -> None:
    s: Signer = make_signer(profile_overrides={"release": {"max_queued": 2}})
    queue(s, b"one")
    queue(s, b"two")
    r = s.gw("sign --profile release --format raw", b"three")
    assert r.returncode == 77 and "at most 2" in one_line_error(r)
    assert len(s.events("queue")) == 2
    assert s.events("deny")[-1]["reason"].endswith("too many queued requests")


@pytest.mark.control("SGN-04")
def test_a_fetch_racing_the_signing_never_answers_no_longer_stored(signer: Signer) -> None:
    """Several fetches of a request the moment it is approved: each gets the signature or
    'being signed, fetch again', never 'signed but no longer stored'."""
    from concurrent.futures import ThreadPoolExecutor

    from signer import gateway, wire

    def fetch(rid: str) -> tuple[int, str, bytes]:
        with gateway.connect(signer.socket) as sock:
            return gateway.exchange(sock, {"v": wire.VERSION, "role": "client",
                                           "caller": "build1", "cmd": "fetch", "id": rid},
                                    None, None)

    for i in range(6):
        rid = queue(signer, b"race %d" % i)
        assert approve(signer, "alice", rid).returncode == 0
        assert approve(signer, "bob", rid).returncode == 0
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(fetch, [rid] * 16))
        assert all(code in (0, 75) for code, _m, _p in answers), answers
        assert not any("no longer stored" in m for _c, m, _p in answers)
        sigs = {p for code, _m, p in answers if code == 0}
        assert len(sigs) == 1 and len(signer.events("sign")) == i + 1


@pytest.mark.control("SGN-04")
def test_an_expired_request_is_not_signed_whatever_its_approvals_after_a_restart_too(
        make_signer: MakeSigner) -> None:
    """The statement carries the request's time and expiry; once it has passed, approvals
    given in time do not release it, and a restart does not revive it."""
    from signer import audit

    s: Signer = make_signer(profile_overrides={"release": {"request_ttl": 15}})
    rid = queue(s, b"expiring")
    text = statement(s, "alice", rid).decode()
    st = json.loads(s.gw(f"status {rid}").stdout)
    assert f"requested={st['requested']}\nexpires={st['expires']}\n" in text
    assert text.startswith("signer-approval-v2\n")
    assert approve(s, "alice", rid).returncode == 0
    assert approve(s, "bob", rid).returncode == 0
    time.sleep(max(0.0, audit.parse_time(st["expires"]) - time.time()) + 0.5)
    for _ in range(2):
        r = s.gw(f"fetch {rid}")
        assert r.returncode == 77 and "expired" in one_line_error(r)
        assert json.loads(s.gw(f"status {rid}").stdout)["state"] == "expired"
        assert s.gw("requests", custodian="carol").stdout == b""
        s.stop()
        s.start()
    assert s.events("sign") == []


@pytest.mark.control("SGN-04")
def test_a_client_cancels_and_a_custodian_rejects(signer: Signer) -> None:
    rid = queue(signer, b"cancel me")
    text = statement(signer, "alice", rid)
    assert signer.gw(f"cancel {rid}", client="build2").returncode == 64  # not its request
    assert signer.gw(f"cancel {rid}").returncode == 0
    assert json.loads(signer.gw(f"status {rid}").stdout)["state"] == "cancelled"
    r = approve(signer, "alice", rid, message=text)
    assert r.returncode == 77 and "cancelled" in one_line_error(r)
    assert signer.gw(f"fetch {rid}").returncode == 77

    rid = queue(signer, b"reject me")
    assert approve(signer, "alice", rid).returncode == 0
    assert signer.gw(f"reject {rid}", custodian="mallory").returncode == 64  # not of release
    assert signer.gw(f"reject {rid}", custodian="bob").returncode == 0
    items = [json.loads(line) for line in signer.gw("requests", custodian="carol")
             .stdout.splitlines()]
    assert [(i["id"], i["state"], i["rejected_by"]) for i in items] == [(rid, "rejected", "bob")]
    r = signer.gw(f"fetch {rid}")
    assert r.returncode == 77 and "bob rejected" in one_line_error(r)
    signer.stop()
    signer.start()
    assert json.loads(signer.gw(f"status {rid}").stdout)["state"] == "rejected"
    assert [e["custodian"] for e in signer.events("reject")] == ["bob"]
    assert len(signer.events("cancel")) == 1 and signer.events("sign") == []
