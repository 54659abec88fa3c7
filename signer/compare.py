"""`signer audit compare LOCAL COPY`: the host's log against the copy kept off the host.

The chain and the checkpoints show that nobody without the audit key rewrote the log; they
cannot show that the log was cut right after a checkpoint (a valid, shorter log), nor that
root on the host, who can use the token, rewrote the tail and signed it again. The copy that
a collector received entry by entry as it was written can (control AUD-04). An entry is one
line of ASCII JSON with no control character (the writer escapes them), so it travels through
syslog unchanged as the message (`%msg%`); the copy is those lines, one per line, in the order
they arrived. Leading and trailing blanks (a syslog field separator) are ignored.

Findings, by the first sequence number where the two disagree (exit 1):
- `rewritten`: the same seq with a different entry hash in LOCAL and COPY (a tail rewritten
  with a recomputed chain, or cut and written again by a restarted daemon), or two different
  entries for one seq in COPY itself;
- `gap`: COPY misses entries that LOCAL holds before COPY's last one (lost in transport);
- `truncation`: COPY holds entries after LOCAL's end (LOCAL was cut);
- `damaged`: a COPY line that is not an entry whose hash matches its content (or, with the
  audit key, a checkpoint whose signature does not verify); `local-invalid`: LOCAL's own
  chain (or, with the key, a checkpoint) does not verify.
A damaged COPY line whose seq cannot be read is placed after the last good line before it.
So when root rewrites the host's log in place while the forwarder runs (the forwarder goes on
from its saved offset, mid-line, and the collector gets a cut line), the finding is the
host's rewrite at its first seq, not damage in transport: the cut line comes after it.

Findings that are not a disagreement, each with its own exit code (a collector script can
tell them apart; none of them is "consistent"):
- `empty-copy` (3): COPY holds no entry (from --from on): nothing was received, so nothing
  was compared;
- `lagging` (4): more than `max_lag` entries of LOCAL are not in COPY yet, or the oldest of
  them was written more than `max_lag_seconds` ago (its `time` against this machine's clock):
  entries that long in flight are a collector that stopped receiving, and a window in which
  the host's log could be cut before the copy has it (Decision 8);
- `local-head-missing` (5): LOCAL begins after seq `since` (0 unless --from): its oldest
  segments were deleted or moved. Segments archived on purpose are compared with --from set
  to LOCAL's first seq.
Consistent (exit 0) means exactly: LOCAL's chain verifies from `since` (and, with the key,
its checkpoints); COPY holds at least one entry; every entry COPY holds from `since` on is
byte-for-byte LOCAL's entry of that seq (same hash; repeats folded); COPY misses none of
LOCAL's entries up to COPY's last one; COPY holds nothing past LOCAL's end; and what LOCAL
holds past COPY's end (in flight) is within both lag bounds.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from signer import audit, segments

CONSISTENT = "consistent"
DEFAULT_MAX_LAG = 1000  # entries in flight: minutes of the busiest signing, seconds of rsyslog
DEFAULT_MAX_LAG_SECONDS = 600.0  # RELP delivers in well under a second when the link is up
# Exit status by kind: 0 consistent, 1 a disagreement, 2 usage (the CLI), 3.. the rest
EXIT = {CONSISTENT: 0, "rewritten": 1, "gap": 1, "truncation": 1, "damaged": 1,
        "local-invalid": 1, "empty-copy": 3, "lagging": 4, "local-head-missing": 5}


@dataclass
class Result:
    kind: str  # a key of EXIT
    first_seq: int | None
    message: str
    local_first: int | None = None
    local_last: int | None = None
    copy_first: int | None = None
    copy_last: int | None = None
    in_flight: int = 0

    @property
    def consistent(self) -> bool:
        return self.kind == CONSISTENT

    @property
    def exit_code(self) -> int:
        return EXIT[self.kind]

    def text(self) -> str:
        if self.consistent:
            return f"consistent: {self.message}"
        if EXIT[self.kind] != 1:
            return f"FINDING {self.kind}: {self.message}"
        return f"FINDING {self.kind}: first differing seq {self.first_seq}: {self.message}"

    def json(self) -> str:
        return json.dumps({"result": CONSISTENT if self.consistent else "finding",
                           **asdict(self)}, sort_keys=True)


@dataclass
class _Copy:
    hashes: dict[int, str]
    conflict: int | None = None  # first seq seen twice with different entries
    # (seq if known, else the seq after the last good line before it; line number; why)
    damaged: tuple[int, int, str] | None = None


def read_copy(path: Path, spki: bytes | None, since: int) -> _Copy:
    """The collector's file: seq -> entry hash, as first received. A duplicate of an entry
    already received (a retransmission) is harmless; a second, different entry for the same
    seq is itself a finding."""
    out = _Copy({})
    after = since  # where a damaged line whose seq cannot be read is placed
    with path.open("rb") as f:
        for number, raw in enumerate(f, 1):
            line = raw.strip()
            if not line:
                continue
            seq, why = _check_line(line, spki)
            if why is not None:
                if out.damaged is None:
                    out.damaged = (seq if seq is not None else after, number, why)
                continue
            assert seq is not None
            after = max(after, seq + 1)
            if seq < since:
                continue
            digest = json.loads(line)["hash"]
            known = out.hashes.setdefault(seq, digest)
            if known != digest and (out.conflict is None or seq < out.conflict):
                out.conflict = seq
    return out


def _check_line(line: bytes, spki: bytes | None) -> tuple[int | None, str | None]:
    try:
        entry = json.loads(line.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        return None, "not a JSON entry (cut or altered in transport?)"
    if not isinstance(entry, dict):
        return None, "not a JSON object"
    seq = entry.get("seq")
    if not isinstance(seq, int) or isinstance(seq, bool):
        return None, "no sequence number"
    claimed = entry.pop("hash", None)
    if claimed != hashlib.sha256(audit.canonical(entry)).hexdigest():
        return seq, "its hash does not match its content"
    entry["hash"] = claimed
    if spki is not None and entry.get("event") == "checkpoint":
        try:
            audit.Verifier(spki)._checkpoint(entry)
        except audit.ChainError as exc:
            return seq, exc.reason
    return seq, None


def compare(local: list[Path], copy: Path, spki: bytes | None = None, since: int = 0,
            max_lag: int = DEFAULT_MAX_LAG, max_lag_seconds: float = DEFAULT_MAX_LAG_SECONDS,
            now: float | None = None) -> Result:
    """LOCAL (segments, as `audit verify` takes them) against COPY (see the module's
    docstring for the findings). OSError/ValueError when either cannot be read (the caller's
    usage error)."""
    segs = segments.resolve(local)
    if not any(s.path.exists() for s in segs):
        raise FileNotFoundError(f"{local[0]}: no such log")
    c = read_copy(copy, spki, since)
    copy_first = min(c.hashes) if c.hashes else None
    copy_last = max(c.hashes) if c.hashes else None
    v = audit.Verifier(spki)
    local_first: int | None = None
    first_in_flight: dict[str, Any] | None = None  # LOCAL's oldest entry not in COPY yet
    finding: tuple[str, int, str] | None = None
    gap_from: int | None = None
    seg: segments.Segment | None = None
    try:
        for seg in segs:
            for _off, line in segments.lines(seg, 0, audit.MAX_LINE + 1):
                entry = v.feed(line) if local_first is not None or seg.first is None \
                    else _feed_first(v, line)
                seq = entry["seq"]
                if local_first is None:
                    local_first = seq
                if seq < since:
                    continue
                if copy_last is None or seq > copy_last:
                    if first_in_flight is None:
                        first_in_flight = entry
                    continue  # not there yet: in flight
                theirs = c.hashes.get(seq)
                if theirs is None:
                    if gap_from is None:
                        gap_from = seq
                    continue
                if gap_from is not None:
                    finding = ("gap", gap_from, f"COPY misses seq {gap_from}..{seq - 1} that "
                               f"LOCAL holds, before COPY's last entry (seq {copy_last}): lost "
                               "between the host and the collector")
                    break
                if theirs != entry["hash"]:
                    finding = ("rewritten", seq, f"LOCAL and COPY hold different entries "
                               f"for seq {seq}: the host's log from there on is not what the "
                               "host sent as it was written (rewritten on the host, with a "
                               "recomputed chain, or cut and written again)")
                    break
            if finding:
                break
    except audit.ChainError as exc:
        return Result("local-invalid", exc.seq, f"LOCAL's chain is broken"
                      f"{f' in segment {seg}' if seg is not None else ''}: {exc.reason}",
                      local_first, v.seq if v.seq >= 0 else None, copy_first, copy_last)
    local_last = v.seq if v.seq >= 0 else None
    if finding is None and gap_from is not None:
        finding = ("gap", gap_from, f"COPY misses seq {gap_from}..{local_last} that LOCAL "
                   f"holds, before COPY's last entry (seq {copy_last}): lost between the host "
                   "and the collector")
    lo = local_last if local_last is not None else since - 1
    candidates: list[tuple[str, int, str]] = []
    if finding:
        candidates.append(finding)
    if c.conflict is not None:
        candidates.append(("rewritten", c.conflict, f"COPY holds two different entries for "
                           f"seq {c.conflict}: the host wrote that seq twice (its log was cut "
                           "and written again)"))
    if c.damaged is not None:
        dseq, number, why = c.damaged
        candidates.append(("damaged", dseq, f"COPY line {number}: {why}"))
    if local_first is not None and local_first > since:
        candidates.append(("local-head-missing", since, f"LOCAL begins at seq {local_first}: "
                           f"seq {since}..{local_first - 1} are not in it (its oldest segments "
                           "deleted or moved); if they were archived on purpose, compare "
                           f"with --from {local_first}"))
    if copy_last is not None and copy_last > lo:
        beyond = min(s for s in c.hashes if s > lo)
        candidates.append(("truncation", beyond, f"COPY holds seq {beyond}..{copy_last} "
                           f"beyond LOCAL's end (seq {local_last}): LOCAL was cut"
                           + (" right after a checkpoint" if v.last_event == "checkpoint"
                              else "")))
    if candidates:
        # At the same seq a disagreement with LOCAL explains a damaged line, not the reverse.
        kind, seq, message = min(candidates, key=lambda x: (x[1], x[0] == "damaged"))
        if kind == "rewritten" and c.damaged is not None and c.damaged[0] > seq:
            message += (f"; COPY line {c.damaged[1]} after it is damaged too ({c.damaged[2]}),"
                        " as a forwarder that reads a file rewritten in place from its saved "
                        "offset sends a cut line")
        return Result(kind, seq, message, local_first, local_last, copy_first, copy_last)
    in_flight = (local_last - copy_last if copy_last is not None else
                 local_last - max(since, local_first or 0) + 1) if local_last is not None else 0
    where = (f"LOCAL seq {_span(local_first, local_last)}, COPY seq "
             f"{_span(copy_first, copy_last)}")
    in_flight = max(in_flight, 0)
    if not c.hashes:
        return Result("empty-copy", None, f"{where}: COPY holds no entry"
                      f"{f' from seq {since} on' if since else ''}, so nothing was compared "
                      f"(is the collector receiving?); {in_flight} entries of LOCAL not in it",
                      local_first, local_last, copy_first, copy_last, in_flight)
    if in_flight > 0 and local_last is not None:
        message = (f"{where}; {in_flight} entries in flight (seq "
                   f"{local_last - in_flight + 1}..{local_last}, not yet in COPY)")
    else:
        message = f"{where}; COPY holds every entry of LOCAL"
    age = _age(first_in_flight, time.time() if now is None else now)
    if in_flight > max_lag or age > max_lag_seconds:
        return Result("lagging", None if first_in_flight is None else first_in_flight["seq"],
                      f"{message}: more than the bound of {max_lag} entries or "
                      f"{max_lag_seconds:g} s (the oldest was written {age:.0f} s ago): the "
                      "collector is not receiving, and the host's log could be cut before "
                      "the copy has it", local_first, local_last, copy_first, copy_last,
                      in_flight)
    return Result(CONSISTENT, None, message, local_first, local_last, copy_first, copy_last,
                  in_flight)


def _age(entry: dict[str, Any] | None, now: float) -> float:
    """Seconds since `entry` was written (0 for none, or an unreadable time: the count bound
    still applies)."""
    if entry is None:
        return 0.0
    try:
        return max(0.0, now - audit.parse_time(str(entry["time"])))
    except (KeyError, ValueError):
        return 0.0


def _feed_first(v: audit.Verifier, line: bytes) -> dict[str, Any]:
    """The first entry of a list of segments that does not begin at seq 0 (older segments
    archived elsewhere): the chain is checked from there on."""
    try:
        head = json.loads(line)
        v.seq, v.last_hash = int(head["seq"]) - 1, str(head["prev"])
    except (ValueError, KeyError, TypeError):
        pass
    return v.feed(line)


def _span(a: int | None, b: int | None) -> str:
    return "none" if a is None or b is None else f"{a}..{b}"
