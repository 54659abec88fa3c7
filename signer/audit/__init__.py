"""The audit log: JSON lines in a hash chain, written and fsynced before anything is released.

Format (also in signer/README.md): one ASCII JSON object per line, keys sorted, no spaces;
`prev` is the previous entry's `hash`; `hash` is the SHA-256 of the entry serialised without
`hash`. `ensure_ascii` escapes every control and non-ASCII character, so a name can never break a
line or forge an entry. A `checkpoint` entry carries `sig`, the audit key's signature over the
entry serialised without `hash` and `sig`; through `prev` it vouches for everything before it.

The chain logic (`seal`, `Verifier`) is pure. `Writer` is the I/O edge: it commits queued
entries in groups, one `fdatasync` per group, so N concurrent signatures cost one disk flush
instead of N (group commit). A failed write is rolled back (ftruncate) so the chain
never carries a torn entry; if even that fails, or fsync fails (the page cache can no longer be
trusted), the writer turns itself off and every later append fails: the daemon fails closed.
"""

from __future__ import annotations

import base64
import fcntl
import hashlib
import json
import logging
import os
import threading
import time as _time
import zlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from signer import segments
from signer.algorithms import verify_digest
from signer.errors import Exit, SignerError

log = logging.getLogger("signerd")

GENESIS = "0" * 64
EVENTS = frozenset({"start", "stop", "sign", "deny", "queue", "approve", "unlock", "freeze", "thaw",
                    "residency-failure", "budget-exceeded", "checkpoint", "cancel", "reject",
                    "adopt"})
MAX_LINE = 64 * 1024
# A flush holding one of these ends with a checkpoint: the audit key vouches for it at once.
CLOSE_WITH_CHECKPOINT = frozenset({"sign", "queue", "approve", "freeze", "thaw",
                                   "budget-exceeded", "unlock", "cancel", "reject", "adopt"})
# Never written unless that checkpoint can be made: a signature is not released, a request
# not queued, a profile not thawed, a range not adopted on the word of a log the audit key
# does not vouch for.
NEEDS_PROOF = frozenset({"sign", "queue", "thaw", "adopt"})
# A flush holding one of these is followed by a state checkpoint (its snapshot kept): losing
# one of them is what a roll-back of the log is for, and a snapshot newer than the log's last
# state checkpoint is how start-up sees that the log was cut (`check_snapshots`). They are
# custodians' actions and rare; a signature (budget use) is not among them (the cost would be
# a snapshot per signature): a cut can undo at most `interval` entries' budget use.
KEEP_STATE_AFTER = frozenset({"freeze", "budget-exceeded", "cancel", "reject"})


class ChainError(Exception):
    """The first entry that cannot be trusted (and the segment it is in, when known)."""

    def __init__(self, seq: int, reason: str, segment: str | None = None) -> None:
        super().__init__(f"seq {seq}: {reason}")
        self.seq = seq
        self.reason = reason
        self.segment = segment

    @property
    def where(self) -> str:
        return f"seq {self.seq} (segment {self.segment})" if self.segment else f"seq {self.seq}"


def canonical(obj: Mapping[str, Any]) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                      allow_nan=False).encode("ascii")


def now_utc() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def format_time(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_time(text: str) -> float:
    return datetime.fromisoformat(text).timestamp()  # 3.11 reads the trailing Z as UTC


def checkpoint_message(body: Mapping[str, Any]) -> bytes:
    """The SHA-256 that the audit key signs for a checkpoint."""
    return hashlib.sha256(canonical({k: v for k, v in body.items()
                                     if k not in ("hash", "sig")})).digest()


def seal(body: dict[str, Any]) -> tuple[dict[str, Any], bytes]:
    """Add `hash` to a complete body (seq, time, prev, event, fields); return entry and line."""
    entry = dict(body)
    entry["hash"] = hashlib.sha256(canonical(body)).hexdigest()
    return entry, canonical(entry) + b"\n"


def body(seq: int, prev: str, event: str, fields: Mapping[str, Any], time: str) -> dict[str, Any]:
    if event not in EVENTS:
        raise ValueError(f"unknown audit event {event!r}")
    out = {k: v for k, v in fields.items() if v is not None}
    out.update(seq=seq, time=time, prev=prev, event=event)
    return out


@dataclass
class Verifier:
    """Feeds on lines in order; raises ChainError at the first bad one."""

    spki: bytes | None = None  # audit public key; None: checkpoint signatures not checked
    seq: int = -1
    last_hash: str = GENESIS
    last_event: str | None = None
    checkpoints: int = 0
    last_checkpoint: int | None = None
    # (first, last, checkpoint seq): ranges a checkpoint says its daemon adopted unverified
    unverified: list[tuple[int, int, int]] = field(default_factory=list)
    # (first, last, operator, seq of the adopt entry): ranges an operator adopted after review
    adoptions: list[tuple[int, int, str, int]] = field(default_factory=list)

    def feed(self, line: bytes) -> dict[str, Any]:
        expected = self.seq + 1
        if not line.endswith(b"\n"):
            raise ChainError(expected, "incomplete entry (the log was cut in the middle of a "
                                       "line)")
        try:
            entry = json.loads(line.decode("ascii"))
        except (UnicodeDecodeError, ValueError):
            raise ChainError(expected, "not a JSON entry") from None
        if not isinstance(entry, dict):
            raise ChainError(expected, "not a JSON object")
        seq = entry.get("seq")
        if not isinstance(seq, int) or isinstance(seq, bool):
            raise ChainError(expected, "no sequence number")
        if seq != expected:
            if seq > expected:
                raise ChainError(expected, f"missing (found seq {seq} in its place: deleted or "
                                           "reordered entries)")
            raise ChainError(seq, f"appears again after seq {expected - 1} (inserted or "
                                  "reordered entries)")
        claimed = entry.pop("hash", None)
        if claimed != hashlib.sha256(canonical(entry)).hexdigest():
            raise ChainError(seq, "hash does not match the entry (modified)")
        entry["hash"] = claimed
        if canonical(entry) + b"\n" != line:
            raise ChainError(seq, "not in canonical form (modified)")
        if entry.get("prev") != self.last_hash:
            if seq == 0:
                raise ChainError(0, "first entry does not start the chain (entries before it "
                                    "were removed)")
            raise ChainError(seq - 1, f"does not match the hash recorded in seq {seq} "
                                      f"(seq {seq - 1} modified, or seq {seq} forged)")
        event = entry.get("event")
        if event not in EVENTS or not isinstance(entry.get("time"), str):
            raise ChainError(seq, f"unknown event {event!r}")
        if event == "checkpoint":
            self._checkpoint(entry)
            span = seq_range(entry.get("unverified"))
            if span is not None:
                self.unverified.append((*span, seq))
        elif event == "adopt":
            span = seq_range([entry.get("first"), entry.get("last")])
            if span is not None:
                self.adoptions.append((*span, str(entry.get("operator")), seq))
        self.seq, self.last_hash, self.last_event = seq, claimed, event
        return entry

    def unreviewed(self) -> list[tuple[int, int, int]]:
        """Ranges adopted unverified that no operator adopted since (by a vouched entry)."""
        done = {(a, b) for a, b, _who, at in self.adoptions
                if self.last_checkpoint is not None and at < self.last_checkpoint}
        return [u for u in self.unverified if (u[0], u[1]) not in done]

    def _checkpoint(self, entry: dict[str, Any]) -> None:
        seq = entry["seq"]
        if self.spki is not None:
            try:
                sig = base64.b64decode(entry.get("sig", ""), validate=True)
            except ValueError:
                raise ChainError(seq, "checkpoint signature is not base64") from None
            if not verify_digest(self.spki, sig, checkpoint_message(entry), pss=False):
                raise ChainError(seq, "checkpoint signature does not verify with the audit key")
        self.checkpoints += 1
        self.last_checkpoint = seq


def seq_range(value: Any) -> tuple[int, int] | None:
    """[first, last] as written in a checkpoint or an adopt entry; None if not one."""
    if (isinstance(value, list) and len(value) == 2
            and all(isinstance(x, int) and not isinstance(x, bool) for x in value)
            and 0 <= value[0] <= value[1]):
        return value[0], value[1]
    return None


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


def snapshot_path(snapshots: Path, seq: int) -> Path:
    return snapshots / f"{seq:0{segments.SEQ_DIGITS}d}.json"


def _is_state_checkpoint(line: bytes) -> bool:
    # A quote inside a value is always escaped (\"), so `"state":"` is only ever a key.
    return b'"event":"checkpoint"' in line and b'"state":"' in line


def _last_state_checkpoint(segs: list[segments.Segment], snapshots: Path
                           ) -> tuple[int, int, bytes, bytes, bytes | None] | None:
    """The last checkpoint that carries a state digest and whose snapshot file is there:
    (segment index, offset after it, its line, the snapshot, the line before it in the log,
    None when it is the first). Read from the end backwards (a compressed segment forwards,
    as a stream: gzip cannot be read backwards), so the cost is what follows that checkpoint,
    whatever the length of the history before it.

    Memory is bounded by a few lines whatever the segment holds: a compressed segment is read
    line by line keeping only the last candidate (a list of every state checkpoint in it,
    as before, cost 15 MiB for a 52 KB `.gz` of repeated checkpoint lines)."""
    for idx in range(len(segs) - 1, -1, -1):
        seg = segs[idx]
        if seg.compressed:
            best: tuple[int, bytes, bytes, bytes | None] | None = None
            before: bytes | None = None
            for off, line in segments.lines(seg, 0, MAX_LINE + 1):
                data = _snapshot_of(line, snapshots)
                if data is not None:
                    best = off, line, data, before
                before = line
            if best is None:
                continue
            off, line, data, before = best
            return idx, off, line, data, before if before is not None else _last_line(segs, idx)
        found: tuple[int, bytes, bytes] | None = None
        for off, line in segments.reverse_lines(seg.path, seg.path.stat().st_size):
            if found is not None:
                return idx, *found, line
            data = _snapshot_of(line, snapshots)
            if data is not None:
                found = off, line, data
        if found is not None:
            return idx, *found, _last_line(segs, idx)
    return None


def _last_line(segs: list[segments.Segment], idx: int) -> bytes | None:
    """The last line of the segments before `idx` (None: there is none)."""
    for k in range(idx - 1, -1, -1):
        seg = segs[k]
        if seg.compressed:
            last = None
            for _off, line in segments.lines(seg, 0, MAX_LINE + 1):
                last = line
        else:
            last = next((line for _off, line in
                         segments.reverse_lines(seg.path, seg.path.stat().st_size)), None)
        if last is not None:
            return last
    return None


def _follows(before: bytes | None, checkpoint: Mapping[str, Any]) -> bool:
    """Whether the line before a checkpoint in the file is the entry its `prev` names: an
    earlier checkpoint copied to the end of the log (its snapshot still kept) is not."""
    if before is None:
        return checkpoint.get("seq") == 0
    try:
        entry = json.loads(before)
        claimed = entry.pop("hash")
    except (ValueError, KeyError, TypeError, AttributeError):
        return False
    return bool(claimed == checkpoint.get("prev") == hashlib.sha256(canonical(entry)).hexdigest()
                and entry.get("seq") == checkpoint.get("seq", 0) - 1)


def _snapshot_of(line: bytes, snapshots: Path) -> bytes | None:
    """The snapshot kept for a state checkpoint line; None for any other line, or when no
    snapshot is kept for it (an earlier one is looked for)."""
    if not _is_state_checkpoint(line):
        return None
    try:
        return snapshot_path(snapshots, int(json.loads(line)["seq"])).read_bytes()
    except (ValueError, KeyError, TypeError, OSError):
        return None


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
        found = _last_state_checkpoint(segs, snapshots)
        if found is not None:
            start_idx, start_off, line, data, before = found
            try:
                head = json.loads(line)
                v = Verifier(spki, seq=int(head["seq"]) - 1, last_hash=str(head["prev"]))
            except (ValueError, KeyError, TypeError):
                raise ChainError(-1, "unreadable checkpoint", str(segs[start_idx])) from None
            if not _follows(before, head):
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


class AuditError(SignerError):
    def __init__(self, message: str) -> None:
        super().__init__(Exit.IOERR, message)


@dataclass
class _Slot:
    event: str
    fields: Mapping[str, Any]
    entry: dict[str, Any] | None = None
    error: str | None = None
    done: bool = False


# Signs a checkpoint digest with the audit key; returns None when it cannot (daemon locked).
CheckpointSigner = Callable[[bytes], bytes | None]
DEFAULT_SEGMENT_BYTES = 256 * 1024 * 1024
DEFAULT_SEGMENT_ENTRIES = 1_000_000
KEEP_SNAPSHOTS = 3


class StateFold(Protocol):
    """The daemon's state as a fold of the entries written (policy.State and the config)."""

    def apply(self, entry: Mapping[str, Any]) -> None: ...

    def snapshot(self, now: float) -> bytes: ...


@dataclass
class Writer:
    """Appends to the active segment; see `append`. With `snapshots` and a state fold
    (`keep_state`), a checkpoint every `interval` entries (and at stop) also carries `state`,
    the SHA-256 of a snapshot of the daemon's state kept in `snapshots/<seq>.json` (written
    and fsynced before the checkpoint): start-up begins there. A segment over its limits is
    closed right after such a checkpoint, so every closed segment ends with one."""

    path: Path
    scan: Scan
    interval: int
    sign_checkpoint: CheckpointSigner | None = None
    snapshots: Path | None = None
    segment_bytes: int = DEFAULT_SEGMENT_BYTES
    segment_entries: int = DEFAULT_SEGMENT_ENTRIES
    _fold: StateFold | None = None
    _kept: list[int] = field(default_factory=list)
    _fd: int = -1
    _queue: list[_Slot] = field(default_factory=list)
    _cv: threading.Condition = field(default_factory=threading.Condition)
    _broken: str | None = None
    _failed: str = ""
    _retry_at: int = 0
    _closing: bool = False
    _flushing: bool = False
    # What the next checkpoint records besides `interval` (then cleared): the range of
    # entries found unvouched at start that the daemon took on without verifying them
    # (`unverified`), or that an operator adopted after review (`adopted`, `signer audit
    # adopt`). `audit verify` fails on the first until an operator adopts it.
    unverified: tuple[int, int] | None = None
    adopted: tuple[int, int] | None = None
    # The time written into entries (seconds since the epoch): the daemon's clock, which
    # follows the monotonic clock within a run and never goes back before the log's last entry.
    clock: Callable[[], float] = _time.time

    def open(self) -> None:
        """Open for append and lock: a second daemon on the same log is refused."""
        new = not self.path.exists()
        try:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC,
                               0o600)
        except OSError as exc:
            raise AuditError(f"cannot open audit log {self.path}: {exc.strerror}") from None
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(self._fd)
            raise AuditError(f"audit log {self.path} is locked by another process (another "
                             "daemon running?)") from None
        try:
            size = os.fstat(self._fd).st_size
            if size != self.scan.end + len(self.scan.torn):
                os.close(self._fd)
                raise AuditError(f"audit log {self.path} changed while it was being read: "
                                 "start again")
            if self.scan.torn:  # only the incomplete last line, nothing else
                os.ftruncate(self._fd, self.scan.end)
                os.fsync(self._fd)
            if new:
                dfd = os.open(self.path.parent, os.O_RDONLY | os.O_DIRECTORY)
                try:
                    os.fsync(dfd)
                finally:
                    os.close(dfd)
        except OSError as exc:
            os.close(self._fd)
            raise AuditError(f"cannot prepare audit log {self.path}: {exc.strerror}") from None

    def append(self, event: str, **fields: Any) -> dict[str, Any]:
        """Write one entry and return it once it is on disk; AuditError if it is not.

        Group commit without a writer thread: the first caller to find no flush running
        becomes the leader, takes everything queued and writes and fsyncs it; the others wait
        for that flush, and one of those queued meanwhile leads the next. Alone, a caller
        flushes its own entry with no hand-off; under load, one fsync serves many entries."""
        slot = _Slot(event, fields)
        with self._cv:
            if self._broken is not None:
                raise AuditError(self._broken)
            if self._closing:
                raise AuditError("the daemon is stopping")
            self._queue.append(slot)
            while not slot.done:
                if self._flushing:
                    self._cv.wait()
                    continue
                self._flushing = True
                batch, self._queue = self._queue, []
                self._cv.release()
                try:
                    self._commit(batch)
                except Exception as exc:  # a bug must not leave callers waiting forever
                    self._broken = f"audit writer failed: {type(exc).__name__}: {exc}"
                    for s in batch:
                        s.error = self._broken
                finally:
                    self._cv.acquire()
                    self._flushing = False
                    for s in batch:
                        s.done = True
                    self._cv.notify_all()
        if slot.error is not None or slot.entry is None:
            raise AuditError(slot.error or "audit entry not written")
        return slot.entry

    def checkpoint(self) -> None:
        """Write a checkpoint now if any entry is not yet covered (stop, unlock); with a
        state fold, one that carries the state."""
        self.append("checkpoint")

    def keep_state(self, fold: StateFold) -> None:
        """From now on, every entry written is folded into `fold` (after it is on disk), and
        state checkpoints carry its snapshot. Call before the first append."""
        self._fold = fold
        if self.snapshots is not None and self.snapshots.is_dir():
            self._kept = sorted(int(p.stem) for p in self.snapshots.glob("*.json")
                                if p.stem.isdigit())

    def close(self) -> None:
        with self._cv:
            self._closing = True
            while self._flushing:
                self._cv.wait()
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1

    @property
    def broken(self) -> str | None:
        return self._broken

    # --- the flush (by whichever caller leads) -------------------------------------------

    def _build(self, batch: list[_Slot], seq: int, prev: str, since: int
               ) -> tuple[list[bytes], list[dict[str, Any]], int, str, int]:
        """The lines of one flush. A flush that holds a state-changing or sign entry ends
        with a checkpoint, so the audit key vouches for it in the same write (a restart
        believes nothing else). An entry that must not exist unproven (NEEDS_PROOF) is not
        written at all when that checkpoint cannot be made: its caller gets an error."""
        while True:
            lines, entries, s2, p2, since2 = self._build_once(batch, seq, prev, since)
            if since2 == 0:
                return lines, entries, s2, p2, since2
            unproven = [slot for slot, e in zip(batch, entries, strict=True)
                        if e and slot.event in NEEDS_PROOF]
            if not unproven:
                return lines, entries, s2, p2, since2
            for slot in unproven:
                slot.error = ("no checkpoint: the audit key cannot vouch for this entry "
                              "(locked, or the key is not available): not written")

    def _build_once(self, batch: list[_Slot], seq: int, prev: str, since: int
                    ) -> tuple[list[bytes], list[dict[str, Any]], int, str, int]:
        lines: list[bytes] = []
        entries: list[dict[str, Any]] = []
        time = format_time(self.clock())
        close = False
        for slot in batch:
            if slot.error is not None:
                entries.append({})
                continue
            if slot.event == "checkpoint":
                if since == 0:  # nothing new to vouch for
                    entries.append({})
                    continue
                sealed = self._checkpoint_line(seq + 1, prev, time)
                if sealed is None:
                    slot.error = "no checkpoint: the audit key is not available (locked?)"
                    entries.append({})
                    continue
            else:
                sealed = seal(body(seq + 1, prev, slot.event, slot.fields, time))
            entry, line = sealed
            if len(line) > MAX_LINE:  # a reader would take it for a torn write: never write it
                slot.error = f"audit entry longer than {MAX_LINE} bytes: not written"
                entries.append({})
                continue
            seq, prev = seq + 1, entry["hash"]
            since = 0 if slot.event == "checkpoint" else since + 1
            close = close or slot.event in CLOSE_WITH_CHECKPOINT
            lines.append(line)
            entries.append(entry)
            if since >= self.interval:
                auto = self._checkpoint_line(seq + 1, prev, time)
                if auto is not None:
                    seq, prev, since = seq + 1, auto[0]["hash"], 0
                    lines.append(auto[1])
        if close and since:
            closing = self._checkpoint_line(seq + 1, prev, time)
            if closing is not None:
                seq, prev, since = seq + 1, closing[0]["hash"], 0
                lines.append(closing[1])
        return lines, entries, seq, prev, since

    def _checkpoint_line(self, seq: int, prev: str, time: str
                         ) -> tuple[dict[str, Any], bytes] | None:
        if self.sign_checkpoint is None:
            return None
        b = body(seq, prev, "checkpoint", self._checkpoint_fields(), time)
        try:
            sig = self.sign_checkpoint(checkpoint_message(b))
        except Exception:  # the token went away: postpone, never stop the log
            return None
        if sig is None:
            return None
        b["sig"] = base64.b64encode(sig).decode("ascii")
        return seal(b)

    def _checkpoint_fields(self) -> dict[str, Any]:
        """What every checkpoint records of the policy it was written under (`interval`: how
        long a tail without a checkpoint can honestly be) and of the entries it newly covers
        that this writer did not write itself (see `unverified`, `adopted`). Everything else
        it newly covers, this daemon wrote: it vouches for it as verified."""
        out: dict[str, Any] = {"interval": self.interval}
        if self.unverified is not None:
            out["unverified"] = list(self.unverified)
        if self.adopted is not None:
            out["adopted"] = list(self.adopted)
        return out

    def _commit(self, batch: list[_Slot]) -> None:
        if self._broken is not None:
            for slot in batch:
                slot.error = self._broken
            return
        s = self.scan
        rotate = s.first is not None and (s.end >= self.segment_bytes
                                          or s.seq - s.first + 1 >= self.segment_entries)
        due = rotate or s.since_state >= self.interval
        explicit = batch[0].event == "checkpoint" and s.since_state > 0  # stop, unlock
        if self._fold is not None and s.seq >= 0 and (
                explicit or (due and s.since_state >= self._retry_at)):
            if self._state_checkpoint():
                self._retry_at = 0
                if rotate and not self._rotate():
                    self._retry_at = self.interval  # not at every write: the log goes on
            else:  # locked: try again `interval` entries later, not at every write
                self._retry_at = s.since_state + self.interval
            if self._broken is not None:
                for slot in batch:
                    slot.error = self._broken
                return
        lines, entries, seq, prev, since = self._build(batch, s.seq, s.last_hash,
                                                       s.since_checkpoint)
        if self._write(lines, seq, prev, since):
            for slot, entry in zip(batch, entries, strict=True):
                if slot.error is None:
                    slot.entry = entry
            if self._fold is not None and any(
                    e.get("event") in KEEP_STATE_AFTER for e in entries):
                self._state_checkpoint()  # not made (locked): the log goes on, as at interval
        else:
            for slot in batch:
                slot.error = slot.error or self._failed

    def _state_checkpoint(self) -> bool:
        """A checkpoint that carries the state's digest, its snapshot kept first; False when
        it cannot be made now (locked: later; a snapshot not written: the log goes on)."""
        assert self._fold is not None and self.snapshots is not None
        s = self.scan
        time = format_time(self.clock())
        data = self._fold.snapshot(parse_time(time))
        b = body(s.seq + 1, s.last_hash, "checkpoint",
                 {"state": hashlib.sha256(data).hexdigest(), **self._checkpoint_fields()}, time)
        try:
            sig = self.sign_checkpoint(checkpoint_message(b)) if self.sign_checkpoint else None
        except Exception:
            sig = None
        if sig is None:
            return False
        b["sig"] = base64.b64encode(sig).decode("ascii")
        entry, line = seal(b)
        try:
            _write_durably(snapshot_path(self.snapshots, s.seq + 1), data)
        except OSError as exc:
            log.warning("cannot keep the state snapshot for seq %d: %s", s.seq + 1, exc)
            return False
        if not self._write([line], s.seq + 1, entry["hash"], 0):
            try:  # a snapshot without its checkpoint would read as a roll-back at start
                snapshot_path(self.snapshots, s.seq + 1).unlink()
            except OSError:
                pass
            return False
        self._kept.append(entry["seq"])
        for old in self._kept[:-KEEP_SNAPSHOTS]:
            try:
                snapshot_path(self.snapshots, old).unlink()
            except OSError:
                pass
        del self._kept[:-KEEP_SNAPSHOTS]
        return True

    def _rotate(self) -> bool:
        """Close the active segment (it ends with a state checkpoint): rename it to its
        sibling name, then start a new, empty active file. A crash between the two leaves
        no active file, which start-up reads as an empty active segment after the closed
        ones: the rename is atomic, so no entry is lost or in two segments."""
        s = self.scan
        assert s.first is not None
        closed = segments.closed_name(self.path, s.first)
        if closed.exists() or closed.with_name(closed.name + ".gz").exists():
            log.error("cannot close audit segment: %s exists", closed)
            return False
        try:
            os.rename(self.path, closed)
        except OSError as exc:
            log.error("cannot close audit segment %s: %s", self.path, exc.strerror)
            return False
        try:
            _fsync_dir(self.path.parent)
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_EXCL
                         | os.O_CLOEXEC, 0o600)
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            _fsync_dir(self.path.parent)
        except OSError as exc:
            self._broken = (f"cannot start a new audit segment {self.path} after closing "
                            f"{closed.name}: {exc.strerror} (restart the daemon)")
            return False
        os.close(self._fd)
        self._fd = fd
        log.info("audit log: closed segment %s (seq %d..%d)", closed.name, s.first, s.seq)
        s.end, s.first = 0, None
        return True

    def _write(self, lines: list[bytes], seq: int, prev: str, since: int) -> bool:
        """Append lines and fdatasync; roll back on failure (False, `_failed` says why)."""
        s = self.scan
        data = b"".join(lines)
        written = False
        try:
            view = memoryview(data)
            while view:
                n = os.write(self._fd, view)
                view = view[n:]
            written = True
            os.fdatasync(self._fd)
        except OSError as exc:
            reason = f"cannot write audit log {self.path}: {exc.strerror}"
            try:
                os.ftruncate(self._fd, s.end)
            except OSError:
                self._broken = reason + " (and cannot roll back: restart the daemon)"
            if written:
                # After a failed fsync the kernel may have dropped dirty pages: nothing written
                # since can be trusted to be on disk. Only a restart (which re-reads and
                # verifies the log) clears this.
                self._broken = reason + " (fsync failed: restart the daemon)"
            self._failed = reason
            return False
        if not lines:
            return True
        if s.first is None:
            s.first = s.seq + 1
        s.since_state = 0 if since == 0 and b'"state":"' in lines[-1] else \
            s.since_state + len(lines)
        s.seq, s.last_hash, s.end, s.since_checkpoint = seq, prev, s.end + len(data), since
        if b'"event":"checkpoint"' in data:  # recorded by the checkpoint just written
            self.unverified = self.adopted = None
        if self._fold is not None:
            for line in lines:
                if b'"event":"checkpoint"' not in line:
                    self._fold.apply(json.loads(line))
        return True


def _fsync_dir(path: Path) -> None:
    dfd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def _write_durably(path: Path, data: bytes) -> None:
    path.parent.mkdir(mode=0o700, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def show(entry: Mapping[str, Any]) -> str:
    """One line for a person: fixed fields first, then the rest, every value JSON-escaped."""
    head = f"{entry.get('seq')} {entry.get('time')} {entry.get('event')}"
    rest = " ".join(f"{k}={json.dumps(v, ensure_ascii=True)}" for k, v in sorted(entry.items())
                    if k not in ("seq", "time", "event", "prev", "hash", "sig"))
    return f"{head} {rest}".rstrip()


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
                       "them and adopt them (`signer audit adopt`){adopted}")
    return True, f"{label}: ok: seq 0..{v.seq}, {signed}{adopted}{tail}"
