"""Signer integrity, round 2 (issue 24): what a start-up believes of a log the daemon did not
verify, roll-back without the key, the clock, and the memory a compressed segment costs."""

from __future__ import annotations

import gzip
import itertools
import json
import shutil
import subprocess
import sys
import tracemalloc
from pathlib import Path
from typing import Any

import pytest

from signer import audit, certs
from tests.signer.conftest import MakeSigner, Signer, until
from tests.signer.test_approvals import _append_forged, approve, queue
from tests.signer.test_audit import _rehash
from toolkit.local_signer import Lab


def _lines(s: Signer) -> list[bytes]:
    return s.audit_log.read_bytes().splitlines(keepends=True)


def _event_index(lines: list[bytes], event: str, **fields: Any) -> int:
    (i,) = [i for i, line in enumerate(lines) if json.loads(line)["event"] == event
            and all(json.loads(line).get(k) == v for k, v in fields.items())]
    return i


def _next_checkpoint(lines: list[bytes], after: int) -> int:
    return next(i for i in range(after + 1, len(lines))
                if json.loads(lines[i])["event"] == "checkpoint")


def _rechain_from(kept: list[bytes], rest: list[bytes]) -> list[bytes]:
    """`kept` as it was, then `rest` renumbered after it with a recomputed chain: all an
    attacker without the audit key can do to a tail."""
    out = list(kept)
    last = json.loads(out[-1])
    seq, prev = last["seq"], last["hash"]
    for line in rest:
        seq += 1
        new = _rehash(line, prev=prev, seq=seq)
        out.append(new)
        prev = json.loads(new)["hash"]
    return out


def _refused(s: Signer) -> str:
    """`signer serve` exits 74; its last line (the journal's) says why."""
    r = s.lab.signer("serve", "--config", s.config, timeout=30)
    assert r.returncode == 74, r.stderr
    assert r.stdout == b"" and b"Traceback" not in r.stderr
    last = r.stderr.decode().splitlines()[-1]
    assert last.startswith("signer: ")
    return last


def _verify(s: Signer) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "signer", "audit", "verify", str(s.audit_log),
                           "--cert", str(s.lab.certs / "audit.pem")],
                          capture_output=True, text=True, env=s.lab.env, check=False)


def _adopt(s: Signer, seqs: str, operator: str = "ops1") -> subprocess.CompletedProcess[bytes]:
    return s.lab.signer("audit", "adopt", "--config", s.config, "--seqs", seqs,
                        "--operator", operator)


def _snapshots(s: Signer) -> Path:
    return s.config.parent / "state" / "checkpoints"


# --- never certify what the daemon did not verify (point 1) ---------------------------------


def _rewrite_tail(s: Signer) -> tuple[int, int]:
    """Two signatures, a freeze of `rsa` by a custodian, a third signature, stop; then the
    tail after the first signature's checkpoint rewritten without the freeze and without
    the later checkpoints (their signatures would no longer verify). Returns the range of
    the rewritten tail."""
    for i in range(2):
        assert s.gw("sign --profile dev --format raw", b"a%d" % i).returncode == 0
    assert s.gw("freeze rsa", client=None, custodian="alice").returncode == 0
    assert s.gw("sign --profile dev --format raw", b"a2").returncode == 0
    s.stop()
    lines = _lines(s)
    keep = _next_checkpoint(lines, next(i for i, ln in enumerate(lines)
                                    if json.loads(ln)["event"] == "sign"))
    rest = [ln for ln in lines[keep + 1:]
            if json.loads(ln)["event"] not in ("checkpoint", "freeze")]
    s.audit_log.write_bytes(b"".join(_rechain_from(lines[:keep + 1], rest)))
    return keep + 1, keep + len(rest)


@pytest.mark.control("SGN-05")
def test_a_rewritten_tail_is_refused_while_the_state_remembers_more(
        make_signer: MakeSigner) -> None:
    """The freeze is gone from the rewritten log, but the state directory keeps the snapshot
    of the state checkpoint written after it (and at stop): the log was cut or rewritten."""
    s: Signer = make_signer()
    _rewrite_tail(s)
    err = _refused(s)
    assert "the state directory holds the snapshot of checkpoint seq" in err, err
    assert "roll-back" in err


@pytest.mark.control("SGN-05")
def test_a_tail_taken_on_unverified_is_never_certified_until_adopted(
        make_signer: MakeSigner) -> None:
    """The same rewrite with the snapshots deleted too: the tail is short and holds nothing
    permissive, so the daemon starts on it, but its checkpoints record the range as adopted
    unverified, `audit verify --cert` fails naming it, and passes once an operator adopts
    it (named in the log and in verify's answer)."""
    s: Signer = make_signer()
    first, last = _rewrite_tail(s)
    shutil.rmtree(_snapshots(s))
    s.start()
    assert f"adopted seq {first}..{last} after the last checkpoint" in \
        s.events("start")[-1]["note"]
    assert s.gw("sign --profile dev --format raw", b"after").returncode == 0
    s.stop()
    marked = [e for e in s.entries() if e["event"] == "checkpoint" and "unverified" in e]
    assert [e["unverified"] for e in marked] == [[first, last]]
    assert all(e["interval"] == 1000 for e in s.entries() if e["event"] == "checkpoint"
               and e["seq"] > last)
    r = _verify(s)
    assert r.returncode == 1, r.stdout
    assert f"no checkpoint vouches for seq {first}..{last}" in r.stdout, r.stdout
    # a second start, from the snapshot of the stop checkpoint, does not make it verified
    s.start()
    s.stop()
    assert _verify(s).returncode == 1
    r2 = _adopt(s, f"{first}-{last}")
    assert r2.returncode == 0, r2.stderr
    adopt = s.events("adopt")[-1]
    assert (adopt["operator"], adopt["first"], adopt["last"]) == ("ops1", first, last)
    r = _verify(s)
    assert r.returncode == 0, r.stdout
    assert f"seq {first}..{last} adopted after review by ops1" in r.stdout


@pytest.mark.control("SGN-05")
def test_a_tail_that_would_thaw_stops_the_daemon_until_an_operator_adopts_it(
        make_signer: MakeSigner) -> None:
    """A forged thaw after the last checkpoint: the daemon does not start, naming the range;
    deleting the snapshots (a replay further back) changes nothing; an operator's adoption
    (which needs the token PIN) is logged with who and which seqs, and only then is the thaw
    believed."""
    s: Signer = make_signer()
    assert s.gw("freeze dev", client=None, custodian="alice").returncode == 0
    s.stop()
    seq = s.entries()[-1]["seq"] + 1
    _append_forged(s, {"event": "thaw", "profile": "dev", "custodian": "alice"})
    err = _refused(s)
    assert f"seq {seq}..{seq} after the last checkpoint (seq {seq - 1})" in err, err
    assert f"thaw seq {seq}" in err and f"--seqs {seq}-{seq}" in err
    shutil.rmtree(_snapshots(s))
    assert f"thaw seq {seq}" in _refused(s)
    assert _adopt(s, f"0-{seq}").returncode == 64  # only the tail itself
    r = _adopt(s, f"{seq}-{seq}")
    assert r.returncode == 0, r.stderr
    s.start()
    assert s.gw("sign --profile dev --format raw", b"thawed").returncode == 0
    s.stop()
    r2 = _verify(s)
    assert r2.returncode == 0 and f"seq {seq}..{seq} adopted after review by ops1" in r2.stdout


@pytest.mark.control("SGN-05")
def test_a_tail_longer_than_the_checkpoint_interval_stops_the_daemon(
        make_signer: MakeSigner) -> None:
    """Denials change no state, but more of them than the interval (recorded in the
    checkpoints) allows without a checkpoint cannot be the daemon's own tail."""
    s: Signer = make_signer(checkpoint_interval=4)
    assert s.gw("sign --profile dev --format raw", b"x").returncode == 0
    s.stop()
    assert s.entries()[-1]["interval"] == 4
    seq = s.entries()[-1]["seq"] + 1
    _append_forged(s, *({"event": "deny", "client": "build1", "reason": "x"}
                        for _ in range(5)))
    err = _refused(s)
    assert f"seq {seq}..{seq + 4}" in err and "more than the checkpoint interval in force (4)" \
        in err, err


# --- roll-back without the key (point 2) -----------------------------------------------------


@pytest.mark.control("SGN-05")
def test_a_log_cut_after_two_approvals_dropping_a_reject_is_refused(
        make_signer: MakeSigner) -> None:
    """Cut right after the checkpoint that follows the second approval: a valid, shorter log
    in which the request is approved and not rejected (it would sign)."""
    s: Signer = make_signer()
    rid = queue(s, b"release me")
    assert approve(s, "alice", rid).returncode == 0
    assert approve(s, "bob", rid).returncode == 0
    assert s.gw(f"reject {rid}", client=None, custodian="carol").returncode == 0
    s.stop()
    lines = _lines(s)
    cut = _next_checkpoint(lines, _event_index(lines, "approve", custodian="bob"))
    s.audit_log.write_bytes(b"".join(lines[:cut + 1]))
    assert audit.verify_file(s.audit_log, certs.load_public_key(s.lab.certs / "audit.pem"),
                             live=False)[0]
    err = _refused(s)
    assert "the log was cut" in err, err


@pytest.mark.control("SGN-05")
def test_an_earlier_checkpoint_appended_at_the_end_is_refused(make_signer: MakeSigner) -> None:
    """The last state checkpoint before a freeze, its snapshot still kept, copied to the end:
    start-up reads backwards and would begin there, forgetting the freeze after it."""
    s: Signer = make_signer()
    assert s.gw("sign --profile dev --format raw", b"x").returncode == 0
    assert s.gw("freeze dev", client=None, custodian="alice").returncode == 0
    s.stop()
    lines = _lines(s)
    freeze = _event_index(lines, "freeze")
    early = next(ln for ln in reversed(lines[:freeze]) if "state" in json.loads(ln))
    assert (_snapshots(s) / f"{json.loads(early)['seq']:012d}.json").exists()
    with s.audit_log.open("ab") as f:
        f.write(early)
    err = _refused(s)
    assert "does not follow the entry before it" in err, err


@pytest.mark.control("SGN-05")
def test_a_deleted_log_with_its_snapshots_left_is_refused(make_signer: MakeSigner) -> None:
    s: Signer = make_signer()
    assert s.gw("freeze dev", client=None, custodian="alice").returncode == 0
    s.stop()
    s.audit_log.unlink()
    err = _refused(s)
    assert "the log is empty, but the state directory holds the snapshot" in err, err

# --- compressed segments are read as streams -------------------------------------------------


def test_a_compressed_segment_costs_bounded_memory_at_start(lab: Lab, tmp_path: Path) -> None:
    """A 52 KB `.gz` segment of repeated state-checkpoint lines (about 12 MB once inflated, as
    a crafted or very repetitive segment compresses) with a snapshot for them: the search for
    the last state checkpoint keeps one line, not every candidate (it cost 15 MiB here before,
    and grows with the inflated size)."""
    _, line = audit.seal(audit.body(1, audit.GENESIS, "checkpoint",
                                    {"state": "00" * 32, "sig": "A" * 96},
                                    "2026-01-01T00:00:00.000000Z"))
    seg = tmp_path / "audit.000000000000.jsonl.gz"
    seg.write_bytes(gzip.compress(line * 30000, 9))
    assert 40_000 < seg.stat().st_size < 60_000
    snapshots = tmp_path / "checkpoints"
    snapshots.mkdir()
    audit.snapshot_path(snapshots, 1).write_bytes(b"{}")
    spki = certs.load_public_key(lab.certs / "audit.pem")
    tracemalloc.start()
    try:
        try:
            audit.scan(tmp_path / "audit.jsonl", lambda _e, _v: None, spki, snapshots,
                       lambda _b: None)
        except audit.ChainError:
            pass  # the forged line is refused; what matters is what finding it cost
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 * 1024 * 1024, f"{peak / 2**20:.1f} MiB"


# --- time (point 7) ---------------------------------------------------------------------------

# The real daemon, with its wall clock (time.time) stepped by the seconds in a side file: what
# an administrator's `date -s`, or a bad NTP source, does to a running service.
_STEPPED_CLOCK = """
import sys, time
from pathlib import Path
real, step = time.time, Path(sys.argv[1])
def stepped():
    try:
        return real() + float(step.read_text())
    except (OSError, ValueError):
        return real()
time.time = stepped
from signer.cli import main
sys.exit(main(["serve", "--config", sys.argv[2]]))
"""


def _start_stepped(s: Signer) -> Path:
    step = s.config.parent / "clock-step"
    s.lab.stop(s.config)
    with (s.config.parent / "daemon.log").open("ab") as log:
        s.lab.daemons[s.config] = subprocess.Popen(
            [sys.executable, "-c", _STEPPED_CLOCK, str(step), str(s.config)], env=s.lab.env,
            stderr=log, stdout=subprocess.DEVNULL)
    s.lab.wait_ready(s.config)
    return step


def _state(s: Signer, rid: str) -> str:
    r = s.gw(f"status {rid}")
    assert r.returncode == 0, r.stderr
    return str(json.loads(r.stdout)["state"])


@pytest.mark.control("SGN-03")
def test_stepping_the_clock_forward_does_not_widen_a_budget(make_signer: MakeSigner) -> None:
    """`small` allows 3 signatures per hour: two hours later by the wall clock, within the
    same run, the first three still count."""
    s: Signer = make_signer(start=False)
    step = _start_stepped(s)
    for i in range(3):
        assert s.gw("sign --profile small --format raw", b"b%d" % i).returncode == 0
    step.write_text("7200")
    r = s.gw("sign --profile small --format raw", b"b3")
    assert r.returncode == 77 and b"budget" in r.stderr, r.stderr


@pytest.mark.control("SGN-04")
def test_stepping_the_clock_back_does_not_reopen_an_expired_request(
        make_signer: MakeSigner) -> None:
    """A request that expired stays expired when the wall clock is set back an hour."""
    s: Signer = make_signer(start=False, profile_overrides={"release": {"request_ttl": 1}})
    step = _start_stepped(s)
    rid = queue(s, b"expires")
    until(lambda: _state(s, rid) == "expired", timeout=10)
    step.write_text("-3600")
    assert _state(s, rid) == "expired"
    assert s.gw(f"fetch {rid}").returncode == 77


@pytest.mark.control("SGN-04")
def test_a_start_with_the_clock_before_the_log_reopens_nothing(
        make_signer: MakeSigner) -> None:
    """Restarted with the wall clock an hour before the log's last entry: noted in the start
    entry, the expired request stays expired, and the log's times never go back."""
    s: Signer = make_signer(profile_overrides={"release": {"request_ttl": 1}})
    rid = queue(s, b"expires")
    until(lambda: _state(s, rid) == "expired", timeout=10)
    s.stop()
    (s.config.parent / "clock-step").write_text("-3600")
    _start_stepped(s)
    assert _state(s, rid) == "expired"
    note = s.events("start")[-1]["note"]
    assert "is earlier than the log's last entry" in note, note
    entries = s.entries()
    assert all(a["time"] <= b["time"] for a, b in itertools.pairwise(entries))
