"""`signer audit compare LOCAL COPY`: the host's log against the copy kept off the host.

The chain and the checkpoints show that nobody without the audit key rewrote the log; they
cannot show that the log was cut right after a checkpoint (a valid, shorter log), nor that
root on the host, who can use the token, rewrote the tail and signed it again. The copy that
a collector received entry by entry as it was written can (control AUD-04). An entry is one
line of ASCII JSON with no control character (the writer escapes them), so it travels through
syslog unchanged as the message (`%msg%`); the copy is those lines, one per line, in the order
they arrived. Leading and trailing blanks (a syslog field separator) are ignored.

Findings, by the first sequence number where the two disagree:
- `rewritten`: the same seq with a different entry hash in LOCAL and COPY (a tail rewritten
  with a recomputed chain, or cut and written again by a restarted daemon), or two different
  entries for one seq in COPY itself;
- `gap`: COPY misses entries that LOCAL holds before COPY's last one (lost in transport);
- `truncation`: COPY holds entries after LOCAL's end (LOCAL was cut);
- `damaged`: a COPY line that is not an entry whose hash matches its content (or, with the
  audit key, a checkpoint whose signature does not verify); `local-invalid`: LOCAL's own
  chain (or, with the key, a checkpoint) does not verify.
COPY lagging behind LOCAL (entries still on their way) is consistent: the count is reported.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from signer import audit, segments

CONSISTENT = "consistent"


@dataclass
class Result:
    kind: str  # consistent | rewritten | gap | truncation | damaged | local-invalid
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

    def text(self) -> str:
        if self.consistent:
            return f"consistent: {self.message}"
        return f"FINDING {self.kind}: first differing seq {self.first_seq}: {self.message}"

    def json(self) -> str:
        return json.dumps({"result": CONSISTENT if self.consistent else "finding",
                           **asdict(self)}, sort_keys=True)


@dataclass
class _Copy:
    hashes: dict[int, str]
    conflict: int | None = None  # first seq seen twice with different entries
    damaged: tuple[int | None, int, str] | None = None  # (seq if known, line number, why)


def read_copy(path: Path, spki: bytes | None, since: int) -> _Copy:
    """The collector's file: seq -> entry hash, as first received. A duplicate of an entry
    already received (a retransmission) is harmless; a second, different entry for the same
    seq is itself a finding."""
    out = _Copy({})
    with path.open("rb") as f:
        for number, raw in enumerate(f, 1):
            line = raw.strip()
            if not line:
                continue
            seq, why = _check_line(line, spki)
            if why is not None:
                if out.damaged is None:
                    out.damaged = (seq, number, why)
                continue
            assert seq is not None
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


def compare(local: list[Path], copy: Path, spki: bytes | None = None, since: int = 0
            ) -> Result:
    """LOCAL (segments, as `audit verify` takes them) against COPY. OSError/ValueError when
    either cannot be read (the caller's usage error)."""
    segs = segments.resolve(local)
    if not any(s.path.exists() for s in segs):
        raise FileNotFoundError(f"{local[0]}: no such log")
    c = read_copy(copy, spki, since)
    copy_first = min(c.hashes) if c.hashes else None
    copy_last = max(c.hashes) if c.hashes else None
    v = audit.Verifier(spki)
    local_first: int | None = None
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
                               f"for seq {seq}: LOCAL's log from there on is not what the "
                               "host sent as it was written (rewritten with a recomputed chain, "
                               "or cut and written again)")
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
        candidates.append(("damaged", dseq if dseq is not None else -1,
                           f"COPY line {number}: {why}"))
    if copy_last is not None and copy_last > lo:
        beyond = min(s for s in c.hashes if s > lo)
        candidates.append(("truncation", beyond, f"COPY holds seq {beyond}..{copy_last} "
                           f"beyond LOCAL's end (seq {local_last}): LOCAL was cut"
                           + (" right after a checkpoint" if v.last_event == "checkpoint"
                              else "")))
    if candidates:
        kind, seq, message = min(candidates, key=lambda x: x[1])
        return Result(kind, seq if seq >= 0 else None, message, local_first, local_last,
                      copy_first, copy_last)
    in_flight = (local_last - copy_last if copy_last is not None else
                 local_last - max(since, local_first or 0) + 1) if local_last is not None else 0
    where = (f"LOCAL seq {_span(local_first, local_last)}, COPY seq "
             f"{_span(copy_first, copy_last)}")
    if in_flight > 0 and local_last is not None:
        message = (f"{where}; {in_flight} entries in flight (seq "
                   f"{local_last - in_flight + 1}..{local_last}, not yet in COPY)")
    else:
        message = f"{where}; COPY holds every entry of LOCAL"
    return Result(CONSISTENT, None, message, local_first, local_last, copy_first, copy_last,
                  max(in_flight, 0))


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
