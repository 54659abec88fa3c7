"""Audit log segments: where they live, in what order, and how to read them (gzip too).

The active segment keeps the configured path (`audit.jsonl`), so a log shipper (rsyslog
`imfile`) follows one stable name. A closed segment is renamed next to it, named after the
sequence number of its first entry: `audit.000000001000.jsonl`, and may later be compressed
(`audit.000000001000.jsonl.gz`, `gzip` or logrotate; never the active one). The name is only a
hint for ordering: the chain decides (each segment's first entry carries the previous
segment's last hash, and a reader checks that the first seq equals the name).

Siblings next to the active file, not a directory of their own: a rename within one directory
is atomic, so rotation has no moment where an entry is in two files or in none, and the daemon
needs no second writable directory (its unit's `ReadWritePaths` stays the log's directory).
"""

from __future__ import annotations

import gzip
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

SEQ_DIGITS = 12
_CLOSED = re.compile(r"^(?P<stem>.+?)\.(?P<seq>\d{12})(?P<ext>(\.[^.]+)?)(?P<gz>\.gz)?$")
BLOCK = 1 << 20


@dataclass(frozen=True)
class Segment:
    path: Path
    first: int | None  # from the name (closed); None for the active segment
    active: bool = False

    @property
    def compressed(self) -> bool:
        return self.path.name.endswith(".gz")

    def open(self) -> IO[bytes]:
        if self.compressed:
            return gzip.GzipFile(self.path, "rb")  # type: ignore[return-value]
        return self.path.open("rb")

    def __str__(self) -> str:
        return self.path.name


def closed_name(active: Path, first: int) -> Path:
    """Where the active segment goes when it is closed: `<stem>.<first seq, 12 digits><ext>`."""
    return active.with_name(f"{active.stem}.{first:0{SEQ_DIGITS}d}{active.suffix}")


def _closed_of(active: Path, name: str) -> int | None:
    m = _CLOSED.match(name)
    if m is None or m["stem"] != active.stem or m["ext"] != active.suffix:
        return None
    return int(m["seq"])


def closed_segments(active: Path) -> list[Segment]:
    """The closed siblings of an active log path, oldest first. When a segment exists both
    plain and compressed (a `gzip` cut short), the plain one is read: it is the original."""
    found: dict[int, Segment] = {}
    try:
        names = os.listdir(active.parent)
    except FileNotFoundError:
        return []
    for name in names:
        first = _closed_of(active, name)
        if first is None:
            continue
        seg = Segment(active.parent / name, first)
        if first not in found or found[first].compressed:
            found[first] = seg
    return [found[k] for k in sorted(found)]


def of_log(active: Path) -> list[Segment]:
    """Every segment of the log whose active file is `active` (which may not exist yet)."""
    segs = closed_segments(active)
    if active.exists():
        segs.append(Segment(active, None, active=True))
    return segs


def resolve(paths: list[Path]) -> list[Segment]:
    """What a reviewer names on the command line, as one ordered list of segments: a
    directory (the one log in it: closed segments and the active file), the active file (its
    closed siblings are found next to it), or closed segment files one by one (ordered by the
    seq in their names). ValueError for a directory with no log or with two."""
    out: list[Segment] = []
    for p in paths:
        m = _CLOSED.match(p.name)
        if p.is_dir():
            out += _of_dir(p)
        elif m is not None:
            out.append(Segment(p, int(m["seq"])))
        else:
            out += of_log(p) if p.exists() else [*closed_segments(p), Segment(p, None, True)]
    seen: dict[Path, Segment] = {s.path: s for s in out}
    closed = sorted((s for s in seen.values() if not s.active), key=lambda s: s.first or 0)
    return closed + [s for s in seen.values() if s.active]


def _of_dir(d: Path) -> list[Segment]:
    stems = set()
    for name in os.listdir(d):
        m = _CLOSED.match(name)
        if m is not None:
            stems.add(m["stem"] + m["ext"])
    if not stems:
        logs = [n for n in os.listdir(d) if n.endswith(".jsonl")]
        if len(logs) != 1:
            raise ValueError(f"{d}: no audit log segments in it")
        stems = {logs[0]}
    if len(stems) > 1:
        raise ValueError(f"{d}: segments of more than one log ({', '.join(sorted(stems))}): "
                         "name the active file")
    return of_log(d / stems.pop())


def lines(seg: Segment, start: int = 0, limit: int = -1) -> Iterator[tuple[int, bytes]]:
    """(offset after the line, line) from `start` (an offset in the uncompressed stream);
    a line is cut at `limit` bytes, the last one possibly without its newline."""
    with seg.open() as f:
        if start:
            f.seek(start)
        offset = start
        while True:
            line = f.readline(limit)
            if not line:
                return
            offset += len(line)
            yield offset, line


def reverse_lines(path: Path, end: int) -> Iterator[tuple[int, bytes]]:
    """Complete lines of a plain file before offset `end`, last first, as (offset after the
    line, line); an incomplete last line is skipped. Reads backwards in blocks: finding the
    last checkpoint costs what lies after it, not the size of the file."""
    with path.open("rb") as f:
        pos = end  # buf holds the file's bytes from pos
        buf = b""
        hi = -1  # buf[:hi] ends with the newline of the next line to yield (-1: not found yet)
        while True:
            if hi < 0:
                i = buf.rfind(b"\n")
                if i >= 0:
                    hi = i + 1
            if hi >= 0:
                j = buf.rfind(b"\n", 0, hi - 1)
                if j >= 0:
                    yield pos + hi, buf[j + 1:hi]
                    hi = j + 1
                    continue
                if pos == 0:
                    yield hi, buf[:hi]
                    return
            elif pos == 0:
                return
            n = min(BLOCK, pos)
            pos -= n
            f.seek(pos)
            head = f.read(n)
            if hi >= 0:
                buf, hi = head + buf[:hi], hi + len(head)
            else:
                buf = head + buf
