"""State snapshots and the checkpoints that sign them, as start-up finds them: the last state
checkpoint whose snapshot is kept, read from the end of the log backwards, and whether it
really follows the entry before it (an earlier checkpoint copied to the end does not)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from signer import segments
from signer.audit.chain import MAX_LINE, canonical


def snapshot_path(snapshots: Path, seq: int) -> Path:
    return snapshots / f"{seq:0{segments.SEQ_DIGITS}d}.json"


def _is_state_checkpoint(line: bytes) -> bool:
    # A quote inside a value is always escaped (\"), so `"state":"` is only ever a key.
    return b'"event":"checkpoint"' in line and b'"state":"' in line


def last_state_checkpoint(segs: list[segments.Segment], snapshots: Path
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


def follows(before: bytes | None, checkpoint: Mapping[str, Any]) -> bool:
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
