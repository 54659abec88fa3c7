"""The audit log at scale: start-up from the last state checkpoint, segments, and the
comparison with the collector's copy (`signer audit compare`)."""

from __future__ import annotations

import gzip
import hashlib
import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from signer import audit, certs, compare
from tests.signer.conftest import MakeSigner, Signer, one_line_error
from tests.signer.test_approvals import approve, queue


def _lines(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines(keepends=True)


def _state_checkpoints(lines: list[bytes]) -> list[int]:
    return [i for i, line in enumerate(lines)
            if json.loads(line)["event"] == "checkpoint" and "state" in json.loads(line)]


def _cli(s: Signer, *args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "signer", *map(str, args)],
                          capture_output=True, text=True, env=s.lab.env, check=False)


def _busy_log(s: Signer) -> str:
    """A log with state worth keeping: signatures against a small budget, a frozen profile,
    a queued request with one approval. Returns the request id."""
    for i in range(2):
        assert s.gw("sign --profile small --format raw", b"s%d" % i).returncode == 0
    assert s.gw("freeze dev", client=None, custodian="alice").returncode == 0
    rid = queue(s, b"release me")
    assert approve(s, "alice", rid).returncode == 0
    return rid


def _assert_state_kept(s: Signer, rid: str) -> None:
    """What _busy_log left: dev frozen, one signature left in small's budget, the request
    pending with alice's approval."""
    assert "frozen" in one_line_error(s.gw("sign --profile dev --format raw", b"x"))
    assert s.gw("sign --profile small --format raw", b"third").returncode == 0
    r = s.gw("sign --profile small --format raw", b"fourth")
    assert r.returncode == 77 and "budget" in r.stderr.decode()
    status = json.loads(s.gw(f"status {rid}").stdout)
    assert status["state"] == "pending" and status["approvals"] == ["alice"]


# --- start-up from the last state checkpoint -----------------------------------------------


@pytest.mark.control("SGN-05")
def test_start_up_begins_at_the_last_state_checkpoint_and_keeps_the_state(
        make_signer: MakeSigner) -> None:
    """The history before the last state checkpoint is not read, but for the entry just
    before it (the checkpoint must follow it: an earlier checkpoint copied to the end would
    not): here the rest is overwritten with garbage of the same length, and the daemon still
    starts with the state the checkpoint vouches for (`audit verify` reads the history)."""
    s: Signer = make_signer()
    rid = _busy_log(s)
    s.stop()
    lines = _lines(s.audit_log)
    cp = _state_checkpoints(lines)[-1]
    assert cp == len(lines) - 1  # the stop checkpoint carries the state
    head = b"".join(lines[:cp - 1])
    s.audit_log.write_bytes(b"x" * (len(head) - 1) + b"\n" + b"".join(lines[cp - 1:]))
    s.start()
    assert f"started from the state of checkpoint seq {cp}; 1 entries read" in s.log
    _assert_state_kept(s, rid)


@pytest.mark.control("SGN-05")
def test_a_changed_state_snapshot_is_refused_at_start(make_signer: MakeSigner) -> None:
    s: Signer = make_signer()
    _busy_log(s)
    s.stop()
    seq = len(_lines(s.audit_log)) - 1
    snap = s.config.parent / "state" / "checkpoints" / f"{seq:012d}.json"
    doc = json.loads(snap.read_bytes())
    assert "dev" in doc["frozen"]
    del doc["frozen"]["dev"]  # thaw it behind the custodians' back
    snap.write_bytes(audit.canonical(doc))
    r = s.lab.signer("serve", "--config", s.config, timeout=20)
    assert r.returncode == 74
    assert f"broken at seq {seq} (segment audit.jsonl): the state snapshot" in one_line_error(r)


@pytest.mark.control("SGN-05")
def test_a_state_checkpoint_forged_without_the_audit_key_is_refused(
        make_signer: MakeSigner) -> None:
    """Snapshot and checkpoint rewritten together (digest and entry hash recomputed): the
    signature no longer verifies."""
    s: Signer = make_signer()
    _busy_log(s)
    s.stop()
    lines = _lines(s.audit_log)
    seq = len(lines) - 1
    snap = s.config.parent / "state" / "checkpoints" / f"{seq:012d}.json"
    doc = json.loads(snap.read_bytes())
    del doc["frozen"]["dev"]
    data = audit.canonical(doc)
    snap.write_bytes(data)
    entry = json.loads(lines[-1])
    entry.pop("hash")
    entry["state"] = hashlib.sha256(data).hexdigest()
    s.audit_log.write_bytes(b"".join(lines[:-1]) + audit.seal(entry)[1])
    r = s.lab.signer("serve", "--config", s.config, timeout=20)
    assert r.returncode == 74
    assert "checkpoint signature does not verify" in one_line_error(r)


def test_without_its_snapshot_the_whole_log_is_replayed(make_signer: MakeSigner) -> None:
    s: Signer = make_signer()
    rid = _busy_log(s)
    s.stop()
    shutil.rmtree(s.config.parent / "state" / "checkpoints")
    s.start()
    assert "replayed from the start" in s.log
    _assert_state_kept(s, rid)


def test_after_a_crash_the_tail_after_the_state_checkpoint_is_replayed(
        make_signer: MakeSigner) -> None:
    s: Signer = make_signer()
    rid = _busy_log(s)
    s.stop(signal.SIGKILL)
    lines = _lines(s.audit_log)
    cp = _state_checkpoints(lines)[-1]
    assert cp < len(lines) - 3  # the freeze and the queue came after it
    s.start()
    assert f"started from the state of checkpoint seq {cp}; {len(lines) - cp} entries" in s.log
    _assert_state_kept(s, rid)


# --- segments --------------------------------------------------------------------------------


@pytest.fixture
def segmented(make_signer: MakeSigner) -> Signer:
    """A daemon whose segments close every 8 entries, stopped after 12 signatures."""
    s: Signer = make_signer(segment_entries=8, checkpoint_interval=100)
    for i in range(12):
        assert s.gw("sign --profile dev --format raw", b"seg%d" % i).returncode == 0
    s.stop()
    return s


def _closed(s: Signer) -> list[Path]:
    return sorted(p for p in s.audit_log.parent.iterdir()
                  if p.name.startswith("audit.0") and p.name != "audit.jsonl")


def _verify(s: Signer, *paths: Path) -> subprocess.CompletedProcess[str]:
    return _cli(s, "audit", "verify", *paths, "--cert", s.lab.certs / "audit.pem")


@pytest.mark.control("SGN-05")
def test_segments_rotate_at_a_state_checkpoint_and_verify_as_one_chain(
        segmented: Signer) -> None:
    s = segmented
    closed = _closed(s)
    assert len(closed) >= 3
    seqs = []
    for p in [*closed, s.audit_log]:
        entries = [json.loads(line) for line in _lines(p)]
        seqs += [e["seq"] for e in entries]
        if p != s.audit_log:
            assert p.name == f"audit.{entries[0]['seq']:012d}.jsonl"
            assert entries[-1]["event"] == "checkpoint" and "state" in entries[-1]
    assert seqs == list(range(len(seqs)))  # nothing lost, nothing twice
    r = _verify(s, s.audit_log)
    assert r.returncode == 0, r.stdout
    assert f"({len(closed) + 1} segments)" in r.stdout
    assert _verify(s, s.audit_log.parent).returncode == 0
    with closed[0].open("rb") as src, gzip.open(f"{closed[0]}.gz", "wb") as dst:
        shutil.copyfileobj(src, dst)
    closed[0].unlink()
    r = _verify(s, s.audit_log)
    assert r.returncode == 0, r.stdout
    s.start()  # and the daemon carries on with a compressed segment behind it
    assert s.gw("sign --profile dev --format raw", b"more").returncode == 0
    s.stop()
    assert _verify(s, s.audit_log).returncode == 0


@pytest.mark.control("SGN-05")
def test_a_missing_segment_is_named_with_the_first_missing_seq(segmented: Signer) -> None:
    s = segmented
    closed = _closed(s)
    gone = closed[1]
    first = int(gone.name.split(".")[1])
    gone.unlink()
    r = _verify(s, s.audit_log)
    assert r.returncode == 1
    assert f"first bad seq {first} (segment {closed[2].name}): missing" in r.stdout


def test_a_crash_between_closing_a_segment_and_opening_the_next_loses_nothing(
        segmented: Signer) -> None:
    """The rename happened, the new active file was never created: start-up continues the
    chain after the last closed segment."""
    s = segmented
    first = json.loads(_lines(s.audit_log)[0])["seq"]
    s.audit_log.rename(s.audit_log.with_name(f"audit.{first:012d}.jsonl"))
    s.start()
    assert s.gw("sign --profile dev --format raw", b"after").returncode == 0
    s.stop()
    r = _verify(s, s.audit_log)
    assert r.returncode == 0, r.stdout


# --- compare with the collector's copy -------------------------------------------------------


@pytest.fixture(scope="module")
def written(lab: Any, tmp_path_factory: pytest.TempPathFactory) -> tuple[list[bytes], Path]:
    """A stopped daemon's log (signatures, each closed by a checkpoint) and the audit cert."""
    from tests.signer.conftest import config, profiles

    s = Signer(lab, config(lab, "compare", profiles(lab)))
    s.start()
    for i in range(6):
        assert s.gw("sign --profile dev --format raw", b"c%d" % i).returncode == 0
    s.stop()
    return _lines(s.audit_log), lab.certs / "audit.pem"


def _compare(tmp_path: Path, local: list[bytes], copy: list[bytes], cert: Path | None = None,
             **bounds: Any) -> compare.Result:
    (tmp_path / "audit.jsonl").write_bytes(b"".join(local))
    # what rsyslog's %msg% gives: the line, sometimes after a blank
    (tmp_path / "copy.log").write_bytes(b"".join(b" " + line for line in copy))
    spki = certs.load_public_key(cert) if cert else None
    return compare.compare([tmp_path / "audit.jsonl"], tmp_path / "copy.log", spki, **bounds)


def _rechain(lines: list[bytes], start: int, **changes: Any) -> list[bytes]:
    out = lines[:start]
    prev = json.loads(out[-1])["hash"]
    for line in lines[start:]:
        entry = json.loads(line)
        entry.pop("hash")
        entry.update(prev=prev, **(changes if entry["event"] == "sign" else {}))
        new = audit.seal(entry)[1]
        out.append(new)
        prev = json.loads(new)["hash"]
    return out


@pytest.mark.control("AUD-04")
def test_compare_a_copy_that_lags_is_consistent(written: tuple[list[bytes], Path],
                                                tmp_path: Path) -> None:
    lines, cert = written
    r = _compare(tmp_path, lines, [*lines[:-3], lines[2]], cert)  # and a retransmission
    assert r.consistent and r.in_flight == 3 and r.first_seq is None, r.text()
    assert f"3 entries in flight (seq {len(lines) - 3}..{len(lines) - 1}" in r.text()
    assert _compare(tmp_path, lines, lines, cert).in_flight == 0


@pytest.mark.control("AUD-04")
def test_compare_finds_a_log_cut_right_after_a_checkpoint(written: tuple[list[bytes], Path],
                                                          tmp_path: Path) -> None:
    lines, cert = written
    cut = next(i for i in range(len(lines) - 3, 0, -1)
               if json.loads(lines[i])["event"] == "checkpoint")
    local = lines[:cut + 1]  # a valid, shorter log: it verifies on its own
    (tmp_path / "alone.jsonl").write_bytes(b"".join(local))
    assert audit.verify_file(tmp_path / "alone.jsonl", certs.load_public_key(cert), False)[0]
    r = _compare(tmp_path, local, lines, cert)
    assert (r.kind, r.first_seq) == ("truncation", cut + 1), r.text()
    assert "right after a checkpoint" in r.text()


@pytest.mark.control("AUD-04")
def test_compare_finds_a_tail_rewritten_with_a_valid_chain(written: tuple[list[bytes], Path],
                                                           tmp_path: Path) -> None:
    lines, _cert = written
    k = len(lines) - 5
    local = _rechain(lines, k, name="innocent.bin")
    (tmp_path / "alone.jsonl").write_bytes(b"".join(local))
    assert audit.verify_file(tmp_path / "alone.jsonl", None, False, chain_only=True)[0]
    r = _compare(tmp_path, local, lines)
    first = next(i for i in range(k, len(lines)) if local[i] != lines[i])
    assert (r.kind, r.first_seq) == ("rewritten", first), r.text()


@pytest.mark.control("AUD-04")
def test_compare_finds_a_gap_in_the_copy(written: tuple[list[bytes], Path],
                                         tmp_path: Path) -> None:
    lines, cert = written
    r = _compare(tmp_path, lines, lines[:3] + lines[5:-1], cert)
    assert (r.kind, r.first_seq) == ("gap", 3), r.text()


def test_compare_command_exit_codes_and_json(written: tuple[list[bytes], Path],
                                             tmp_path: Path, lab: Any) -> None:
    lines, cert = written
    (tmp_path / "audit.jsonl").write_bytes(b"".join(lines))
    (tmp_path / "lag.log").write_bytes(b"".join(lines[:-1]))
    (tmp_path / "cut.log").write_bytes(b"".join([*lines, lines[-1].replace(b'"seq":', b'"seq":1')]))

    def run(*args: str | Path) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "signer", "audit", "compare", *map(str, args)],
                              capture_output=True, text=True, env=lab.env, check=False)

    r = run(tmp_path / "audit.jsonl", tmp_path / "lag.log", "--cert", cert, "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["result"] == "consistent" and doc["in_flight"] == 1
    r = run(tmp_path / "audit.jsonl", tmp_path / "cut.log")
    assert r.returncode == 1 and r.stdout.startswith("FINDING damaged: "), r.stdout
    r = run(tmp_path / "audit.jsonl", tmp_path / "missing.log")
    assert r.returncode == 2 and "missing.log" in r.stderr
    assert run(tmp_path / "audit.jsonl").returncode == 2


def _run_compare(lab: Any, *args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "signer", "audit", "compare", *map(str, args)],
                          capture_output=True, text=True, env=lab.env, check=False)


@pytest.mark.control("AUD-04")
def test_compare_an_empty_copy_is_a_finding_of_its_own(written: tuple[list[bytes], Path],
                                                       tmp_path: Path, lab: Any) -> None:
    """A collector that never received anything used to be "consistent, N in flight"."""
    lines, cert = written
    r = _compare(tmp_path, lines, [], cert)
    assert r.kind == "empty-copy", r.text()
    assert (r.exit_code, r.in_flight) == (3, len(lines)), r.text()
    p = _run_compare(lab, tmp_path / "audit.jsonl", tmp_path / "copy.log", "--cert", cert)
    assert p.returncode == 3 and p.stdout.startswith("FINDING empty-copy: "), p.stdout
    # blank lines (a separator rsyslog writes) are no entries either
    (tmp_path / "blank.log").write_bytes(b" \n\n")
    assert _run_compare(lab, tmp_path / "audit.jsonl", tmp_path / "blank.log").returncode == 3


@pytest.mark.control("AUD-04")
def test_compare_a_copy_that_lags_beyond_a_bound_is_a_finding(written: tuple[list[bytes], Path],
                                                              tmp_path: Path, lab: Any) -> None:
    """In flight is consistent only within a bound, in entries and in seconds (the oldest
    entry not yet in the copy, by its time): beyond it the collector has stopped receiving."""

    lines, cert = written
    copy = lines[:-3]
    r = _compare(tmp_path, lines, copy, cert, max_lag=2)
    assert (r.kind, r.exit_code, r.in_flight) == ("lagging", 4, 3), r.text()
    assert r.first_seq == len(lines) - 3
    assert _compare(tmp_path, lines, copy, cert, max_lag=3).consistent
    written_at = audit.parse_time(json.loads(lines[-3])["time"])
    late = _compare(tmp_path, lines, copy, cert, now=written_at + compare.DEFAULT_MAX_LAG_SECONDS
                    + 1)
    assert (late.kind, late.exit_code) == ("lagging", 4), late.text()
    assert _compare(tmp_path, lines, copy, cert, now=written_at + 1).consistent
    # a complete copy never lags, however old its entries
    assert _compare(tmp_path, lines, lines, cert, now=written_at + 10**6).consistent
    p = _run_compare(lab, tmp_path / "audit.jsonl", tmp_path / "copy.log", "--max-lag", "2")
    assert p.returncode == 0, p.stdout  # the last _compare wrote the complete copy
    (tmp_path / "copy.log").write_bytes(b"".join(copy))
    p = _run_compare(lab, tmp_path / "audit.jsonl", tmp_path / "copy.log", "--max-lag", "2")
    assert p.returncode == 4 and p.stdout.startswith("FINDING lagging: "), p.stdout
    p = _run_compare(lab, tmp_path / "audit.jsonl", tmp_path / "copy.log", "--max-lag", "3",
                     "--max-lag-seconds", "0")
    assert p.returncode == 4, p.stdout  # the newest entries are older than 0 s
    p = _run_compare(lab, tmp_path / "audit.jsonl", tmp_path / "copy.log", "--max-lag", "3")
    assert p.returncode == 0, p.stdout


@pytest.mark.control("AUD-04")
def test_compare_a_host_log_without_its_oldest_segments_is_a_finding(
        written: tuple[list[bytes], Path], tmp_path: Path, lab: Any) -> None:
    """The host's log in segments; its oldest one deleted. What remains is a valid chain from
    there on, and the copy holds all of it: the missing head is its own finding (5), unless
    the reviewer says where the kept log starts (--from, for segments archived on purpose)."""
    from signer import segments

    lines, cert = written
    active = tmp_path / "host" / "audit.jsonl"
    active.parent.mkdir()
    segments.closed_name(active, 0).write_bytes(b"".join(lines[:4]))
    segments.closed_name(active, 4).write_bytes(b"".join(lines[4:8]))
    active.write_bytes(b"".join(lines[8:]))
    (tmp_path / "copy.log").write_bytes(b"".join(lines))
    spki = certs.load_public_key(cert)
    assert compare.compare([active], tmp_path / "copy.log", spki).consistent
    segments.closed_name(active, 0).unlink()
    r = compare.compare([active], tmp_path / "copy.log", spki)
    assert r.kind == "local-head-missing", r.text()
    assert (r.exit_code, r.first_seq, r.local_first) == (5, 0, 4), r.text()
    assert "--from 4" in r.message
    assert compare.compare([active], tmp_path / "copy.log", spki, since=4).consistent
    p = _run_compare(lab, active, tmp_path / "copy.log", "--cert", cert)
    assert p.returncode == 5 and p.stdout.startswith("FINDING local-head-missing: "), p.stdout
    assert _run_compare(lab, active, tmp_path / "copy.log", "--from", "4").returncode == 0


@pytest.mark.control("AUD-04")
def test_compare_names_the_hosts_rewrite_in_place_not_transport_damage(
        written: tuple[list[bytes], Path], tmp_path: Path) -> None:
    """Root rewrites the host's log in place while the forwarder runs: the forwarder goes on
    from its saved offset in the middle of a rewritten line, and the collector gets a cut
    line after the entries it already had. The finding is the host's rewrite at its first
    seq; it used to be "damaged" (in transport) at the cut line."""
    lines, cert = written
    k = len(lines) - 6
    local = _rechain(lines, k, name="innocent.bin")
    first = next(i for i in range(k, len(lines)) if local[i] != lines[i])
    received = len(lines) - 2  # what the forwarder had sent before the rewrite
    cut = local[received][len(local[received]) // 2:]  # read on from its offset, mid-line
    r = _compare(tmp_path, local, [*lines[:received], cut], cert)
    assert (r.kind, r.first_seq) == ("rewritten", first), r.text()
    assert r.exit_code == 1
    assert "rewritten on the host" in r.message and "damaged too" in r.message, r.message
    # the same cut line with nothing rewritten is damage in transport
    r = _compare(tmp_path, lines, [*lines[:received], lines[received][5:]], cert)
    assert r.kind == "damaged", r.text()
