"""Reading an audit log back: start-up's `scan` (verify, then replay only what a checkpoint
vouches for, from the last state snapshot when there is one), `check_snapshots` (a log rolled
back under a state directory that remembers more), and `verify_file` (`signer audit verify`:
every segment as one chain)."""

from __future__ import annotations

import hashlib
import json
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from signer import segments
from signer.audit.chain import GENESIS, MAX_LINE, ChainError, Verifier, seq_range
from signer.audit.snapshots import follows, last_state_checkpoint, snapshot_path


def read_lines(path: Path) -> Iterator[tuple[int, bytes]]:
    """(offset after the line, line) for each line, the last one possibly without newline."""
    return segments.lines(segments.Segment(path, None), 0, MAX_LINE + 1)


@dataclass
class Scan:
    """What the daemon needs to carry on appending to an existing log."""

    seq: int = -1
    last_hash: str = GENESIS
    end: int = 0  # offset after the last good entry, in the active segment
    torn: bytes = b""  # an incomplete last line (a crash in the middle of a write), exactly
    since_checkpoint: int = 0
    since_state: int = 0  # entries since the last checkpoint that carries the state
    first: int | None = None  # seq of the active segment's first entry (None: it is empty)
    verified: int | None = None  # seq of the last checkpoint (verified when a key was given)
    state_seq: int | None = None  # start-up began at the state of this checkpoint
    replayed: int = 0  # entries read and checked at start (the cost of the start-up)
    tail: list[dict[str, Any]] = field(default_factory=list)  # entries after it: unproven
    checkpoint: dict[str, Any] | None = None  # the last checkpoint (its `interval`)
    last_time: str | None = None  # `time` of the last entry read


def _first_seq(seg: segments.Segment) -> int | None:
    for _off, line in segments.lines(seg, 0, MAX_LINE + 1):
        try:
            seq = json.loads(line).get("seq")
        except (ValueError, AttributeError):
            return None
        return seq if isinstance(seq, int) else None
    return None


def scan(path: Path, on_entry: Callable[[dict[str, Any], bool], None],
         spki: bytes | None = None,
         snapshots: Path | None = None, restore: Callable[[bytes], None] | None = None
         ) -> Scan:
    """Verify the chain of an existing log (all its segments; none is an empty log) and
    replay it.

    Only an incomplete *last* line is tolerated (returned in `torn`, byte for byte, for the
    caller to keep and report): the writer never writes a line longer than MAX_LINE, so a line
    without its newline that has anything after it is not a torn write but a broken log, and
    raises like any other damage (cutting there would drop every later entry).

    Anyone who can write the file can recompute the chain, so only what a checkpoint vouches
    for is replayed through `on_entry` (with False for the entries that checkpoint says its
    daemon adopted unverified, `unverified`: the caller believes of those what it believed
    then, never more, whether it starts from a snapshot or replays further back); with the
    audit key (`spki`) the last checkpoint is verified (through the chain it vouches for
    every entry before it; one that does not verify is tampering and raises). The entries
    after it are returned in `tail`, not replayed: the caller decides what, if anything, to
    believe of them.

    With `snapshots` (and the key), start-up begins at the last checkpoint that carries a
    state digest: its signature is verified, the snapshot kept for it must have that digest
    (else ChainError: the snapshot was changed), `restore` gets it, and only what follows is
    read and replayed. Without a usable one, the whole log is replayed."""
    segs = segments.of_log(path)
    out = Scan()
    v = Verifier()
    start_idx, start_off = 0, 0
    pending: list[dict[str, Any]] = []
    last_cp: dict[str, Any] | None = None
    if snapshots is not None and restore is not None and spki is not None and segs:
        found = last_state_checkpoint(segs, snapshots)
        if found is not None:
            start_idx, start_off, line, data, before = found
            try:
                head = json.loads(line)
                v = Verifier(spki, seq=int(head["seq"]) - 1, last_hash=str(head["prev"]))
            except (ValueError, KeyError, TypeError):
                raise ChainError(-1, "unreadable checkpoint", str(segs[start_idx])) from None
            if not follows(before, head):
                raise ChainError(v.seq + 1, "this state checkpoint does not follow the entry "
                                 "before it in the log (an earlier checkpoint copied to the "
                                 "end?)", str(segs[start_idx]))
            try:
                last_cp = v.feed(line)
            except ChainError as exc:
                exc.segment = str(segs[start_idx])
                raise
            if hashlib.sha256(data).hexdigest() != last_cp["state"]:
                raise ChainError(last_cp["seq"], "the state snapshot kept for this checkpoint "
                                 f"({snapshot_path(snapshots, last_cp['seq'])}) does not have "
                                 "the digest the checkpoint signs (changed)",
                                 str(segs[start_idx]))
            restore(data)
            out.last_time = last_cp["time"]
            out.state_seq = out.verified = last_cp["seq"]
            out.replayed = 1
    if start_off and segs[start_idx].active:
        out.end, out.first = start_off, _first_seq(segs[start_idx])
    for k in range(start_idx, len(segs)):
        seg = segs[k]
        begin = start_off if k == start_idx else 0
        size = seg.path.stat().st_size if seg.active else -1
        read = 0
        try:
            for offset, line in segments.lines(seg, begin, MAX_LINE + 1):
                if not line.endswith(b"\n"):
                    if offset == size:
                        out.torn = line
                        break
                    raise ChainError(v.seq + 1, f"entry longer than {MAX_LINE} bytes, or cut "
                                     "(not a torn last line: entries or segments follow it)")
                entry = v.feed(line)
                read += 1
                if offset == len(line) and seg.first is not None and entry["seq"] != seg.first:
                    raise ChainError(entry["seq"], f"the segment's name says it starts at seq "
                                     f"{seg.first} (renamed)")
                out.replayed += 1
                out.last_time = entry["time"]
                if seg.active:
                    out.end = offset
                    if out.first is None:
                        out.first = entry["seq"]
                is_cp = entry["event"] == "checkpoint"
                out.since_checkpoint = 0 if is_cp else out.since_checkpoint + 1
                out.since_state = 0 if is_cp and "state" in entry else out.since_state + 1
                pending.append(entry)
                if is_cp:
                    last_cp = entry
                    span = seq_range(entry.get("unverified")) or (-1, -1)
                    for e in pending:
                        on_entry(e, not span[0] <= e["seq"] <= span[1])
                    pending = []
        except ChainError as exc:
            exc.segment = exc.segment or str(seg)
            raise
        if not seg.active and not begin and not read:
            raise ChainError(v.seq + 1, "empty segment", str(seg))
    if last_cp is not None:
        if spki is not None and last_cp["seq"] != out.state_seq:
            Verifier(spki)._checkpoint(last_cp)
        out.verified = last_cp["seq"]
    out.checkpoint = last_cp
    out.tail = pending
    out.seq, out.last_hash = v.seq, v.last_hash
    return out


def check_snapshots(snapshots: Path, scan: Scan) -> str | None:
    """Roll-back of the log under a state directory that remembers more: start-up begins at
    the last state checkpoint in the log whose snapshot is kept, so a snapshot of a later
    checkpoint means the log no longer holds that checkpoint (cut after an earlier one, an
    earlier checkpoint copied to the end, the log deleted or replaced): ChainError. The one
    exception is a snapshot for the very next seq, with nothing after it: a crash between
    keeping a snapshot and writing its checkpoint (removed; the note says so).

    A snapshot that is missing is not a roll-back: start-up begins at an earlier one and
    replays forward, believing no more than it did (see `scan`). A roll-back of the log and
    the state directory together cannot be seen from the host: the collector's copy can."""
    try:
        kept = sorted(int(p.stem) for p in snapshots.glob("*.json") if p.stem.isdigit())
    except OSError:
        return None
    newer = [k for k in kept if scan.state_seq is None or k > scan.state_seq]
    if newer == [scan.seq + 1]:
        try:
            snapshot_path(snapshots, newer[0]).unlink()
        except OSError:
            pass
        return (f"removed the snapshot for seq {newer[0]}, whose checkpoint was never written "
                "(a crash in between)")
    if not newer:
        return None
    last = max(newer)
    if scan.seq < 0:
        raise ChainError(0, f"the log is empty, but the state directory holds the snapshot of "
                         f"checkpoint seq {last} ({snapshot_path(snapshots, last)}): the log "
                         "was deleted or replaced (roll-back)")
    where = (f"the log's last state checkpoint with a snapshot is seq {scan.state_seq}"
             if scan.state_seq is not None else "the log holds no state checkpoint with one")
    raise ChainError(last, f"the state directory holds the snapshot of checkpoint seq {last}, "
                     f"but {where} (log ends at seq {scan.seq}): the log was cut, or rewritten "
                     f"after seq {scan.verified if scan.verified is not None else -1} "
                     "(roll-back)")


def verify_file(path: Path | list[Path], spki: bytes | None, live: bool,
                chain_only: bool = False) -> tuple[bool, str]:
    """`signer audit verify`: (valid, one line naming the first bad sequence number, and
    the segment it is in when the log has several).

    `path`: a log file (its closed segments next to it count too), a directory of segments,
    or a list of either; all are checked as one chain, compressed segments included, and a
    segment's first seq must be the one in its name.

    Valid means vouched for by the audit key: without a key (`spki` None) or without a single
    checkpoint, the chain alone proves nothing (anyone can recompute it), so the answer is
    "not valid" unless the caller asked for exactly that weaker check (`chain_only`)."""
    paths = path if isinstance(path, list) else [path]
    label = " ".join(str(p) for p in paths)
    try:
        segs = segments.resolve(paths)
    except (ValueError, OSError) as exc:
        return False, f"{label}: {exc}"
    if len(segs) > 1:
        label = f"{label} ({len(segs)} segments)"
    v = Verifier(spki)
    seg: segments.Segment | None = None
    try:
        for seg in segs:
            read = 0
            for _offset, line in segments.lines(seg, 0, MAX_LINE + 1):
                entry = v.feed(line)
                if not read and seg.first is not None and entry["seq"] != seg.first:
                    raise ChainError(entry["seq"], "the segment's name says it starts at seq "
                                     f"{seg.first} (renamed)")
                read += 1
            if not read and not seg.active:
                raise ChainError(v.seq + 1, "empty segment")
    except ChainError as exc:
        where = f" (segment {seg})" if seg is not None and len(segs) > 1 else ""
        return False, f"{label}: first bad seq {exc.seq}{where}: {exc.reason}"
    except (OSError, EOFError, zlib.error) as exc:
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        return False, f"{label}: cannot read {seg}: {why}"
    if v.seq < 0:
        return (live and chain_only, f"{label}: empty log" if live
                else f"{label}: first bad seq 0: missing (the log is empty)")
    if spki is None:
        signed = f"{v.checkpoints} checkpoint(s), signatures NOT checked"
    else:
        signed = f"{v.checkpoints} checkpoint(s) verified"
    if v.last_event != "checkpoint" and not live:
        return False, (f"{label}: first bad seq {v.seq + 1}: missing: the log ends at seq "
                       f"{v.seq} without a closing checkpoint (truncated, or written by a "
                       "running or crashed daemon: use --live)")
    tail = ""
    if v.last_event != "checkpoint":
        n = v.seq - (v.last_checkpoint if v.last_checkpoint is not None else -1)
        tail = f"; the last {n} entries are not yet covered by a checkpoint"
    if chain_only:
        return True, f"{label}: chain ok: seq 0..{v.seq}, {signed} (--chain-only){tail}"
    if spki is None:
        return False, (f"{label}: NOT verified: seq 0..{v.seq} chain ok, but {signed}: without "
                       "the audit key anyone can recompute the chain (give --cert or --pubkey; "
                       "--chain-only to check the chain alone)")
    if v.checkpoints == 0:
        return False, (f"{label}: NOT verified: seq 0..{v.seq} chain ok, but no checkpoint: "
                       "nothing in it is vouched for by the audit key (--chain-only to check "
                       "the chain alone)")
    adopted = "".join(f"; seq {a}..{b} adopted after review by {who} (seq {at})"
                      for a, b, who, at in v.adoptions
                      if v.last_checkpoint is not None and at < v.last_checkpoint)
    open_ = v.unreviewed()
    if open_:
        ranges = ", ".join(f"seq {a}..{b} (checkpoint seq {at})" for a, b, at in open_)
        return False, (f"{label}: NOT verified: seq 0..{v.seq} chain ok, {signed}, but no "
                       f"checkpoint vouches for {ranges} as verified: the daemon found them "
                       "after its last checkpoint at start and took them on unverified; review "
                       f"them and adopt them (`signer audit adopt`){adopted}")
    return True, f"{label}: ok: seq 0..{v.seq}, {signed}{adopted}{tail}"
