"""The audit log off the host (issue 15, AUD-04): the lab's collector keeps a copy that root on
the signing host cannot change, and `signer audit compare` shows what root did to the host's log.

The collector is rsyslog in the lab's collector namespace (lab/collector.py); the signing host
forwards each entry as it is written (rsyslog imfile -> RELP over mutual TLS, deployed by the
signer role). Signatures come from the build server's namespace, as in test_signer_e2e.

The two tampering tests change the host's live log as root would (with the forwarder stopped,
so that nothing of the forgery reaches the collector) and put back the exact bytes afterwards
(same file, same size: the forwarder's saved offset is right again and sends nothing twice);
the tests after these find the log as it was.
"""

from __future__ import annotations

import json
import secrets
import shlex
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from lab import collector
from lab.config import Instance
from lab.state import LabState
from lab.target import Party, Target
from signer.audit import seal

if TYPE_CHECKING:
    from tests.lab.conftest import AdminSsh, WaitFor

pytestmark = [pytest.mark.lab, pytest.mark.slow]

SIGNER = Path(__file__).resolve().parents[2] / ".venv" / "bin" / "signer"
CATCH_UP = 120  # seconds the forwarder may take to reconnect and send its queue (TCG guest)


@pytest.fixture(scope="module")
def inst(lab: LabState) -> Instance:
    return Instance(str(lab.raw["instance"]), lab.state_dir)


@pytest.fixture(scope="module")
def copy_path(lab: LabState) -> Path:
    return Path(lab.raw["collector"]["vm_copy"])


@pytest.fixture(scope="module")
def audit_log(target: Target) -> str:
    """The host's live audit log, where the inventory under test puts it."""
    return str(target.values["signer_audit_log"])


@pytest.fixture(scope="module")
def audit_cert(target: Target) -> Path:
    cert = target.token_dir / "audit.pem"
    if not cert.exists():
        pytest.fail(f"{cert} is missing: run `invoke deploy` with this inventory first")
    return cert


@pytest.fixture(scope="module")
def sign(lab: LabState, target: Target, signing: tuple[Party, str]) -> Callable[[int], None]:
    """`sign(n)`: n raw signatures for a build server of the inventory (its namespace, its key,
    its own account) on a profile that signs at once."""
    client, profile = signing
    opts = ["-o", f"UserKnownHostsFile={lab.state_dir / 'known_hosts'}",
            "-o", "StrictHostKeyChecking=yes", "-o", "IdentitiesOnly=yes",
            "-o", "BatchMode=yes", "-o", "ConnectTimeout=15", "-o", "LogLevel=ERROR",
            "-i", str(client.key)]

    def run(n: int) -> None:
        for _ in range(n):
            r = lab.netns_run(str(client.netns_host),
                              ["ssh", *opts, f"{target.account(client)}@{lab.vm_ipv4}", "sign",
                               "--profile", profile, "--format", "raw",
                               "--name", "collector-probe.bin", "--size", "256"],
                              input=secrets.token_bytes(256), timeout=90)
            assert r.returncode == 0, r.stderr.decode()

    return run


def _host_log(admin_ssh: AdminSsh, audit_log: str) -> list[str]:
    r = admin_ssh(f"cat {shlex.quote(audit_log)}", sudo=True)
    assert r.returncode == 0, r.stderr
    return r.stdout.splitlines()


def _copy(copy_path: Path) -> list[str]:
    return copy_path.read_text().splitlines() if copy_path.exists() else []


def _write(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines))
    return path


def _compare(local: Path, copy: Path, cert: Path) -> tuple[int, Any]:
    """`signer audit compare LOCAL COPY --cert CERT --json`: its exit status and its JSON."""
    r = subprocess.run([str(SIGNER), "audit", "compare", str(local), str(copy), "--cert", str(cert),
                        "--json"], capture_output=True, text=True, timeout=120)
    # 0 consistent, 1 LOCAL and COPY disagree, 3/4/5 empty, lagging copy, LOCAL's head missing;
    # 2 (usage, unreadable) is the one that says nothing about the logs
    assert r.returncode in (0, 1, 3, 4, 5), \
        f"compare: exit {r.returncode}: {r.stderr.strip()[-400:]}"
    return r.returncode, json.loads(r.stdout)


def _ints(obj: Any) -> set[int]:
    if isinstance(obj, bool):
        return set()
    if isinstance(obj, int):
        return {obj}
    if isinstance(obj, dict):
        return set().union(*(_ints(v) for v in obj.values())) if obj else set()
    if isinstance(obj, list):
        return set().union(*(_ints(v) for v in obj)) if obj else set()
    return set()


def _seq(line: str) -> int:
    return int(json.loads(line)["seq"])


def _fold(copy: list[str]) -> list[str]:
    """The copy with RELP's resends folded: after a broken session the forwarder sends again
    what it had not seen acknowledged, so an entry can arrive twice, byte for byte (Decision 8).
    A different line under a sequence number already held is not a resend: it fails here."""
    held: dict[int, str] = {}
    for line in copy:
        seq = _seq(line)
        assert held.setdefault(seq, line) == line, f"seq {seq} arrived twice, differently"
    return [held[seq] for seq in sorted(held)]


def _caught_up(admin_ssh: AdminSsh, audit_log: str, copy_path: Path,
               wait_for: WaitFor) -> list[str]:
    """The host's log once the collector holds its latest entry."""
    lines = _host_log(admin_ssh, audit_log)
    assert lines, "the host's audit log is empty"
    assert wait_for(lambda: lines[-1] in _copy(copy_path), timeout=CATCH_UP), (
        f"the collector never got the host's latest entry (seq {_seq(lines[-1])})")
    return lines


@pytest.fixture
def tamper(target: Target, admin_ssh: AdminSsh,
           audit_log: str) -> Iterator[Callable[[list[str]], None]]:
    """`tamper(lines)`: the host's log becomes these lines, as root would make it, with the
    forwarder stopped; afterwards the bytes it had at that moment go back and the forwarder
    starts again."""
    saved: list[str] = []

    def put(text: str) -> None:
        # The text reaches the host as the admin's own file (sudo's standard input carries its
        # password where the inventory has one), then root writes it in place: the same inode
        # that the daemon and the forwarder hold, never a new file.
        staged = "/tmp/signlab-audit-forgery"
        r = subprocess.run([*target.admin_argv(), f"umask 077; cat > {staged}"], input=text,
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        r = admin_ssh(f"cat {staged} > {shlex.quote(audit_log)} && rm -f {staged}", sudo=True)
        assert r.returncode == 0, r.stderr

    def forge(lines: list[str]) -> None:
        assert not saved, "one forgery per test"
        original = admin_ssh(f"cat {shlex.quote(audit_log)}", sudo=True)
        assert original.returncode == 0 and original.stdout, original.stderr
        # The socket too: journald forwards to it and would start rsyslog again mid-forgery.
        stopped = admin_ssh("systemctl stop syslog.socket rsyslog.service", sudo=True)
        assert stopped.returncode == 0, stopped.stderr
        saved.append(original.stdout)
        put("".join(line + "\n" for line in lines))

    try:
        yield forge
    finally:
        if saved:
            put(saved[0])
            assert admin_ssh(f"cat {shlex.quote(audit_log)}", sudo=True).stdout == saved[0]
            started = admin_ssh("systemctl start rsyslog.service", sudo=True)
            assert started.returncode == 0, started.stderr


@pytest.mark.control("AUD-04", "SGN-05")
def test_a_log_cut_right_after_a_checkpoint_is_caught_by_the_collectors_copy(
        sign: Callable[[int], None], admin_ssh: AdminSsh, audit_log: str, wait_for: WaitFor,
        tamper: Callable[[list[str]], None], copy_path: Path, audit_cert: Path,
        tmp_path: Path) -> None:
    # The newest entries of the host's log: ..., sign, checkpoint, sign, checkpoint.
    sign(2)
    lines = _caught_up(admin_ssh, audit_log, copy_path, wait_for)
    events = [json.loads(line)["event"] for line in lines]
    assert events[-4:] == ["sign", "checkpoint", "sign", "checkpoint"], events[-6:]
    cut = lines[:-2]  # right after a checkpoint: the last signature and its checkpoint are gone
    tamper(cut)
    local = _write(tmp_path / "host.jsonl", _host_log(admin_ssh, audit_log))
    assert local.read_text().splitlines() == cut
    # On its own the cut log is a valid, shorter log: the audit key vouches for its last entry.
    alone = subprocess.run([str(SIGNER), "audit", "verify", str(local), "--cert", str(audit_cert)],
                           capture_output=True, text=True, timeout=120)
    assert alone.returncode == 0, alone.stdout + alone.stderr
    # Against the collector's copy it is not.
    copy = _write(tmp_path / "copy.jsonl", _copy(copy_path))
    status, report = _compare(local, copy, audit_cert)
    assert status == 1, report
    assert "truncat" in json.dumps(report).lower(), report
    assert _seq(lines[-2]) in _ints(report), (f"the first missing entry is seq {_seq(lines[-2])}",
                                              report)


@pytest.mark.control("AUD-04", "SGN-05")
def test_a_tail_rewritten_with_a_valid_chain_is_caught_at_its_first_sequence_number(
        sign: Callable[[int], None], admin_ssh: AdminSsh, audit_log: str, wait_for: WaitFor,
        tamper: Callable[[list[str]], None], copy_path: Path, audit_cert: Path,
        tmp_path: Path) -> None:
    sign(1)
    lines = _caught_up(admin_ssh, audit_log, copy_path, wait_for)
    entries = [json.loads(line) for line in lines]
    assert entries[-2]["event"] == "sign", entries[-2]
    # Root hides what was signed last: another name, and every hash from there on made again.
    first = len(entries) - 2
    forged = lines[:first]
    prev = entries[first - 1]["hash"]
    for entry in entries[first:]:
        body = {k: v for k, v in entry.items() if k != "hash"}
        if body["event"] == "sign":
            body["name"] = "harmless.bin"
        body["prev"] = prev
        sealed, line = seal(body)
        prev = sealed["hash"]
        forged.append(line.decode().rstrip("\n"))
    tamper(forged)
    local = _write(tmp_path / "host.jsonl", _host_log(admin_ssh, audit_log))
    assert local.read_text().splitlines() == forged
    chain = subprocess.run([str(SIGNER), "audit", "verify", str(local), "--chain-only"],
                           capture_output=True, text=True, timeout=120)
    assert chain.returncode == 0, chain.stdout + chain.stderr  # a valid chain: only the copy knows
    copy = _write(tmp_path / "copy.jsonl", _copy(copy_path))
    status, report = _compare(local, copy, audit_cert)
    assert status == 1, report
    assert "rewrit" in json.dumps(report).lower(), report
    assert entries[first]["seq"] in _ints(report), (f"the first rewritten entry is seq "
                                                    f"{entries[first]['seq']}", report)


@pytest.mark.control("AUD-04")
def test_entries_signed_while_the_collector_is_down_arrive_complete_and_in_order(
        inst: Instance, sign: Callable[[int], None], admin_ssh: AdminSsh, audit_log: str,
        copy_path: Path, audit_cert: Path, wait_for: WaitFor, tmp_path: Path) -> None:
    before = _caught_up(admin_ssh, audit_log, copy_path, wait_for)
    assert collector.stop(inst) is not None, "the lab's collector was not running"
    try:
        sign(3)  # signing goes on: the daemon's own log is the record, the forwarder queues
        during = _host_log(admin_ssh, audit_log)
        assert len(during) > len(before)
        assert during[-1] not in _copy(copy_path)  # nothing can have arrived: no collector
    finally:
        collector.start(inst)
    assert wait_for(lambda: during[-1] in _copy(copy_path), timeout=CATCH_UP), (
        f"the collector did not catch up to seq {_seq(during[-1])} within {CATCH_UP}s")
    copied = _copy(copy_path)
    held = _fold(copied)
    seqs = [_seq(line) for line in held]
    # In order, nothing missing: every entry of the outage, exactly as written.
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), "gaps or reordering"
    new = len(during) - len(before)
    assert held[-new:] == during[-new:]
    local = _write(tmp_path / "host.jsonl", during)
    status, report = _compare(local, _write(tmp_path / "copy.jsonl", copied), audit_cert)
    assert status == 0, report
