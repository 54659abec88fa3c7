"""The audit log's writer, the I/O edge: entries committed in groups, one `fdatasync` per group
(group commit), checkpoints signed by the audit key, state checkpoints with their snapshots, and
rotation into segments. A failed write is rolled back (ftruncate) so the chain never carries a
torn entry; if even that fails, or fsync fails (the page cache can no longer be trusted), the
writer turns itself off and every later append fails: the daemon fails closed."""

from __future__ import annotations

import base64
import fcntl
import hashlib
import json
import logging
import os
import threading
import time as _time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from signer import segments
from signer.audit.chain import MAX_LINE, body, checkpoint_message, format_time, parse_time, seal
from signer.audit.reader import Scan
from signer.audit.snapshots import snapshot_path
from signer.errors import Exit, SignerError

log = logging.getLogger("signerd")

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
